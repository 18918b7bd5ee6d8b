"""Stock lm-eval (0.4.13, `local-completions`) against a server with API keys and TLS, run as the
README tells a user on another machine to run it; without the key it fails at once, with a 401,
and the server goes on serving.

lm-eval sends the key in two places: OPENAI_API_KEY for /v1/completions, `auth_token` for its
remote tokenizer (/tokenizer_info, /tokenize, /detokenize). Its `ca_cert_path` reaches only the
tokenizer's requests; the completions go through requests (num_concurrent=1) or aiohttp
(num_concurrent>1) with the default trust store, so a private CA is given to those by
REQUESTS_CA_BUNDLE and SSL_CERT_FILE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import certifi
import pytest
import requests

from testing.live_server import ROOT
from tests.conftest import API_KEYS

pytestmark = pytest.mark.slow

TASKS_DIR = ROOT / "clients" / "lm_eval_tasks"
TASK, LIMIT = "hellaswag_dev", 10


def run_lm_eval(
    server, ca: Path, out_dir: Path, *, api_key: str | None, auth_token: str | None, timeout: float
) -> subprocess.CompletedProcess:
    """lm-eval as the README runs it, on the offline HellaSwag items."""
    bundle = out_dir / "ca-bundle.pem"  # the usual CAs plus the server's
    bundle.write_bytes(Path(certifi.where()).read_bytes() + ca.read_bytes())
    model_args = (
        f"base_url={server.url}/v1/completions,tokenized_requests=True,tokenizer_backend=remote,"
        f"ca_cert_path={ca},num_concurrent=2,max_retries=1,timeout=60"
    )
    if auth_token:
        model_args += f",auth_token={auth_token}"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    env.update(
        {
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(out_dir / "hf_cache"),
            "TOKENIZERS_PARALLELISM": "false",
            "REQUESTS_CA_BUNDLE": str(bundle),
            "SSL_CERT_FILE": str(bundle),
        }
    )
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        TASK,
        "--include_path",
        str(TASKS_DIR),
        "--limit",
        str(LIMIT),
        "--batch_size",
        "4",
        "--output_path",
        str(out_dir),
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_lm_eval_with_key_over_tls(secure_server, tls_files, tmp_path):
    proc = run_lm_eval(
        secure_server, tls_files["ca"], tmp_path, api_key=API_KEYS[0], auth_token=API_KEYS[0], timeout=900
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Using remote tokenizer from https://127.0.0.1" in output, output[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["n-samples"][TASK]["effective"] == LIMIT
    assert 0 <= results["results"][TASK]["acc,none"] <= 1
    print(f"{TASK} over HTTPS with a key: acc {results['results'][TASK]['acc,none']}")


@pytest.mark.parametrize(
    "api_key, auth_token", [(None, None), (None, API_KEYS[0])], ids=["no key at all", "tokenizer key only"]
)
def test_lm_eval_without_the_key_fails_fast_with_401(secure_server, tls_files, tmp_path, api_key, auth_token):
    start = time.monotonic()
    proc = run_lm_eval(secure_server, tls_files["ca"], tmp_path, api_key=api_key, auth_token=auth_token, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "401" in output and "Unauthorized" in output, output[-3000:]
    assert time.monotonic() - start < 120
    assert not list(tmp_path.rglob("results_*.json"))
    # The server is unharmed: it answers a keyed request at once.
    response = requests.get(
        secure_server.url + "/v1/models",
        headers={"Authorization": f"Bearer {API_KEYS[1]}"},
        verify=secure_server.verify,
        timeout=10,
    )
    assert response.status_code == 200
