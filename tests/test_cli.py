"""Start-up: --help, settings from the environment, and clear one-line errors for bad model paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.config import ConfigError, Settings
from tests.conftest import ROOT, free_port


def run(args: list[str], env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_explains_every_setting():
    out = run([sys.executable, "-m", "server", "--help"])
    assert out.returncode == 0
    for flag, env in [("--model", "LOGPROBS_MODEL"), ("--n-ctx", "LOGPROBS_N_CTX"),
                      ("--n-threads", "LOGPROBS_N_THREADS"), ("--max-logprobs", "LOGPROBS_MAX_LOGPROBS"),
                      ("--model-name", "LOGPROBS_MODEL_NAME"), ("--backend", "LOGPROBS_BACKEND")]:
        assert flag in out.stdout and env in out.stdout


def test_settings_from_environment():
    settings = Settings.from_env({"LOGPROBS_N_CTX": "4096", "LOGPROBS_MODEL": "/m.gguf", "LOGPROBS_MAX_LOGPROBS": "5"})
    assert (settings.n_ctx, settings.model, settings.max_logprobs) == (4096, "/m.gguf", 5)
    with pytest.raises(ConfigError, match="LOGPROBS_N_CTX"):
        Settings.from_env({"LOGPROBS_N_CTX": "big"})


@pytest.mark.parametrize("kind", ["missing", "not gguf", "folder"])
def test_bad_model_path_is_one_clear_line(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "not gguf":
        path.write_text("this is not a model")
    elif kind == "folder":
        path = tmp_path
    expected = {"missing": "does not exist", "not gguf": "is not a GGUF file", "folder": "is a folder"}[kind]

    cli = run([sys.executable, "-m", "server", "--model", str(path)])
    assert cli.returncode != 0
    assert expected in cli.stderr and "Traceback" not in cli.stderr

    # The same through `uvicorn server.app:app`, configured by environment variables.
    served = run([sys.executable, "-m", "uvicorn", "server.app:app", "--port", str(free_port())],
                 env={"LOGPROBS_MODEL": str(path)})
    assert served.returncode != 0
    assert expected in served.stderr and "Traceback" not in served.stderr
