"""The prefix-affinity rule (server/scale/affinity.py) on lm-eval's own request stream: HellaSwag's
items from data/ as lm-eval builds them (context and " " + ending tokenized apart by the
default model's tokenizer, then joined; sent longest first, as lm-eval's Collator orders them),
0-shot and 5-shot. Each replica's prefix cache is the engine's own PrefixCache, so "reused" is
what the replicas would reuse; one server is the same cache with every prompt."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from server.engine.prefix_cache import PrefixCache
from server.numerics.scoring import ScoredRows
from server.scale.affinity import PrefixAffinity, block_names
from testing.live_server import DATA

ITEMS = 300


@pytest.fixture(scope="module")
def tokenize(model_path):
    import llama_cpp

    vocab = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=False, special=False)


@pytest.fixture(scope="module")
def docs():
    lines = (DATA / "hellaswag_dev.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[: ITEMS + 50]]


def requests_for(docs, tokenize, shots: str) -> list[list[int]]:
    """Every (context + ending) prompt, in lm-eval's order. shots: "none", "same" (one set of five
    examples before every item: a long prefix all items share) or "random" (five per item, as
    lm-eval's default sampler draws them)."""
    rng = random.Random(1234)
    pool, items = docs[ITEMS:], docs[:ITEMS]
    same = rng.sample(pool, 5)
    prompts = []
    for doc in items:
        examples = {"none": [], "same": same, "random": rng.sample(pool, 5)}[shots]
        context = "".join(f"{e['ctx']} {e['endings'][e['label']]}\n\n" for e in examples) + doc["ctx"]
        context_ids = tokenize(context)
        prompts += [context_ids + tokenize(" " + ending) for ending in doc["endings"]]
    return sorted(prompts, key=lambda p: (-len(p), tuple(p)))


def replay(prompts: list[list[int]], route) -> tuple[int, list[int]]:
    """(prompt tokens reused from the replicas' prefix caches, prompts per replica) when each prompt
    goes where route(prompt) says; a scored prompt is cached after it runs, as the engine does."""
    caches: dict[str, PrefixCache] = {}
    reused = 0
    empty = ScoredRows(np.empty(0, np.float32), np.empty((0, 1), np.int64), np.empty((0, 1), np.float32))
    for prompt in prompts:
        cache = caches.setdefault(route(prompt), PrefixCache(1 << 40))
        hit = cache.find(prompt, 1)
        reused += hit.length if hit else 0
        cache.add(prompt, None, len(prompt), empty, 1)
    return reused, [c.lookups for c in caches.values()]


def affinity_route(n: int):
    rule, replicas = PrefixAffinity(), [f"replica-{i}" for i in range(n)]

    def route(prompt):
        choice = rule.order(prompt, replicas)[0]
        rule.sent(choice, prompt)
        return choice

    return route


@pytest.mark.parametrize("shots", ["none", "same", "random"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_replicas_reuse_what_one_server_reuses_and_share_the_work(docs, tokenize, shots, n):
    prompts = requests_for(docs, tokenize, shots)
    one, _ = replay(prompts, lambda p: "one")
    reused, shares = replay(prompts, affinity_route(n))
    rng = random.Random(0)
    spread, _ = replay(prompts, lambda p: f"replica-{rng.randrange(n)}")  # routing that ignores the prompt
    computed_one = sum(map(len, prompts)) - one
    computed = sum(map(len, prompts)) - reused
    print(
        f"{shots}-shot, {n} replicas: reused {reused / one:.3f} of one server's ({reused} vs {one} tokens; "
        f"random routing {spread / one:.3f}); computed {computed / computed_one:.3f}x one server's; "
        f"shares {sorted(shares)} (max {max(shares) / np.mean(shares):.2f}x the mean)"
    )
    assert len(shares) == n
    assert reused >= 0.95 * one
    # Tokens computed: at most 1.05x one server's at 2 and 4 replicas (the target; measured
    # at most 1.049x, with one few-shot prefix shared by every item at 4). At 8, where every replica
    # computes that prefix once and one server reuses 87 % of those prompts' tokens (so 1 % less
    # reuse is 7 % more computing), measured 1.096x: held at 1.15x.
    assert computed <= (1.05 if n <= 4 else 1.15) * computed_one
    assert max(shares) <= 1.25 * np.mean(shares)
    if shots != "same":  # (with a shared few-shot prefix, random routing also finds it on every replica)
        assert spread < 0.95 * one  # the measure can tell routing that ignores the prompt


def test_a_few_shot_prefix_ties_every_replica_and_load_decides():
    rule, replicas = PrefixAffinity(), ["a", "b", "c"]
    shared = list(range(1000, 1200))  # a 200-token prefix every prompt starts with
    for i in range(30):
        prompt = shared + [i] * 40
        rule.sent(rule.order(prompt, replicas)[0], prompt)
    assert [rule.replicas[r].sent for r in replicas] == [10, 10, 10]
    # An item's second choice goes where its first went, whatever the load.
    first = shared + [7] * 40 + [1, 2, 3]
    home = next(r for r in replicas if rule.replicas[r].match(block_names(first)) > len(block_names(shared)))
    assert rule.order(first, replicas)[0] == home


def test_the_load_bound_moves_a_hot_prefix_off_its_replica():
    rule, replicas = PrefixAffinity(slack=0.2), ["a", "b"]
    hot = list(range(64))
    for _ in range(20):
        rule.sent(rule.order(hot, replicas)[0], hot)
    counts = [rule.replicas[r].sent for r in replicas]
    assert max(counts) <= 1.2 * 21 / 2 + 1 + 4 and min(counts) > 0  # SLACK, rounded up, + BURST


def test_a_redeploy_forgets_the_old_replicas():
    rule = PrefixAffinity()
    prompt = list(range(100))
    rule.sent(rule.order(prompt, ["old-1", "old-2"])[0], prompt)
    assert rule.order(prompt, ["new-1", "new-2"]) == ["new-1", "new-2"]  # no match, equal load: by id
    assert set(rule.replicas) == {"new-1", "new-2"}


def test_a_replica_that_joins_takes_its_share_from_then_on():
    """A replica added to (or restarted among) busy ones starts at their mean count: it does not take
    every prompt until it has caught up with their history."""
    rule = PrefixAffinity()
    for i in range(100):
        prompt = [i] * 32
        rule.sent(rule.order(prompt, ["a", "b"])[0], prompt)
    sent_before = {r: rule.replicas[r].sent for r in ("a", "b")}
    for i in range(100, 160):
        prompt = [i] * 32
        rule.sent(rule.order(prompt, ["a", "b", "c"])[0], prompt)
    gained = [rule.replicas[r].sent - sent_before.get(r, 50) for r in ("a", "b", "c")]
    assert max(gained) <= 1.25 * 60 / 3 + 1, gained


def test_block_names_chain_the_whole_prefix():
    a, b = list(range(48)), list(range(48))
    b[3] = 999  # differs in the first block only
    assert block_names(a)[0] != block_names(b)[0] and block_names(a)[2] != block_names(b)[2]
    assert block_names("x" * 130) == block_names("x" * 128 + "yy")  # the partial block is left out
    assert block_names([1, 2, 3]) == [] and block_names("short") == []
