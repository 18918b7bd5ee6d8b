"""The HTTP layer in-process: every route, validation and error bodies, keys and the Host check,
limits and 429, Server-Sent Events framing and chat rendering, through httpx's ASGITransport
around the byte-level fake model (testing/fake_backend.py). Every logprob is checked against a
float64 log-softmax of the fake's logits, computed here, not by the server. The live-server tests
(test_completions, test_security, test_limits, ...) run the same routes on real models."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testing.fake_backend import BOS, ByteBackend, fake_logits
from testing.in_process import InProcess
from testing.oracle import log_softmax64

TOLERANCE = 1e-5  # float32 scoring vs the float64 oracle, in nats


@pytest.fixture(scope="module")
def app():
    served = InProcess(max_logprobs=20)
    yield served
    served.close()


def expected_prompt_logprobs(tokens: list[int]) -> np.ndarray:
    """log p(token i | tokens before it), i >= 1, in float64."""
    rows = log_softmax64(fake_logits(tokens[:-1], range(len(tokens) - 1)))
    return rows[np.arange(len(tokens) - 1), tokens[1:]]


def greedy(tokens: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        seq = tokens + out
        out.append(int(np.argmax(fake_logits([seq[-1]], [len(seq) - 1])[0])))
    return out


def assert_error(response, status: int, param: str | None = None, contains: str = "") -> dict:
    """An error in OpenAI's format, with this status, param and words in its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert contains.lower() in error["message"].lower(), error
    return error


# -- routes ---------------------------------------------------------------------------------------


def test_health_models_and_tokenizer_info(app):
    assert app.get("/health").json() == {"status": "ok"}
    card = app.get("/v1/models").json()["data"][0]
    assert card["id"] == "byte-model" and card["max_model_len"] == 512
    assert card["system_fingerprint"] == app.state.fingerprint.short and card["fingerprint"]["backend"] == "fake"
    info = app.get("/tokenizer_info").json()
    assert info == {
        "eos_token": "</s>",
        "bos_token": "<s>",
        "pad_token": None,
        "add_bos_token": True,
        "chat_template": ByteBackend().info.chat_template,
        "model_max_length": 512,
    }


def test_tokenize_and_detokenize_round_trip(app):
    text = "héllo, wörld ✓"
    body = app.post("/tokenize", {"prompt": text}).json()
    assert body["tokens"] == [BOS, *text.encode()] and body["count"] == len(text.encode()) + 1
    assert app.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"] == list(text.encode())
    assert app.post("/detokenize", {"tokens": list(text.encode())}).json() == {"prompt": text}
    assert_error(app.post("/detokenize", {"tokens": [0, 999]}), 400, "tokens", "outside this model's vocabulary")


