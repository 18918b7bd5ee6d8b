"""Properties, checked by hypothesis on generated inputs: the scoring math (server/scoring.py) for
any finite float32 logits."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.scoring import score_rows

EPS32 = float(np.finfo(np.float32).eps)
# Values that tie often (hypothesis also repeats values on its own), and any other finite float32.
LOGIT = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5]), st.floats(width=32, allow_nan=False,
                                                                          allow_infinity=False))


@st.composite
def scoring_case(draw, logit=LOGIT):
    n, n_vocab = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    logits = draw(hnp.arrays(np.float32, (n, n_vocab), elements=logit))
    targets = draw(hnp.arrays(np.int64, n, elements=st.integers(0, n_vocab - 1)))
    return logits, targets, draw(st.integers(0, n_vocab + 2))


# -- scoring ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(scoring_case())
def test_logprobs_are_never_positive_and_top_k_is_a_stable_sort(case):
    """x - lse <= 0 exactly in float32: the row's max term adds exp(0) = 1 to the sum, so its log is
    >= 0 and lse >= max >= x. Top-k: the best k logits, best first, the lowest id first among ties
    (as argmax's top-1), so a response's top tokens do not depend on how many were asked for."""
    logits, targets, k = case
    scored = score_rows(logits, targets, k)
    assert not np.isnan(scored.token_logprobs).any() and (scored.token_logprobs <= 0).all()
    assert not np.isnan(scored.top_logprobs).any() and (scored.top_logprobs <= 0).all()
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(scored.top_ids, expected)
    assert (np.diff(scored.top_logprobs, axis=1) <= 0).all()
    # A target among the top-k carries the very same float in both places (lm-eval compares with ==).
    for row, column in zip(*np.nonzero(scored.top_ids == targets[:, None])):
        assert scored.top_logprobs[row, column].tobytes() == scored.token_logprobs[row].tobytes()


@settings(max_examples=300, deadline=None)
@given(scoring_case(logit=st.floats(-2.0**100, 2.0**100, width=32)))
def test_logprobs_agree_with_a_float64_log_softmax(case):
    """Within float32's rounding of the numbers involved: the logits' magnitude and spread, and
    one rounding per summed term."""
    logits, targets, k = case
    scored = score_rows(logits, targets, k)
    wide = logits.astype(np.float64)
    row_max = wide.max(axis=1, keepdims=True)
    reference = wide - (row_max + np.log(np.exp(wide - row_max).sum(axis=1, keepdims=True)))
    magnitude = np.abs(wide).max(axis=1)
    spread = wide.max(axis=1) - wide.min(axis=1)
    tolerance = 4 * EPS32 * (magnitude + spread + logits.shape[1] + 1)
    rows = np.arange(len(targets))
    assert (np.abs(scored.token_logprobs - reference[rows, targets]) <= tolerance).all()
    top_reference = np.take_along_axis(reference, scored.top_ids, axis=1)
    assert (np.abs(scored.top_logprobs - top_reference) <= tolerance[:, None]).all()


@settings(max_examples=100, deadline=None)
@given(scoring_case(), st.integers(2, 4))
def test_threads_give_the_same_bits(case, threads):
    logits, targets, k = case
    one, many = score_rows(logits, targets, k), score_rows(logits, targets, k, threads=threads)
    for a, b in ((one.token_logprobs, many.token_logprobs), (one.top_ids, many.top_ids),
                 (one.top_logprobs, many.top_logprobs)):
        assert a.tobytes() == b.tobytes()


@settings(max_examples=100, deadline=None)
@given(scoring_case(logit=st.one_of(st.sampled_from([0.0, 1.0, -1.0]), st.floats(-100.0, 100.0, width=32))))
def test_mlx_scoring_picks_the_same_top_k(case):
    """The MLX path (its own logsumexp, so values differ in the last bits) keeps the same tokens in
    the same order, ties to the lowest id included."""
    mx = pytest.importorskip("mlx.core")
    from server.scoring import score_rows_mlx

    logits, targets, k = case
    on_device, on_host = score_rows_mlx(mx.array(logits), targets, k), score_rows(logits, targets, k)
    np.testing.assert_array_equal(on_device.top_ids, on_host.top_ids)
    assert np.abs(on_device.token_logprobs - on_host.token_logprobs).max() < 1e-4
