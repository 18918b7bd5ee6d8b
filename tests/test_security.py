"""Serving other machines: API keys, the Host header check, TLS and the CLI's start-up refusal, on
real servers over real loopback connections (three servers: keyed + TLS, keyed + public metrics +
named hosts, keyless on all interfaces)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import time

import pytest
import requests

from testing.live_server import ROOT
from tests.conftest import API_KEYS, FILE_KEY, serve

KEY_ERROR = {
    "error": {
        "message": "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}

# Each endpoint but /health, with a request it answers 200 to (/metrics: another module serves it;
# with the key it is no longer a 401, whether or not it is there).
PROTECTED = {
    "/v1/completions": ("POST", {"prompt": "Hello", "max_tokens": 1, "temperature": 0}),
    "/v1/chat/completions": ("POST", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    "/v1/models": ("GET", None),
    "/tokenize": ("POST", {"prompt": "Hello"}),
    "/detokenize": ("POST", {"tokens": [19556]}),
    "/tokenizer_info": ("GET", None),
    "/metrics": ("GET", None),
}

BAD_CREDENTIALS = {
    "no header": None,
    "basic scheme": "Basic " + base64.b64encode(f"user:{API_KEYS[0]}".encode()).decode(),
    "no scheme": API_KEYS[0],
    "wrong key": "Bearer sk-test-wrong-key",
    "empty bearer": "Bearer ",
    "key in other case": "Bearer " + API_KEYS[0].upper(),
    "key with extra text": f"Bearer {API_KEYS[0]}x",
    "two keys": f"Bearer {API_KEYS[0]},{API_KEYS[1]}",
}

GOOD_KEYS = {"first key": API_KEYS[0], "second key": API_KEYS[1], "key from the file": FILE_KEY}


def call(server, path: str, authorization: str | None = None, headers: dict | None = None, **kwargs):
    method, payload = PROTECTED.get(path, ("GET", None))
    headers = {**({"Authorization": authorization} if authorization is not None else {}), **(headers or {})}
    return requests.request(
        method, server.url + path, json=payload, headers=headers, timeout=120, verify=server.verify, **kwargs
    )


def bearer(key: str) -> str:
    return f"Bearer {key}"


# -- API keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
def test_protected_endpoint_refuses_a_request_without_a_valid_key(secure_server, path, credentials):
    response = call(secure_server, path, BAD_CREDENTIALS[credentials])
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == KEY_ERROR  # the same answer whatever was wrong


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize("key", GOOD_KEYS)
def test_protected_endpoint_answers_each_configured_key(secure_server, path, key):
    response = call(secure_server, path, bearer(GOOD_KEYS[key]))
    if path == "/metrics":
        assert response.status_code != 401
    else:
        assert response.status_code == 200, response.text


def test_the_scheme_is_case_insensitive_and_spaces_around_the_key_do_not_matter(secure_server):
    for authorization in (f"bearer {API_KEYS[0]}", f"BEARER {API_KEYS[1]}", f"Bearer   {FILE_KEY} "):
        assert call(secure_server, "/v1/models", authorization).status_code == 200, authorization


def test_health_needs_no_key(secure_server):
    for authorization in (None, "Bearer sk-test-wrong-key"):
        response = call(secure_server, "/health", authorization)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_unknown_path_needs_the_key_too(secure_server):
    """A 404 would tell a stranger which paths exist."""
    assert call(secure_server, "/v1/nothing-here").status_code == 401
    assert call(secure_server, "/v1/nothing-here", bearer(API_KEYS[0])).status_code == 404


def test_streamed_completion_with_the_key(secure_server):
    payload = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": True, "logprobs": 1}
    with requests.post(
        secure_server.url + "/v1/completions",
        json=payload,
        stream=True,
        timeout=120,
        headers={"Authorization": bearer(API_KEYS[1])},
        verify=secure_server.verify,
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    refused = requests.post(
        secure_server.url + "/v1/completions", json=payload, stream=True, timeout=120, verify=secure_server.verify
    )
    assert refused.status_code == 401 and refused.json() == KEY_ERROR


def test_a_client_that_leaves_still_cancels_its_request(secure_server):
    """The key check hands the ASGI channels on untouched, so the server still hears the client go."""
    cancelled = re.compile(r"cancelled")
    seen = len(cancelled.findall(secure_server.log()))
    context = ssl.create_default_context(cafile=str(secure_server.verify))
    connection = http.client.HTTPSConnection("127.0.0.1", secure_server.port, timeout=30, context=context)
    payload = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.8, "seed": 1, "stop": ["zzzzzzzz"]}
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps(payload),
        headers={"Content-Type": "application/json", "Authorization": bearer(API_KEYS[0])},
    )
    time.sleep(1.0)
    connection.close()
    deadline = time.monotonic() + 60
    while len(cancelled.findall(secure_server.log())) <= seen:
        assert time.monotonic() < deadline, secure_server.log()[-3000:]
        time.sleep(0.1)
    assert call(secure_server, "/v1/models", bearer(API_KEYS[0])).status_code == 200


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_is_verified_against_the_given_ca_only(secure_server, monkeypatch):
    assert secure_server.url.startswith("https://")
    assert requests.get(secure_server.url + "/health", verify=secure_server.verify, timeout=10).ok
    assert requests.get(f"https://localhost:{secure_server.port}/health", verify=secure_server.verify, timeout=10).ok
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with pytest.raises(requests.exceptions.SSLError):  # the system's CAs do not know the throwaway one
        requests.get(secure_server.url + "/health", timeout=10)
    with pytest.raises(requests.ConnectionError):  # and nothing answers plain HTTP on that port
        requests.get(f"http://127.0.0.1:{secure_server.port}/health", timeout=10)


# -- keys from the environment, public metrics, named hosts ---------------------------------------

ENV_KEY = "sk-test-key-from-the-environment"


@pytest.fixture(scope="module")
def named_hosts_server(model_path, tmp_path_factory):
    yield from serve(
        model_path,
        tmp_path_factory,
        "named-hosts",
        "--metrics-public",
        "--allowed-hosts",
        "127.0.0.1, *.example.org",
        env={"LOGPROBS_API_KEY": ENV_KEY},
    )


def test_key_from_the_environment_and_public_metrics(named_hosts_server):
    assert call(named_hosts_server, "/v1/models").json() == KEY_ERROR
    assert call(named_hosts_server, "/v1/models", bearer(ENV_KEY)).status_code == 200
    assert call(named_hosts_server, "/v1/models", bearer(API_KEYS[0])).status_code == 401
    assert call(named_hosts_server, "/metrics").status_code != 401
    assert call(named_hosts_server, "/tokenizer_info").status_code == 401


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("api.example.org", True),
        ("a.b.example.org:8000", True),
        ("127.0.0.1", True),
        ("example.org", False),
        ("evil.org", False),
        ("localhost", False),
        ("api.example.org.evil.net", False),
    ],
)
def test_named_hosts_are_checked_before_the_key(named_hosts_server, host, allowed):
    for authorization, status in ((bearer(ENV_KEY), 200), (None, 401)):
        response = call(named_hosts_server, "/v1/models", authorization, headers={"Host": host})
        assert response.status_code == (status if allowed else 400), (host, response.text)


# -- keyless, on all interfaces: the start-up refusal, --allow-no-auth, the Host check -------------


@pytest.fixture(scope="module")
def keyless_server(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "keyless", "--host", "0.0.0.0", "--allow-no-auth")


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("LOGPROBS_")}
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.23", "model-box.lan"])
def test_cli_refuses_to_serve_other_machines_without_a_key(host):
    proc = run_cli("--host", host)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"logprobs-server: error: --host {host} ")
    for how in ("--api-key", "LOGPROBS_API_KEY", "--api-key-file", "--allow-no-auth"):
        assert how in lines[0]


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--api-key-file", "/nonexistent/keys.txt"], {}, "--api-key-file /nonexistent/keys.txt: cannot read it"),
        ([], {"LOGPROBS_API_KEY": " , "}, "--api-key (LOGPROBS_API_KEY) holds no key"),
        (["--allowed-hosts", "api.*.org"], {}, "--allowed-hosts 'api.*.org': a wildcard must be like"),
        (["--ssl-certfile", "/nonexistent/cert.pem", "--ssl-keyfile", "/nonexistent/key.pem"], {}, "cannot use them"),
    ],
)
def test_cli_reports_unusable_security_settings_in_one_line(args, env, expected):
    proc = run_cli("--host", "0.0.0.0", *args, **env)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in proc.stderr


def test_cli_refuses_an_encrypted_or_mismatched_tls_key(tls_files, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    encrypted, other = tmp_path / "encrypted.pem", tmp_path / "other.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    other.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for keyfile, expected in ((encrypted, "is encrypted"), (other, "cannot use them")):
        proc = run_cli("--ssl-certfile", str(tls_files["cert"]), "--ssl-keyfile", str(keyfile))
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr


def test_uvicorn_path_reports_an_unreadable_key_file_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", "server.app:app", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "LOGPROBS_API_KEY_FILE": "/nonexistent/keys.txt"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "logprobs-server: error: --api-key-file /nonexistent/keys.txt: cannot read it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_allow_no_auth_serves_without_a_key_and_warns_about_hosts(keyless_server):
    assert "logprobs-server: warning: no API key" in keyless_server.log()
    assert call(keyless_server, "/v1/models").status_code == 200
    assert call(keyless_server, "/v1/completions").status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"])
def test_loopback_host_headers_pass(keyless_server, host):
    for path in ("/health", "/v1/models"):
        response = call(keyless_server, path, headers={"Host": f"{host}:{keyless_server.port}"})
        assert response.status_code == 200, (host, response.text)


@pytest.mark.parametrize(
    "host",
    [
        "rebound.attacker.example",
        "attacker.example",
        "0.0.0.0",
        "192.168.1.23",
        "127.0.0.1.attacker.example",
        "localhost@attacker.example",
        "",
    ],
)
@pytest.mark.parametrize("path", ["/health", "/v1/completions", "/tokenize"])
def test_other_host_headers_get_a_400_everywhere(keyless_server, host, path):
    response = call(keyless_server, path, headers={"Host": f"{host}:{keyless_server.port}" if host else ""})
    assert response.status_code == 400, (host, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "Host", "invalid_host")
    assert "is not allowed by this server" in error["message"] and "--allowed-hosts" in error["message"]
