"""Generation as OpenAI clients expect it: the official `openai` package, streaming, stop strings,
seeds, n > 1, penalties, logit_bias, chat templates, and cancellation when a client goes away.

Each test runs on both backends (`fixture_server`: the two-block fixture on llama.cpp and on MLX);
the batching test pairs each backend's session server with a --max-sequences 4 one."""

from __future__ import annotations

import functools
import operator
import time

import jinja2.sandbox
import numpy as np
import pytest
import requests

openai = pytest.importorskip("openai")

CANCELLED = "request cancelled (the client went away)"  # the engine's log line


@pytest.fixture
def client(fixture_server):
    return openai.OpenAI(base_url=fixture_server.url + "/v1", api_key="unused", max_retries=0)


# Greedy: 24+ tokens without an end-of-generation token (test_stop_string_spanning_tokens checks this).
PROMPT = "The history of the Roman Empire"


def test_openai_client_completions(client, fixture_server):
    model = server_model(fixture_server)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.choices[0].text and out.choices[0].text == PROMPT + plain.choices[0].text
    assert out.choices[0].logprobs.token_logprobs[0] is None
    assert len(out.choices[0].logprobs.tokens) == out.usage.prompt_tokens + 12
    assert out.usage.completion_tokens == plain.usage.completion_tokens == 12
    assert out.choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_client_chat(client, fixture_server):
    messages = [{"role": "user", "content": "Say hello."}]
    out = client.chat.completions.create(
        model=server_model(fixture_server),
        messages=messages,
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    chunks = list(
        client.chat.completions.create(
            model=server_model(fixture_server), messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_uses_the_models_template(fixture_server):
    """Greedy chat equals greedy completion of the conversation rendered with the served template."""
    info = requests.get(fixture_server.url + "/tokenizer_info").json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(info["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    tokens = fixture_server.post("/tokenize", {"prompt": rendered, "add_special_tokens": False}).json()["tokens"]
    chat = fixture_server.post(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 20, "temperature": 0}
    ).json()
    completion = fixture_server.complete(prompt=tokens, max_tokens=20, temperature=0)
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == len(tokens)


def test_stop_string_spanning_tokens(fixture_server):
    """A stop string made of the end of one token and the start of the next is cut, in plain and
    streamed responses, and never leaks partially into a streamed chunk."""
    free = fixture_server.complete(prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)["choices"][0]
    assert free["finish_reason"] == "length"  # PROMPT's premise: no end-of-generation token in 24
    tokens, offsets, text = free["logprobs"]["tokens"], free["logprobs"]["text_offset"], free["text"]

    def spans(i: int) -> str | None:
        """The stop string made of the last two characters of token i-1 and the first two of token
        i, if its first occurrence in the text is there (not earlier, inside one token)."""
        if min(len(tokens[i - 1]), len(tokens[i])) < 2 or any(t.startswith("bytes:") for t in tokens[i - 1 : i + 1]):
            return None
        stop = tokens[i - 1][-2:] + tokens[i][:2]
        return stop if text.index(stop) == offsets[i] - 2 else None

    i, stop = next((i, spans(i)) for i in range(1, len(tokens)) if spans(i))
    expected = text[: offsets[i] - 2]

    cut = fixture_server.complete(prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "zzzz-never"])["choices"][0]
    assert cut["text"] == expected and cut["finish_reason"] == "stop"

    events = fixture_server.stream("/v1/completions", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == expected
    for piece in pieces:
        assert not any(stop[:n] in piece and piece.endswith(stop[:n]) for n in range(1, len(stop)) if piece)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_streaming_format_and_usage(fixture_server):
    events = fixture_server.stream(
        "/v1/completions",
        prompt=[PROMPT, "Once upon a time"],
        max_tokens=5,
        temperature=0,
        logprobs=1,
        stream_options={"include_usage": True},
    )
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and len(chunk["choices"]) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert sum(len(c["logprobs"]["tokens"]) for c in mine) == 5


def test_streamed_echo_with_logprobs_equals_plain(fixture_server):
    payload = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    plain = fixture_server.complete(**payload)["choices"][0]
    events = fixture_server.stream("/v1/completions", **payload)
    assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
    merged = {
        key: functools.reduce(
            operator.iadd, (e["choices"][0]["logprobs"][key] for e in events if e["choices"][0]["logprobs"]), []
        )
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }
    assert merged == plain["logprobs"]


def test_seed_n_and_sampling(fixture_server):
    payload = {"prompt": "My favourite animal is", "max_tokens": 12, "temperature": 1.0, "seed": 1234, "n": 4}
    first = fixture_server.complete(**payload)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in fixture_server.complete(**payload)["choices"]]  # same seed, same texts
    assert len(set(texts)) > 1  # the n samples are independent draws
    other = [c["text"] for c in fixture_server.complete(**(payload | {"seed": 99}))["choices"]]
    assert other != texts
    n_prompt = len(fixture_server.post("/tokenize", {"prompt": payload["prompt"]}).json()["tokens"])
    assert first["usage"]["prompt_tokens"] == n_prompt  # counted once, not n times


def test_logit_bias_and_penalties(fixture_server):
    forced = fixture_server.post("/tokenize", {"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    out = fixture_server.complete(prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(forced): 100})
    assert out["choices"][0]["text"] == " banana" * 5

    def repeats(**extra) -> int:
        lp = fixture_server.complete(
            prompt="one two one two one two", max_tokens=30, temperature=0, logprobs=0, **extra
        )["choices"][0]["logprobs"]
        return len(lp["tokens"]) - len(set(lp["tokens"]))

    baseline = repeats()
    assert repeats(presence_penalty=2.0) < baseline
    assert repeats(frequency_penalty=2.0) < baseline
    assert repeats(repetition_penalty=2.0) < baseline


def test_disconnect_stops_generation(fixture_server):
    """The client reads a few chunks and hangs up; the server stops that job within about a second,
    so the next request is not stuck behind hundreds of unwanted tokens."""
    info = requests.get(fixture_server.url + "/tokenizer_info").json()
    eos = fixture_server.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()
    eos = eos["tokens"][0]
    cancelled_before = fixture_server.log().count(CANCELLED)  # the server lives all session
    payload = {
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(eos): -100},
    }
    with requests.post(fixture_server.url + "/v1/completions", json=payload, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    hung_up = time.monotonic()
    fixture_server.complete(prompt="Hi", max_tokens=1)
    assert time.monotonic() - hung_up < 3.0
    deadline = time.monotonic() + 5
    while fixture_server.log().count(CANCELLED) == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fixture_server.log().count(CANCELLED) == cancelled_before + 1


def server_model(server) -> str:
    return requests.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_greedy_is_independent_of_batch_composition(fixture_server):
    """Prompts generated together (several in one request, and concurrent requests) give the same
    greedy text as each alone."""
    import concurrent.futures

    prompts = [PROMPT, "Once upon a time", "The best way to learn a language is", "In 1969, the first humans"]
    alone = [fixture_server.complete(prompt=p, max_tokens=20, temperature=0)["choices"][0]["text"] for p in prompts]
    together = [c["text"] for c in fixture_server.complete(prompt=prompts, max_tokens=20, temperature=0)["choices"]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        concurrent_ = list(
            pool.map(
                lambda p: fixture_server.complete(prompt=p, max_tokens=20, temperature=0)["choices"][0]["text"], prompts
            )
        )
    assert together == alone and concurrent_ == alone


@pytest.fixture(scope="module", params=["gguf", "mlx"])
def batching_pair(request, tmp_path_factory):
    """(a default server, the same model with --max-sequences 4), on each backend."""
    from tests.conftest import serve_beside

    yield from serve_beside(request, tmp_path_factory, "batching", "--max-sequences", "4")


def test_opt_in_batched_generation(batching_pair, request):
    """--max-sequences 4 decodes concurrent requests together: every request completes, prompt
    scores are those of the default server (exactly on llama.cpp, which runs prompts one at a time;
    within 1e-4 on MLX, which runs prompts admitted together in one pass), and generated tokens'
    logprobs stay within the backend's batch-composition noise."""
    import concurrent.futures

    server, batching_server = batching_pair
    prompts = [
        PROMPT,
        "Once upon a time",
        "The best way to learn a language is",
        "In 1969, the first humans",
        "My favourite animal is",
    ]
    payload = {"max_tokens": 12, "temperature": 0, "echo": True, "logprobs": 2}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        batched = list(pool.map(lambda p: batching_server.complete(prompt=p, **payload)["choices"][0], prompts))
    assert "Runs up to 4 sequence(s) at once" in batching_server.log()
    shares_passes = request.node.callspec.params["batching_pair"] == "mlx"
    assert ("share forward passes" in batching_server.log()) == shares_passes
    for prompt, choice in zip(prompts, batched):
        alone = server.complete(prompt=prompt, **payload)["choices"][0]
        n_prompt = len(server.post("/tokenize", {"prompt": prompt}).json()["tokens"])
        a, b = choice["logprobs"], alone["logprobs"]
        # The prompt pass and the first generated token (chosen from its last row): the same.
        assert a["tokens"][: n_prompt + 1] == b["tokens"][: n_prompt + 1]
        if shares_passes:
            assert a["token_logprobs"][0] is None and b["token_logprobs"][0] is None
            np.testing.assert_allclose(
                a["token_logprobs"][1 : n_prompt + 1], b["token_logprobs"][1 : n_prompt + 1], atol=1e-4, rtol=0
            )
            for x, y in zip(a["top_logprobs"][1 : n_prompt + 1], b["top_logprobs"][1 : n_prompt + 1]):
                assert x.keys() == y.keys() and all(abs(x[t] - y[t]) <= 1e-4 for t in x)
        else:
            for key in ("token_logprobs", "top_logprobs"):
                assert a[key][: n_prompt + 1] == b[key][: n_prompt + 1], key
        # Later tokens, while both have generated the same so far (the same context): the same
        # alternatives within the noise. Greedy may then pick another token only where the
        # default server's top two are that close.
        gen_a, gen_b = a["tokens"][n_prompt:], b["tokens"][n_prompt:]
        same = next((j for j, (x, y) in enumerate(zip(gen_a, gen_b)) if x != y), None)
        if same is None:  # the same tokens (an end-of-generation token ends both alike)
            assert len(gen_a) == len(gen_b) and choice["text"] == alone["text"]
            same = len(gen_a) - 1
        for i in range(n_prompt + 1, n_prompt + same + 1):
            common = a["top_logprobs"][i].keys() & b["top_logprobs"][i].keys()
            assert common and max(abs(a["top_logprobs"][i][t] - b["top_logprobs"][i][t]) for t in common) <= 0.1
        if gen_a[same] != gen_b[same]:
            top = b["top_logprobs"][n_prompt + same]
            assert gen_a[same] in top and top[gen_b[same]] - top[gen_a[same]] <= 0.2, (same, top, gen_a[same])
