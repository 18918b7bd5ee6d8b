"""Observability and reproducibility: GET /metrics counts exactly what was served, every response
has an x-request-id that the log lines of its request carry, and every completion carries the
system_fingerprint that /v1/models lists the parts of.

Most tests use the session's live server (counts are compared before and after, so they hold
whatever ran earlier); one second server, started with another --n-batch, shows the fingerprint
follow the settings. The middleware's layering (401s from an auth layer inside it, 500s) is tested
in-process on the ASGI app, without a model."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import requests
from prometheus_client.parser import text_string_to_metric_families

from server.models.default_model import SHA256
from server.models.digests import DigestCache, model_sha256
from server.observability.fingerprint import Fingerprint
from server.observability.metrics import Metrics
from tests.conftest import serve

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of Prometheus' text format: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = requests.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples_of(response.text)


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before, after, name: str, **labels) -> float:
    """How much a sample grew between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def fresh_tokens(n: int) -> list[int]:
    """Token ids no earlier prompt started with (so the prefix cache has nothing to reuse)."""
    rng = random.Random(uuid.uuid4().int)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def wait_for_log(server, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if needle in line]
        if lines:
            return "\n".join(lines)
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not logged:\n{server.log()[-3000:]}")


def post_and_hold(server, payload: dict, headers: dict[str, str] | None = None) -> http.client.HTTPConnection:
    """POST a completion request without reading the answer; closing the connection leaves."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps(payload),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return connection


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_jobs_exactly(server):
    before = scrape(server)
    # An echo request scoring a 13-token prompt (token ids: exactly 13 prompt tokens).
    out = server.complete(prompt=fresh_tokens(13), max_tokens=0, echo=True, logprobs=1)
    assert len(out["choices"][0]["logprobs"]["tokens"]) == 13
    after_one = scrape(server)
    assert grew(before, after_one, "logprobs_requests_total", route="/v1/completions", status="200") == 1
    assert grew(before, after_one, "logprobs_request_duration_seconds_count", route="/v1/completions") == 1
    assert grew(before, after_one, "logprobs_prompt_tokens_run_total") == 13
    assert grew(before, after_one, "logprobs_prompt_tokens_reused_total") == 0
    assert grew(before, after_one, "logprobs_generated_tokens_total") == 0
    assert grew(before, after_one, "logprobs_queue_wait_seconds_count") == 1
    assert grew(before, after_one, "logprobs_prefix_cache_lookups_total") == 1

    # Two prompts sampled twice: 4 jobs, each running its 5-token prompt (too short for the prefix
    # cache), generating up to 3 tokens.
    two = server.complete(prompt=[fresh_tokens(5), fresh_tokens(5)], n=2, max_tokens=3, temperature=1.0, seed=3)
    # A 400 (over --max-logprobs), a 404 on an unknown path (route "other"), and a 405.
    assert server.post("/v1/completions", {"prompt": "Hi", "logprobs": 21}).status_code == 400
    assert requests.get(server.url + "/no/such/path/" + uuid.uuid4().hex, timeout=30).status_code == 404
    assert requests.put(server.url + "/v1/completions", timeout=30).status_code == 405
    after = scrape(server)
    assert grew(after_one, after, "logprobs_queue_wait_seconds_count") == 4
    assert grew(after_one, after, "logprobs_generated_tokens_total") == two["usage"]["completion_tokens"]
    assert grew(after_one, after, "logprobs_prompt_tokens_run_total") == 20
    for route, status in [
        ("/v1/completions", "200"),
        ("/v1/completions", "400"),
        ("other", "404"),
        ("/v1/completions", "405"),
    ]:
        assert grew(after_one, after, "logprobs_requests_total", route=route, status=status) == 1, (route, status)
    # Unknown paths never become label values.
    assert not any(dict(labels).get("route", "").startswith("/no/") for _, labels in after)

    # Read from the engine at scrape time: nothing is waiting now.
    assert after[("logprobs_queue_jobs", ())] == 0 and after[("logprobs_queue_tokens", ())] == 0
    for name in [
        "logprobs_prefix_cache_hits_total",
        "logprobs_prefix_cache_reused_tokens_total",
        "logprobs_prefix_cache_bytes",
        "logprobs_prefix_cache_entries",
    ]:
        assert (name, ()) in after, name
    assert value(after, "logprobs_prefix_cache_capacity_bytes") == 1024 << 20
    assert value(after, "logprobs_model_load_seconds") > 0


def test_a_client_gone_halfway_through_its_body_counts_as_499_not_400(server):
    """Starlette turns a body cut short by a disconnect into a 400 that nobody receives; /metrics
    counts what happened instead: the client closed the request (499)."""
    before = scrape(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "1000")
    connection.endheaders(b'{"prompt": "half a bo')
    time.sleep(0.3)  # the server is reading the body when the client goes
    connection.close()
    deadline = time.monotonic() + 10
    while grew(before, after := scrape(server), "logprobs_requests_total", route="/v1/completions", status="499") < 1:
        assert time.monotonic() < deadline, "the cut request was not counted as 499"
        time.sleep(0.1)
    assert grew(before, after, "logprobs_requests_total", route="/v1/completions", status="499") == 1
    assert grew(before, after, "logprobs_requests_total", route="/v1/completions", status="400") == 0


def test_queue_gauges_show_jobs_waiting_behind_a_generation(server):
    """One sequence at a time (the default): while a long generation runs, another request's two
    jobs wait, and the gauges read them (their cost: prompt + max_tokens tokens each, and the 32 of
    --job-overhead-tokens). The long one's client then leaves, which cancels it."""
    before = scrape(server)
    long = post_and_hold(
        server, {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.8, "seed": 2, "stop": ["zzzzzzzz"]}
    )
    try:
        deadline = time.monotonic() + 30
        while not grew(before, scrape(server), "logprobs_queue_wait_seconds_count") and time.monotonic() < deadline:
            time.sleep(0.05)  # until the model has taken the generation
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                server.post, "/v1/completions", {"prompt": [fresh_tokens(5), fresh_tokens(7)], "max_tokens": 1}
            )
            seen = None
            while seen is None and not waiting.done() and time.monotonic() < deadline:
                samples = scrape(server)
                seen = samples if samples[("logprobs_queue_jobs", ())] > 0 else None
            long.close()
            assert waiting.result().status_code == 200
    finally:
        long.close()
    assert seen is not None, "no job seen waiting"
    assert seen[("logprobs_queue_jobs", ())] == 2 and seen[("logprobs_queue_tokens", ())] == (5 + 1 + 32) + (7 + 1 + 32)