@pytest.mark.parametrize("prompt", ["The capital of France is", [[BOS, 84, 104, 101, 32, 99]]])
def test_echo_logprobs_equal_the_float64_oracle(app, prompt):
    body = app.post("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5}).json()
    tokens = [BOS, *prompt.encode()] if isinstance(prompt, str) else prompt[0]
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == len(tokens)
    np.testing.assert_allclose(logprobs["token_logprobs"][1:], expected_prompt_logprobs(tokens), atol=TOLERANCE)
    rows = log_softmax64(fake_logits(tokens[:-1], range(len(tokens) - 1)))
    strings = app.backend.tokens.strings
    for i, top in enumerate(logprobs["top_logprobs"][1:]):
        # The top 5, best first, then (as OpenAI and vLLM do) the prompt's own token if not among them.
        best = list(np.argsort(-rows[i], kind="stable")[:5])
        shown = best + ([tokens[i + 1]] if tokens[i + 1] not in best else [])
        assert list(top) == [strings[t] for t in shown]
        np.testing.assert_allclose(list(top.values()), rows[i][shown], atol=TOLERANCE)
    if isinstance(prompt, str):
        assert body["choices"][0]["text"] == prompt  # BOS adds no text
    assert body["usage"] == {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}
    assert body["system_fingerprint"] == app.state.fingerprint.short


def check_prompt_logprobs(app, tokens: list[int], entries: list, n: int) -> None:
    """vLLM's prompt_logprobs against the float64 oracle: null first, then at each position the n best
    (best first, ties by lower id) and the prompt's own token, each with its logprob, its rank in that
    order and its text."""
    assert len(entries) == len(tokens) and entries[0] is None
    rows = log_softmax64(fake_logits(tokens[:-1], range(len(tokens) - 1)))
    strings = app.backend.tokens.strings
    for i, entry in enumerate(entries[1:]):
        order = list(np.argsort(-rows[i], kind="stable"))
        token = tokens[i + 1]
        shown = order[:n] + ([token] if token not in order[:n] else [])
        assert list(entry) == [str(t) for t in shown]
        for t in shown:
            assert entry[str(t)]["rank"] == order.index(t) + 1
            assert abs(entry[str(t)]["logprob"] - rows[i][t]) <= TOLERANCE
            assert entry[str(t)]["decoded_token"] == strings[t]


@pytest.mark.parametrize("echo", [False, True])
def test_prompt_logprobs_are_vllms_with_the_oracles_values_and_ranks(app, echo):
    tokens = [BOS, *b"The capital of France is"]
    payload = {"prompt": [tokens], "max_tokens": 3, "temperature": 0, "prompt_logprobs": 4, "echo": echo, "logprobs": 1}
    choice = app.post("/v1/completions", payload).json()["choices"][0]
    check_prompt_logprobs(app, tokens, choice["prompt_logprobs"], 4)
    # The echo's and the generated tokens' top-k stay what `logprobs` asked: 1 (and the token itself).
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"] if top is not None)
    assert len(choice["logprobs"]["tokens"]) == (len(tokens) if echo else 0) + 3
    streamed = app.events("/v1/completions", payload)
    assert streamed[0]["choices"][0]["prompt_logprobs"] == choice["prompt_logprobs"]
    assert all("prompt_logprobs" not in c["choices"][0] for c in streamed[1:])
    plain = app.post("/v1/completions", {"prompt": [tokens], "max_tokens": 1}).json()["choices"][0]
    assert "prompt_logprobs" not in plain  # only when asked for


def test_prompt_logprobs_and_echo_share_the_prefix_cache_without_mixing_widths():
    """A prompt cached by an echo (top-1, no ranks) is not reused for prompt_logprobs (ranks needed);
    one cached by prompt_logprobs (top-4 and ranks) serves a later echo narrowed to its top-1."""
    served = InProcess(max_logprobs=20, prefix_cache_mb=64)
    try:
        a = [BOS, *b"A shared context, then one ending"]
        b = [BOS, *b"Another shared context, and its ending"]
        echo = {"max_tokens": 0, "echo": True, "logprobs": 1}
        first = served.post("/v1/completions", {"prompt": [a], **echo}).json()["choices"][0]
        ranked = served.post("/v1/completions", {"prompt": [a], "max_tokens": 0, "prompt_logprobs": 4}).json()
        check_prompt_logprobs(served, a, ranked["choices"][0]["prompt_logprobs"], 4)
        served.post("/v1/completions", {"prompt": [b], "max_tokens": 0, "prompt_logprobs": 4})
        again = served.post("/v1/completions", {"prompt": [b], **echo}).json()["choices"][0]
        rows, strings = log_softmax64(fake_logits(b[:-1], range(len(b) - 1))), served.backend.tokens.strings
        for i, top in enumerate(again["logprobs"]["top_logprobs"][1:]):  # the top-1 (+ the token itself)
            best = int(np.argmax(rows[i]))
            assert list(top) == [strings[best]] + ([strings[b[i + 1]]] if b[i + 1] != best else [])
        np.testing.assert_allclose(again["logprobs"]["token_logprobs"][1:], expected_prompt_logprobs(b), atol=TOLERANCE)
        np.testing.assert_allclose(first["logprobs"]["token_logprobs"][1:], expected_prompt_logprobs(a), atol=TOLERANCE)
        assert served.state.engine.cache.hits >= 1
    finally:
        served.close()


def test_prompt_logprobs_above_the_limit_is_a_400(app):
    response = app.post("/v1/completions", {"prompt": "abc", "max_tokens": 1, "prompt_logprobs": 21})
    assert_error(response, 400, param="prompt_logprobs", contains="max-logprobs")


def test_greedy_generation_and_n_samples(app):
    tokens = [BOS, *b"abc"]
    body = app.post(
        "/v1/completions", {"prompt": "abc", "max_tokens": 6, "temperature": 0, "n": 2, "logprobs": 1}
    ).json()
    expected = greedy(tokens, 6)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"] == [app.backend.tokens.strings[t] for t in expected]
        want = [
            log_softmax64(fake_logits([(tokens + expected)[i - 1]], [i - 1]))[0][t]
            for i, t in zip(range(len(tokens), len(tokens) + 6), expected)
        ]
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], want, atol=TOLERANCE)
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_stop_string_cuts_the_text(app):
    full = app.post("/v1/completions", {"prompt": "abc", "max_tokens": 8, "temperature": 0}).json()["choices"][0]
    text = full["text"]
    stop = text[3:5]
    if not stop.strip("\ufffd"):
        pytest.skip("the fake's greedy text has no clean stop string here")
    cut = app.post("/v1/completions", {"prompt": "abc", "max_tokens": 8, "temperature": 0, "stop": [stop]}).json()[
        "choices"
    ][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]


