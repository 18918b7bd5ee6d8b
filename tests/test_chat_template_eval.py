"""Instruct models evaluated with their own chat template, the way the Open LLM Leaderboard runs them
(lm-eval's --apply_chat_template, few-shot examples as turns), over HTTP with the server's remote
tokenizer and no Hugging Face tokenizer: `logprobs-eval run --apply-chat-template`.

The oracle shares nothing with the client's renderer: each request's context is rebuilt with
lm-eval's own prompt building rendered by Hugging Face's renderer (transformers), and must equal
what lm-eval sent; every loglikelihood and generated text equals llama.cpp in-process on the same
token ids (1e-4)."""

from __future__ import annotations

import pytest
import requests

from testing.live_server import ROOT
from tests.test_lm_eval import TASKS_DIR, encode_pair, logged_loglikelihood, request_args
from tests.test_logprobs_eval import lm_eval_files, logprobs_eval

pytestmark = pytest.mark.slow

FEWSHOT = 2  # as turns: user question, assistant answer, ..., then the item's question
TASKS = ("hellaswag_dev", "gsm8k_dev")
LIMIT = 6
TOLERANCE = 1e-4


def hf_renderer(info: dict):
    """Hugging Face's apply_chat_template as a function of (messages, add_generation_prompt)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=info["chat_template"],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            bos_token=info["bos_token"],
            eos_token=info["eos_token"],
        )
        return rendered[0]

    return render


def oracle_contexts(task_name: str, limit: int, render, monkeypatch) -> list[str]:
    """The contexts lm-eval builds for the first `limit` docs with this renderer, as its evaluator
    does: the task's few-shot sampler seeded as by default (1234), docs in order."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the tasks' data paths are relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = TaskManager(include_path=str(TASKS_DIR)).load([task_name])["tasks"][task_name]
    task.set_fewshot_seed(seed=1234)
    docs = list(task.eval_docs)[:limit]
    return [
        task.fewshot_context(
            doc,
            num_fewshot=FEWSHOT,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            chat_template=render,
            gen_prefix=task.doc_to_prefix(doc),
        )
        for doc in docs
    ]


def test_chat_template_evaluation_equals_the_oracle(server, oracle, tmp_path, monkeypatch):
    info = requests.get(server.url + "/tokenizer_info").json()
    assert info["chat_template"] and "<|im_start|>" in info["chat_template"]  # SmolLM2-Instruct's ChatML
    out = tmp_path / "out"
    limit = LIMIT
    proc = logprobs_eval(
        "run",
        server.url,
        "--tasks",
        ",".join(TASKS),
        "--limit",
        str(limit),
        "--batch-size",
        "4",
        "--apply-chat-template",
        "--output-path",
        str(out),
        "--log-samples",
        "--",
        "--num_fewshot",
        str(FEWSHOT),
        tmp_path=tmp_path,
    )
    assert "--apply_chat_template" in proc.stderr and "logprobs-completions" in proc.stderr
    render = hf_renderer(info)

    # Multiple choice: 4 loglikelihood requests per item, after 2 few-shot turns.
    results, samples = lm_eval_files(out, "hellaswag_dev")
    assert results["config"]["model"] == "logprobs-completions" and results["fewshot_as_multiturn"] is True
    assert results["chat_template"] == info["chat_template"]
    contexts = oracle_contexts("hellaswag_dev", limit, render, monkeypatch)
    worst, n = 0.0, 0
    for sample in samples:
        context = contexts[sample["doc_id"]]
        assert context.count("<|im_start|>user") == FEWSHOT + 1 and context.endswith("<|im_start|>assistant\n")
        for (sent, continuation), resp in zip(request_args(sample), sample["resps"]):
            assert sent == context
            ll, greedy = logged_loglikelihood(resp)
            expected, expected_greedy = oracle.loglikelihood(*encode_pair(oracle, context, continuation))
            worst, n = max(worst, abs(ll - expected)), n + 1
            assert abs(ll - expected) <= TOLERANCE, (sample["doc_id"], ll, expected)
            assert greedy == expected_greedy
    assert n == 4 * limit
    print(
        f"hellaswag_dev, chat template, {FEWSHOT}-shot as turns: {n} loglikelihoods, "
        f"max |server - oracle| = {worst:.2e}; acc {results['results']['hellaswag_dev']['acc,none']}"
    )

    # Generation: greedy until a stop string or the end of the assistant's turn.
    results, samples = lm_eval_files(out, "gsm8k_dev")
    contexts = oracle_contexts("gsm8k_dev", limit, render, monkeypatch)
    assert len(samples) == limit
    for sample in samples:
        ((sent, gen_kwargs),) = request_args(sample)
        assert sent == contexts[sample["doc_id"]]
        expected = oracle.greedy(oracle.tokenize(sent), gen_kwargs["max_gen_toks"], gen_kwargs["until"])
        assert sample["resps"][0][0] == expected, sample["doc_id"]
    assert 0 <= results["results"]["gsm8k_dev"]["exact_match,strict-match"] <= 1
