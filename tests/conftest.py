"""Shared fixtures: the default model, a live server on a loopback port, and the oracle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.config import Settings
from server.models.default_model import ensure_default_model
from testing.live_server import DATA, ROOT, SERVER_N_CTX, LiveServer


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_default_model(Settings().cache_path())


@pytest.fixture(scope="session")
def requantized_model_path(model_path) -> Path:
    """Another build of the default model: Q3_K_M requantized from the Q4_1 file (made once, in the
    cache folder). Its weight types (Q4_0, Q5_0 and Q4_K: the Q3_K_M recipe falls back to them for
    SmolLM2's 576-wide rows) go through llama.cpp's repacked CPU kernels, whose logits depend on how
    many tokens a forward pass holds (Q4_1 gives identical floats either way)."""
    from testing.fixture_model import quantize

    return quantize(model_path, model_path.with_name(model_path.stem + "-to-Q3_K_M.gguf"), "Q3_K_M")


# A shape whose rows take K-quants and llama.cpp's repacked kernels (1024 wide), random weights.
RANDOM_SHAPE = ["--n-embd", "1024", "--n-layer", "2", "--n-head", "16", "--n-head-kv", "4", "--n-ff", "2816"]


@pytest.fixture(scope="session")
def random_f16(model_path) -> Path:
    """RANDOM_SHAPE in F16 with the default model's tokenizer (made once, in the cache folder);
    quantize it with testing.fixture_model.quantize. Random weights give flat distributions, so
    any difference of floats shows (never use it for accuracy)."""
    folder = Settings().cache_path() / "fixtures"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "random-1024x2-F16.gguf"
    if not f16.exists():
        partial = f16.with_suffix(".partial")
        command = [sys.executable, str(ROOT / "bench" / "make_random_gguf.py"), "--tokenizer-from", str(model_path)]
        subprocess.run([*command, str(partial), *RANDOM_SHAPE], check=True, capture_output=True)
        partial.rename(f16)
    return f16


def serve(model: Path, tmp_path_factory, name: str, *flags: str, **options):
    """A live server for a fixture: yields it, stops it afterwards. `options`: LiveServer's env and ca."""
    live = LiveServer(
        model, tmp_path_factory.mktemp(name) / "server.log", "--n-ctx", str(SERVER_N_CTX), *flags, **options
    )
    yield live
    live.stop()


@pytest.fixture(scope="session")
def server(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "server", "--max-logprobs", "20")


@pytest.fixture(scope="session")
def oracle(model_path):
    from testing.oracle import LlamaOracle

    return LlamaOracle(str(model_path), n_ctx=SERVER_N_CTX)


def greedy_ids(oracle, tokens: list[int], max_tokens: int, stop: list[str] = ()) -> tuple[list[int], str]:
    """What a greedy request must generate, by the oracle's own argmax loop: the token ids (an
    end-of-generation token included, as the server reports it; a stop string's last token too)
    and the finish_reason: "stop" at an end-of-generation token or at the token that completes a
    stop string, else "length" after max_tokens tokens."""
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(int(np.argmax(oracle.logprob_matrix(tokens + out)[-1])))
        if oracle.is_end_of_generation(out[-1]) or any(s in oracle.detokenize(out) for s in stop):
            return out, "stop"
    return out, "length"


# -- the two-block fixture model, in both formats (testing/fixture_model.py) ------------------------

FIXTURE_NAME = "smollm2-2block"


def fixture_files(model_path: Path, add_bos: bool) -> dict[str, Path]:
    """The fixture's GGUF file and mlx folder (created once, cached), by backend."""
    from testing.fixture_model import make_fixture

    gguf, mlx = make_fixture(model_path, Settings().cache_path() / "fixtures", add_bos=add_bos)
    return {"gguf": gguf, "mlx": mlx}


@pytest.fixture(scope="session")
def fixture_paths(model_path) -> dict[str, Path]:
    return fixture_files(model_path, add_bos=False)


@pytest.fixture(scope="session")
def gguf_fixture_server(fixture_paths, tmp_path_factory):
    yield from serve(fixture_paths["gguf"], tmp_path_factory, "fixture-gguf", "--model-name", FIXTURE_NAME)


@pytest.fixture(scope="session")
def mlx_fixture_server(fixture_paths, tmp_path_factory):
    yield from serve(fixture_paths["mlx"], tmp_path_factory, "fixture-mlx", "--model-name", FIXTURE_NAME)


def serve_beside(request, tmp_path_factory, name: str, *flags: str):
    """For request.param "gguf" or "mlx": the session's server of that backend (SmolLM2 Q4_1 on
    llama.cpp, the two-block fixture on MLX) and a second server of the same model started with
    `flags`. Yields the pair; stops the second one afterwards."""
    if request.param == "gguf":
        first, model, model_flags = request.getfixturevalue("server"), request.getfixturevalue("model_path"), []
    else:
        pytest.importorskip("mlx_lm")
        first = request.getfixturevalue("mlx_fixture_server")
        model, model_flags = request.getfixturevalue("fixture_paths")["mlx"], ["--model-name", FIXTURE_NAME]
    second = serve(model, tmp_path_factory, f"{name}-{request.param}", *flags, *model_flags)
    yield first, next(second)
    next(second, None)


@pytest.fixture(params=["gguf", "mlx"])
def fixture_server(request):
    """The same fixture model served by each backend in turn (both stay up for the session)."""
    return request.getfixturevalue(f"{request.param}_fixture_server")


@pytest.fixture(scope="session")
def mlx_oracle(fixture_paths):
    from testing.oracle import MlxOracle

    return MlxOracle(str(fixture_paths["mlx"]))


@pytest.fixture(scope="session")
def numpy_reference(fixture_paths):
    from testing.numpy_llama import NumpyLlama

    return NumpyLlama(fixture_paths["mlx"])


# -- the same model with a tokenizer that adds BOS (like Gemma 3's and Llama's) -------------------

BOS_FIXTURE_NAME = "smollm2-2block-bos"


@pytest.fixture(scope="session")
def bos_fixture_paths(model_path) -> dict[str, Path]:
    return fixture_files(model_path, add_bos=True)


@pytest.fixture(scope="session", params=["gguf", "mlx"])
def bos_fixture_server(request, bos_fixture_paths, tmp_path_factory):
    """The BOS-adding fixture model served by each backend in turn."""
    if request.param == "mlx":
        pytest.importorskip("mlx_lm")
    yield from serve(
        bos_fixture_paths[request.param], tmp_path_factory, f"bos-{request.param}", "--model-name", BOS_FIXTURE_NAME
    )


@pytest.fixture(scope="session")
def bos_numpy_reference(bos_fixture_paths):
    """The float64 forward pass of the BOS fixture's folder (the same weights as the plain fixture)."""
    from testing.numpy_llama import NumpyLlama

    return NumpyLlama(bos_fixture_paths["mlx"])


# -- a server as other machines reach it: API keys and TLS (test_security.py, test_remote_lm_eval.py) --

API_KEYS = ("sk-test-first-key", "sk-test-second-key")  # --api-key, comma-separated
FILE_KEY = "sk-test-key-from-file"  # --api-key-file


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA (trustme) and the server certificate it signed for 127.0.0.1 and localhost."""
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server-key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    issued.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    return files


@pytest.fixture(scope="session")
def secure_server(model_path, tls_files, tmp_path_factory):
    """Served as the README's remote command does: all interfaces, API keys (two given, one from
    a file), HTTPS with the throwaway CA's certificate."""
    key_file = tls_files["ca"].parent / "api-keys.txt"
    key_file.write_text(f"# keys for the tests\n\n  {FILE_KEY}  \n")
    yield from serve(
        model_path,
        tmp_path_factory,
        "secure",
        "--host",
        "0.0.0.0",
        "--api-key",
        ",".join(API_KEYS),
        "--api-key-file",
        str(key_file),
        "--ssl-certfile",
        str(tls_files["cert"]),
        "--ssl-keyfile",
        str(tls_files["key"]),
        ca=str(tls_files["ca"]),
    )


def pytest_report_header(config):
    return f"data: {DATA} ({'present' if DATA.exists() else 'MISSING'}); cpus: {os.cpu_count()}"