def test_streamed_completion_framing_and_content_equal_the_whole_response(app):
    payload = {"prompt": "xyz", "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}
    whole = app.post("/v1/completions", payload).json()
    events = app.events("/v1/completions", payload | {"stream_options": {"include_usage": True}})
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    streamed = [
        lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]
    ]
    assert streamed == whole["choices"][0]["logprobs"]["token_logprobs"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_renders_the_template_with_openai_roles(app):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    body = app.post(
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    ).json()
    # developer reaches the template as system; text parts are joined.
    rendered = "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>"
    tokens = [BOS, *rendered.encode()]  # the template's "<s>" read as BOS
    assert body["usage"]["prompt_tokens"] == len(tokens)
    expected = greedy(tokens, 3)
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [app.backend.tokens.strings[t] for t in expected]
    assert body["choices"][0]["message"]["role"] == "assistant" and body["object"] == "chat.completion"
    events = app.events("/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events) == body["choices"][0]["message"]["content"]
    )


def test_chat_tool_role_reaches_the_template(app):
    body = app.post(
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "function", "content": "7", "name": "f"},
            ],
            "max_tokens": 1,
        },
    ).json()
    rendered = "<|user|>x\n<|tool|>42\n<|tool|>7\n<|assistant|>"
    assert body["usage"]["prompt_tokens"] == 1 + len(rendered.encode())


def test_distributions_are_the_full_float64_log_softmax(app):
    tokens = [BOS, *b"distributions"]
    response = app.post("/v1/distributions", {"prompt": tokens, "start": 4})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    rows, vocab = int(response.headers["x-rows"]), int(response.headers["x-vocab"])
    assert (rows, vocab, response.headers["x-start"]) == (len(tokens) - 1 - 4, 258, "4")
    assert response.headers["x-system-fingerprint"] == app.state.fingerprint.short
    got = np.frombuffer(response.content, "<f4").reshape(rows, vocab)
    want = log_softmax64(fake_logits(tokens[4:-1], range(4, len(tokens) - 1)))
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    half = app.post("/v1/distributions", {"prompt": tokens, "start": 4, "dtype": "float16"})
    assert len(half.content) == rows * vocab * 2
    np.testing.assert_allclose(np.frombuffer(half.content, "<f2").reshape(rows, vocab), want, rtol=1e-3, atol=1e-3)


