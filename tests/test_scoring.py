"""The scoring math and the bytes-to-text rules, against straightforward float64 / stdlib references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.numerics.scoring import ELEMENTS_PER_STEP, score_rows
from server.text.decoding import StopStringWatcher, join_pieces, token_string
from testing.oracle import log_softmax64


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_vocab,k", [(50, 0), (50, 1), (1000, 5), (49152, 1), (49152, 20), (262144, 3)])
def test_score_rows_matches_float64_log_softmax(n_vocab, k, threads):
    rng = np.random.default_rng(n_vocab + k)
    n = min(ELEMENTS_PER_STEP // n_vocab, 100) + 7  # more than one internal step
    logits = (rng.standard_normal((n, n_vocab)) * 4).astype(np.float32)
    targets = rng.integers(0, n_vocab, n)
    scored = score_rows(logits, targets, k, threads=threads)

    reference = log_softmax64(logits)
    assert np.abs(scored.token_logprobs - reference[np.arange(n), targets]).max() < 1e-4
    expected_top = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(scored.top_ids, expected_top)
    if k:
        assert np.abs(scored.top_logprobs - np.take_along_axis(reference, expected_top, axis=1)).max() < 1e-4
        assert (np.diff(scored.top_logprobs, axis=1) <= 0).all()


def test_threads_do_not_change_a_single_bit():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((300, 8192)) * 4).astype(np.float32)
    targets = rng.integers(0, 8192, 300)
    for k in (1, 4):
        one, two = score_rows(logits, targets, k), score_rows(logits, targets, k, threads=2)
        np.testing.assert_array_equal(one.token_logprobs, two.token_logprobs)
        np.testing.assert_array_equal(one.top_ids, two.top_ids)
        np.testing.assert_array_equal(one.top_logprobs, two.top_logprobs)


def test_target_in_top_k_has_the_identical_float():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 4096)).astype(np.float32)
    greedy = logits.argmax(axis=1)
    scored = score_rows(logits, greedy, 1)
    # lm-eval checks greedy with ==, so these must be equal bit for bit, not approximately.
    assert (scored.token_logprobs == scored.top_logprobs[:, 0]).all()
    np.testing.assert_array_equal(scored.top_ids[:, 0], greedy)


def test_ties_are_broken_by_lowest_token_id():
    logits = np.zeros((1, 10), dtype=np.float32)
    logits[0, [7, 3, 5]] = 2.0
    scored = score_rows(logits, np.array([0]), 3)
    assert scored.top_ids.tolist() == [[3, 5, 7]]
    assert score_rows(logits, np.array([0]), 1).top_ids.tolist() == [[3]]


def test_ranks_follow_the_top_k_order_ties_by_lowest_id():
    """A target's rank is its place in the top-k's order (ties by lower id), for every target, on
    random rows and rows full of ties; numpy's stable argsort is the independent count."""
    rng = np.random.default_rng(1)
    logits = np.round(rng.standard_normal((60, 300)) * 2).astype(np.float32)  # many exact ties
    targets = rng.integers(0, 300, 60)
    scored = score_rows(logits, targets, 5, ranks=True)
    want = [int(np.flatnonzero(np.argsort(-row, kind="stable") == t)[0]) + 1 for row, t in zip(logits, targets)]
    assert scored.token_ranks.tolist() == want
    for ids, t, rank in zip(scored.top_ids, targets, scored.token_ranks):
        if t in ids:
            assert rank == list(ids).index(t) + 1
    assert score_rows(logits, targets, 5).token_ranks is None  # only when asked


def test_token_string_uses_openai_bytes_form_for_partial_utf8():
    assert token_string(" caf\xc3\xa9".encode("latin-1")) == " café"
    assert token_string(b"\xf0\x9f") == "bytes:\\xf0\\x9f"
    assert token_string(b"") == ""


def test_join_pieces_offsets_count_characters_of_the_final_text():
    pieces = [b"Z", b"\xc3", b"\xbcrich", b" \xf0\x9f", b"\x8e\x89", b"!"]
    text, offsets = join_pieces(pieces)
    assert text == "Zürich 🎉!"
    # A split character appears at the token that completes it.
    assert offsets == [0, 1, 1, 6, 7, 8]