def test_prefix_cache_reuse_is_counted(server):
    prompt = fresh_tokens(40)
    before = scrape(server)
    server.complete(prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    server.complete(prompt=prompt[:30] + fresh_tokens(10), max_tokens=0, echo=True, logprobs=1)
    after = scrape(server)
    reused = grew(before, after, "logprobs_prompt_tokens_reused_total")
    assert reused > 0 and reused + grew(before, after, "logprobs_prompt_tokens_run_total") == 80
    assert grew(before, after, "logprobs_prefix_cache_hits_total") == 1
    assert grew(before, after, "logprobs_prefix_cache_reused_tokens_total") == reused


# -- request ids --------------------------------------------------------------------------------


def test_request_id_is_echoed_or_made_and_logged(server):
    sent = f"obs-{uuid.uuid4().hex[:12]}"
    response = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 1}, headers={"x-request-id": sent})
    assert response.status_code == 200 and response.headers["x-request-id"] == sent
    # Every log line about the request carries it: the engine's, and uvicorn's access line.
    lines = wait_for_log(server, f"[{sent}]")
    assert "completed 1 prompt(s)" in lines and '"POST /v1/completions HTTP/1.1" 200' in lines, lines
    # Lines outside any request show "-".
    assert re.search(r" server\.state \[-\]: Loading ", server.log())

    made = [
        requests.get(server.url + "/health", headers=headers, timeout=30).headers["x-request-id"]
        for headers in [{}, {}, {"x-request-id": "has space"}, {"x-request-id": "x" * 129}, {"x-request-id": ""}]
    ]
    assert all(GENERATED_ID.fullmatch(i) for i in made), made
    assert len(set(made)) == len(made)
    # On errors too.
    assert server.post("/v1/completions", {"prompt": 5}, headers={"x-request-id": sent}).headers["x-request-id"] == sent
    assert requests.get(server.url + "/nope", timeout=30).headers["x-request-id"]


def test_cancellation_line_carries_the_request_id(server):
    """The "request cancelled" line is logged on the model thread, outside the request's context."""
    sent = f"gone-{uuid.uuid4().hex[:12]}"
    connection = post_and_hold(
        server,
        {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.8, "seed": 1, "stop": ["zzzzzzzz"]},
        {"x-request-id": sent},
    )
    time.sleep(1.0)
    connection.close()
    assert "request cancelled (the client went away)" in wait_for_log(server, f"[{sent}]")


# -- system_fingerprint -------------------------------------------------------------------------


def streamed_chunks(server, path: str, payload: dict) -> list[dict]:
    response = requests.post(server.url + path, json=payload | {"stream": True}, stream=True, timeout=60)
    assert response.status_code == 200
    events = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def served_fingerprint(server) -> tuple[str, dict]:
    (entry,) = requests.get(server.url + "/v1/models", timeout=30).json()["data"]
    return entry["system_fingerprint"], entry["fingerprint"]