def test_distributions_refuse_what_they_cannot_serve():
    served = InProcess(max_distribution_values=258 * 4)
    try:
        assert_error(served.post("/v1/distributions", {"prompt": [1, 2, 3], "start": 2}), 400, "start", "past the last")
        assert_error(served.post("/v1/distributions", {"prompt": [1]}), 400, "prompt")
        assert_error(served.post("/v1/distributions", {"prompt": "text"}), 400, "prompt")
        assert_error(served.post("/v1/distributions", {"prompt": [1, 999]}), 400, "prompt", "vocabulary")
        assert_error(
            served.post("/v1/distributions", {"prompt": list(range(10))}), 400, "prompt", "--max-distribution-values"
        )
        assert served.post("/v1/distributions", {"prompt": list(range(10)), "start": 5}).status_code == 200
    finally:
        served.close()


def test_metrics_count_requests_by_route_and_status():
    served = InProcess()
    try:
        for _ in range(3):
            served.get("/health")
        served.post("/v1/completions", {"prompt": "a", "max_tokens": 2})
        served.post("/v1/completions", {"prompt": "a", "max_tokns": 2})
        text = served.get("/metrics").text
        assert 'logprobs_requests_total{route="/health",status="200"} 3.0' in text
        assert 'logprobs_requests_total{route="/v1/completions",status="200"} 1.0' in text
        assert 'logprobs_requests_total{route="/v1/completions",status="400"} 1.0' in text
        assert "logprobs_generated_tokens_total 2.0" in text
    finally:
        served.close()


# -- errors -------------------------------------------------------------------------------------


def test_validation_errors_are_400_in_openai_format(app):
    assert_error(app.post("/v1/completions", {"prompt": "a", "max_tokns": 3}), 400, "max_tokns", "unknown field")
    assert_error(app.post("/v1/completions", {"prompt": "a", "max_tokens": "3"}), 400, "max_tokens")
    assert_error(app.post("/v1/completions", {"max_tokens": 3}), 400, "prompt", "missing")
    assert_error(app.post("/v1/completions", {"prompt": []}), 400, "prompt", "empty list")
    as_json = {"content-type": "application/json"}
    assert_error(
        app.request("POST", "/v1/completions", content=b"{not json", headers=as_json), 400, None, "not valid JSON"
    )
    assert_error(app.request("POST", "/v1/completions", content=b"[1, 2]", headers=as_json), 400, None, "JSON object")
    assert_error(app.post("/v1/completions", {"prompt": "a", "model": "other"}), 404, "model", "not served here")
    assert_error(app.post("/v1/completions", {"prompt": "a", "logprobs": 21}), 400, "logprobs", "limit of 20")
    assert_error(app.post("/v1/completions", {"prompt": "a", "suffix": "b"}), 400, "suffix")
    assert_error(app.post("/v1/completions", {"prompt": "a", "n": 17}), 400, "n")
    assert_error(app.post("/v1/completions", {"prompt": "a" * 600, "max_tokens": 0}), 400, "prompt", "context")
    assert_error(app.get("/v1/nothing"), 404, None)
    error = assert_error(app.get("/v1/completions"), 405, None)
    assert error["type"] == "invalid_request_error"


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize(
    "route, body", [("/v1/completions", {"prompt": "a", "max_tokens": 2}), ("/v1/chat/completions", CHAT)]
)
def test_stream_options_need_stream(app, route, body):
    """OpenAI and vLLM refuse stream_options without stream: it would be silently ignored."""
    for stream in ({}, {"stream": False}):
        assert_error(
            app.post(route, body | stream | {"stream_options": {"include_usage": True}}),
            400,
            "stream_options",
            "only allowed when stream is true",
        )
    events = app.events(route, body | {"stream": True, "stream_options": {"include_usage": True}})
    assert events[-1]["usage"]["completion_tokens"] == 2 and events[-1]["choices"] == []


