"""Unmodified lm-eval (0.4.13, `local-completions`) evaluates the server over HTTP, and every number it
reports is recomputed from the oracle: per-request loglikelihoods, is_greedy, generated texts and
the task metrics.

lm-eval auto-detects the server's remote tokenizer, sends tokenized requests in batches, and
reads token_logprobs[ctxlen:-1]; the oracle re-tokenizes the same strings with llama.cpp's own
tokenizer, following lm-eval's documented rules for splitting context and continuation.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from testing.live_server import DATA, ROOT

pytestmark = pytest.mark.slow

TASKS_DIR = ROOT / "clients" / "lm_eval_tasks"
LL_TOLERANCE = 1e-3


@pytest.fixture(params=["gguf", "mlx"])
def target(request):
    """(server, oracle): the default GGUF model vs llama.cpp in-process, and the fixture model on
    the MLX backend vs mlx-lm in-process (fewer items: MLX on a Linux CPU is slower)."""
    if request.param == "gguf":
        return request.getfixturevalue("server"), request.getfixturevalue("oracle")
    return request.getfixturevalue("mlx_fixture_server"), request.getfixturevalue("mlx_oracle")


def model_id(server) -> str:
    return requests.get(server.url + "/v1/models").json()["data"][0]["id"]


def run_lm_eval(
    server, task: str, limit: int, out_dir: Path, *, batch_size: int = 4, extra_model_args: str = ""
) -> tuple[dict, list[dict]]:
    model_args = (
        f"base_url={server.url}/v1/completions,model={model_id(server)},"
        f"tokenized_requests=True,num_concurrent=2,max_retries=1{extra_model_args}"
    )
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out_dir / "hf_cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        task,
        "--include_path",
        str(TASKS_DIR),
        "--limit",
        str(limit),
        "--batch_size",
        str(batch_size),
        "--log_samples",
        "--output_path",
        str(out_dir),
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Auto-detected remote tokenizer support" in output, output[-3000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in next(out_dir.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    assert len(samples) == limit
    return results, sorted(samples, key=lambda s: s["doc_id"])


def request_args(sample: dict) -> list[tuple]:
    """The arguments lm-eval sent for one doc, in request order."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [
            tuple(v[k] for k in sorted(v)) for _, v in sorted(args.items(), key=lambda kv: int(kv[0].split("_")[-1]))
        ]
    return [tuple(a) for a in args]


def logged_loglikelihood(resp: list) -> tuple[float, bool]:
    """lm-eval logs each (loglikelihood, is_greedy) response as strings."""
    ll, greedy = resp[0] if isinstance(resp[0], list) else (resp[0], None)
    return float(ll), str(greedy) == "True"


def encode_pair(oracle, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal encoding: trailing context spaces move to the continuation, whole is split."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = oracle.tokenize(context + continuation)
    context_enc = oracle.tokenize(context)
    return context_enc, whole[len(context_enc) :]


def test_hellaswag_multiple_choice(target, tmp_path):
    server, oracle = target
    limit = 20 if server.model.suffix == ".gguf" else 8
    results, samples = run_lm_eval(server, "hellaswag_dev", limit, tmp_path)
    labels = [json.loads(line)["label"] for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:limit]]

    acc, acc_norm, worst = [], [], 0.0
    for sample in samples:
        oracle_lls = []
        for (context, continuation), resp in zip(request_args(sample), sample["resps"]):
            server_ll, server_greedy = logged_loglikelihood(resp)
            expected_ll, expected_greedy = oracle.loglikelihood(*encode_pair(oracle, context, continuation))
            worst = max(worst, abs(server_ll - expected_ll))
            assert abs(server_ll - expected_ll) <= LL_TOLERANCE, (sample["doc_id"], server_ll, expected_ll)
            assert server_greedy == expected_greedy
            oracle_lls.append(expected_ll)
        gold = labels[sample["doc_id"]]
        lengths = np.array([float(len(c)) for _, c in request_args(sample)]) - 1  # minus the " " delimiter
        acc.append(float(np.argmax(oracle_lls) == gold))
        acc_norm.append(float(np.argmax(np.array(oracle_lls) / lengths) == gold))
    print(f"hellaswag_dev on {server.model.name}: max |ll(server) - ll(oracle)| = {worst:.2e}; acc {np.mean(acc):.3f}")
    assert results["acc,none"] == pytest.approx(np.mean(acc), abs=1e-9)
    assert results["acc_norm,none"] == pytest.approx(np.mean(acc_norm), abs=1e-9)


def test_wikitext_loglikelihood_rolling(target, tmp_path):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    server, oracle = target
    limit, max_length = 5, 96  # a short window, so each paragraph spans several requests
    results, samples = run_lm_eval(
        server, "wikitext2_paragraphs", limit, tmp_path, extra_model_args=f",max_length={max_length}"
    )
    prefix = (
        oracle.bos_id if oracle.bos_id else oracle.eos_id
    )  # lm-eval's remote tokenizer: bos_token_id or eos_token_id

    total_ll, total_words, total_bytes, n_windows = 0.0, 0, 0, 0
    for sample in samples:
        text = sample["doc"]["text"]
        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(
                token_list=oracle.tokenize(text), prefix_token=prefix, max_seq_len=max_length - 2, context_len=1
            )
        ]
        n_windows += len(windows)
        expected = sum(oracle.loglikelihood(ctx, cont)[0] for ctx, cont in windows)
        server_ll, _ = logged_loglikelihood(sample["resps"][0])
        # lm-eval logs the sum over the paragraph's windows; each window is one request.
        assert abs(server_ll - expected) <= LL_TOLERANCE * len(windows), (sample["doc_id"], server_ll, expected)
        total_ll += expected
        total_words += len(re.split(r"\s+", text))
        total_bytes += len(text.encode("utf-8"))
    assert n_windows > len(samples)  # some paragraphs were scored in several windows
    assert results["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_words), rel=1e-4)
    assert results["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_bytes), rel=1e-4)
    assert results["bits_per_byte,none"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-4)


def test_gsm8k_generate_until(target, tmp_path):
    server, oracle = target
    limit = 24 if server.model.suffix == ".gguf" else 4
    results, samples = run_lm_eval(server, "gsm8k_dev", limit, tmp_path)
    matches = []
    for sample in samples:
        ((context, gen_kwargs),) = request_args(sample)
        expected = oracle.greedy(oracle.tokenize(context), gen_kwargs["max_gen_toks"], gen_kwargs["until"])
        assert sample["resps"][0][0] == expected, sample["doc_id"]
        found = re.findall(r"#### (\-?[0-9\.\,]+)", expected)
        answer = found[0] if found else "[invalid]"
        target = sample["target"].split("####")[-1].strip()
        clean = lambda s: re.sub(r"\.$", "", s.replace(",", "").replace("$", "")).lower()  # noqa: E731
        matches.append(float(clean(answer) == clean(target)))
    assert results["exact_match,strict-match"] == pytest.approx(np.mean(matches), abs=1e-9)