def test_system_fingerprint_on_every_response_and_settings_change_it(server, model_path, tmp_path_factory):
    short, parts = served_fingerprint(server)
    assert re.fullmatch(r"fp_[0-9a-f]{12}", short)
    # The short id is the hash of exactly the parts listed.
    assert Fingerprint.of(parts).short == short
    assert parts["model_sha256"] == SHA256  # the default model's published sha256
    assert parts["backend"] == "gguf" and parts["kv_cache_type"] == "f32" and parts["flash_attn"] == "off"
    assert parts["llama_cpp_system_info"]  # the build's CPU features, e.g. "CPU : SSE3 = 1 | ... | AVX512 = 1"
    seen = {
        server.complete(prompt="Hi", max_tokens=1)["system_fingerprint"],
        server.complete(prompt=[1, 2, 3], max_tokens=0, echo=True, logprobs=1)["system_fingerprint"],
        server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).json()[
            "system_fingerprint"
        ],
    }
    # Greedy: a sampled token can add no text (part of a character), and then sends no chunk of its own.
    for path, payload in [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "stream_options": {"include_usage": True},
            },
        ),
    ]:
        chunks = streamed_chunks(server, path, payload | {"temperature": 0})
        assert len(chunks) >= 2
        seen |= {c["system_fingerprint"] for c in chunks}
    assert seen == {short}
    metrics = scrape(server)
    info = [dict(labels) for name, labels in metrics if name == "logprobs_model_info"]
    assert info == [{"model": "SmolLM2-135M-Instruct.Q4_1", "system_fingerprint": short, **parts}]

    # Another n_batch: another fingerprint, differing in that part only.
    other = serve(model_path, tmp_path_factory, "obs-n-batch", "--n-batch", "256")
    second = next(other)
    try:
        other_short, other_parts = served_fingerprint(second)
        assert second.complete(prompt="Hi", max_tokens=1)["system_fingerprint"] == other_short
    finally:
        next(other, None)
    assert other_short != short
    assert {k for k in parts if parts[k] != other_parts.get(k)} == {"n_batch"}


# -- model digests, without a server --------------------------------------------------------------


def test_model_digest_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import server.models.digests as digests

    hashed = []
    real = digests.sha256_of
    monkeypatch.setattr(digests, "sha256_of", lambda path: hashed.append(path.name) or real(path))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights v1")
    cache_file = tmp_path / "cache" / "digests.json"

    first = DigestCache(cache_file)
    digest = model_sha256(model, first)
    first.save()
    assert model_sha256(model, DigestCache(cache_file)) == digest and hashed == ["model.gguf"]  # read from the cache
    model.write_bytes(b"weights v2")
    assert model_sha256(model, DigestCache(cache_file)) != digest and hashed == ["model.gguf"] * 2

    # An MLX folder: its files, not documentation or hidden files.
    folder = tmp_path / "mlx-model"
    (folder / ".cache").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"tensors")
    folder_digest = model_sha256(folder, DigestCache(None))
    (folder / "README.md").write_text("about")
    (folder / ".cache" / "download.lock").write_text("x")
    assert model_sha256(folder, DigestCache(None)) == folder_digest
    (folder / "config.json").write_text('{"rope_theta": 1}')
    assert model_sha256(folder, DigestCache(None)) != folder_digest


# -- the middleware's place among the layers, in-process ------------------------------------------


async def _call(app, method: str, path: str, headers: dict[str, str] | None = None):
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    # Starlette's error middleware sends its 500, then raises for the server to log
    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


def test_middleware_counts_401s_from_an_inner_auth_layer_and_500s():
    """The request-id and counting layer sits outside the key check and the 500 layer (app.py's
    list), so a refused request and a failed one are counted and carry their ids."""
    from server.app import create_app
    from server.config import Settings

    app = create_app(Settings(api_key="secret-key"))
    metrics = Metrics()
    app.state.server = SimpleNamespace(metrics=metrics)  # what /metrics and the middleware read
    key = {"authorization": "Bearer secret-key"}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    async def run():
        return [
            await _call(app, "POST", "/v1/completions", {"x-request-id": "r-401"}),
            await _call(app, "GET", "/boom", key),
            await _call(app, "GET", "/metrics", key),
        ]

    (denied, denied_headers), (failed, failed_headers), (scraped, _) = asyncio.run(run())
    assert (denied, denied_headers["x-request-id"]) == (401, "r-401")
    assert failed == 500 and GENERATED_ID.fullmatch(failed_headers["x-request-id"])
    assert scraped == 200
    samples = samples_of(metrics.render().decode())
    assert value(samples, "logprobs_requests_total", route="/v1/completions", status="401") == 1
    assert value(samples, "logprobs_requests_total", route="/boom", status="500") == 1
