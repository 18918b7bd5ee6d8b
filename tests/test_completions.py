"""/v1/completions over real HTTP against the default model, checked against the oracle."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import requests

from tests.conftest import greedy_ids

TOLERANCE = 1e-4

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Zürich, São Paulo, Kraków and 東京 are cities; naïve café owners say 🎉 ✓.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]


def check_against_oracle(oracle, tokens: list[int], logprobs: dict, k: int) -> float:
    """Every echoed token's logprob equals the oracle's; top-k holds the oracle's top-k. Returns max |diff|."""
    expected = oracle.logprob_matrix(tokens)
    got = logprobs["token_logprobs"]
    assert got[0] is None and logprobs["top_logprobs"][0] is None
    diffs = np.abs(np.array(got[1 : len(tokens)]) - expected[np.arange(len(tokens) - 1), tokens[1:]])
    assert diffs.max() <= TOLERANCE, diffs.max()
    for i in range(1, len(tokens)):
        top = logprobs["top_logprobs"][i]
        want = np.argsort(-expected[i - 1])[:k]
        ranked = sorted(top.values(), reverse=True)
        # top-k values equal the oracle's k best, in order (the entry for the actual token may be extra)
        assert np.abs(np.array(ranked[:k]) - expected[i - 1][want]).max() <= TOLERANCE
        assert len(top) in (k, k + 1)
        token_str = logprobs["tokens"][i]
        assert top[token_str] == got[i]  # bit for bit: lm-eval's greedy check is ==
    return float(diffs.max())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_echo_logprobs_match_oracle_for_string_prompts(server, oracle, prompt):
    tokens = server.post("/tokenize", {"prompt": prompt, "add_special_tokens": True}).json()["tokens"]
    assert tokens == oracle.tokenize(prompt)  # SmolLM2 adds no BOS
    out = server.complete(prompt=prompt, echo=True, logprobs=5, max_tokens=0)
    choice = out["choices"][0]
    assert choice["text"] == prompt  # byte-level BPE: echo reproduces the prompt exactly
    assert len(choice["logprobs"]["tokens"]) == len(tokens)
    check_against_oracle(oracle, tokens, choice["logprobs"], 5)
    assert out["usage"] == {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}


def test_token_id_batch_of_unequal_lengths_with_and_without_bos(server, oracle):
    bos_text = requests.get(server.url + "/tokenizer_info").json()["bos_token"]
    bos = server.post("/tokenize", {"prompt": bos_text, "add_special_tokens": False}).json()["tokens"]
    assert bos == [oracle.bos_id]
    base = [oracle.tokenize(p) for p in PROMPTS]
    batch = [bos + base[0], base[1], base[2][:7], bos + base[1][:3]]
    out = server.complete(prompt=batch, echo=True, logprobs=3, max_tokens=1, temperature=0)
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for tokens, choice in zip(batch, choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(tokens) + 1  # the prompt, then the one generated token
        check_against_oracle(oracle, tokens, lp, 3)
        # The generated token is the argmax of the distribution after the prompt.
        expected_next = int(np.argmax(oracle.logprob_matrix(tokens)[-1]))
        assert lp["tokens"][-1] == server.post("/detokenize", {"tokens": [expected_next]}).json()["prompt"]
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert out["usage"]["prompt_tokens"] == sum(map(len, batch))
    assert out["usage"]["completion_tokens"] == 4


def test_text_offsets_and_bytes_tokens(server):
    prompt = "Emoji 🎉🎉 and 東京 in one line"
    lp = server.complete(prompt=prompt, echo=True, logprobs=0, max_tokens=0)["choices"][0]["logprobs"]
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert any(t.startswith("bytes:\\x") for t in tokens), tokens  # emoji split into byte tokens
    assert offsets == sorted(offsets) and offsets[0] == 0
    for i, token in enumerate(tokens):
        if not token.startswith("bytes:"):
            assert prompt[offsets[i] : offsets[i] + len(token)] == token
    # logprobs=0: each entry holds just the token that is there.
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])


@pytest.mark.parametrize(
    "prompt,stop",
    [
        ("Question: What is 2 + 3?\nAnswer:", ["\n\n"]),
        ("The history of the Roman Empire", ["zzzz-never"]),
    ],
)
def test_greedy_generation_matches_oracle(server, oracle, prompt, stop):
    tokens = oracle.tokenize(prompt)
    out = server.complete(prompt=tokens, max_tokens=24, temperature=0, stop=stop)
    choice = out["choices"][0]
    assert choice["text"] == oracle.greedy(tokens, 24, stop)
    ids, reason = greedy_ids(oracle, tokens, 24, stop)
    assert (choice["finish_reason"], out["usage"]["completion_tokens"]) == (reason, len(ids))
    assert choice["logprobs"] is None


