"""What the Ray Serve ingress does besides routing, without Ray: a multi-prompt completion split into
one request per prompt and joined gives the single server's response to the whole request, float
for float; what a single server would answer differently is never split; and a forwarded request
run through the replica's app (server/scale/asgi_call.py) streams, and stops the work when left."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.config import Settings
from server.scale import asgi_call, fanout
from testing.fake_backend import BOS, ByteBackend
from testing.in_process import InProcess

PROMPTS = [[BOS, *b"A context, then"], [BOS, *b"Another one"], [BOS, *b"A context, and"], [BOS, *b"xyz"]]


@pytest.fixture(scope="module")
def app():
    served = InProcess(max_logprobs=20)
    yield served
    served.close()


def call(method: str, path: str, body: dict | None = None, **headers) -> dict:
    return {
        "method": method,
        "path": path,
        "query": "",
        "client": ["127.0.0.1", 5000],
        "headers": [("host", "127.0.0.1:8000"), ("content-type", "application/json"), *headers.items()],
        "body": json.dumps(body).encode() if body is not None else b"",
    }


async def collect(served, forwarded: dict) -> tuple[int, bytes]:
    status, chunks = 0, []
    async for message in asgi_call.run(served.app, forwarded):
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))
    return status, b"".join(chunks)


@pytest.mark.parametrize("n", [1, 2])
def test_split_and_joined_equals_the_whole_request(app, n):
    body = {
        "prompt": PROMPTS,
        "max_tokens": 3,
        "echo": True,
        "logprobs": 2,
        "temperature": 0 if n == 1 else 1,
        "seed": 7,
        "n": n,
    }
    parts = fanout.split("/v1/completions", body, app.settings)
    assert [p["prompt"] for p in parts] == [[p] for p in PROMPTS]

    async def go():
        whole = await collect(app, call("POST", "/v1/completions", body))
        pieces = await asyncio.gather(*[collect(app, call("POST", "/v1/completions", p)) for p in parts])
        return whole, pieces

    (status, whole), pieces = asyncio.run(go())
    assert status == 200 and all(s == 200 for s, _ in pieces)
    joined, single = fanout.join([json.loads(b) for _, b in pieces], n), json.loads(whole)
    assert joined["choices"] == single["choices"]  # text, logprobs, indexes: identical
    assert joined["usage"] == single["usage"]
    assert {k: joined[k] for k in ("object", "model", "system_fingerprint")} == {
        k: single[k] for k in ("object", "model", "system_fingerprint")
    }


def test_what_a_single_server_answers_differently_goes_whole():
    settings = Settings.load(max_prompts=4, max_request_tokens=200)
    ids = [[1, 2, 3], [4, 5]]
    assert fanout.split("/v1/completions", {"prompt": ids, "max_tokens": 5}, settings) is not None
    for body in (
        {"prompt": ids, "stream": True},
        {"prompt": ["a", "b"]},
        {"prompt": [1, 2, 3]},
        {"prompt": ids * 3},
        {"prompt": ids, "max_tokens": 150},
        {"prompt": ids, "max_tokens": None},
        {"prompt": [[1, 2], "b"]},
        {"prompt": [[1, 2], []]},
        {"prompt": ids, "n": 0},
        {"prompt": ids, "n": True},
    ):
        assert fanout.split("/v1/completions", body, settings) is None, body
    assert fanout.split("/v1/chat/completions", {"prompt": ids}, settings) is None
    # Large fields beside the prompt are not copied once per prompt: such a request goes whole.
    many = [[1, 2]] * 4
    heavy = {"prompt": many, "max_tokens": 1, "stop": ["x" * 5000] * 3}
    assert fanout.split("/v1/completions", heavy, settings, len(json.dumps(heavy))) is None
    light = {"prompt": many, "max_tokens": 1, "stop": ["\n"]}
    assert fanout.split("/v1/completions", light, settings, len(json.dumps(light))) is not None


def test_parts_from_different_builds_are_not_joined():
    a = {"model": "m", "system_fingerprint": "fp_1", "choices": [], "usage": {"prompt_tokens": 1}}
    assert fanout.consistent([a, dict(a)])
    assert not fanout.consistent([a, {**a, "system_fingerprint": "fp_2"}])


def test_route_keys():
    assert fanout.route_key({"prompt": [[5, 6], [7]]}) == [5, 6]
    assert fanout.route_key({"prompt": [5, 6]}) == [5, 6]
    assert fanout.route_key({"prompt": "text"}) == "text"
    assert fanout.route_key({"prompt": ["a", "b"]}) == "a"
    assert fanout.route_key({"messages": [{"role": "system", "content": "Be brief."}]}) == "Be brief."
    assert fanout.route_key({"prompt": [[1, "x"]]}) is None and fanout.route_key(None) is None
    assert fanout.parse(b"\xff") is None and fanout.parse(b"[1]") is None


def test_a_forwarded_request_keeps_the_replicas_keys_and_errors():
    served = InProcess(api_key="sk-one")
    try:

        async def go():
            refused = await collect(served, call("GET", "/v1/models"))
            allowed = await collect(served, call("GET", "/v1/models", authorization="Bearer sk-one"))
            bad = await collect(
                served,
                call("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, authorization="Bearer sk-one"),
            )
            return refused, allowed, bad

        (s1, _), (s2, _), (s3, body) = asyncio.run(go())
        assert (s1, s2, s3) == (401, 200, 400) and json.loads(body)["error"]["param"] == "max_tokens"
    finally:
        served.close()


def test_leaving_a_stream_stops_the_work():
    backend = ByteBackend(delay=0.05)  # 400 tokens would take 20 s
    decodes: list[int] = []
    decode = backend.decode
    backend.decode = lambda steps: decodes.append(len(steps)) or decode(steps)  # counted, then run
    served = InProcess(backend)
    try:

        async def go():
            stream = asgi_call.run(
                served.app, call("POST", "/v1/completions", {"prompt": "abc", "max_tokens": 400, "stream": True})
            )
            bodies = 0
            async for message in stream:
                bodies += message["type"] == "http.response.body" and bool(message.get("body"))
                if bodies >= 3:
                    break
            await stream.aclose()  # what Serve does to the replica's generator when the client leaves

        started = time.monotonic()
        asyncio.run(go())
        seen = -1
        while len(decodes) != seen:  # the model thread stops decoding the abandoned request
            assert time.monotonic() - started < 10, "the abandoned request went on decoding"
            seen = len(decodes)
            time.sleep(0.3)
        assert seen < 100  # of 400
    finally:
        served.close()
