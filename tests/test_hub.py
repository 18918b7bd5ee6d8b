"""Models by Hugging Face Hub name, offline: a real Hub cache laid out in a temporary HF_HOME the way
huggingface_hub writes it (models--ORG--NAME/blobs/SHA256, snapshots/COMMIT/FILE as links to the
blobs, refs/main), holding the fixture models (F32, Q8_0 and Q4_K_M GGUF files of the two-block
SmolLM2, a GGUF split in two, and the MLX folder). With HF_HUB_OFFLINE=1 each is served by name
through the real CLI; the server process runs with every non-loopback connection refused and
recorded, and with proxies pointing at a closed loopback port, and none may be attempted."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from testing.fixture_model import quantize, write_split
from testing.live_server import ROOT
from tests.conftest import FIXTURE_NAME, serve

pytestmark = pytest.mark.slow  # a dozen servers of the fixture model: about a minute

OLD, NEW = "a" * 40, "b" * 40  # two commits of the GGUF repo
SPLIT_COMMIT, MLX_COMMIT = "c" * 40, "d" * 40
GGUF_REPO, SPLIT_REPO, MLX_REPO = (
    "testorg/smollm2-2block-GGUF",
    "testorg/smollm2-2block-split-GGUF",
    "testorg/smollm2-2block-mlx",
)
TAMPERED_REPO = "testorg/tampered-GGUF"
PROMPT = [[1, 504, 3458, 282, 4649, 314, 7042]]  # token ids: the same tokens whatever the model file

# Refuses, and records, any connection to a non-loopback address from the server process.
GUARD = """
import ipaddress, os, socket
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
def _loopback(address):
    if not isinstance(address, tuple):
        return True  # a Unix socket
    host = address[0]
    try:
        return host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
def _guard(address):
    if not _loopback(address):
        with open(os.environ["NET_GUARD_LOG"], "a") as log:
            log.write(f"{address!r}\\n")
        raise OSError("test: no network while HF_HUB_OFFLINE=1")
def connect(self, address):
    _guard(address)
    return _connect(self, address)
def connect_ex(self, address):
    _guard(address)
    return _connect_ex(self, address)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()) -> None:
    """One commit of a repo in huggingface_hub's cache layout: each file's content in blobs/ under
    its sha256 (an LFS file's etag), the snapshot's files as relative links to the blobs."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for name, source in files.items():
        blob = root / "blobs" / sha256(source)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def files(fixture_paths, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("hub-files")
    f32 = fixture_paths["gguf"]
    return {
        "F32": f32,
        "Q8_0": quantize(f32, work / "q8_0.gguf", "Q8_0"),
        "Q4_K_M": quantize(f32, work / "q4_k_m.gguf", "Q4_K_M"),
        "split": write_split(f32, work / "smollm2-2block-F32.gguf"),
    }


@pytest.fixture(scope="module")
def hub(files, fixture_paths, tmp_path_factory) -> dict[str, str]:
    """HF_HOME with the three repos; the environment of an offline, network-guarded server."""
    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    add_snapshot(cache, GGUF_REPO, OLD, {"smollm2-2block-F32.gguf": files["F32"], "README.md": ROOT / "README.md"})
    add_snapshot(
        cache,
        GGUF_REPO,
        NEW,
        {
            "smollm2-2block-F32.gguf": files["F32"],
            "smollm2-2block-Q8_0.gguf": files["Q8_0"],
            "smollm2-2block-Q4_K_M.gguf": files["Q4_K_M"],
        },
        refs=("main",),
    )
    add_snapshot(cache, SPLIT_REPO, SPLIT_COMMIT, {p.name: p for p in files["split"]}, refs=("main",))
    add_snapshot(
        cache, MLX_REPO, MLX_COMMIT, {p.name: p for p in sorted(fixture_paths["mlx"].iterdir())}, refs=("main",)
    )
    # A blob whose name (the Hub's sha256 for it) is not its content's: a damaged cache.
    add_snapshot(cache, TAMPERED_REPO, NEW, {"smollm2-2block-Q8_0.gguf": files["Q8_0"]}, refs=("main",))
    blob = next((cache / ("models--" + TAMPERED_REPO.replace("/", "--")) / "blobs").iterdir())
    blob.rename(blob.with_name("f" * 64))
    link = cache / ("models--" + TAMPERED_REPO.replace("/", "--")) / "snapshots" / NEW / "smollm2-2block-Q8_0.gguf"
    link.unlink()
    link.symlink_to(os.path.relpath(blob.with_name("f" * 64), link.parent))
    guard = home / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    return {
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "",
        "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "NET_GUARD_LOG": str(home / "connections.log"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }


@pytest.fixture(scope="module", autouse=True)
def no_network_was_tried(hub):
    yield
    log = Path(hub["NET_GUARD_LOG"])
    assert not log.exists(), f"non-loopback connections attempted while offline: {log.read_text()}"


@contextmanager
def served(model: str, tmp_path_factory, name: str, env: dict[str, str], *flags: str):
    """A live server of `model` (a Hub name), stopped afterwards."""
    gen = serve(model, tmp_path_factory, name, *flags, env=env)
    try:
        yield next(gen)
    finally:
        next(gen, None)


def model_card(server) -> dict:
    return requests.get(server.url + "/v1/models").json()["data"][0]


def echo(server) -> list[float]:
    body = server.complete(prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    return body["choices"][0]["logprobs"]["token_logprobs"]


@pytest.fixture(scope="module")
def by_path(files, tmp_path_factory) -> dict[str, list[float]]:
    """Each GGUF file's answers served by path, the reference for the same file served by name."""
    answers = {}
    for name in ("F32", "Q8_0", "Q4_K_M"):
        gen = serve(files[name], tmp_path_factory, f"path-{name}")
        answers[name] = echo(next(gen))
        next(gen, None)
    return answers


