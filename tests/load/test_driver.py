"""The load test's own checks can fail: each criterion, fed a violation, is reported (no server)."""

from __future__ import annotations

import copy

from testing.load.driver import LoadStats, Report, compare_scoring


def answer(token_logprob: float = -1.5, top: dict | None = None) -> dict:
    return {
        "choices": [
            {
                "index": 0,
                "text": "ab",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": ["a", "b"],
                    "text_offset": [0, 1],
                    "token_logprobs": [None, token_logprob],
                    "top_logprobs": [None, top or {"b": token_logprob, "c": -0.5}],
                },
            }
        ]
    }


def test_compare_scoring_tolerance_and_keys():
    reference = answer()
    assert compare_scoring(reference, copy.deepcopy(reference)) == ([], 0.0)
    problems, worst = compare_scoring(reference, answer(-1.5 + 5e-5, {"b": -1.5 + 5e-5, "c": -0.5}))
    assert problems == [] and 4e-5 < worst < 6e-5
    assert compare_scoring(reference, answer(-1.5 + 2e-4, {"b": -1.5 + 2e-4, "c": -0.5}))[0]
    assert compare_scoring(reference, answer(top={"b": -1.5, "d": -0.5}))[0]
    other = copy.deepcopy(reference)
    other["choices"][0]["logprobs"]["tokens"] = ["a", "x"]
    assert compare_scoring(reference, other)[0]


def healthy() -> LoadStats:
    stats = LoadStats(
        clients=1,
        duration_s=1,
        records=[("score", 200, 0.1), ("score", 429, 0.0)],
        compared=1,
        refused=1,
        health=[0.01],
        queue_tokens=[0.0, 700.0],
    )
    stats.metrics_after = {("logprobs_requests_total", (("route", "/v1/completions"), ("status", "200"))): 1.0}
    return stats


def report(run: LoadStats, rss_after_run: int = 1000) -> Report:
    return Report(
        healthy(),
        run,
        max_queued_tokens=768,
        rss_after_warmup=1000,
        rss_after_run=rss_after_run,
        recheck_problems=[],
        cancellations=1,
    )


def test_each_criterion_is_reported():
    assert report(healthy()).failures() == []
    cases = {
        "5xx": lambda s: s.records.append(("generate", 503, 1.0)),
        "counted 5xx": lambda s: s.metrics_after.update(
            {("logprobs_requests_total", (("route", "/v1/completions"), ("status", "500"))): 1.0}
        ),
        "above --max-queued-tokens": lambda s: s.queue_tokens.append(769.0),
        "Retry-After": lambda s: setattr(s, "refused_without_retry_after", 1),
        "no 429": lambda s: setattr(s, "refused", 0),
        "/health": lambda s: s.health_failures.append("/health answered 502"),
        "compared": lambda s: setattr(s, "compared", 0),
        "did not stop": lambda s: setattr(s, "stuck_clients", 1),
    }
    for words, spoil in cases.items():
        run = healthy()
        spoil(run)
        assert any(words in f for f in report(run).failures()), words
    assert any("RSS" in f for f in report(healthy(), rss_after_run=1101).failures())