def test_openai_chat_defaults_are_accepted_and_other_values_refused_by_name(app):
    plain = app.post("/v1/chat/completions", CHAT).json()
    # What OpenAI's SDKs and proxies send as defaults changes nothing.
    defaults = {
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "store": False,
        "service_tier": "auto",
        "modalities": ["text"],
        "metadata": {"run": "7"},
        "audio": None,
        "prediction": None,
        "reasoning_effort": None,
        "functions": None,
        "function_call": "auto",
    }
    same = app.post("/v1/chat/completions", CHAT | defaults).json()
    assert same["choices"] == plain["choices"] and same["usage"] == plain["usage"]
    for field, value, words in [
        ("response_format", {"type": "json_object"}, "(structured output) is not supported"),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, "'json_schema'"),
        ("tools", [{"type": "function", "function": {"name": "f"}}], "tool calling is not supported"),
        ("tool_choice", "required", "tool calling"),
        ("store", True, "not stored"),
        ("service_tier", "flex", "one service tier"),
        ("modalities", ["text", "audio"], "text only"),
        ("audio", {"voice": "alloy", "format": "wav"}, "text only"),
        ("reasoning_effort", "low", "reasoning"),
        ("prediction", {"type": "content", "content": "x"}, "predicted outputs"),
    ]:
        assert_error(app.post("/v1/chat/completions", CHAT | {field: value}), 400, field, words)
    assert_error(
        app.post("/v1/chat/completions", CHAT | {"response_format": {"kind": "text"}}),
        400,
        "response_format",
        "missing",
    )


def test_a_prompt_past_the_context_has_openais_code(app):
    """OpenAI's code context_length_exceeded (litellm and others detect overflow by it); on chat the
    prompt is in `messages`."""
    error = assert_error(app.post("/v1/completions", {"prompt": "a" * 600, "max_tokens": 0}), 400, "prompt", "context")
    assert error["code"] == "context_length_exceeded"
    error = assert_error(app.post("/v1/completions", {"prompt": "a" * 100, "max_tokens": 500}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    long_chat = {"messages": [{"role": "user", "content": "a" * 600}], "max_tokens": 1}
    error = assert_error(app.post("/v1/chat/completions", long_chat), 400, "messages", "context")
    assert error["code"] == "context_length_exceeded"
    error = assert_error(app.post("/v1/chat/completions", long_chat | {"max_tokens": None}), 400, "messages")
    assert error["code"] == "context_length_exceeded"


def test_a_body_that_is_not_utf8_is_a_400(app):
    for body in (b'{"prompt": "\xff\xfe"}', b"\xff\xfe\x00{", b'{"prompt": "\xed\xa0\x80"}'):
        assert_error(
            app.request("POST", "/v1/completions", content=body, headers={"content-type": "application/json"}), 400
        )


SURROGATE = st.sampled_from(["\ud800", "\udfff", "\udc00", "\ud83d"])
TEXT_WITH_SURROGATE = st.tuples(st.text(max_size=8), SURROGATE, st.text(max_size=8)).map("".join)

# Each text field a request can carry, as a function of a (bad) string: the request and its param.
TEXT_FIELDS = [
    ("/v1/completions", lambda s: {"prompt": s}, "prompt"),
    ("/v1/completions", lambda s: {"prompt": ["ok", s]}, "prompt"),
    ("/v1/completions", lambda s: {"prompt": "ok", "stop": s}, "stop"),
    ("/v1/completions", lambda s: {"prompt": "ok", "stop": ["a", s]}, "stop"),
    ("/v1/completions", lambda s: {"prompt": "ok", "model": s}, "model"),
    ("/v1/completions", lambda s: {"prompt": "ok", "user": s}, "user"),
    ("/v1/completions", lambda s: {"prompt": "ok", "suffix": s}, "suffix"),
    ("/v1/completions", lambda s: {"prompt": "ok", "logit_bias": {s: 1}}, "logit_bias"),
    # An unknown top-level key: the param names it, the surrogate written as its escape.
    ("/v1/completions", lambda s: {"prompt": "ok", s: 1}, lambda s: s.encode("utf-8", "backslashreplace").decode()),
    ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": s}]}, "messages"),
    (
        "/v1/chat/completions",
        lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]},
        "messages",
    ),
    ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": "x", "name": s}]}, "messages"),
    (
        "/v1/chat/completions",
        lambda s: {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"k": [s]}},
        "chat_template_kwargs",
    ),
    ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": "x"}], "stop": s}, "stop"),
    ("/tokenize", lambda s: {"prompt": s}, "prompt"),
    ("/tokenize", lambda s: {"prompt": "x", "model": s}, "model"),
    ("/detokenize", lambda s: {"tokens": [1], "model": s}, "model"),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(TEXT_FIELDS), bad=TEXT_WITH_SURROGATE)