def test_generation_logprobs_and_echo_text(server, oracle):
    """Echo + generation: the text is the prompt followed by exactly the plain generation, and
    every generated token is the oracle's greedy token with the oracle's logprob."""
    prompt = "Once upon a time"
    out = server.complete(prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    tokens = oracle.tokenize(prompt)
    n_prompt = out["usage"]["prompt_tokens"]
    assert n_prompt == len(tokens)
    plain = server.complete(prompt=prompt, max_tokens=5, temperature=0)["choices"][0]
    assert choice["text"] == prompt + plain["text"]
    ids, reason = greedy_ids(oracle, tokens, 5)
    assert choice["finish_reason"] == reason
    assert out["usage"]["completion_tokens"] == len(ids)
    assert len(lp["tokens"]) == n_prompt + len(ids)
    expected = oracle.logprob_matrix(tokens + ids)
    for j, token in enumerate(ids):
        i = n_prompt + j
        assert lp["tokens"][i] == server.post("/detokenize", {"tokens": [token]}).json()["prompt"]
        assert abs(lp["token_logprobs"][i] - expected[i - 1, token]) <= TOLERANCE
        assert lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())  # greedy picks the top token
        assert lp["text_offset"][i] == len(prompt) + len(oracle.detokenize(ids[:j]))


def test_seeded_sampling_is_reproducible(server):
    payload = {"prompt": "List of fruits:", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 42}
    assert server.complete(**payload)["choices"][0]["text"] == server.complete(**payload)["choices"][0]["text"]


def test_concurrent_clients_each_get_their_own_answer(server):
    requests_ = [{"prompt": p, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0} for p in PROMPTS] * 2
    sequential = [server.complete(**r) for r in requests_]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        concurrent_ = list(pool.map(lambda r: server.complete(**r), requests_))
    for a, b in zip(sequential, concurrent_):
        la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
        assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
        # Batched with other requests, a prompt's logits may differ in the last bits, no more.
        diff = np.abs(np.array(la["token_logprobs"][1:]) - np.array(lb["token_logprobs"][1:]))
        assert diff.max() <= 1e-4, diff.max()
        for i in range(1, len(lb["tokens"])):  # each position's own token, bit for bit
            assert lb["top_logprobs"][i][lb["tokens"][i]] == lb["token_logprobs"][i]


def test_health_answers_during_a_long_scoring_request(server, oracle):
    long_prompt = [oracle.tokenize(" ".join(PROMPTS * 30))[:1500]]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.complete, prompt=long_prompt, echo=True, logprobs=1, max_tokens=0)
        time.sleep(0.5)
        started = time.monotonic()
        assert requests.get(server.url + "/health", timeout=5).ok
        health_latency = time.monotonic() - started
        assert not pending.done(), "the scoring request should still be running"
        pending.result()
    assert health_latency < 2.0


def test_tokenizer_endpoints(server):
    info = requests.get(server.url + "/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"]) == ("<|im_end|>", "<|im_start|>")
    assert "<|im_start|>" in info["chat_template"]
    assert info["model_max_length"] == 2048
    tok = server.post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    assert server.post("/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    # lm-eval's remote tokenizer finds the EOS id by tokenizing the EOS text: it must be one token.
    eos = server.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert len(eos) == 1


def test_models_and_model_field(server):
    models = requests.get(server.url + "/v1/models").json()["data"]
    assert len(models) == 1 and models[0]["max_model_len"] == 2048
    name = models[0]["id"]
    assert name == "SmolLM2-135M-Instruct.Q4_1"
    assert server.complete(prompt="Hi", model=name, max_tokens=1)["model"] == name
    assert server.complete(prompt="Hi", model=None, max_tokens=1)["model"] == name


def test_prompts_of_unequal_length_in_one_request_equal_each_alone(server):
    """lm-eval batches prompts of nearly equal length; each must come out exactly as if alone
    (llama.cpp once moved one sequence's last-row logits by 0.54 in such a batch)."""
    import json as json_

    from testing.live_server import DATA

    items = [json_.loads(line) for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[6:9]]
    prompts = [item["ctx"] + " " + ending for item in items for ending in item["endings"]]
    ids = [server.post("/tokenize", {"prompt": p, "add_special_tokens": False}).json()["tokens"] for p in prompts]
    ids.sort(key=len, reverse=True)
    payload = {"echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}
    together = server.complete(prompt=ids, **payload)["choices"]
    for tokens, choice in zip(ids, together):
        alone = server.complete(prompt=tokens, **payload)["choices"][0]
        assert choice["logprobs"] == alone["logprobs"] and choice["text"] == alone["text"]