def test_stop_string_spanning_tokens_is_cut_and_not_returned():
    watcher = StopStringWatcher(["\n\nQuestion:"])
    fed = [watcher.feed(p) for p in [b"The answer is 4.", b"\n", b"\nQu", b"estion:", b" more"]]
    assert fed == [False, False, False, True, True]
    assert watcher.finish() == "The answer is 4."


def test_earliest_stop_string_wins():
    watcher = StopStringWatcher(["b", "abc"])
    assert watcher.feed(b"xxabc")
    assert watcher.finish() == "xx"  # "abc" starts before "b"


def _held_by_search(text: str, stops: list[str]) -> int:
    """The longest end of text that begins a stop string, by trying every length."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@given(
    st.lists(st.text("ab", min_size=1, max_size=6), min_size=1, max_size=3),
    st.lists(st.text("abc", max_size=5), max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_stop_matching_equals_a_search_of_the_whole_text(stops, pieces):
    """Linear-time matching finds what searching the whole text after each token finds: the earliest
    stop string, and while none has ended, how much of the text's end may begin one."""
    watcher, text = StopStringWatcher(stops), ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert watcher.feed(piece.encode()) == bool(hits)
        if hits:
            assert watcher.finish() == text[: min(hits)] and watcher.held == 0
            return
        assert watcher.text == text and watcher.held == _held_by_search(text, stops)


def test_stop_matching_time_is_linear_in_long_stop_strings():
    """4 stop strings of 100,000 characters against 2,000 generated tokens: each token costs about
    its own length, not the text's (a generous bound that catches quadratic work, not a speed test)."""
    import time

    stops = ["x" * 99_999 + str(i) for i in range(4)]
    watcher = StopStringWatcher(stops)
    began = time.perf_counter()
    for _ in range(2000):
        assert not watcher.feed(b"xxxx")
        assert watcher.held == len(watcher.text)  # all of it may begin a stop string
    assert time.perf_counter() - began < 20


@pytest.mark.parametrize("k", [0, 1, 5])
def test_mlx_scoring_matches_numpy_scoring(k):
    mx = pytest.importorskip("mlx.core")
    from server.backends.mlx_scoring import score_rows_mlx

    rng = np.random.default_rng(k)
    logits = (rng.standard_normal((70, 49152)) * 4).astype(np.float32)
    targets = rng.integers(0, 49152, 70)
    targets[:10] = logits[:10].argmax(axis=1)  # some targets are the top token
    on_device = score_rows_mlx(mx.array(logits), targets, k, ranks=True)
    on_host = score_rows(logits, targets, k, ranks=True)
    np.testing.assert_array_equal(on_device.token_ranks, on_host.token_ranks)
    assert np.abs(on_device.token_logprobs - on_host.token_logprobs).max() < 1e-5
    np.testing.assert_array_equal(on_device.top_ids, on_host.top_ids)
    if k:
        assert np.abs(on_device.top_logprobs - on_host.top_logprobs).max() < 1e-4
        # A target that is the top token has the identical float in both places.
        assert (on_device.token_logprobs[:10] == on_device.top_logprobs[:10, 0]).all()


def test_mlx_backend_gpu_and_cpu_scoring_paths_agree(fixture_paths):
    """The MLX backend scores with numpy on the CPU device and in MLX on a GPU: on the fixture's
    real logits both paths give the same numbers (the GPU path runs here on the CPU device)."""
    pytest.importorskip("mlx_lm")
    from server.backends.mlx import MLXBackend

    backend = MLXBackend(str(fixture_paths["mlx"]), n_threads=2)
    tokens = backend.tokenize("Zürich is 🎉 a city; print('hello') # the lazy dog", False)
    logits = backend.prefill(0, tokens, 0, 0)
    targets = np.asarray([*tokens[1:], 0])
    results = {}
    for on_cpu in (True, False):
        backend.on_cpu = on_cpu
        results[on_cpu] = backend.score(logits, targets, 5)
    host, device = results[True], results[False]
    assert np.abs(host.token_logprobs - device.token_logprobs).max() < 1e-5
    np.testing.assert_array_equal(host.top_ids, device.top_ids)
    assert np.abs(host.top_logprobs - device.top_logprobs).max() < 1e-5
