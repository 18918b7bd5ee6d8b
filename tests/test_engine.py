"""The engine's scheduling, on a small fake backend that records every call (the engine is what is
tested here; the real backends' numbers are tested in test_conformance and test_completions).

- one request's jobs are submitted together, so with --max-sequences they decode together;
- a cancelled request's queued jobs never reach the backend, and its running ones stop before
  the next forward pass (a long prompt between its chunks);
- streamed and non-streamed requests take the same path and give the same results.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.backends.base import Backend, ModelInfo, ReuseRule, Step
from server.backends.probes import Exactness
from server.engine import (
    Engine,
    EngineHooks,
    Origin,
    Outputs,
    PromptJob,
    PromptResult,
    PromptScored,
    QueueFull,
    TokenEvent,
)
from server.engine.fair_queue import FairQueue
from server.numerics.sampling import SamplingParams
from server.text.tokens import TokenTable

N_VOCAB = 8
END = 7  # the end-of-generation token


def next_token(token: int, position: int) -> int:
    """The fake model's greedy choice after `token` at `position` (never END)."""
    return (token + position) % END


class FakeBackend(Backend):
    """Logits that peak at next_token(); records prefill and decode calls; optional delays let a
    test act while the model thread is busy."""

    def __init__(self, max_sequences: int = 1, n_batch: int = 512, delay: float = 0.0):
        self.max_sequences, self.n_batch, self.delay = max_sequences, n_batch, delay
        self.info = ModelInfo(
            path="fake",
            n_ctx=4096,
            n_ctx_train=4096,
            n_vocab=N_VOCAB,
            bos_id=None,
            eos_id=END,
            pad_id=None,
            add_bos=False,
            chat_template=None,
            description="fake",
        )
        self.tokens = TokenTable([bytes([ord("a") + t]) for t in range(N_VOCAB)], [END])
        self.prefills: list[tuple[int, int, int]] = []  # (seq, start, n tokens)
        self.decodes: list[list[int]] = []  # the sequences of each decode step
        self.lengths: dict[int, int] = {}
        self.lock = threading.Lock()

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return [ord(c) % END for c in text]

    def _rows(self, tokens, positions) -> np.ndarray:
        rows = np.zeros((len(tokens), N_VOCAB), dtype=np.float32)
        rows[np.arange(len(tokens)), [next_token(t, p) for t, p in zip(tokens, positions)]] = 5.0
        return rows

    def prefill(self, seq, tokens, start, logits_from):
        time.sleep(self.delay)
        with self.lock:
            self.prefills.append((seq, start, len(tokens)))
        assert len(tokens) <= self.n_batch and self.lengths.get(seq, 0) >= start
        self.lengths[seq] = start + len(tokens)
        if logits_from >= len(tokens):
            return None
        return self._rows(tokens[logits_from:], range(start + logits_from, start + len(tokens)))

    def decode(self, steps: list[Step]) -> np.ndarray:
        time.sleep(self.delay)
        with self.lock:
            self.decodes.append([s.seq for s in steps])
        assert len(steps) <= self.max_sequences
        for s in steps:
            assert self.lengths[s.seq] == s.position, "a decode step must continue where its sequence stands"
            self.lengths[s.seq] += 1
        return self._rows([s.token for s in steps], [s.position for s in steps])

    def release(self, seq: int) -> None:
        self.lengths.pop(seq, None)


def greedy_job(prompt: list[int], max_tokens: int, **kw) -> PromptJob:
    outputs = Outputs.of(echo=kw.pop("echo", False), logprobs=kw.pop("logprobs", None))
    return PromptJob(
        tokens=prompt, max_tokens=max_tokens, outputs=outputs, sampling=SamplingParams(temperature=0.0), **kw
    )


def expected_greedy(prompt: list[int], max_tokens: int) -> list[int]:
    out, token, position = [], prompt[-1], len(prompt) - 1
    for _ in range(max_tokens):
        token = next_token(token, position)
        out.append(token)
        position += 1
    return out


@pytest.fixture
def make_engine():
    engines = []

    def make(hooks: EngineHooks | None = None, **kw) -> tuple[Engine, FakeBackend]:
        backend = FakeBackend(**kw)
        engines.append(Engine(backend, hooks=hooks))
        return engines[-1], backend

    yield make
    for engine in engines:
        engine.close()


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the model thread"
        time.sleep(0.005)


