"""One set of conformance tests, run against both backends serving the same float32 weights
(testing/fixture_model.py), plus cross-backend agreement and agreement with a float64 numpy
forward pass of those weights (testing/numpy_llama.py). The last tests use the variant whose
tokenizer adds BOS, as Gemma 3's and Llama's do."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from testing.fixture_model import BOS_TOKEN
from tests.conftest import greedy_ids

REFERENCE_TOLERANCE = 1e-3  # each backend vs the float64 numpy forward pass
CROSS_TOLERANCE = 1e-3  # |logprob(mlx) - logprob(gguf)| per token

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Zürich, São Paulo, Kraków and 東京 are cities; naïve café owners say 🎉 ✓.",
    "def add(a, b):\n    return a + b  # 12345 digits split one by one",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


def tokenize(server, text: str, add_special_tokens: bool = True) -> list[int]:
    return server.post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens}).json()["tokens"]


def echo(server, prompt, k: int = 5, **extra) -> list[dict]:
    payload = {"prompt": prompt, "echo": True, "logprobs": k, "max_tokens": 0, "temperature": 0}
    return [c["logprobs"] for c in server.complete(**(payload | extra))["choices"]]


def check_against_reference(reference, tokens: list[int], lp: dict, k: int) -> None:
    """An echo's logprobs (top-k) equal the float64 reference's for every token after the first."""
    assert len(lp["tokens"]) == len(tokens)
    expected = reference.logprob_matrix(tokens)
    got = np.array(lp["token_logprobs"][1:])
    diff = np.abs(got - expected[np.arange(len(tokens) - 1), tokens[1:]])
    assert diff.max() <= REFERENCE_TOLERANCE, diff.max()
    # The first token has no context: null, in both lists.
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(tokens)):
        top = lp["top_logprobs"][i]
        best = np.sort(expected[i - 1])[::-1][:k]
        assert np.abs(np.sort(list(top.values()))[::-1][:k] - best).max() <= REFERENCE_TOLERANCE
        assert top[lp["tokens"][i]] == lp["token_logprobs"][i]  # bit for bit


@pytest.mark.parametrize("prompt", PROMPTS)
def test_echo_logprobs_match_float64_reference(fixture_server, numpy_reference, prompt):
    tokens = tokenize(fixture_server, prompt)
    (lp,) = echo(fixture_server, prompt, k=5)
    check_against_reference(numpy_reference, tokens, lp, 5)


def test_prompt_logprobs_values_and_ranks_match_float64_reference(fixture_server, numpy_reference):
    """vLLM's prompt_logprobs from the real backend: each prompt token's logprob as echo gives it, and
    its rank where the float64 reference puts it (a token within the tolerance of another may swap
    places with it: the rank must lie in the span such near-ties allow)."""
    prompt = PROMPTS[0]
    tokens = tokenize(fixture_server, prompt)
    choice = fixture_server.complete(prompt=prompt, max_tokens=0, prompt_logprobs=3, echo=True, logprobs=3)["choices"][
        0
    ]
    entries = choice["prompt_logprobs"]
    expected = numpy_reference.logprob_matrix(tokens)
    assert len(entries) == len(tokens) and entries[0] is None
    for i, (entry, token) in enumerate(zip(entries[1:], tokens[1:])):
        own = entry[str(token)]
        assert own["logprob"] == choice["logprobs"]["token_logprobs"][i + 1]  # the same float as echo's
        row, value = expected[i], expected[i][token]
        assert (
            (row > value + REFERENCE_TOLERANCE).sum() + 1 <= own["rank"] <= (row >= value - REFERENCE_TOLERANCE).sum()
        )
        best = [e for e in entry.values() if e["rank"] <= 3]
        assert [e["rank"] for e in best] == [1, 2, 3]
        assert np.abs(np.array([e["logprob"] for e in best]) - np.sort(row)[::-1][:3]).max() <= REFERENCE_TOLERANCE


def test_backends_agree_token_by_token(gguf_fixture_server, mlx_fixture_server):
    worst = 0.0
    for prompt in PROMPTS:
        assert tokenize(gguf_fixture_server, prompt) == tokenize(mlx_fixture_server, prompt)
        (a,) = echo(gguf_fixture_server, prompt, k=3)
        (b,) = echo(mlx_fixture_server, prompt, k=3)
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        diff = np.abs(np.array(a["token_logprobs"][1:]) - np.array(b["token_logprobs"][1:]))
        worst = max(worst, float(diff.max()))
        for top_a, top_b in zip(a["top_logprobs"][1:], b["top_logprobs"][1:]):
            common = set(top_a) & set(top_b)
            assert len(common) >= 2  # top-3 lists may differ only where values nearly tie
            assert max(abs(top_a[t] - top_b[t]) for t in common) <= CROSS_TOLERANCE
    print(f"max |logprob(gguf) - logprob(mlx)| = {worst:.2e}")
    assert worst <= CROSS_TOLERANCE


def test_token_id_batch_unequal_lengths_with_and_without_bos(fixture_server, numpy_reference):
    info = requests.get(fixture_server.url + "/tokenizer_info").json()
    bos = tokenize(fixture_server, info["bos_token"], add_special_tokens=False)
    assert len(bos) == 1
    base = [tokenize(fixture_server, p) for p in PROMPTS[:3]]
    batch = [bos + base[0], base[1], base[2][:5], bos + base[1][:2]]
    choices = fixture_server.complete(prompt=batch, echo=True, logprobs=2, max_tokens=1, temperature=0)["choices"]
    assert [c["index"] for c in choices] == list(range(len(batch)))
    for tokens, choice in zip(batch, choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(tokens) + 1
        expected = numpy_reference.logprob_matrix(tokens)
        got = np.array(lp["token_logprobs"][1 : len(tokens)])
        assert np.abs(got - expected[np.arange(len(tokens) - 1), tokens[1:]]).max() <= REFERENCE_TOLERANCE
        # Greedy: the generated token is the reference's argmax, and its value is the top value.
        assert (
            lp["tokens"][-1]
            == fixture_server.post("/detokenize", {"tokens": [int(expected[-1].argmax())]}).json()["prompt"]
        )
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_bos_rules_and_tokenizer_info(fixture_server):
    info = requests.get(fixture_server.url + "/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert info["chat_template"] and "<|im_start|>" in info["chat_template"]
    # This tokenizer adds no BOS, with or without special tokens; special-token text is parsed.
    assert info["add_bos_token"] is False
    assert tokenize(fixture_server, "Hello", True) == tokenize(fixture_server, "Hello", False)
    assert len(tokenize(fixture_server, "<|im_end|>", False)) == 1
    # Token-id prompts are used exactly as given.
    ids = tokenize(fixture_server, "Hello world")
    assert fixture_server.complete(prompt=ids, max_tokens=0, echo=True)["usage"]["prompt_tokens"] == len(ids)


def test_utf8_pieces_offsets_and_bytes_form(fixture_server):
    prompt = "Emoji 🎉🎉 and 東京"
    (lp,) = echo(fixture_server, prompt, k=0)
    assert any(t.startswith("bytes:\\x") for t in lp["tokens"])
    text = fixture_server.complete(prompt=prompt, echo=True, max_tokens=0)["choices"][0]["text"]
    assert text == prompt
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs=0: just the token


def test_greedy_generation_and_stop_strings(gguf_fixture_server, mlx_fixture_server, mlx_oracle):
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = mlx_oracle.tokenize(prompt)
    free = mlx_oracle.greedy(ids, 12, [])
    # A stop string from the middle of the oracle's text (it ends generation), and one that is not there.
    middle = free[len(free) // 2 :][:3]
    assert len(middle) == 3 and "\n" not in free
    for stop in ([middle, "\n"], ["\n"]):
        tokens, reason = greedy_ids(mlx_oracle, ids, 12, stop)
        assert reason == "stop" or middle not in stop  # the stop string does end generation
        outs = [
            s.complete(prompt=ids, max_tokens=12, temperature=0, stop=stop)
            for s in (gguf_fixture_server, mlx_fixture_server)
        ]
        for out in outs:
            assert out["choices"][0]["text"] == mlx_oracle.greedy(ids, 12, stop)
            assert out["choices"][0]["finish_reason"] == reason
            assert out["usage"]["completion_tokens"] == len(tokens)


def test_seeded_sampling_is_reproducible(fixture_server):
    payload = {"prompt": "List of fruits:", "max_tokens": 10, "temperature": 0.8, "top_p": 0.95, "seed": 7}
    first = fixture_server.complete(**payload)["choices"][0]["text"]
    assert fixture_server.complete(**payload)["choices"][0]["text"] == first


# -- a tokenizer that adds BOS (testing/fixture_model.py, add_bos=True) ---------------------------

BOS_PROMPT = "The quick brown fox"


def test_bos_fixture_adds_bos_only_with_special_tokens(bos_fixture_server):
    info = requests.get(bos_fixture_server.url + "/tokenizer_info").json()
    assert info["add_bos_token"] is True and info["bos_token"] == BOS_TOKEN
    bos = tokenize(bos_fixture_server, BOS_TOKEN, add_special_tokens=False)
    assert bos == [0]  # SmolLM2's <|endoftext|>: the same id on both backends
    without = tokenize(bos_fixture_server, BOS_PROMPT, add_special_tokens=False)
    assert without and 0 not in without
    assert tokenize(bos_fixture_server, BOS_PROMPT, add_special_tokens=True) == bos + without
    # A string prompt is tokenized with special tokens; token ids are used as given.
    usage = bos_fixture_server.complete(prompt=BOS_PROMPT, max_tokens=0, echo=True)["usage"]
    assert usage["prompt_tokens"] == len(without) + 1
    usage = bos_fixture_server.complete(prompt=without, max_tokens=0, echo=True)["usage"]
    assert usage["prompt_tokens"] == len(without)


def test_echo_with_added_bos_returns_the_prompt_as_sent(bos_fixture_server):
    """The echoed text is the prompt as sent (as OpenAI and vLLM answer), not "<BOS>" + prompt:
    lm-eval and other clients cut the continuation from the echo by the prompt's length."""
    payload = {"prompt": BOS_PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1}
    assert bos_fixture_server.complete(**payload)["choices"][0]["text"] == BOS_PROMPT
    events = bos_fixture_server.stream("/v1/completions", **payload)
    assert "".join(e["choices"][0]["text"] for e in events) == BOS_PROMPT
    # With generated tokens after it: the prompt, then exactly the non-echo continuation.
    generated = bos_fixture_server.complete(prompt=BOS_PROMPT, max_tokens=3, temperature=0)["choices"][0]["text"]
    assert generated
    payload |= {"max_tokens": 3, "temperature": 0}
    assert bos_fixture_server.complete(**payload)["choices"][0]["text"] == BOS_PROMPT + generated
    events = bos_fixture_server.stream("/v1/completions", **payload)
    assert "".join(e["choices"][0]["text"] for e in events) == BOS_PROMPT + generated


def test_echo_with_added_bos_tokens_and_offsets(bos_fixture_server):
    """The BOS is reported as the first token, without logprob and zero-width at offset 0; each
    other token's offset points at its text in the prompt."""
    lp = bos_fixture_server.complete(prompt=BOS_PROMPT, echo=True, max_tokens=0, logprobs=1)["choices"][0]["logprobs"]
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert tokens[0] == BOS_TOKEN and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert offsets[:2] == [0, 0], offsets
    assert "".join(tokens[1:]) == BOS_PROMPT
    for token, offset in zip(tokens[1:], offsets[1:]):
        assert BOS_PROMPT[offset : offset + len(token)] == token, (token, offset)


def test_echo_with_added_bos_logprobs_match_float64_reference(bos_fixture_server, bos_numpy_reference):
    tokens = tokenize(bos_fixture_server, BOS_PROMPT)
    assert tokens[0] == 0
    (lp,) = echo(bos_fixture_server, BOS_PROMPT, k=5)
    check_against_reference(bos_numpy_reference, tokens, lp, 5)
