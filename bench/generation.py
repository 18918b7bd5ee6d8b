"""Generation against llama.cpp's own server (`make bench` rows 7; alone: `python -m bench.generation`).

lm-eval's GSM8K-style generate_until requests (clients/lm_eval_tasks/gsm8k_dev.yaml: 3-shot
"Question: ...\nAnswer:" prompts, greedy, stop at "Question:" or a blank line, max_gen_toks), sent
by N concurrent clients (lm-eval's num_concurrent), each one prompt per request, to:

- llama-server (`-np N -cb`: N parallel slots, continuous batching), built from the llama.cpp that
  llama-cpp-python vendors (bench/llama_tools.py), with the server's numerics (flash attention off,
  float32 KV cache, the same threads and batch);
- this server with --max-sequences 1 and N;

beside the raw greedy decode loop in-process (one sequence; the reference for one client). On the
random-weight shapes EOS and the stop strings are banned or never met, so every request generates
max_tokens; on the default model the answers end where the model ends them.

Reported per model and concurrency: generated tokens/s of each, the ratio to llama-server's, and
how many of this server's texts equal the same prompt generated alone (--max-sequences 1, one
client): greedy answers must not depend on what else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from bench.llama_tools import llama_tool
from bench.machine import cpu_model
from bench.run import our_server
from testing.live_server import DATA, ServerProcess, free_port

STOP = ["Question:", "\n\n"]
SHOTS = 3
MODELS = ("smollm2", "1b-q4_k_m", "1b-q8_0")


def log(message: str) -> None:
    print(f"[generation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gsm8k_prompts(n: int) -> list[str]:
    """lm-eval's gsm8k_dev prompts: SHOTS solved examples, then a question, as its task builds them."""
    items = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    shots = "\n\n".join(f"Question: {i['question']}\nAnswer: {i['answer']}" for i in items[:SHOTS])
    return [f"{shots}\n\nQuestion: {i['question']}\nAnswer:" for i in items[SHOTS : SHOTS + n]]


def model_path(name: str, cache: Path) -> Path:
    from server.models.default_model import ensure_default_model

    if name == "smollm2":
        return ensure_default_model(cache)
    from bench.shared_passes import random_model

    shape, quant = name.split("-", 1)
    return random_model(cache, shape, quant, log)


def banned_tokens(model: Path) -> list[int]:
    """End-of-generation tokens: banned on random weights, where one would end a request at random."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def raw_decode(model: Path, prompts: list[str], max_tokens: int, threads: int, banned: list[int]) -> float:
    """Generated tokens/s of llama-cpp-python's greedy loop in-process, one sequence, no server."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False, type_k=0, type_v=0
    )
    generated, elapsed, n_vocab = 0, 0.0, llm.n_vocab()
    for prompt in prompts:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=True))
        started = time.perf_counter()  # decoding only: the servers' prompt passes count against them
        for _ in range(max_tokens):
            last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last evaluated token's row
            logits = np.ctypeslib.as_array(last, shape=(n_vocab,)).copy()
            logits[banned] = -np.inf
            token = int(np.argmax(logits))
            llm.eval([token])
            generated += 1
        elapsed += time.perf_counter() - started
    del llm
    return generated / elapsed


def llama_server(binary: Path, model: Path, slots: int, threads: int, out: Path, name: str) -> ServerProcess:
    port = free_port()
    command = [
        str(binary),
        "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
        "--ctx-size", str(2048 * slots), "--parallel", str(slots), "--cont-batching",
        "--threads", str(threads), "--threads-batch", str(threads), "--batch-size", "512", "--ubatch-size", "512",
        "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32",
        "--no-webui", "--log-disable",
    ]  # fmt: skip
    return ServerProcess(command, port, out / f"{name}.log", health_path="/health", timeout=300)


def decoding(sequences: int) -> tuple[str, ...]:
    """This server's flags for `sequences` decoded together, with llama-server's per-slot context."""
    return ("--max-sequences", str(sequences), "--n-ctx", "2048")


def run_clients(
    url: str, prompts: Sequence[str], clients: int, max_tokens: int, bias: dict[str, float]
) -> tuple[float, list[str]]:
    """(generated tokens/s, texts in prompt order) with `clients` threads, one prompt per request."""
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "stop": STOP, "seed": 1234}
    if bias:
        body["logit_bias"] = bias

    def one(prompt: str) -> dict[str, Any]:
        response = requests.post(url + "/v1/completions", json=body | {"prompt": prompt}, timeout=1800)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, prompts))
    elapsed = time.perf_counter() - started
    return sum(a["usage"]["completion_tokens"] for a in answers) / elapsed, [a["choices"][0]["text"] for a in answers]


