"""Prefix reuse: results with the cache equal results without it, and it is really used."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest
import requests

from server.backends.base import ReuseRule
from server.backends.probes import Exactness, choose_reuse_rule
from server.engine import Engine, Outputs, PromptJob
from server.engine.prefix_cache import MIN_REUSE, PrefixCache
from server.numerics.scoring import ScoredRows
from testing.fake_backend import BOS, ByteBackend
from testing.live_server import DATA
from tests.conftest import serve, serve_beside


@pytest.fixture(scope="module", params=["gguf", "mlx"])
def servers(request, tmp_path_factory):
    """(a server with the prefix cache, the same model without it), on each backend."""
    yield from serve_beside(request, tmp_path_factory, "uncached", "--prefix-cache-mb", "0")


def hellaswag_requests(server, n_items: int) -> list[list[int]]:
    """lm-eval-style token sequences: context + " " + ending, for every ending of each item."""
    sequences = []
    for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:n_items]:
        item = json.loads(line)
        for ending in item["endings"]:
            sequences.append(
                server.post("/tokenize", {"prompt": item["ctx"] + " " + ending, "add_special_tokens": False}).json()[
                    "tokens"
                ]
            )
    return sequences


def test_reuse_gives_the_same_numbers(servers):
    server, uncached_server = servers
    sequences = hellaswag_requests(server, 6)
    # lm-eval's order: longest first, so the endings of one context are spread over batches.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    hits_before = _hits(server)
    for start in range(0, len(order), 4):
        batch = [sequences[i] for i in order[start : start + 4]]
        for k in (1, 5):
            payload = {"prompt": batch, "echo": True, "logprobs": k, "max_tokens": 1, "temperature": 0}
            cached = server.complete(**payload)["choices"]
            fresh = uncached_server.complete(**payload)["choices"]
            for a, b in zip(cached, fresh):
                # The prompt's tokens (what lm-eval reads), not the one generated after it.
                la = {key: value[:-1] for key, value in a["logprobs"].items()}
                lb = {key: value[:-1] for key, value in b["logprobs"].items()}
                assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
                diff = np.abs(np.array(la["token_logprobs"][1:]) - np.array(lb["token_logprobs"][1:]))
                assert diff.max() <= 1e-4
                for i in range(1, len(la["tokens"])):
                    ta, tb = la["top_logprobs"][i], lb["top_logprobs"][i]
                    # The same alternatives as without reuse, each with the same value...
                    assert ta.keys() == tb.keys(), (i, ta, tb)
                    assert max(abs(ta[t] - tb[t]) for t in ta) <= 1e-4, (i, ta, tb)
                    # ... and the token's own entry is its token_logprob, bit for bit (lm-eval's greedy ==).
                    assert ta[la["tokens"][i]] == la["token_logprobs"][i]
    assert _hits(server) > hits_before  # the cache was really used
    assert _hits(uncached_server) == 0 and _metric(uncached_server, "logprobs_prefix_cache_capacity_bytes") == 0


def gsm8k_prompts(n: int, shots: int = 3) -> list[str]:
    """lm-eval's generate_until prompts for GSM8K (clients/lm_eval_tasks/gsm8k_dev.yaml): the same
    solved examples before each question."""
    items = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()[: shots + n]]
    examples = "\n\n".join(f"Question: {i['question']}\nAnswer: {i['answer']}" for i in items[:shots])
    return [f"{examples}\n\nQuestion: {i['question']}\nAnswer:" for i in items[shots:]]


def test_generations_reuse_the_few_shot_prefix_and_answer_the_same(servers, request):
    """Generations share lm-eval's few-shot examples: where the start-up check found cache hits
    give the very same floats (llama.cpp on this file), they start from the cached examples, and
    every answer (text, token logprobs, top-k) is what the server without a cache gives."""
    server, uncached_server = servers
    hits, lookups = _hits(server), _lookups(server)
    for prompt in gsm8k_prompts(4):
        payload = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": ["Question:", "\n\n"], "logprobs": 2}
        cached, fresh = server.complete(**payload)["choices"], uncached_server.complete(**payload)["choices"]
        assert cached == fresh
    if request.node.callspec.params["servers"] == "gguf":
        assert _lookups(server) == lookups + 4 and _hits(server) >= hits + 3  # the first fills the cache


@pytest.fixture(scope="module")
def repacked_servers(requantized_model_path, tmp_path_factory):
    """The Q3_K_M build of the default model (its weights go through llama.cpp's repacked kernels),
    with the cache asked for (the default 1024 MB), and the same without."""
    cached = serve(requantized_model_path, tmp_path_factory, "repacked")
    uncached = serve(requantized_model_path, tmp_path_factory, "repacked-uncached", "--prefix-cache-mb", "0")
    yield next(cached), next(uncached)
    next(cached, None), next(uncached, None)


def test_reuse_stays_exact_where_pass_shapes_change_the_numbers(repacked_servers):
    """With weights that llama.cpp repacks, a cache hit whose tail starts anywhere gives other logits
    than the whole prompt (0.99 on this file): the start-up check finds so and keeps the cache on
    under the rule that gives the same floats (tails of 8+ tokens at multiples of 4), and HellaSwag's
    requests after cache hits get exactly the numbers the uncached server gives."""
    server, uncached = repacked_servers
    assert _metric(server, "logprobs_prefix_cache_capacity_bytes") == 1024 << 20  # the check kept it on
    sequences = hellaswag_requests(server, 4)  # four contexts, four endings each
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # lm-eval's order
    for start in range(0, len(order), 4):
        payload = {
            "prompt": [sequences[i] for i in order[start : start + 4]],
            "echo": True,
            "logprobs": 1,
            "max_tokens": 0,
        }
        assert server.complete(**payload)["choices"] == uncached.complete(**payload)["choices"]
    assert _hits(server) >= 8


ECHO_1 = Outputs.of(echo=True, logprobs=1)  # lm-eval's loglikelihood request


def _metric(server, name: str) -> float:
    """A value of the server's GET /metrics (what its operators read, rather than its log lines)."""
    text = requests.get(server.url + "/metrics", timeout=30, verify=server.verify).text
    return float(re.search(rf"^{name}(?:_total)? (\S+)$", text, flags=re.M).group(1))


def _hits(server) -> int:
    return int(_metric(server, "logprobs_prefix_cache_hits"))


def _lookups(server) -> int:
    return int(_metric(server, "logprobs_prefix_cache_lookups"))


def _rows(n: int, k: int) -> ScoredRows:
    return ScoredRows(np.zeros(n, np.float32), np.zeros((n, k), np.int64), np.zeros((n, k), np.float32))


def test_an_aligned_rule_starts_tails_where_the_whole_passes_compute_the_same():
    """ReuseRule(4, 8) on a grid of 64: tails start at multiples of 4 past a grid line, with at least
    8 tokens in their first pass, or on the line itself."""
    rule, n_batch = ReuseRule(4, 8), 64
    assert rule.restore_length(shared=300, n=300, n_batch=n_batch) == 292  # 8 tokens run, from 292 = 256 + 36
    assert rule.restore_length(shared=298, n=300, n_batch=n_batch) == 292
    assert rule.restore_length(shared=150, n=300, n_batch=n_batch) == 148  # 149 cut back to 128 + 20
    assert rule.restore_length(shared=128, n=300, n_batch=n_batch) == 120  # 124..127 would be a 4-token pass
    assert rule.restore_length(shared=129, n=300, n_batch=n_batch) == 128  # on the line: a whole pass
    assert ReuseRule().restore_length(shared=127, n=300, n_batch=n_batch) == 126  # the plain rule: 2 tokens
    for shared in range(1, 301):
        length = rule.restore_length(shared, 300, n_batch)
        line = length // n_batch * n_batch
        assert 0 <= length < shared and (length - line) % 4 == 0
        assert length == line or min(300, line + n_batch) - length >= 8


def test_cache_rules():
    cache = PrefixCache(max_bytes=1000)
    base = list(range(100, 130))
    cache.add(base, "state-a", 400, _rows(len(base) - 1, 2), 2)
    # Scored reuse stops one short of the shared prefix (the last shared row predicts a new token).
    hit = cache.find([*base[:20], 1, 2, 3], k=2)
    assert hit.entry.state == "state-a" and hit.length == 19
    assert cache.find([*base[:20], 1, 2, 3], k=1).length == 19  # a narrower top-k is cut from the cached one
    # The same prompt again: at least its last two tokens run again.
    assert cache.find(base, k=2).length == len(base) - 2
    # Wider top-k than cached, or too short a prefix: no reuse.
    assert cache.find([*base[:20], 1], k=5) is None
    assert cache.find(base[: MIN_REUSE - 1] + [1] * 10, k=1) is None
    # Eviction keeps the byte bound, least recently used first.
    other = list(range(500, 530))
    cache.add(other, "state-b", 400, _rows(len(other) - 1, 1), 1)
    cache.find([*base, 7], k=1)  # base is now the most recently used
    cache.add(list(range(900, 930)), "state-c", 400, _rows(29, 1), 1)
    assert cache.used <= 1000 and len(cache) == 2
    assert cache.find([*other, 1], k=1) is None and cache.find([*base, 1], k=1) is not None


class KernelPaths(ByteBackend):
    """The fake model, with llama.cpp's pass-shape rules made explicit: a pass of fewer than `short`
    tokens, or one that starts off a multiple of `group` past its n_batch grid line, takes another
    kernel path, whose logits differ by `moved` (as K-quant and repacked kernels do)."""

    reuse_rules = (ReuseRule(1, 2), ReuseRule(4, 8), ReuseRule(16, 16))

    def __init__(self, short: int, group: int, moved: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.short, self.group, self.moved = short, group, moved

    def prefill(self, seq, tokens, start, logits_from):
        block = super().prefill(seq, tokens, start, logits_from)
        if block is not None and (
            len(tokens) < self.short or (start - start // self.n_batch * self.n_batch) % self.group
        ):
            block = block + np.float32(self.moved)
        return block


@pytest.mark.parametrize(
    "short, group, chosen",
    [
        (1, 1, ReuseRule(1, 2)),
        (8, 4, ReuseRule(4, 8)),
        (3, 4, ReuseRule(4, 8)),
        (16, 16, ReuseRule(16, 16)),
        (8, 32, None),
        (24, 4, None),
    ],
)
def test_the_start_up_check_finds_the_rule_that_keeps_every_number(short, group, chosen):
    """The check tries the backend's rules in turn on the shapes real requests take and keeps the
    first whose cache hits give the whole pass's floats, or turns the cache off; with the rule it
    chose, lm-eval-shaped requests after cache hits get exactly the numbers they get without."""
    backend = KernelPaths(short, group, n_batch=64, n_ctx=512)
    assert choose_reuse_rule(backend, MIN_REUSE) == chosen
    if chosen is None:
        return
    contexts = [[BOS, *bytes(range(40 + 7 * i, 140 + 11 * i))] for i in range(6)]
    batches = [[c + [65 + j] * (1 + j % 3) for j in range(4)] for c in contexts]  # MMLU-like: 1-3 token answers
    batches += [[c[:60] + list(b"an ending of some length")[: 10 + 3 * j] for j in range(4)] for c in contexts]

    def scores(cache_mb: int):
        engine = Engine(backend, exactness=Exactness(cache_mb << 20, chosen, shared_passes=False))
        try:
            out = [
                r.prompt_scores.token_logprobs
                for prompts in batches
                for r in asyncio.run(
                    engine.complete(
                        [PromptJob(tokens=p, max_tokens=0, outputs=Outputs.of(echo=True, logprobs=1)) for p in prompts]
                    )
                )
            ]
            return out, engine.cache.hits if engine.cache else 0
        finally:
            engine.close()

    (cached, hits), (whole, _) = scores(64), scores(0)
    assert hits >= len(batches) and all(np.array_equal(a, b) for a, b in zip(cached, whole))