def test_one_requests_jobs_decode_together(make_engine):
    """A non-streamed request of 4 prompts with --max-sequences 4: 4 prompt passes, then every
    decode step carries all 4 sequences (before, the jobs ran one after another: 16 steps of 1)."""
    engine, backend = make_engine(max_sequences=4)
    prompts = [[1, 2, 3], [4, 5], [6], [2, 2, 2, 2]]
    results = asyncio.run(engine.complete([greedy_job(p, 5) for p in prompts]))
    assert [r.generated for r in results] == [expected_greedy(p, 5) for p in prompts]
    assert len(backend.prefills) == 4
    # 5 tokens each: the first comes from the prompt pass, the other 4 from shared decode steps.
    assert backend.decodes == [[0, 1, 2, 3]] * 4


def test_n_samples_decode_together(make_engine):
    engine, backend = make_engine(max_sequences=3)
    jobs = [greedy_job([1, 2], 4, sample_index=i) for i in range(3)]
    results = asyncio.run(engine.complete(jobs))
    assert all(r.generated == expected_greedy([1, 2], 4) for r in results)
    assert backend.decodes == [[0, 1, 2]] * 3


def test_more_jobs_than_sequences_run_in_waves(make_engine):
    engine, backend = make_engine(max_sequences=2)
    prompts = [[1], [2], [3], [4], [5]]
    results = asyncio.run(engine.complete([greedy_job(p, 3) for p in prompts]))
    assert [r.generated for r in results] == [expected_greedy(p, 3) for p in prompts]
    assert max(map(len, backend.decodes)) == 2 and len(backend.prefills) == 5


def test_streamed_and_complete_give_the_same_results(make_engine):
    engine, _ = make_engine(max_sequences=2)
    jobs = [greedy_job([1, 2, 3], 6, logprobs=2, echo=True), greedy_job([5, 4], 3, logprobs=2, echo=True)]

    async def streamed():
        events: dict[int, list] = {0: [], 1: []}
        async for index, item in engine.stream(jobs):
            events[index].append(item)
        return events

    plain = asyncio.run(engine.complete(jobs))
    events = asyncio.run(streamed())
    for index, result in enumerate(plain):
        kinds = [type(e) for e in events[index]]
        assert kinds == [PromptScored] + [TokenEvent] * len(result.generated) + [PromptResult]
        final: PromptResult = events[index][-1]
        assert final.generated == result.generated == [e.token for e in events[index][1:-1]]
        np.testing.assert_array_equal(final.prompt_scores.token_logprobs, result.prompt_scores.token_logprobs)
        np.testing.assert_array_equal(final.generated_scores.top_ids, result.generated_scores.top_ids)


class CountingHooks(EngineHooks):
    """What the model thread reports of each job (as the metrics hear it)."""

    def __init__(self) -> None:
        self.admitted = self.ended = self.generated = 0

    def job_admitted(self, waited: float) -> None:
        self.admitted += 1

    def job_ended(self, prompt_tokens_run: int, prompt_tokens_reused: int, generated: int) -> None:
        self.ended += 1
        self.generated += generated


def test_cancelled_request_drops_queued_jobs_and_stops_running_ones(make_engine):
    """One sequence, a request of 10 long generations: cancel it while the first one runs. The
    other 9 never reach the backend; the first stops before its next decode step."""
    counted = CountingHooks()
    engine, backend = make_engine(hooks=counted, max_sequences=1, delay=0.005)
    jobs = [greedy_job([1, 2, 3], 200) for _ in range(10)]

    async def run_and_cancel():
        task = asyncio.ensure_future(engine.complete(jobs))
        while len(backend.decodes) < 3:
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_and_cancel())
    wait_until(lambda: engine.queued_jobs == 0 and counted.ended == 1)
    n_decodes = len(backend.decodes)
    time.sleep(0.05)
    assert len(backend.decodes) == n_decodes, "the cancelled job went on decoding"
    assert n_decodes < 50 and len(backend.prefills) == 1
    # The running job stopped early; the 9 queued ones were dropped without ever being admitted.
    assert (counted.admitted, counted.ended) == (1, 1) and 1 <= counted.generated <= n_decodes + 1


