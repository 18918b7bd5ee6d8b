"""logprobs-eval end to end (`python -m logprobs_client`, the `logprobs-eval` script's module):
`run` drives stock lm-eval against a live server; `compare` runs the same tasks against two live
servers and pairs them item by item. Checked against lm-eval's own results JSON and samples, and
against the client: the same model served twice must compare as exactly equal (every delta 0,
no flips); two builds of one model (Q4_1 and a Q3_K_M requantized from it) must give the numbers
that lm-eval's files give when recomputed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testing.live_server import DATA, ROOT
from tests.conftest import serve

sys.path.insert(0, str(ROOT / "clients"))  # the checkout's client, installed or not

from logprobs_client import Client

pytestmark = pytest.mark.slow


def logprobs_eval(*args: str, tmp_path: Path, timeout: float = 1500) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "clients"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "logprobs_client", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def lm_eval_files(folder: Path, task: str) -> tuple[dict, list[dict]]:
    """lm-eval's results JSON and the task's samples (by doc_id) under `folder`."""
    results = json.loads(next(folder.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(folder.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def arguments(sample: dict) -> list[tuple]:
    args = sorted(sample["arguments"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
    return [tuple(v[k] for k in sorted(v)) for _, v in args]


def lls(sample: dict) -> list[float]:
    return [float(r[0][0]) if isinstance(r[0], list) else float(r[0]) for r in sample["resps"]]


@pytest.fixture(scope="module")
def twin_server(model_path, tmp_path_factory):
    """A second server of the session's model, with the same settings."""
    yield from serve(model_path, tmp_path_factory, "twin", "--max-logprobs", "20")


@pytest.fixture(scope="module")
def requantized_server(requantized_model_path, tmp_path_factory):
    """Another build of the same model (conftest's Q3_K_M), without the prefix cache: its numbers
    are then the same whatever came before, with or without it (test_prefix_cache)."""
    yield from serve(requantized_model_path, tmp_path_factory, "requantized", "--prefix-cache-mb", "0")