def test_text_that_is_not_valid_unicode_is_a_400_in_every_field(app, field, bad):
    """JSON may escape lone surrogates; no tokenizer can encode them. Each gets a 400 naming the
    field, and the app raises nothing (a raise drops the client's kept-alive connection)."""
    path, make, param = field
    param = param(bad) if callable(param) else param
    body = json.dumps(make(bad))  # ensure_ascii: the surrogate travels as its \\u escape
    response = app.request("POST", path, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, param, "not valid Unicode")


@pytest.mark.parametrize("depth", [10, 500, 900, 990, 1000, 5000])
def test_deeply_nested_bodies_never_give_a_500(app, depth):
    """However deep the JSON nests (the parser's own limit is near 1000): an unknown field is a 400
    in OpenAI's format, a field that takes any JSON (a chat message's extras) is served or refused
    with a 4xx, never a 500 from a recursion limit."""
    nested = "[" * depth + "]" * depth
    unknown = app.request(
        "POST",
        "/v1/completions",
        content=f'{{"prompt": "a", "x": {nested}}}',
        headers={"content-type": "application/json"},
    )
    assert_error(unknown, 400)
    extra = app.request(
        "POST",
        "/v1/chat/completions",
        content=f'{{"max_tokens": 1, "messages": [{{"role": "user", "content": "x", "x": {nested}}}]}}',
        headers={"content-type": "application/json"},
    )
    assert extra.status_code == 200 or assert_error(extra, 400)


def test_after_a_bad_request_the_same_connection_serves_the_next(app):
    async def work(client):
        bad = await client.post(
            "/v1/completions", content='{"prompt": "\\ud800"}', headers={"content-type": "application/json"}
        )
        good = await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1})
        return bad, good

    bad, good = app.run(work)
    assert bad.status_code == 400 and good.status_code == 200