def test_cancelled_long_prompt_stops_between_chunks(make_engine):
    engine, backend = make_engine(max_sequences=1, n_batch=4, delay=0.01)
    job = greedy_job(list(range(1, 7)) * 20, 1)  # 120 tokens: 30 chunks of 4

    async def run_and_cancel():
        task = asyncio.ensure_future(engine.complete([job]))
        while len(backend.prefills) < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_and_cancel())
    wait_until(lambda: not backend.lengths)  # the sequence was released
    assert 2 <= len(backend.prefills) < 30
    assert [start for _, start, _ in backend.prefills] == list(range(0, 4 * len(backend.prefills), 4))


def test_cancelling_one_request_leaves_the_others_whole(make_engine):
    engine, backend = make_engine(max_sequences=2, delay=0.002)

    async def run():
        victim = asyncio.ensure_future(engine.complete([greedy_job([1], 300), greedy_job([2], 300)]))
        survivor = asyncio.ensure_future(engine.complete([greedy_job([3, 4], 40)]))
        while len(backend.decodes) < 5:
            await asyncio.sleep(0.001)
        victim.cancel()
        return await survivor

    (result,) = asyncio.run(run())
    assert result.generated == expected_greedy([3, 4], 40) and result.finish_reason == "length"


def test_a_queued_job_of_a_closed_stream_is_dropped(make_engine):
    """Closing a stream early (a streaming client went away) cancels its request too."""
    engine, backend = make_engine(max_sequences=1, delay=0.005)

    async def read_one_event_then_leave():
        events = engine.stream([greedy_job([1], 100), greedy_job([2], 100)])
        await events.__anext__()
        await events.aclose()

    asyncio.run(read_one_event_then_leave())
    wait_until(lambda: not backend.lengths)
    time.sleep(0.05)
    assert len(backend.prefills) == 1


def test_stop_string_finishes_with_stop_and_is_cut(make_engine):
    engine, _ = make_engine()
    # The fake's greedy tokens after prompt [0]: 0 ('a'), 1 ('b'), 3 ('d'), 6 ('g'), ...
    assert expected_greedy([0], 4) == [0, 1, 3, 6]
    (result,) = asyncio.run(engine.complete([greedy_job([0], 10, stop=["bd"])]))
    assert result.finish_reason == "stop" and result.generated_text == "a" and result.generated == [0, 1, 3]
    (result,) = asyncio.run(engine.complete([greedy_job([0], 3)]))
    assert result.finish_reason == "length" and result.generated_text == "abd"


def test_backend_failure_reaches_the_request(make_engine):
    """A job that fails inside the engine fails its request with that error; the engine goes on."""
    engine, backend = make_engine()

    def broken_decode(steps):
        raise RuntimeError("backend exploded")

    backend.decode = broken_decode
    with pytest.raises(RuntimeError, match="backend exploded"):
        asyncio.run(engine.complete([greedy_job([1], 5)]))
    del backend.decode  # the class's own decode again
    (result,) = asyncio.run(engine.complete([greedy_job([1], 5)]))
    assert result.generated == expected_greedy([1], 5)


def test_admission_refuses_past_the_queue_bound(make_engine):
    """max_queued_tokens bounds what waits: a request that would pass it gets QueueFull (the API's
    429) with a Retry-After estimate, and nothing of it is queued."""
    backend = FakeBackend(max_sequences=1, delay=0.01)
    engine = Engine(backend, max_queued_tokens=100)
    try:

        async def run():
            first = asyncio.ensure_future(engine.complete([greedy_job([1] * 10, 20)]))  # cost 30
            while not backend.prefills:
                await asyncio.sleep(0.001)
            second = asyncio.ensure_future(engine.complete([greedy_job([2] * 10, 50)] * 2))  # cost 120
            await asyncio.sleep(0)
            with pytest.raises(QueueFull) as refused:
                await second
            assert refused.value.cost == 120 and refused.value.limit == 100 and refused.value.retry_after >= 1
            third = asyncio.ensure_future(engine.complete([greedy_job([3] * 10, 40)] * 2))  # cost 100: fits
            return await first, await third

        (first,), third = asyncio.run(run())
        assert first.generated == expected_greedy([1] * 10, 20)
        assert [r.generated for r in third] == [expected_greedy([3] * 10, 40)] * 2
        assert engine.queued_tokens == 0 and engine.queued_jobs == 0
        assert len(backend.prefills) == 3  # the refused request never reached the backend
    finally:
        engine.close()