def model_rows(
    letter: str, name: str, cache: Path, binary: Path, args: argparse.Namespace, add: Callable[..., None]
) -> None:
    """Rows 7<letter>: r the raw decode loop, <n>l llama-server with n slots and clients, <n>o this
    server with --max-sequences n (its ratio: to llama-server's row)."""
    model = model_path(name, cache)
    random = name != "smollm2"
    banned = banned_tokens(model) if random else []
    bias = {str(t): -100.0 for t in banned}
    n_prompts = max(args.concurrency) * args.per_client
    prompts = gsm8k_prompts(n_prompts)
    out = args.out
    with our_server(model, args.threads, out, f"{name}-gen-1", *decoding(1)) as server:
        log(f"{name}: this server, --max-sequences 1, 1 client (the texts alone)")
        alone_speed, alone = run_clients(server.url, prompts, 1, args.max_tokens, bias)
    for n in args.concurrency:
        part = prompts  # the same work at every concurrency: the ratios compare like with like
        with llama_server(binary, model, n, args.threads, out, f"llama-server-{name}-{n}") as server:
            log(f"{name}: llama-server -np {n} -cb, {n} client(s)")
            theirs, their_texts = run_clients(server.url, part, n, args.max_tokens, bias)
        if n == 1:
            ours, texts = alone_speed, alone[: len(part)]
        else:
            with our_server(model, args.threads, out, f"{name}-gen-{n}", *decoding(n)) as server:
                log(f"{name}: this server, --max-sequences {n}, {n} clients")
                ours, texts = run_clients(server.url, part, n, args.max_tokens, bias)
        same = sum(a == b for a, b in zip(texts, alone))
        llama_row = f"7{letter}{n}l"
        add(llama_row, f"{name}: llama-server -np {n} -cb, {n} client(s)", theirs, theirs, reference=llama_row)
        add(
            f"7{letter}{n}o",
            f"{name}: this server --max-sequences {n}, {n} client(s)",
            ours,
            theirs,
            reference=llama_row,
            same_as_alone=f"{same}/{len(part)}",
            llama_server_same_as_ours_alone=f"{sum(a == b for a, b in zip(their_texts, alone))}/{len(part)}",
        )

    # Last, in a process of its own: llama.cpp's threads and buffers in this process would otherwise
    # share the 2 cores with the servers measured above.
    log(f"{name}: raw greedy decode loop in-process, {args.per_client} prompt(s)")
    with ProcessPoolExecutor(1) as pool:
        raw = pool.submit(raw_decode, model, prompts[: args.per_client], args.max_tokens, args.threads, banned).result()
    add(f"7{letter}r", f"{name}: raw greedy decode loop in-process, 1 sequence", raw, raw, reference=f"7{letter}r")


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The generation rows' options (`make bench` takes them with the prefix --gen-)."""
    parser.add_argument(f"--{prefix}models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument(f"--{prefix}concurrency", default="1,4,8", help="concurrent clients (llama-server slots)")
    parser.add_argument(f"--{prefix}max-tokens", type=int, default=256, help="max_gen_toks of each request")
    parser.add_argument(
        f"--{prefix}per-client",
        type=int,
        default=2,
        help="prompts per client at the highest concurrency",
    )


def rows(args: argparse.Namespace, out: Path, add: Callable[..., None], prefix: str = "") -> None:
    """Rows 7, one letter per model (a: the first of --models), through `add(row, name, value, base, **extra)`."""
    from server.config import Settings

    options = argparse.Namespace(
        models=getattr(args, f"{prefix}models"),
        concurrency=[int(c) for c in getattr(args, f"{prefix}concurrency").split(",")],
        max_tokens=getattr(args, f"{prefix}max_tokens"),
        per_client=getattr(args, f"{prefix}per_client"),
        threads=args.threads,
        out=out,
    )
    out.mkdir(parents=True, exist_ok=True)
    cache = Settings().cache_path()
    binary = llama_tool(cache, "llama-server")
    for letter, name in zip("abcdefgh", options.models.split(",")):
        model_rows(letter, name, cache, binary, options, add)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("bench_out/generation"))
    args = parser.parse_args(argv)
    found: list[dict[str, Any]] = []

    def add(row: str, name: str, value: float, base: float | None, reference: str = "", **extra: str) -> None:
        ratio = f"{value / base:.2f}x row {reference}" if base else ""
        found.append({"row": row, "name": name, "tokens_per_s": round(value, 2), "ratio": ratio, **extra})
        log(f"{row} {name}: {value:.1f} generated tokens/s {ratio} {' '.join(f'{k}={v}' for k, v in extra.items())}")

    rows(args, args.out, add)
    header = f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {args.threads} threads, max_tokens {args.max_tokens}"
    lines = [
        header,
        "",
        "| row | generated tokens/s | vs llama-server | same as alone |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [f"| {r['name']} | {r['tokens_per_s']} | {r['ratio']} | {r.get('same_as_alone', '')} |" for r in found]
    (args.out / "results.json").write_text(json.dumps({"setup": header, "rows": found}, indent=2))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