@pytest.mark.parametrize(
    "model, expected_file, commit, quant",
    [
        (f"{GGUF_REPO}:Q8_0", "smollm2-2block-Q8_0.gguf", NEW, "Q8_0"),
        (f"{GGUF_REPO}:q8_0", "smollm2-2block-Q8_0.gguf", NEW, "Q8_0"),  # tags match in any case
        (GGUF_REPO, "smollm2-2block-Q4_K_M.gguf", NEW, "Q4_K_M"),  # the default quantization
        (f"{GGUF_REPO}/smollm2-2block-F32.gguf", "smollm2-2block-F32.gguf", NEW, "F32"),
        (f"{GGUF_REPO}@{OLD}", "smollm2-2block-F32.gguf", OLD, "F32"),  # that commit's only .gguf
        (f"{GGUF_REPO}:F32@main", "smollm2-2block-F32.gguf", NEW, "F32"),
    ],
)
def test_a_gguf_repo_by_name_serves_the_chosen_file(
    hub, files, by_path, tmp_path_factory, model, expected_file, commit, quant
):
    with served(model, tmp_path_factory, "hub", hub) as server:
        assert echo(server) == by_path[quant]  # the same floats as the file served by path
        card = model_card(server)
        assert card["id"] == model
        parts = card["fingerprint"]
        assert parts["hub_repo"] == GGUF_REPO and parts["hub_commit"] == commit
        assert parts["hub_weights_sha256"] == f"{expected_file}={sha256(files[quant])}"
        assert parts["model_sha256"] == sha256(files[quant])
        assert f"{expected_file} (1 file(s)" in server.log()  # the log line says what was taken


def test_a_split_gguf_is_loaded_from_its_first_part(hub, files, by_path, tmp_path_factory):
    with served(SPLIT_REPO, tmp_path_factory, "hub-split", hub) as server:
        assert echo(server) == by_path["F32"]
        weights = model_card(server)["fingerprint"]["hub_weights_sha256"]
        assert weights == ",".join(f"{p.name}={sha256(p)}" for p in files["split"])


def test_an_mlx_repo_by_name_equals_the_folder_by_path(hub, fixture_paths, mlx_fixture_server, tmp_path_factory):
    pytest.importorskip("mlx_lm")
    with served(MLX_REPO, tmp_path_factory, "hub-mlx", hub, "--model-name", FIXTURE_NAME) as server:
        assert echo(server) == echo(mlx_fixture_server)
        parts = model_card(server)["fingerprint"]
        assert parts["backend"] == "mlx" and parts["hub_commit"] == MLX_COMMIT
        assert parts["hub_weights_sha256"] == f"model.safetensors={sha256(fixture_paths['mlx'] / 'model.safetensors')}"


def test_a_cached_file_whose_content_is_not_the_hubs_is_reported(hub, files, by_path, tmp_path_factory):
    with served(TAMPERED_REPO, tmp_path_factory, "hub-tampered", hub) as server:
        assert echo(server) == by_path["Q8_0"]  # served, with the file's own sha256 in the fingerprint
        weights = model_card(server)["fingerprint"]["hub_weights_sha256"]
        assert weights == f"smollm2-2block-Q8_0.gguf={sha256(files['Q8_0'])}"
        assert f"but the Hub names it {'f' * 64}" in server.log()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "testorg/not-cached"], ["not in the Hugging Face cache", "hf download testorg/not-cached"]),
        # One quantization or one file: the download suggested is that narrow, not the whole repository.
        (["--model", "testorg/not-cached:Q8_0"], ['hf download testorg/not-cached --include "*Q8_0*" (or']),
        (["--model", "testorg/not-cached/m.Q8_0.gguf"], ["hf download testorg/not-cached m.Q8_0.gguf (or"]),
        (
            ["--model", f"{GGUF_REPO}@v9"],
            ["revision 'v9' is not in the cache", f"hf download {GGUF_REPO} --revision v9"],
        ),
        (["--model", f"{GGUF_REPO}:Q5_K"], ["no file for the quantization Q5_K", "smollm2-2block-Q8_0.gguf"]),
        (["--model", f"{GGUF_REPO}/other.gguf"], ["has no file other.gguf", "smollm2-2block-F32.gguf"]),
        (["--model", f"{GGUF_REPO}@{OLD}:Q8_0"], ["Model path"]),  # :QUANT goes before @REVISION
        (["--model", GGUF_REPO, "--backend", "mlx"], ["not an MLX model", "drop --backend mlx"]),
        (["--model", MLX_REPO, "--backend", "gguf"], ["holds no .gguf file", "drop --backend gguf"]),
        (["--model", "./no/such/file.gguf"], ["Model path", "does not exist"]),
    ],
)
def test_errors_are_one_line_with_exit_status_2_before_any_model_loads(hub, args, words):
    result = subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **hub},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("logprobs-server: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_the_network_guard_catches_a_connection(hub, tmp_path):
    """The guard the servers above ran under does refuse and record a non-loopback connection."""
    log = tmp_path / "connections.log"
    result = subprocess.run(
        [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 443), 1)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **hub, "NET_GUARD_LOG": str(log)},
    )
    assert result.returncode != 0 and "no network while HF_HUB_OFFLINE=1" in result.stderr
    assert "192.0.2.1" in log.read_text()