def test_one_jobs_sampling_failure_fails_only_that_job(make_engine):
    """A job whose sampling raises (here: a logit_bias id outside the vocabulary, which the API
    refuses before it gets here) fails its own request; the job decoding beside it goes on."""
    engine, _ = make_engine(max_sequences=2)
    bad = PromptJob(
        tokens=[1],
        max_tokens=5,
        sampling=SamplingParams(temperature=0.0, logit_bias={N_VOCAB + 5: 1.0}),
    )

    async def run():
        good = asyncio.ensure_future(engine.complete([greedy_job([4], 30)]))
        failing = asyncio.ensure_future(engine.complete([bad]))
        return await asyncio.gather(good, failing, return_exceptions=True)

    good, failing = asyncio.run(run())
    assert isinstance(failing, IndexError)
    assert good[0].generated == expected_greedy([4], 30)


class SnapshotFakeBackend(FakeBackend):
    """The fake with prefix-cache support: a snapshot is the sequence's length."""

    supports_snapshots = True

    def snapshot(self, seq):
        return self.lengths[seq], 64

    def restore(self, seq, state, n_tokens):
        assert n_tokens <= state
        self.lengths[seq] = n_tokens


def test_choices_admitted_together_reuse_each_others_prefix():
    """One request of 4 scored choices sharing a 20-token context, 4 sequences: the cache is looked
    up just before each prompt pass, so choices 2-4 reuse the context that choice 1 ran."""
    backend = SnapshotFakeBackend(max_sequences=4)
    engine = Engine(backend, prefix_cache_mb=1)
    try:
        context = [1, 2, 3, 4, 5] * 4
        jobs = [greedy_job([*context, 6, i % 7, 2], 0, echo=True, logprobs=1) for i in range(4)]
        results = asyncio.run(engine.complete(jobs))
        assert [start for _, start, _ in backend.prefills] == [0] + [len(context)] * 3
        assert engine.cache.hits == 3 and all(len(r.prompt_scores.token_logprobs) == 22 for r in results)
    finally:
        engine.close()


@pytest.mark.parametrize("reuse_generations", [False, True])
def test_generations_reuse_a_shared_prefix_where_the_check_found_reuse_exact(reuse_generations):
    """Generation prompts that share lm-eval's few-shot examples start from the cached examples
    where the start-up check found cache hits give the very same floats, and answer the same."""
    backend = SnapshotFakeBackend(max_sequences=1)
    exactness = Exactness(1 << 20, ReuseRule(), shared_passes=False, reuse_generations=reuse_generations)
    engine = Engine(backend, exactness=exactness)
    try:
        examples = [1, 2, 3, 4, 5] * 6
        prompts = [[*examples, 6, q, 2] for q in range(3)]
        results = [asyncio.run(engine.complete([greedy_job(p, 4)]))[0] for p in prompts]
        assert [r.generated for r in results] == [expected_greedy(p, 4) for p in prompts]
        starts = [start for _, start, _ in backend.prefills]
        assert starts == ([0, len(examples), len(examples)] if reuse_generations else [0, 0, 0])
        assert engine.cache.hits == (2 if reuse_generations else 0)
    finally:
        engine.close()


class SharingFakeBackend(SnapshotFakeBackend):
    """The fake that runs fresh prompts together (as the MLX backend does): records each group."""

    shares_prompt_passes = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.groups: list[list[int]] = []  # the sequences of each prefill_together call

    def prefill_together(self, prompts):
        self.groups.append([seq for seq, _, _ in prompts])
        return [self.prefill(seq, tokens, 0, logits_from) for seq, tokens, logits_from in prompts]


def lm_eval_like_jobs(n_contexts: int, choices: int = 4) -> list[PromptJob]:
    """Scored prompts as one lm-eval request sends them: each context with each of its endings."""
    return [
        greedy_job([c + 1] * 12 + [6, e % 7], 1, echo=True, logprobs=1)
        for c in range(n_contexts)
        for e in range(choices)
    ]


