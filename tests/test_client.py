"""logprobs_client against live servers over loopback (no mocks): its results equal the server's
raw responses and the llama.cpp oracle; keys and TLS against the keyed HTTPS server; retries
against servers started with a tiny queue bound (real 429s with Retry-After) and a short request
timeout (real 503s); and the lm-eval command logprobs-eval builds from what a server reports."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests

from testing.live_server import DATA, ROOT, free_port
from tests.conftest import API_KEYS, serve
from tests.test_lm_eval import encode_pair as lm_eval_encode_pair

sys.path.insert(0, str(ROOT / "clients"))  # the checkout's client, installed or not

from logprobs_client import (
    APIError,
    AsyncClient,
    Client,
    lm_eval_run,
)
from logprobs_client.cli import main as logprobs_eval

LL_TOLERANCE = 1e-3


def encode_pair(oracle, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split, with the oracle's tokenizer (tests/test_lm_eval.py), and for an empty
    context lm-eval's prefix token: BOS, else EOS."""
    if context == "":
        tokens = oracle.tokenize(continuation)
        prefix = oracle.bos_id or oracle.eos_id
        return ([prefix], tokens) if tokens[0] != prefix else (tokens[:1], tokens[1:])
    return lm_eval_encode_pair(oracle, context, continuation)


def hellaswag_items(n: int) -> list[tuple[str, list[str]]]:
    docs = [json.loads(line) for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:n]]
    return [(d["ctx"], [" " + e for e in d["endings"]]) for d in docs]


CASES = [
    *hellaswag_items(2),
    ("The capital of France is ", ["Paris", "London", "the city of Paris"]),  # trailing space moves
    ("", ["Hello world", "The"]),  # empty context: the prefix token
    ("Café au lait — ", ["très bon ☕", "日本語のテキスト"]),  # multi-byte text, tokens split mid-character
]


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


# -- plain calls equal the raw endpoints ------------------------------------------------------------


def test_info_calls_equal_the_raw_endpoints(server, client):
    assert client.health() is True
    raw = requests.get(server.url + "/v1/models").json()["data"][0]
    model = client.model_info()
    assert (model.id, model.max_model_len, model.system_fingerprint, model.fingerprint) == (
        raw["id"],
        raw["max_model_len"],
        raw["system_fingerprint"],
        raw["fingerprint"],
    )
    assert model.max_model_len == 2048
    info = client.tokenizer_info()
    raw_info = requests.get(server.url + "/tokenizer_info").json()
    assert (
        info.bos_token,
        info.eos_token,
        info.pad_token,
        info.add_bos_token,
        info.model_max_length,
        info.chat_template,
    ) == (
        raw_info["bos_token"],
        raw_info["eos_token"],
        raw_info["pad_token"],
        raw_info["add_bos_token"],
        raw_info["model_max_length"],
        raw_info["chat_template"],
    )
    for text in ("Hello world", "<|im_start|>user", "Café ☕"):
        for special in (True, False):
            raw_tok = server.post("/tokenize", {"prompt": text, "add_special_tokens": special}).json()
            tok = client.tokenize(text, add_special_tokens=special)
            assert (tok.tokens, tok.count, tok.max_model_len) == (
                raw_tok["tokens"],
                raw_tok["count"],
                raw_tok["max_model_len"],
            )
            assert client.detokenize(tok.tokens) == server.post("/detokenize", {"tokens": tok.tokens}).json()["prompt"]


