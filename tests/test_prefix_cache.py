"""Prefix reuse: results with the cache equal results without it, and it is really used."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import requests

from server.engine.prefix_cache import MIN_REUSE, PrefixCache
from server.numerics.scoring import ScoredRows
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
            sequences.append(server.post("/tokenize", {"prompt": item["ctx"] + " " + ending,
                                                       "add_special_tokens": False}).json()["tokens"])
    return sequences


def test_reuse_gives_the_same_numbers(servers):
    server, uncached_server = servers
    sequences = hellaswag_requests(server, 6)
    # lm-eval's order: longest first, so the endings of one context are spread over batches.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    hits_before = _hits(server) or 0  # None: nothing logged yet
    for start in range(0, len(order), 4):
        batch = [sequences[i] for i in order[start:start + 4]]
        for k in (1, 5):
            payload = dict(prompt=batch, echo=True, logprobs=k, max_tokens=1, temperature=0)
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
    assert _hits(uncached_server) is None


def test_generation_is_not_served_from_the_cache(servers):
    server, uncached_server = servers
    prompt = "The history of the Roman Empire is a story of power, politics and"
    server.complete(prompt=prompt + " war", max_tokens=1, echo=True, logprobs=1)  # cached
    lookups = _lookups(server)
    payload = dict(prompt=prompt + " glory", max_tokens=16, temperature=0, logprobs=2)
    assert server.complete(**payload)["choices"][0] == uncached_server.complete(**payload)["choices"][0]
    assert _lookups(server) == lookups  # a request without echo does not even look in the cache


@pytest.fixture(scope="module")
def repacked_server(requantized_model_path, tmp_path_factory):
    """The Q3_K_M build of the default model, with the cache asked for (the default 1024 MB)."""
    yield from serve(requantized_model_path, tmp_path_factory, "repacked")


def test_reuse_is_turned_off_where_passes_change_the_numbers(repacked_server):
    """With weights that llama.cpp repacks, a prompt run as after a cache hit (prefix, then tail)
    gives other logits than run whole: the server measures that at start-up, says so, and serves
    without reuse, so that a prompt's numbers never depend on which prompts came before."""
    log = repacked_server.log()
    drift = float(re.search(r"Prefix cache off: .* moved by up to (\S+);", log).group(1))
    assert drift > 1e-2  # ~1 on this file: far above the 1e-4 tolerance, not a rounding matter
    assert "prefix cache: off" in log and "prefix_cache=off" in log  # the settings line and the fingerprint
    metrics = requests.get(repacked_server.url + "/metrics", timeout=10).text
    assert re.search(r"^logprobs_prefix_cache_capacity_bytes 0\.0$", metrics, re.M)
    sequences = hellaswag_requests(repacked_server, 2)  # two contexts, four endings each
    first = [repacked_server.complete(prompt=sequences, echo=True, logprobs=1, max_tokens=0)["choices"]
             for _ in range(2)]
    assert first[0] == first[1] and _hits(repacked_server) is None


def _counts(server) -> tuple[int, int] | None:
    """(hits, lookups) of the prefix cache in the server's latest log line, None if none yet."""
    found = re.findall(r"prefix cache: (\d+)/(\d+) hits", server.log())
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def _hits(server) -> int | None:
    counts = _counts(server)
    return None if counts is None else counts[0]


def _lookups(server) -> int:
    counts = _counts(server)
    assert counts is not None, "the server logs its cache counts after each request"
    return counts[1]


def _rows(n: int, k: int) -> ScoredRows:
    return ScoredRows(np.zeros(n, np.float32), np.zeros((n, k), np.int64), np.zeros((n, k), np.float32))


def test_cache_rules():
    cache = PrefixCache(max_bytes=1000)
    base = list(range(100, 130))
    cache.add(base, "state-a", 400, _rows(len(base) - 1, 2), 2)
    # Scored reuse stops one short of the shared prefix (the last shared row predicts a new token).
    hit = cache.find(base[:20] + [1, 2, 3], k=2)
    assert hit.entry.state == "state-a" and hit.length == 19
    assert cache.find(base[:20] + [1, 2, 3], k=1).length == 19  # a narrower top-k is cut from the cached one
    # The same prompt again: at least its last two tokens run again.
    assert cache.find(base, k=2).length == len(base) - 2
    # Wider top-k than cached, or too short a prefix: no reuse.
    assert cache.find(base[:20] + [1], k=5) is None
    assert cache.find(base[:MIN_REUSE - 1] + [1] * 10, k=1) is None
    # Eviction keeps the byte bound, least recently used first.
    other = list(range(500, 530))
    cache.add(other, "state-b", 400, _rows(len(other) - 1, 1), 1)
    cache.find(base + [7], k=1)  # base is now the most recently used
    cache.add(list(range(900, 930)), "state-c", 400, _rows(29, 1), 1)
    assert cache.used <= 1000 and len(cache) == 2
    assert cache.find(other + [1], k=1) is None and cache.find(base + [1], k=1) is not None