@pytest.mark.parametrize("prefix_cache_mb", [0, 1])
def test_fresh_prompts_run_together_and_choices_then_reuse_their_context(prefix_cache_mb):
    """8 sequences, one request of 2 contexts x 4 endings: without a prefix cache all 8 prompts run in
    one shared pass; with it the first choice of each context runs together, and the other 6 reuse
    the context it left in the cache, one by one. Either way the results are those of the backend
    that runs every prompt alone."""
    jobs = lm_eval_like_jobs(2)

    def run(backend: Backend) -> tuple[list[PromptResult], Engine]:
        engine = Engine(backend, prefix_cache_mb=prefix_cache_mb)
        try:
            return asyncio.run(engine.complete(jobs)), engine
        finally:
            engine.close()

    expected, _ = run(SnapshotFakeBackend(max_sequences=8))
    backend = SharingFakeBackend(max_sequences=8)
    results, engine = run(backend)
    if prefix_cache_mb:
        assert [len(g) for g in backend.groups] == [2]
        assert [start for _, start, _ in backend.prefills] == [0, 0] + [12] * 6 and engine.cache.hits == 6
    else:
        assert [len(g) for g in backend.groups] == [8]
    for got, want in zip(results, expected):
        assert got.generated == want.generated
        np.testing.assert_array_equal(got.prompt_scores.token_logprobs, want.prompt_scores.token_logprobs)


def test_long_prompts_and_lone_ones_do_not_share_passes():
    """A prompt longer than one pass runs in chunks on its own; a group of one is no group."""
    backend = SharingFakeBackend(max_sequences=4, n_batch=8)
    engine = Engine(backend)
    try:
        results = asyncio.run(engine.complete([greedy_job([1] * 20, 2), greedy_job([2, 3], 2)]))
    finally:
        engine.close()
    assert backend.groups == []
    assert [r.generated for r in results] == [expected_greedy([1] * 20, 2), expected_greedy([2, 3], 2)]


# -- taking turns between clients ---------------------------------------------------------------


def test_clients_take_turns_for_the_model(make_engine):
    """Client A sends 12 prompts; client B, a moment later, 2. In arrival order B would wait for all
    of A's; taking turns, B's first runs after at most the job of A's that was running and one more,
    and B's second one A job later."""
    engine, backend = make_engine(delay=0.02)

    async def as_client(name: str, prompts: list[list[int]]):
        # The client, as server.api names it for each HTTP request.
        return await engine.complete([greedy_job(p, 0, echo=True, logprobs=1) for p in prompts], Origin(client=name))

    async def main():
        a = asyncio.ensure_future(as_client("a", [[1, 2, 3]] * 12))
        await asyncio.to_thread(wait_until, lambda: len(backend.prefills) >= 1)  # A's first is running
        b = asyncio.ensure_future(as_client("b", [[4, 5, 6, 7, 1]] * 2))
        await asyncio.sleep(0.005)  # B's task has submitted its jobs
        arrived = len(backend.prefills)
        return arrived, await asyncio.gather(a, b)

    arrived, (a_results, b_results) = asyncio.run(main())
    assert len(a_results) == 12 and len(b_results) == 2
    lengths = [n for _, _, n in backend.prefills]  # A's prompts have 3 tokens, B's 5
    assert sorted(lengths) == [3] * 12 + [5] * 2
    first = lengths.index(5)
    second = lengths.index(5, first + 1)
    assert arrived + 2 < 12, "B came too late to tell turns from arrival order"
    assert first <= arrived + 2 and second - first == 2, (arrived, lengths)


def test_fair_queue_turns_and_removal():
    queue = FairQueue()
    queue.extend("a", ["a1", "a2", "a3"])
    queue.extend("b", ["b1"])
    queue.extend("a", ["a4"])  # more work for a waiting client keeps its place in the turns
    queue.extend("c", ["c1", "c2"])
    assert len(queue) == 7 and list(queue) == ["a1", "a2", "a3", "a4", "b1", "c1", "c2"]
    assert [queue.popleft() for _ in range(3)] == ["a1", "b1", "c1"]
    assert queue.remove_if(lambda item: item in ("a3", "c2")) == ["a3", "c2"]
    assert len(queue) == 2 and [queue.popleft(), queue.popleft()] == ["a2", "a4"]
    assert not queue and len(queue) == 0
    queue.extend(Origin().client, ["x", "y"])  # no client named: plain arrival order
    assert [queue.popleft(), queue.popleft()] == ["x", "y"]
