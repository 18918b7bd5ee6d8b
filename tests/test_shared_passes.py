"""The exactness rules of llama.cpp's forward passes that this server's numbers rest on, held on
the default model (SmolLM2 Q4_1, this machine's build), the same floats or nothing:

- a prompt run as consecutive passes of two or more tokens each gives the same rows as one pass:
  the prefix cache (which re-runs at least the last two tokens) and n_batch chunking rely on it;
- prompts sharing one forward pass, each in its own KV stream and padded at its end to the
  group's longest, give the same rows as each alone, in every order and grouping: what an engine
  that shares passes (bench/shared_passes.py measures it) would rely on;
- so do prompts sharing one unified KV cache when each prompt's cells start at a multiple of 64
  (each prompt padded to a multiple of 64 tokens): the cell offset changes how attention's sums
  over the cache fall into SIMD lanes, so unaligned prompts moved by up to 1.6 here (measured:
  offsets that are multiples of 16 gave the same floats on this AVX-512 CPU; 64 leaves room for
  other CPUs' vector widths and unrolling);
- on the MLX backend, prompts in one padded (k, longest) batch stay within 1e-4 in every logprob
  of each prompt alone, not bit-identical (measured on the two-block fixture: 4.4e-5; the matrix
  products' sums are ordered by the batch's shape).

A one-token pass is the exception (llama.cpp's single-token path moved logits by up to 0.66 here),
and so are ragged unpadded groups, which llama.cpp splits into ubatches that hold one token of some
prompts: bench/shared_passes.py's probe shows both. If an upgrade of llama.cpp breaks a rule, these
tests say which."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench.shared_passes import Passes, hellaswag_prompts


@pytest.fixture(scope="module")
def passes(model_path):
    p = Passes(model_path, 4, threads=2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def prompts(passes):
    """Five HellaSwag prompts of different lengths (18 to 55 tokens)."""
    chosen = [hellaswag_prompts(passes, 25)[i] for i in (8, 12, 3, 51, 20)]
    assert len({len(p) for p in chosen}) == 5
    return chosen


@pytest.fixture(scope="module")
def alone(passes, prompts):
    return [passes.pieces(p, [len(p)]) for p in prompts]


def test_a_prompt_in_passes_of_two_or_more_tokens_is_unchanged(passes, prompts, alone):
    for tokens, expected in zip(prompts, alone):
        n = len(tokens)
        two_at_a_time = [2] * (n // 2 - 1) + [2 + n % 2]
        for sizes in ([n - 2, 2], [n - 6, 6], [10, n - 10], [n - 6, 2, 2, 2], two_at_a_time):
            np.testing.assert_array_equal(passes.pieces(tokens, sizes), expected, err_msg=f"passes of {sizes}")


def test_padded_shared_passes_equal_each_prompt_alone_in_every_order(passes, prompts, alone):
    for group in [
        *itertools.permutations(range(3)),
        *itertools.combinations(range(5), 4),
        *itertools.combinations(range(5), 2),
    ]:
        outs = passes.group([prompts[i] for i in group])
        for i, out in zip(group, outs):
            np.testing.assert_array_equal(out, alone[i], err_msg=f"prompt {i} in group {group}")


@pytest.fixture(scope="module")
def unified(model_path):
    p = Passes(model_path, 4, threads=2, unified=True)
    yield p
    p.close()


def test_unified_cache_with_aligned_cells_equals_each_prompt_alone_in_every_order(unified, prompts, alone):
    for group in [*itertools.permutations(range(3)), *itertools.combinations(range(5), 4)]:
        outs = unified.group([prompts[i] for i in group], pad=False, align=64)
        for i, out in zip(group, outs):
            np.testing.assert_array_equal(out, alone[i], err_msg=f"prompt {i} in group {group}")


def test_mlx_padded_batches_stay_within_1e_4_of_each_prompt_alone(fixture_paths):
    from bench.shared_passes import mlx_speed_and_exactness

    results = mlx_speed_and_exactness(fixture_paths["mlx"], 3, [4, 12], rounds=1, log=lambda message: None)
    for k in ("4", "12"):
        assert results[k]["max_abs_logprob_diff"] <= 1e-4, results[k]


@pytest.fixture(scope="module")
def mlx_engine(fixture_paths):
    """The engine on the MLX fixture with 4 sequences and no prefix cache (every prompt fresh); the
    backend's shared passes are counted, not replaced."""
    from server.backends.mlx import MLXBackend
    from server.engine import Engine

    backend = MLXBackend(str(fixture_paths["mlx"]), max_sequences=4)
    assert backend.shares_prompt_passes
    backend.groups = []
    run_together = backend.prefill_together
    backend.prefill_together = lambda prompts: backend.groups.append(len(prompts)) or run_together(prompts)
    engine = Engine(backend)
    yield engine, backend
    engine.close()


def test_mlx_engine_runs_prompts_together_within_1e_4_of_alone_in_every_order(mlx_engine):
    """Three scored prompts (echo, logprobs=5) and one that generates 4 greedy tokens, as one
    request: one shared pass, in each of the 24 orders, and each prompt's logprobs within 1e-4 of the
    same prompt sent alone (which runs on its own), its top tokens and greedy tokens the same."""
    import asyncio
    import types

    from server.engine import Outputs, PromptJob
    from server.numerics.sampling import SamplingParams

    engine, backend = mlx_engine
    prompts = hellaswag_prompts(types.SimpleNamespace(tokenize=lambda text: backend.tokenize(text, True)), 6)
    chosen = [prompts[i] for i in (0, 5, 10, 17)]  # four contexts, 25 to 50 tokens
    greedy = SamplingParams(temperature=0.0)
    jobs = [PromptJob(p, max_tokens=0, outputs=Outputs.of(echo=True, logprobs=5), sampling=greedy) for p in chosen[:3]]
    jobs.append(PromptJob(chosen[3], max_tokens=4, outputs=Outputs.of(logprobs=5), sampling=greedy))
    alone = [asyncio.run(engine.complete([job]))[0] for job in jobs]
    assert backend.groups == []
    for order in itertools.permutations(range(4)):
        results = asyncio.run(engine.complete([jobs[i] for i in order]))
        for i, got in zip(order, results):
            want = alone[i]
            for kind in ("prompt_scores", "generated_scores"):
                a, b = getattr(got, kind), getattr(want, kind)
                if b is None or not len(b.token_logprobs):
                    continue
                np.testing.assert_allclose(
                    a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=0, err_msg=f"prompt {i} in order {order}"
                )
                np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-4, rtol=0)
                np.testing.assert_array_equal(a.top_ids, b.top_ids)
            assert got.generated == want.generated
    assert backend.groups == [4] * 24