PART_TYPES = st.sampled_from(["image_url", "input_audio", "file", "image", "video_url", "refusal", "tool_result"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=PART_TYPES, before=st.integers(0, 2))
def test_content_parts_the_model_cannot_see_are_refused_by_name(app, kind, before):
    parts = [{"type": "text", "text": "look: "}] * before + [{"type": kind, kind: {"url": "data:,x"}}]
    response = app.post("/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]})
    assert_error(response, 400, "messages", f"content part {before} is of type '{kind}'")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    role=st.text(min_size=0, max_size=12).filter(
        lambda r: r not in {"system", "developer", "user", "assistant", "tool", "function"}
    )
)
def test_roles_openai_refuses_are_refused(app, role):
    response = app.post("/v1/chat/completions", {"messages": [{"role": role, "content": "hi"}]})
    assert_error(response, 400, "messages", "role")


def test_chat_without_a_template_is_a_400():
    served = InProcess(ByteBackend(chat_template=None))
    try:
        assert_error(
            served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
            400,
            "messages",
            "no chat template",
        )
    finally:
        served.close()


def test_an_unexpected_failure_is_a_500_without_details_and_the_server_goes_on():
    class Failing(ByteBackend):
        def tokenize(self, text, add_special_tokens):
            if text == "boom":
                raise RuntimeError("secret internals /path/to/model")
            return super().tokenize(text, add_special_tokens)

    served = InProcess(Failing())
    try:
        error = assert_error(served.post("/v1/completions", {"prompt": "boom"}), 500)
        assert error["type"] == "server_error" and "secret" not in error["message"]
        assert served.post("/v1/completions", {"prompt": "fine", "max_tokens": 1}).status_code == 200
    finally:
        served.close()


# -- keys, hosts, limits ------------------------------------------------------------------------


def test_api_keys_and_the_host_check():
    served = InProcess(api_key="sk-one,sk-two")
    try:
        assert_error(served.post("/v1/completions", {"prompt": "a"}), 401, None, "API key")
        assert_error(served.post("/v1/completions", {"prompt": "a"}, headers={"Authorization": "Bearer sk-x"}), 401)
        for key in ("sk-one", "sk-two"):
            ok = served.post(
                "/v1/completions", {"prompt": "a", "max_tokens": 1}, headers={"Authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        assert served.get("/health").status_code == 200  # open without a key
        assert_error(served.get("/metrics"), 401)
    finally:
        served.close()
    unkeyed = InProcess()
    try:
        assert_error(unkeyed.get("/v1/models", host="evil.example:8000"), 400, None, "not allowed")
        assert unkeyed.get("/v1/models", host="localhost:8000").status_code == 200
    finally:
        unkeyed.close()


def test_body_and_request_limits():
    served = InProcess(
        max_body_bytes=2000,
        max_prompts=2,
        max_request_tokens=100,
        max_queued_tokens=100,
        max_stop=1,
        max_stop_chars=1000,
    )
    try:
        assert_error(served.post("/v1/completions", {"prompt": "a" * 3000}), 413)
        assert_error(served.post("/v1/completions", {"prompt": ["a", "b", "c"]}), 400, "prompt", "at most 2")
        assert_error(served.post("/v1/completions", {"prompt": "a" * 50, "max_tokens": 60}), 400)
        assert_error(served.post("/v1/completions", {"prompt": "a", "stop": ["x", "y"]}), 400, "stop")
        assert_error(
            served.post("/v1/completions", {"prompt": "a", "stop": "x" * 1500}), 400, "stop", "1500 characters"
        )
    finally:
        served.close()


def test_every_choice_counts_its_fixed_cost():
    """Many tiny prompts, or many samples of them, cost what their passes cost: --job-overhead-tokens
    each, beside their tokens and max_tokens."""
    served = InProcess(job_overhead_tokens=10, max_request_tokens=100, max_n=4)
    try:
        payload = {"prompt": [[5]] * 4, "max_tokens": 1}
        assert served.post("/v1/completions", payload | {"n": 2}).status_code == 200  # (1 + 1 + 10) x 8 = 96
        assert_error(
            served.post("/v1/completions", payload | {"n": 3}),
            400,
            "prompt",
            "may cost 144 tokens (prompt tokens plus max_tokens plus 10 for each of its 12 choices",
        )
    finally:
        served.close()


def test_a_full_queue_answers_429_with_retry_after():
    # Each request costs 21 prompt tokens + 30 + 32 (--job-overhead-tokens): one fits the queue at a time.
    served = InProcess(ByteBackend(delay=0.05), max_request_tokens=100, max_queued_tokens=100)

    async def work(client):
        payload = {"prompt": "a" * 20, "max_tokens": 30}
        return await asyncio.gather(*(client.post("/v1/completions", json=payload) for _ in range(4)))

    try:
        responses = served.run(work)
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and 429 in statuses, statuses
        for r in responses:
            if r.status_code == 429:
                assert_error(r, 429, None, "busy")
                assert 1 <= int(r.headers["retry-after"]) <= 60
    finally:
        served.close()


def test_every_response_carries_a_request_id(app):
    response = app.post("/v1/completions", {"prompt": "a", "max_tokens": 1}, headers={"x-request-id": "my-id-1"})
    assert response.headers["x-request-id"] == "my-id-1"
    assert app.get("/health").headers["x-request-id"]
