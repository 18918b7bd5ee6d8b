"""Start-up: --help, settings from the environment and flags, and clear one-line errors for bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.config import ConfigError, Settings, env_name, flag_name
from server.http.connections import HttpProtocol
from testing.live_server import ROOT, free_port


def run(args: list[str], env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    """`args` with this environment, less its LOGPROBS_* variables, plus `env`."""
    inherited = {name: value for name, value in os.environ.items() if not name.upper().startswith("LOGPROBS_")}
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**inherited, **(env or {})}
    )


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "server", *args], env)


def uvicorn(env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "uvicorn", "server.app:app", "--port", str(free_port())], env)


@pytest.fixture
def clean_env(monkeypatch):
    """No LOGPROBS_* variables from the caller's environment."""
    for name in list(os.environ):
        if name.upper().startswith("LOGPROBS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_help_explains_every_setting():
    out = cli("--help", env={"LOGPROBS_N_CTX": "4096", "COLUMNS": "10000"})  # no wrapping
    assert out.returncode == 0
    for name, field in Settings.model_fields.items():
        assert flag_name(name) in out.stdout and f"{field.description} [env {env_name(name)}" in out.stdout
    assert "--backend {gguf,mlx}" in out.stdout and "--kv-cache-type {f32,f16}" in out.stdout
    assert "[env LOGPROBS_N_CTX; default: 0; now: 4096]" in out.stdout


def test_settings_from_environment(clean_env):
    clean_env.setenv("LOGPROBS_N_CTX", "4096")
    clean_env.setenv("LOGPROBS_MODEL", "/m.gguf")
    clean_env.setenv("LOGPROBS_MAX_LOGPROBS", "5")
    clean_env.setenv("LOGPROBS_BACKEND", "mlx")
    clean_env.setenv("LOGPROBS_MODEL_NAME", "")  # empty: not set
    clean_env.setenv("LOGPROBS_NOT_A_SETTING", "1")  # unknown: ignored, not fatal
    settings = Settings.load()
    assert (settings.n_ctx, settings.model, settings.max_logprobs, settings.backend) == (4096, "/m.gguf", 5, "mlx")
    assert settings.model_name is None and settings.n_batch == 512

    clean_env.setenv("LOGPROBS_N_CTX", "big")
    with pytest.raises(ConfigError, match=r"^LOGPROBS_N_CTX=big: Input should be a valid integer"):
        Settings.load()


def test_overrides_win_over_environment(clean_env):
    clean_env.setenv("LOGPROBS_N_CTX", "big")  # replaced by the override, so never an error
    clean_env.setenv("LOGPROBS_MAX_LOGPROBS", "5")
    settings = Settings.load(n_ctx="128")
    assert (settings.n_ctx, settings.max_logprobs) == (128, 5)
    with pytest.raises(ConfigError, match=r"^--n-batch 0: Input should be greater than or equal to 1$"):
        Settings.load(n_ctx="128", n_batch="0")


def test_cli_passes_settings_to_the_app(clean_env):
    """Flags over the environment, handed to create_app and uvicorn as objects: the environment is untouched."""
    import uvicorn as uvicorn_module

    import server.app
    from server.cli import main

    clean_env.setenv("LOGPROBS_N_CTX", "4096")
    clean_env.setenv("LOGPROBS_PORT", "9123")
    made, served = [], []
    clean_env.setattr(server.app, "create_app", lambda settings, **found: made.append(settings) or "the app")
    clean_env.setattr(uvicorn_module, "run", lambda app, **kwargs: served.append((app, kwargs)))
    main(["--n-ctx", "128", "--log-level", "DEBUG", "--backend", "gguf", "--request-read-timeout", "7.5"])

    [settings] = made
    assert (settings.n_ctx, settings.port, settings.log_level, settings.backend) == (128, 9123, "debug", "gguf")
    [(app, kwargs)] = served
    protocol = kwargs.pop("http")  # the connection's protocol, carrying --request-read-timeout
    assert (app, kwargs) == (
        "the app",
        {"host": "127.0.0.1", "port": 9123, "log_level": "debug", "timeout_graceful_shutdown": 30.0},
    )
    assert issubclass(protocol, HttpProtocol) and protocol.read_timeout == 7.5
    assert os.environ["LOGPROBS_N_CTX"] == "4096" and "LOGPROBS_LOG_LEVEL" not in os.environ


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--max-sequences", "0"], {}, "--max-sequences 0: Input should be greater than or equal to 1"),
        (["--backend", "onnx"], {}, "--backend onnx: Input should be 'gguf' or 'mlx'"),
        (
            [],
            {"LOGPROBS_N_CTX": "big"},
            "LOGPROBS_N_CTX=big: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            [],
            {"LOGPROBS_N_BATCH": "0", "LOGPROBS_KV_CACHE_TYPE": "f8"},
            "LOGPROBS_N_BATCH=0: Input should be greater than or equal to 1; "
            "LOGPROBS_KV_CACHE_TYPE=f8: Input should be 'f32' or 'f16'",
        ),
    ],
)
def test_bad_value_is_one_clear_line(args, env, expected):
    out = cli(*args, env=env)
    assert out.returncode != 0
    assert out.stderr.splitlines() == [f"logprobs-server: error: {expected}"]


def test_bad_environment_through_uvicorn_is_one_clear_line():
    served = uvicorn({"LOGPROBS_N_BATCH": "0"})
    assert served.returncode != 0
    assert "Traceback" not in served.stderr
    assert (
        served.stderr.splitlines()[-1]
        == "logprobs-server: error: LOGPROBS_N_BATCH=0: Input should be greater than or equal to 1"
    )


@pytest.mark.parametrize("kind", ["missing", "not gguf", "folder"])
def test_bad_model_path_is_one_clear_line(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "not gguf":
        path.write_text("this is not a model")
    elif kind == "folder":
        path = tmp_path
    expected = {"missing": "does not exist", "not gguf": "is not a GGUF file", "folder": "is a folder"}[kind]

    out = cli("--model", str(path))
    assert out.returncode != 0
    assert expected in out.stderr and "Traceback" not in out.stderr

    # The same through `uvicorn server.app:app`, configured by environment variables.
    served = uvicorn({"LOGPROBS_MODEL": str(path)})
    assert served.returncode != 0
    assert expected in served.stderr and "Traceback" not in served.stderr


@pytest.mark.parametrize("entry", ["server.app", "server.cli"])
def test_entry_points_load_llama_cpp_before_numpy(entry):
    """On a CUDA build, a process that had loaded numpy before llama_cpp crashed loading a model
    (issue 13); each entry point's first import (the server package) loads llama.cpp first.
    (server.serve_ray too, which needs Ray, not installed by `make setup`.)"""
    probe = (
        f"import sys, {entry}; names = list(sys.modules); "
        "print(names.index('llama_cpp.llama_cpp'), names.index('numpy'))"
    )
    result = run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    llama_at, numpy_at = map(int, result.stdout.split())
    assert llama_at < numpy_at, f"{entry}: numpy was imported before llama.cpp's library"


def test_the_backend_setting_offers_every_registered_kind():
    """--backend's choices (declared with the settings) are the registry's kinds, no more, no less."""
    from typing import get_args

    from server.backends import KINDS

    annotation = Settings.model_fields["backend"].annotation
    choices = {arg for member in get_args(annotation) for arg in get_args(member)}
    assert choices == set(KINDS)
