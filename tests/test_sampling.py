"""Sampling (server/numerics/sampling.py) on its own, no model and no HTTP: greedy ties, seeds, the
truncations, logit_bias and penalties, and that draws follow the softmax they should."""

from __future__ import annotations

import numpy as np
import pytest

from server.numerics.sampling import Sampler, SamplingParams

LOGITS = np.array([1.0, 3.0, 3.0, 0.5, -2.0, 2.5], dtype=np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def draws(params: SamplingParams, n: int, logits=LOGITS, stream: int = 0) -> np.ndarray:
    sampler = Sampler(params, prompt=[], stream_index=stream)
    return np.array([sampler._choose(sampler._adjust(logits)) for _ in range(n)])


def test_greedy_takes_the_lowest_id_among_ties():
    assert Sampler(SamplingParams(temperature=0.0), []).choose(LOGITS) == 1


def test_draws_follow_the_tempered_softmax():
    n = 40_000
    for temperature in (1.0, 0.5):
        counts = np.bincount(draws(SamplingParams(temperature=temperature, seed=3), n), minlength=len(LOGITS))
        expected = softmax(LOGITS / temperature)
        # Binomial standard error at n = 40000 is at most 0.0025; allow 4 of them.
        assert np.abs(counts / n - expected).max() < 0.01


def test_same_seed_same_draws_and_each_sample_its_own_stream():
    params = SamplingParams(temperature=1.0, seed=11)
    first = draws(params, 200)
    np.testing.assert_array_equal(first, draws(params, 200))
    assert not np.array_equal(first, draws(params, 200, stream=1))
    assert not np.array_equal(first, draws(SamplingParams(temperature=1.0, seed=12), 200))


def test_top_k_top_p_and_min_p_keep_only_what_they_should():
    assert set(draws(SamplingParams(top_k=2, seed=0), 2000)) == {1, 2}
    # Tokens 1 and 2 hold 0.36 each: top_p 0.5 needs both; the rest never appear.
    assert set(draws(SamplingParams(top_p=0.5, seed=0), 2000)) == {1, 2}
    # min_p 0.5: keep tokens with p >= 0.5 * p_max, i.e. logits >= 3 - ln 2 (tokens 1, 2 and 5).
    assert set(draws(SamplingParams(min_p=0.5, seed=0), 4000)) == {1, 2, 5}


def test_logit_bias_forces_and_forbids():
    assert set(draws(SamplingParams(logit_bias={4: 100.0}, seed=0), 200)) == {4}
    assert Sampler(SamplingParams(temperature=0.0, logit_bias={1: -100.0}), []).choose(LOGITS) == 2


def test_penalties_adjust_exactly_the_seen_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), prompt=[1, 4])
    adjusted = sampler._adjust(LOGITS)
    expected = LOGITS.copy()
    expected[1] = 3.0 / 2.0  # positive: divided
    expected[4] = -2.0 * 2.0  # negative: multiplied
    np.testing.assert_array_equal(adjusted, expected)

    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25), prompt=[])
    for token in (5, 5, 3):
        sampler._generated[token] += 1
    adjusted = sampler._adjust(LOGITS)
    expected = LOGITS.copy()
    expected[5] -= 0.5 + 0.25 * 2
    expected[3] -= 0.5 + 0.25 * 1
    np.testing.assert_allclose(adjusted, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(LOGITS, [1.0, 3.0, 3.0, 0.5, -2.0, 2.5])  # the model's logits untouched


@pytest.mark.parametrize("penalty", [1.3, 3.0])
def test_greedy_with_repetition_penalty_avoids_the_repeated_token(penalty):
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=penalty), prompt=[])
    assert sampler.choose(LOGITS) == 1
    # 1 was generated: its logit 3 becomes 3/penalty < 3, so the tie breaks to 2.
    assert sampler.choose(LOGITS) == 2