def test_run_a_few_items(server, tmp_path):
    proc = logprobs_eval(
        "run",
        server.url,
        "--tasks",
        "hellaswag_dev",
        "--limit",
        "4",
        "--batch-size",
        "4",
        "--output-path",
        str(tmp_path / "out"),
        "--log-samples",
        "--",
        "--seed",
        "0",
        tmp_path=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert f"Using remote tokenizer from {server.url}/v1/completions" in output
    assert "|hellaswag_dev|" in proc.stdout and "Requesting API" in proc.stderr  # lm-eval's table and progress
    results, samples = lm_eval_files(tmp_path / "out", "hellaswag_dev")
    model_args = results["config"]["model_args"]
    assert {
        k: model_args[k] for k in ("base_url", "model", "tokenizer_backend", "tokenized_requests", "max_length")
    } == {
        "base_url": f"{server.url}/v1/completions",
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "tokenizer_backend": "remote",
        "tokenized_requests": True,
        "max_length": 2048,
    }
    assert results["n-samples"]["hellaswag_dev"]["effective"] == 4
    # What lm-eval logged for each request is what the client's score() gives for it.
    with Client(server.url) as client:
        for sample in samples:
            (context, _), *_ = arguments(sample)
            scores = client.score(context, [cont for _, cont in arguments(sample)])
            assert [s.loglikelihood for s in scores] == lls(sample)
            assert [str(s.is_greedy) for s in scores] == [r[0][1] for r in sample["resps"]]


def test_compare_the_same_model_twice_is_exactly_equal(server, twin_server, tmp_path):
    tasks = ["hellaswag_dev", "wikitext2_paragraphs", "gsm8k_dev"]
    proc = logprobs_eval(
        "compare",
        server.url,
        twin_server.url,
        "--tasks",
        ",".join(tasks),
        "--limit",
        "3",
        "--output-path",
        str(tmp_path / "cmp"),
        "--json",
        tmp_path=tmp_path,
    )
    report = json.loads(proc.stdout)  # lm-eval's own printout went to stderr
    assert report == json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert report["warnings"] == [] and [t["task"] for t in report["tasks"]] == sorted(tasks)
    for task in report["tasks"]:
        results_a, _ = lm_eval_files(tmp_path / "cmp" / "A", task["task"])
        results_b, _ = lm_eval_files(tmp_path / "cmp" / "B", task["task"])
        assert task["n_docs"] == 3
        for m in task["metrics"]:
            key = f"{m['metric']},{m['filter']}"
            assert (m["a"], m["b"]) == (
                results_a["results"][task["task"]][key],
                results_b["results"][task["task"]][key],
            )
            assert m["a"] == m["b"] and m["delta"] == 0 and (m["ci_low"], m["ci_high"]) == (0, 0)
            assert m["a_recomputed"] == pytest.approx(m["a"], rel=1e-12)
            assert m["flips"] in (0, None)
        if task["task"] == "wikitext2_paragraphs":
            assert all(m["flips"] is None for m in task["metrics"])  # a perplexity has no answer to flip
        if task["task"] == "gsm8k_dev":
            assert task["loglikelihood"] is None and task["metrics"][0]["filter"] == "strict-match"
            assert task["metrics"][0]["flips"] == 0  # the same generated texts
        else:
            ll = task["loglikelihood"]
            assert (ll["mean_abs_delta"], ll["max_abs_delta"]) == (0, 0) and ll["greedy_changed"] in (0, None)
            assert task["worst"] == []
    text = logprobs_eval("report", str(tmp_path / "cmp" / "A"), str(tmp_path / "cmp" / "B"), tmp_path=tmp_path).stdout
    assert "Every request's loglikelihood is identical on both sides." in text


def test_compare_two_builds_of_one_model(server, requantized_server, tmp_path):
    limit = 6
    chart = tmp_path / "delta.png"
    proc = logprobs_eval(
        "compare",
        server.url,
        requantized_server.url,
        "--tasks",
        "hellaswag_dev,wikitext2_paragraphs",
        "--limit",
        str(limit),
        "--output-path",
        str(tmp_path / "cmp"),
        "--json",
        "--chart",
        str(chart),
        "--worst",
        "3",
        tmp_path=tmp_path,
    )
    report = json.loads(proc.stdout)
    tasks = {t["task"]: t for t in report["tasks"]}
    assert report["a"]["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert report["b"]["model"] == "SmolLM2-135M-Instruct.Q4_1-to-Q3_K_M"
    assert report["a"]["model_sha256"] != report["b"]["model_sha256"] and report["warnings"] == []

    # HellaSwag: recomputed here from lm-eval's samples and the gold labels.
    results_a, samples_a = lm_eval_files(tmp_path / "cmp" / "A", "hellaswag_dev")
    results_b, samples_b = lm_eval_files(tmp_path / "cmp" / "B", "hellaswag_dev")
    labels = [json.loads(line)["label"] for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:limit]]
    hella = tasks["hellaswag_dev"]
    deltas = []
    for metric in ("acc", "acc_norm"):
        chosen = {}
        for side, samples in (("a", samples_a), ("b", samples_b)):
            picks = []
            for sample in samples:
                values = np.array(lls(sample))
                if metric == "acc_norm":  # lm-eval divides by the choice's length in characters
                    values = values / np.array([len(cont) - 1 for _, cont in arguments(sample)])
                picks.append(int(np.argmax(values)))
            chosen[side] = picks
        m = next(m for m in hella["metrics"] if m["metric"] == metric)
        assert m["a"] == results_a["results"]["hellaswag_dev"][f"{metric},none"]
        assert m["b"] == results_b["results"]["hellaswag_dev"][f"{metric},none"]
        assert m["a"] == pytest.approx(np.mean([p == g for p, g in zip(chosen["a"], labels)]), abs=1e-12)
        assert m["b"] == pytest.approx(np.mean([p == g for p, g in zip(chosen["b"], labels)]), abs=1e-12)
        assert m["delta"] == pytest.approx(m["b"] - m["a"], abs=1e-12)
        assert m["flips"] == sum(x != y for x, y in zip(chosen["a"], chosen["b"])) and m["n"] == limit
        assert m["ci_low"] <= m["delta"] <= m["ci_high"]
    for sa, sb in zip(samples_a, samples_b):
        assert sa["doc_id"] == sb["doc_id"] and arguments(sa) == arguments(sb)
        deltas += [b - a for a, b in zip(lls(sa), lls(sb))]
    ll = hella["loglikelihood"]
    assert ll["n"] == 4 * limit
    assert ll["mean_abs_delta"] == pytest.approx(np.mean(np.abs(deltas)), rel=1e-12)
    assert ll["max_abs_delta"] == pytest.approx(np.max(np.abs(deltas)), rel=1e-12) and ll["max_abs_delta"] > 0
    assert [abs(w["delta"]) for w in hella["worst"]] == sorted(np.abs(deltas), reverse=True)[:3]

    # The B side's numbers are the requantized server's: the client agrees on the first item.
    with Client(requantized_server.url) as client:
        (context, _), *_ = arguments(samples_b[0])
        assert [s.loglikelihood for s in client.score(context, [c for _, c in arguments(samples_b[0])])] == lls(
            samples_b[0]
        )

    # WikiText: perplexities as lm-eval reported them; one rolling loglikelihood per paragraph.
    results_a, samples_a = lm_eval_files(tmp_path / "cmp" / "A", "wikitext2_paragraphs")
    results_b, samples_b = lm_eval_files(tmp_path / "cmp" / "B", "wikitext2_paragraphs")
    wiki = tasks["wikitext2_paragraphs"]
    for m in wiki["metrics"]:
        key = f"{m['metric']},none"
        assert (m["a"], m["b"]) == (
            results_a["results"]["wikitext2_paragraphs"][key],
            results_b["results"]["wikitext2_paragraphs"][key],
        )
        assert m["a_recomputed"] == pytest.approx(m["a"], rel=1e-9) and m["flips"] is None
        assert m["ci_low"] <= m["delta"] <= m["ci_high"]
    wiki_deltas = [lls(b)[0] - lls(a)[0] for a, b in zip(samples_a, samples_b)]
    assert wiki["loglikelihood"]["max_abs_delta"] == pytest.approx(np.max(np.abs(wiki_deltas)), rel=1e-12)

    # The bootstrap is seeded: the same folders give the same intervals; the chart is a PNG.
    again = json.loads(
        logprobs_eval(
            "report",
            str(tmp_path / "cmp" / "A"),
            str(tmp_path / "cmp" / "B"),
            "--json",
            "--worst",
            "3",
            tmp_path=tmp_path,
        ).stdout
    )
    assert [t["metrics"] for t in again["tasks"]] == [t["metrics"] for t in report["tasks"]]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