def test_complete_equals_the_raw_response(server, client):
    payload = {
        "prompt": ["The capital of France is", "1, 2, 3,"],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 3,
        "echo": True,
    }
    raw = server.complete(**payload)
    got = client.complete(payload["prompt"], max_tokens=4, temperature=0, logprobs=3, echo=True)
    assert got.model == raw["model"] and got.system_fingerprint == raw["system_fingerprint"]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        raw["usage"]["prompt_tokens"],
        raw["usage"]["completion_tokens"],
    )
    for choice, expected in zip(got.choices, raw["choices"]):
        assert (choice.index, choice.text, choice.finish_reason) == (
            expected["index"],
            expected["text"],
            expected["finish_reason"],
        )
        lp = expected["logprobs"]
        assert (
            choice.logprobs.tokens,
            choice.logprobs.token_logprobs,
            choice.logprobs.top_logprobs,
            choice.logprobs.text_offset,
        ) == (lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"])
    # Extra fields pass through (logit_bias), and generation without logprobs has none.
    plain = client.complete("Hello", max_tokens=2, temperature=0, logit_bias={"28": -100})
    assert plain.choices[0].logprobs is None and plain.usage.completion_tokens == 2


# -- score(): the server's echo, lm-eval's arithmetic, and the oracle ---------------------------------


def test_score_equals_raw_echo_lm_eval_and_the_oracle(server, client, oracle):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    worst = 0.0
    for context, continuations in CASES:
        scores = client.score(context, continuations, batch_size=2)  # several requests per call
        assert [s.continuation for s in scores] == continuations
        pairs = [encode_pair(oracle, context, cont) for cont in continuations]
        assert [(s.context_tokens, s.continuation_tokens) for s in scores] == pairs, context
        prompts = [ctx + cont for ctx, cont in pairs]
        ctxlens = [len(ctx) for ctx, _ in pairs]
        # The server's raw echo of the same tokens: the same floats, summed in the same order.
        raw = server.complete(prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)["choices"]
        # lm-eval's own parser on the request it sends (max_tokens=1, read up to the last token).
        lm_eval_request = server.complete(prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
        lm_eval_results = LocalCompletionsAPI.parse_logprobs(lm_eval_request, ctxlens=ctxlens)
        for score, (ctx, cont), choice, (ll, greedy) in zip(scores, pairs, raw, lm_eval_results):
            values = choice["logprobs"]["token_logprobs"][len(ctx) :]
            assert (score.token_logprobs, score.tokens) == (values, choice["logprobs"]["tokens"][len(ctx) :])
            assert score.loglikelihood == sum(values)
            assert (score.loglikelihood, score.is_greedy) == (ll, greedy)
            # The oracle: llama.cpp in-process, log-softmax in float64.
            expected_ll, expected_greedy = oracle.loglikelihood(ctx, cont)
            worst = max(worst, abs(score.loglikelihood - expected_ll))
            assert abs(score.loglikelihood - expected_ll) <= LL_TOLERANCE, (context, score.continuation)
            assert score.is_greedy == expected_greedy
    print(f"score(): max |loglikelihood - oracle| = {worst:.2e}")


def test_score_greedy_continuation_and_token_ids(client):
    context = "The capital of France is"
    greedy_text = client.complete(context, max_tokens=3, temperature=0).choices[0].text
    by_text = client.score(context, [greedy_text, " Berlin"])
    assert [s.is_greedy for s in by_text] == [True, False]
    by_ids = client.score(by_text[0].context_tokens, [s.continuation_tokens for s in by_text])
    assert [(s.loglikelihood, s.is_greedy, s.continuation) for s in by_ids] == [
        (s.loglikelihood, s.is_greedy, None) for s in by_text
    ]
    assert client.score(context, greedy_text) == by_text[:1]  # one continuation as a plain string
    with pytest.raises(TypeError):
        client.score([1, 2, 3], ["text"])


def test_async_client_gives_the_same_results(server, client):
    context, continuations = CASES[0]

    async def run():
        async with AsyncClient(server.url, max_concurrency=2) as c:
            return await asyncio.gather(
                c.health(),
                c.models(),
                c.tokenizer_info(),
                c.tokenize("Hello world", add_special_tokens=False),
                c.score(context, continuations, batch_size=1),
                c.complete("Hello", max_tokens=3, temperature=0, logprobs=1),
            )

    health, models, info, tok, scores, completion = asyncio.run(run())
    assert health and models == client.models() and info == client.tokenizer_info()
    assert tok == client.tokenize("Hello world", add_special_tokens=False)
    assert scores == client.score(context, continuations)
    sync = client.complete("Hello", max_tokens=3, temperature=0, logprobs=1)
    assert completion.choices == sync.choices


def test_errors_come_back_typed_and_are_not_retried(server):
    retries = []
    with Client(server.url, max_retries=3, on_retry=lambda *a: retries.append(a)) as c:
        with pytest.raises(APIError) as bad:
            c.complete("Hello", max_tokens=1, top_p=0)
        assert bad.value.status == 400 and bad.value.param == "top_p" and bad.value.type == "invalid_request_error"
        with pytest.raises(APIError) as unknown:
            c.score("Hello", [" world"], model="no-such-model")
        assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    assert retries == []


def test_connection_refused_is_retried_a_bounded_number_of_times():
    retries = []
    with (
        Client(
            f"http://127.0.0.1:{free_port()}",
            max_retries=2,
            backoff=0.01,
            on_retry=lambda attempt, error, wait: retries.append((attempt, type(error), wait)),
        ) as c,
        pytest.raises(httpx.ConnectError),
    ):
        c.health()
    assert retries == [(1, httpx.ConnectError, 0.01), (2, httpx.ConnectError, 0.02)]


# -- keys and TLS -----------------------------------------------------------------------------------


def test_key_and_private_ca(secure_server, tls_files, client):
    context, continuations = "The capital of France is ", ["Paris", "London"]
    expected = client.score(context, continuations)  # the same model on the plain server
    with Client(secure_server.url, api_key=API_KEYS[1], verify=tls_files["ca"]) as c:
        assert c.model_info().id == client.model_info().id
        assert c.score(context, continuations) == expected

    async def run():
        async with AsyncClient(secure_server.url, api_key=API_KEYS[0], verify=str(tls_files["ca"])) as c:
            return await c.score(context, continuations)

    assert asyncio.run(run()) == expected


@pytest.mark.parametrize("key", [None, "sk-test-wrong-key"], ids=["no key", "wrong key"])
def test_missing_or_wrong_key_is_a_401_at_once(secure_server, tls_files, key):
    retries = []
    with Client(secure_server.url, api_key=key, verify=tls_files["ca"], on_retry=lambda *a: retries.append(a)) as c:
        assert c.health()  # /health needs no key
        with pytest.raises(APIError) as refused:
            c.models()
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key" and retries == []


def test_unknown_ca_fails_the_handshake_without_retries(secure_server):
    retries = []
    with (
        Client(secure_server.url, api_key=API_KEYS[0], on_retry=lambda *a: retries.append(a)) as c,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        c.models()
    assert retries == []


# -- retries against real 429s and 503s ----------------------------------------------------------------


def gauge(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def long_context(client, n_tokens: int) -> str:
    """Text of about n_tokens tokens, from the HellaSwag contexts."""
    text = " ".join(ctx for ctx, _ in hellaswag_items(40))
    tokens = client.tokenize(text, add_special_tokens=False).tokens
    assert len(tokens) >= n_tokens
    return client.detokenize(tokens[:n_tokens])


@pytest.fixture(scope="module")
def queue_server(model_path, tmp_path_factory):
    """Room for 1200 tokens of queued work."""
    yield from serve(
        model_path, tmp_path_factory, "client-queue", "--max-queued-tokens", "1200", "--max-request-tokens", "1200"
    )


class FullQueue:
    """A queue that stays full until released: a long generation holds the model (one sequence),
    and three distinct 358-token prompts to score (1170 of the 1200 tokens of room, with the 32
    each prompt counts for: --job-overhead-tokens) wait behind it.
    Without the generation the queue drains as the prompts run, and whether a request finds it
    full becomes a race with the clock (it was lost once on a slow CI machine). Releasing closes
    the generation's connection, which cancels it; the prompts then run and the queue empties."""

    def __init__(self, server, client):
        self.server = server
        eos = client.tokenize(client.tokenizer_info().eos_token, add_special_tokens=False).tokens[0]
        admitted = gauge(server, "logprobs_queue_wait_seconds_count")
        self.hog = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        self.hog.request(
            "POST",
            "/v1/completions",
            headers={"Content-Type": "application/json"},
            body=json.dumps(
                {"prompt": "Once upon a time", "max_tokens": 1100, "temperature": 0, "logit_bias": {str(eos): -100}}
            ),
        )
        wait_until(
            lambda: gauge(server, "logprobs_queue_wait_seconds_count") > admitted, "the generation did not start"
        )
        prompts = [[200 + 17 * i + j % 11 for j in range(358)] for i in range(3)]
        self.prompts = threading.Thread(
            target=server.post,
            args=("/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}),
        )
        self.prompts.start()
        wait_until(lambda: gauge(server, "logprobs_queue_tokens") >= 1170, "the prompts were not queued")

    def release(self) -> None:
        self.hog.close()

    def __enter__(self) -> FullQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.prompts.join(120)


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_429_is_retried_after_its_retry_after(queue_server, client):
    context = long_context(client, 120)
    continuations = [" and then he walks away.", " but nobody answers.", " so it ends.", " while it rains."]
    expected = client.score(context, continuations)
    retries = []
    with FullQueue(queue_server, client) as full:

        def on_retry(*attempt):
            retries.append(attempt)
            full.release()  # the queue drains while the client waits out Retry-After

        with Client(queue_server.url, max_retries=8, on_retry=on_retry) as c:
            scores = c.score(context, continuations)  # ~520 tokens: no room behind the 1170 queued
    _attempt, error, wait = retries[0]
    assert isinstance(error, APIError) and error.status == 429 and error.code == "queue_full"
    assert error.retry_after >= 1 and wait == error.retry_after  # the server's Retry-After, as sent
    assert [a for a, _, _ in retries] == list(range(1, len(retries) + 1))
    assert [s.loglikelihood for s in scores] == pytest.approx([s.loglikelihood for s in expected], abs=1e-6)
    assert [s.is_greedy for s in scores] == [s.is_greedy for s in expected]


def test_429_retries_are_bounded_and_waits_capped(queue_server, client):
    context = long_context(client, 120)
    retries = []
    with (
        FullQueue(queue_server, client),
        Client(queue_server.url, max_retries=1, max_wait=0.05, on_retry=lambda *a: retries.append(a)) as c,
        pytest.raises(APIError) as refused,
    ):
        c.score(context, [" one.", " two.", " three.", " four."])
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    assert len(retries) == 1 and retries[0][0] == 1 and retries[0][2] == 0.05


@pytest.fixture(scope="module")
def timeout_server(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "client-timeout", "--request-timeout", "8")


def test_503_timeout_is_retried_with_backoff(timeout_server, client):
    """A generation that would run for minutes holds the model; a scoring request sent behind it
    waits past --request-timeout (503, code timeout); the retry, after the backoff, finds the
    model free (the generation was cancelled at its own deadline) and succeeds."""
    context = long_context(client, 300)
    expected = client.score(context, [" and so on."])
    eos = client.tokenize(client.tokenizer_info().eos_token, add_special_tokens=False).tokens[0]
    admitted = gauge(timeout_server, "logprobs_queue_wait_seconds_count")
    hog = threading.Thread(
        target=timeout_server.post,
        args=(
            "/v1/completions",
            {"prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0, "logit_bias": {str(eos): -100}},
        ),
    )
    hog.start()
    try:
        deadline = time.monotonic() + 30
        while gauge(timeout_server, "logprobs_queue_wait_seconds_count") <= admitted:  # until it runs
            assert time.monotonic() < deadline
            time.sleep(0.02)
        retries = []
        with Client(timeout_server.url, max_retries=4, backoff=0.5, on_retry=lambda *a: retries.append(a)) as c:
            scores = c.score(context, [" and so on."])
    finally:
        hog.join(120)
    _attempt, error, wait = retries[0]
    assert isinstance(error, APIError) and (error.status, error.code) == (503, "timeout")
    assert error.retry_after is None and wait == 0.5  # no Retry-After: the backoff
    assert scores[0].loglikelihood == pytest.approx(expected[0].loglikelihood, abs=1e-6)


# -- the lm-eval command logprobs-eval builds -------------------------------------------------------------


def test_run_command_from_what_the_server_reports(secure_server, tls_files, capsys):
    status = logprobs_eval(
        [
            "run",
            secure_server.url,
            "--api-key",
            API_KEYS[0],
            "--ca-cert",
            str(tls_files["ca"]),
            "--tasks",
            "hellaswag_dev",
            "--limit",
            "5",
            "--batch-size",
            "4",
            "--dry-run",
            "--model-arg",
            "seed=7",
            "--",
            "--seed",
            "3",
        ]
    )
    out = capsys.readouterr()
    assert status == 0
    argv = out.out.split()
    assert argv[1:5] == ["-m", "lm_eval", "--model", "local-completions"]
    model_args = dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))
    assert model_args == {
        "base_url": f"{secure_server.url}/v1/completions",
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "tokenizer_backend": "remote",
        "tokenized_requests": "True",
        "num_concurrent": "2",
        "max_retries": "5",
        "timeout": "600",
        "max_length": "2048",
        "auth_token": "***",
        "ca_cert_path": str(tls_files["ca"].resolve()),
        "seed": "7",
    }
    assert API_KEYS[0] not in out.out + out.err
    assert argv[argv.index("--tasks") + 1] == "hellaswag_dev" and argv[argv.index("--limit") + 1] == "5"
    assert argv[argv.index("--batch_size") + 1] == "4" and argv[-2:] == ["--seed", "3"]
    assert argv[argv.index("--include_path") + 1] == str(ROOT / "clients" / "lm_eval_tasks")
    assert "context 2048 tokens" in out.err


def test_lm_eval_environment_carries_key_and_ca_bundle(tls_files, monkeypatch):
    import certifi

    monkeypatch.setenv("OPENAI_API_KEY", "sk-someone-elses")
    with lm_eval_run.environment(lm_eval_run.Target("https://127.0.0.1:1", "sk-key", str(tls_files["ca"]))) as env:
        bundle = Path(env["REQUESTS_CA_BUNDLE"]).read_bytes()
        assert env["OPENAI_API_KEY"] == "sk-key" and env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"]
        assert bundle.startswith(Path(certifi.where()).read_bytes()) and tls_files["ca"].read_bytes() in bundle
    assert not Path(env["REQUESTS_CA_BUNDLE"]).exists()  # removed after the run
    with lm_eval_run.environment(lm_eval_run.Target("http://127.0.0.1:1")) as env:
        assert "OPENAI_API_KEY" not in env  # not someone else's key to our server


def test_cli_reports_an_unreachable_server_in_one_line(capsys):
    status = logprobs_eval(["run", f"http://127.0.0.1:{free_port()}", "--tasks", "hellaswag_dev", "--dry-run"])
    assert status == 2 and capsys.readouterr().err.startswith("logprobs-eval: ")
