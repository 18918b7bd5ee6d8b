"""The client installs alone: in a fresh virtual environment with nothing but `pip install ./clients`
(httpx and what it needs; no compiler, no llama-cpp-python, no server package), `logprobs-eval
--help` works and Client.score against a live server equals that server's own echo."""

from __future__ import annotations

import json
import subprocess
import venv

import pytest

from testing.live_server import ROOT

pytestmark = pytest.mark.slow  # a venv and a pip install (from pip's cache or PyPI): ~30 s

SCORE = """
import json, sys
from logprobs_client import Client
url, context, continuations = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with Client(url) as client:
    by_text = client.score(context, continuations)
    by_ids = client.score(by_text[0].context_tokens, [s.continuation_tokens for s in by_text])
print(json.dumps([[s.context_tokens, s.continuation_tokens, s.loglikelihood, s.is_greedy] for s in by_text]
                 + [[s.loglikelihood, s.is_greedy] for s in by_ids]))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client-alone") / "venv"
    venv.create(folder, with_pip=True)  # no system site-packages: only what the client pulls in
    python = folder / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT / "clients")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return folder


def test_the_client_venv_holds_no_server_and_no_llama_cpp(client_venv):
    installed = subprocess.run(
        [client_venv / "bin" / "python", "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "logprobs-client" in names and "httpx" in names
    assert not names & {"llama-cpp-python", "logprobs-server", "numpy", "fastapi", "lm-eval"}, names
    missing = subprocess.run(
        [
            client_venv / "bin" / "python",
            "-c",
            "import importlib.util as u; print([m for m in ('llama_cpp', 'server', 'numpy') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert missing.stdout.strip() == "[]"


def test_logprobs_eval_help_works_without_lm_eval(client_venv):
    for argv in ([], ["run"], ["compare"], ["report"]):
        result = subprocess.run(
            [client_venv / "bin" / "logprobs-eval", *argv, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        assert "logprobs-eval" in result.stdout
    # Comparing needs numpy (the [eval] extra): said in one line, not a traceback.
    report = subprocess.run(
        [client_venv / "bin" / "logprobs-eval", "report", "/nonexistent-a", "/nonexistent-b"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert report.returncode != 0 and "pip install './clients[eval]'" in report.stderr
    assert "Traceback" not in report.stderr


def test_score_from_the_lone_client_equals_the_servers_echo(client_venv, server):
    context, continuations = "The capital of France is", [" Paris", " Berlin, the capital of Germany"]
    result = subprocess.run(
        [client_venv / "bin" / "python", "-c", SCORE, server.url, json.dumps(context), json.dumps(continuations)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_text, by_ids = rows[:2], rows[2:]
    for (ctx, cont, loglikelihood, is_greedy), (ll_ids, greedy_ids) in zip(by_text, by_ids):
        echo = server.complete(prompt=[ctx + cont], max_tokens=0, echo=True, logprobs=1, temperature=0)
        logprobs = echo["choices"][0]["logprobs"]
        values = logprobs["token_logprobs"][len(ctx) :]
        assert loglikelihood == sum(values) and ll_ids == loglikelihood  # the same floats, summed in order
        tops = logprobs["top_logprobs"][len(ctx) :]
        assert is_greedy == all(max(top.values()) == value for top, value in zip(tops, values)) == greedy_ids
