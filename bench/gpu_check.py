"""The CUDA path, checked and measured in one run (issue 13); `bench/gpu_check.sh` sets it up.

For each model shape (random-weight llama GGUFs of SmolLM2-135M's, a 1B and an 8B shape, Q4_K_M,
made by bench/make_random_gguf.py; speed does not depend on weight values, and every
check below compares llama.cpp with itself on the same device, never with a real model's numbers):

- exactness: the server over HTTP (lm-eval's loglikelihood requests: batches of 8 token-id prompts,
  echo, logprobs=1, max_tokens=1; 2 and 8 concurrent clients; prefix reuse off and on) against the
  same prompts run alone in-process through the GGUF backend, log-softmax taken here in float64:
  every prompt token's logprob within 1e-4, or the run fails;
- speed: in-process one prompt per forward pass (logits for the last position only, for every
  position, and every position plus the server's scoring on the host: the host's share), the
  server's tokens/s in each setting above as a ratio to the in-process pass, and prompts in shared
  forward passes (bench/shared_passes.py: 4 and 16 per pass, separate KV streams padded, and a
  unified KV cache unpadded) with whether each came out the same floats as alone;
- start-up: a model load after numpy and requests were imported, and one before, each in a fresh
  process (a CUDA build once crashed in the first case); on a crash, a native backtrace by
  cuda-gdb where it is installed.

Work is sized to --budget-s: a model that would not fit in what is left is skipped and says so.
--model FILE checks a GGUF file too (the CPU run, `bench/gpu_check.sh cpu`, checks the default
model this way).
Writes gpu_check.json to --out (the servers' logs to --logs) and exits 1 if a server did not start or a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import llama_cpp  # first: see server/__init__.py
import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402
from bench.run import BATCH, log, our_server  # noqa: E402
from bench.shared_passes import DATA, MAKE_RANDOM_GGUF, SHAPES, random_model, speed_and_exactness  # noqa: E402
from server.backends.gguf import GGUFBackend  # noqa: E402
from testing.oracle import log_softmax64  # noqa: E402  (the tests' float64 reference)

TOLERANCE = 1e-4
# Prompts in shared passes (bench.shared_passes.parse_layout): a KV stream each, padded to the
# longest; one unified cache as is; unified with every prompt's cells starting at a multiple of 16
# or 32 (on CPUs, multiples of the SIMD width gave the same floats as alone, other offsets did not).
SHARED_LAYOUTS = ["4", "16", "4u", "16u", "16u16", "16u32"]
# Rough seconds for one model's whole turn (made, every row) at the default sizes on a GPU machine
# (guesses, not yet measured there: the first GPU run's log gives the real ones); a model starts
# only if this much of the budget is left.
NEEDS_S = {"135m": 60, "1b": 90, "8b": 240, "file": 60}


def device_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if out:
            return f"GPU {out}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"CPU {cpu_model()}, {os.cpu_count()} CPUs"


def import_order(model: Path) -> dict:
    """Load a model in a fresh process with numpy and requests imported first, then with llama_cpp
    first: exit status of each (negative: killed by that signal)."""
    load = (
        "import faulthandler; faulthandler.enable(); {first}; import llama_cpp as ll; ll.llama_backend_init(); "
        f"m = ll.llama_model_load_from_file({str(model).encode()!r}, ll.llama_model_default_params()); "
        "print('loaded', bool(m))"
    )
    results = {}
    for name, first in (("numpy_first", "import numpy, requests"), ("llama_cpp_first", "pass")):
        code = load.format(first=first)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        results[name] = run.returncode
        log(f"load after {name.replace('_', ' ')}: exit {run.returncode}")
        if run.returncode != 0:
            log("  " + "\n  ".join((run.stdout + run.stderr).strip().splitlines()[-15:]))
            if shutil.which("cuda-gdb"):
                gdb = subprocess.run(
                    ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                results[f"{name}_backtrace"] = gdb.stdout[-6000:]
                log("  cuda-gdb backtrace:\n  " + "\n  ".join(gdb.stdout.strip().splitlines()[-35:]))
    return results


def lm_eval_sequences(backend: GGUFBackend, data: Path, n_items: int) -> list[list[int]]:
    """lm-eval's (context, continuation) encoding of HellaSwag items, whole, longest first."""
    sequences = []
    for line in (data / "hellaswag_dev.jsonl").read_text().splitlines()[:n_items]:
        item = json.loads(line)
        context = backend.tokenize(item["ctx"], add_special_tokens=False)
        for ending in item["endings"]:
            whole = backend.tokenize(item["ctx"] + " " + ending, add_special_tokens=False)
            sequences.append(context + whole[len(context) :])
    return sorted(sequences, key=lambda s: (-len(s), s))


def in_process(backend: GGUFBackend, sequences: list[list[int]], rounds: int) -> tuple[dict, list[np.ndarray]]:
    """tokens/s of one prompt per pass (best of interleaved rounds) and each prompt's reference
    token logprobs (positions 1..n-1, log-softmax in float64 of the logits llama.cpp returned)."""
    n_tokens = sum(map(len, sequences))
    reference = []

    scoring_share: list[float] = []

    def run(logits_from_end: bool, score: bool, keep: bool = False) -> float:
        scoring = 0.0
        started = time.perf_counter()
        for tokens in sequences:
            backend.release(0)
            logits = backend.prefill(0, tokens, 0, len(tokens) - 1 if logits_from_end else 0)
            if score:
                scored_at = time.perf_counter()
                backend.score(logits[:-1], np.asarray(tokens[1:]), 1)
                scoring += time.perf_counter() - scored_at
            if keep:
                logprobs = log_softmax64(logits[:-1])
                reference.append(logprobs[np.arange(len(logprobs)), tokens[1:]])
        elapsed = time.perf_counter() - started
        if score:
            scoring_share.append(scoring / elapsed)
        return n_tokens / elapsed

    run(False, False, keep=True)  # warm-up, and the reference
    rows = {"last_position": [], "all_positions": [], "all_positions_scored": []}
    for _ in range(rounds):
        rows["last_position"].append(run(True, False))
        rows["all_positions"].append(run(False, False))
        rows["all_positions_scored"].append(run(False, True))
    best = {name: max(s) for name, s in rows.items()}
    # The host's share: time in the server's scoring (log-softmax, top-k on the host) in the fastest
    # scored pass; the logits' copy to the host happens inside llama_decode (the all-positions row).
    best["host_share"] = scoring_share[int(np.argmax(rows["all_positions_scored"]))]
    return best, reference


def server_pass(url: str, sequences: list[list[int]], n_clients: int) -> tuple[float, list]:
    """lm-eval-shaped requests from n_clients threads taking batches in turn: tokens/s and each
    prompt's echoed token logprobs (positions 1..n-1)."""
    batches = [list(range(i, min(i + BATCH, len(sequences)))) for i in range(0, len(sequences), BATCH)]
    answers: list = [None] * len(sequences)
    lock, errors = threading.Lock(), []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if not batches:
                        return
                    batch = batches.pop(0)
                try:
                    r = session.post(
                        url,
                        json={
                            "prompt": [sequences[i] for i in batch],
                            "max_tokens": 1,
                            "logprobs": 1,
                            "echo": True,
                            "temperature": 0,
                        },
                        timeout=600,
                    )
                    r.raise_for_status()
                    for i, choice in zip(batch, r.json()["choices"]):
                        answers[i] = choice["logprobs"]["token_logprobs"][1 : len(sequences[i])]
                except Exception as exc:  # reported below; the pass fails
                    errors.append(repr(exc))
                    return

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    return sum(map(len, sequences)) / elapsed, answers


def server_rows(
    model: Path, sequences, reference, threads: int, out: Path, clients: list[int], extra_flags: list[str]
) -> dict:
    """The server without and with prefix reuse (a fresh server per pass with reuse, so that its
    cache starts empty), for each number of clients: tokens/s and max |logprob - reference|."""
    rows = {}
    for reuse in (False, True):
        server = None
        try:
            for n_clients in clients:
                name = f"{'reuse' if reuse else 'no_reuse'}_{n_clients}_clients"
                if server is None:
                    started = time.perf_counter()
                    server = our_server(
                        model,
                        threads,
                        out,
                        f"{model.stem}-{name}",
                        "--n-ctx",
                        "2048",
                        "--max-sequences",
                        "8",
                        "--prefix-cache-mb",
                        "1024" if reuse else "0",
                        *extra_flags,
                    )
                    log(f"  server up in {time.perf_counter() - started:.1f} s")
                    warm = sequences[-1][::-1]  # a prompt no sequence starts with
                    requests.post(
                        server.completions_url, json={"prompt": warm, "max_tokens": 1}, timeout=300
                    ).raise_for_status()
                speed, answers = server_pass(server.completions_url, sequences, n_clients)
                gap = max(
                    float(np.abs(np.asarray(a, dtype=np.float64) - ref).max()) for a, ref in zip(answers, reference)
                )
                metrics = requests.get(server.completions_url.replace("/v1/completions", "/metrics"), timeout=30).text
                cache_off = "Prefix cache off" in server.log()
                reused = re.search(r"^logprobs_prompt_tokens_reused_total (\S+)", metrics, re.M)
                rows[name] = {
                    "tokens_per_s": speed,
                    "max_abs_logprob_diff": gap,
                    "tokens_reused": float(reused.group(1)) if reused else None,
                    "cache_turned_off_at_start": reuse and cache_off,
                }
                log(
                    f"  server, {name.replace('_', ' ')}: {speed:.0f} tok/s, max |d logprob| vs alone in-process "
                    f"{gap:.2e}, prompt tokens reused {rows[name]['tokens_reused']:.0f}"
                    + (
                        " (the start-up check turned the cache off: reuse would move numbers on this build)"
                        if reuse and cache_off
                        else ""
                    )
                )
                if reuse:  # the next pass starts from an empty cache
                    server.stop()
                    server = None
        finally:  # a failed pass must not leave its server running
            if server is not None:
                server.stop()
    return rows


def model_for(target: str, args) -> Path:
    """A shape's random-weight Q4_K_M file (made once), or a GGUF file named by its path."""
    if target in SHAPES:
        return random_model(args.models, target, "q4_k_m", log, tokenizer_from=args.tokenizer_from, tool=args.tool)
    return Path(target)


def check(target: str, args) -> dict:
    started = time.perf_counter()
    model = model_for(target, args)
    result: dict = {"model": model.name, "made_in_s": time.perf_counter() - started}
    backend = GGUFBackend(str(model), n_ctx=2048, n_threads=args.threads)
    sequences = lm_eval_sequences(backend, args.data, args.items)
    log(f"{model.name}: {backend.info.description}; {len(sequences)} sequences, {sum(map(len, sequences))} tokens")
    result["in_process"], reference = in_process(backend, sequences, args.rounds)
    backend.close()
    ip = result["in_process"]
    log(
        f"  in-process, one prompt per pass: last position only {ip['last_position']:.0f} tok/s, every position "
        f"{ip['all_positions']:.0f}, every position scored {ip['all_positions_scored']:.0f} "
        f"(host scoring {ip['host_share']:.0%} of the time)"
    )
    result["server"] = server_rows(model, sequences, reference, args.threads, args.logs, args.clients, args.server_flag)
    for row in result["server"].values():
        row["vs_in_process"] = row["tokens_per_s"] / ip["all_positions"]
    log(
        "  server / in-process every position (issue 13's target without reuse: >= 0.9x): "
        + ", ".join(f"{name.replace('_', ' ')} {row['vs_in_process']:.2f}x" for name, row in result["server"].items())
    )
    result["exact"] = all(r["max_abs_logprob_diff"] <= TOLERANCE for r in result["server"].values())
    if not args.shared_items:
        result["seconds"] = time.perf_counter() - started
        return result
    rows = speed_and_exactness(
        model, args.shared_items, SHARED_LAYOUTS, args.threads, args.rounds, lambda m: log("  " + m)
    )
    result["shared_passes"] = rows
    log(
        "  shared passes (k: a KV stream each, padded; ku: one unified KV cache; kuN: unified, prompts padded to "
        "multiples of N): "
        + ", ".join(
            f"{k}/pass {r['tokens_per_s'] / rows['1']['tokens_per_s']:.2f}x "
            f"{'same floats' if r['identical'] else 'DIFFERENT'} ({r['max_abs_logit_diff']:.2g})"
            for k, r in rows.items()
            if k != "1"
        )
    )
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="135m,1b,8b", help="random-weight model shapes, in order (135m, 1b, 8b)")
    parser.add_argument(
        "--model", action="append", default=[], type=Path, help="a GGUF file to check first (repeatable)"
    )
    parser.add_argument("--items", type=int, default=100, help="HellaSwag items (4 sequences each)")
    parser.add_argument("--shared-items", type=int, default=25, help="items for the shared-pass rows (0: none)")
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        help="one more argument for the servers, e.g. --server-flag=--kv-cache-type --server-flag=f16",
    )
    parser.add_argument("--clients", default="2,8", help="concurrent clients of the server rows")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the in-process rows (best kept)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--budget-s", type=float, default=480, help="start no model after this many seconds")
    parser.add_argument("--models", type=Path, required=True, help="folder for the model files (made once)")
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="a GGUF whose tokenizer the models get")
    parser.add_argument("--tool", type=Path, default=MAKE_RANDOM_GGUF, help="make_random_gguf.py")
    parser.add_argument("--data", type=Path, default=DATA, help="holds hellaswag_dev.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out/gpu", help="where gpu_check.json goes")
    parser.add_argument("--logs", type=Path, help="where the servers' logs go (default: OUT/logs)")
    args = parser.parse_args()
    args.logs = args.logs or args.out / "logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    args.clients = [int(c) for c in args.clients.split(",")]
    deadline = time.monotonic() + args.budget_s
    args.models.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    ll = llama_cpp
    report: dict = {
        "device": device_name(),
        "llama_cpp_python": ll.__version__,
        "gpu_offload": bool(ll.llama_supports_gpu_offload()),
        "threads": args.threads,
        "models": {},
    }
    log(
        f"{report['device']}; llama-cpp-python {ll.__version__}, GPU offload {'yes' if report['gpu_offload'] else 'no'}"
    )
    targets = [str(m) for m in args.model] + [shape for shape in args.shapes.split(",") if shape]
    report["import_order"] = import_order(model_for(targets[0], args))
    passed = all(code == 0 for key, code in report["import_order"].items() if not key.endswith("backtrace"))
    for target in targets:
        left, needs = deadline - time.monotonic(), NEEDS_S.get(target, NEEDS_S["file"])
        if left < needs:
            log(f"{target}: skipped ({left:.0f} s of the budget left, needs about {needs})")
            report["models"][target] = {"skipped": f"{left:.0f} s left of the budget"}
            continue
        try:
            report["models"][target] = result = check(target, args)
            passed &= result["exact"]
        except Exception as exc:  # a server that did not start, a failed request: recorded, the run fails
            log(f"{target}: FAILED: {exc!r}")
            logs = sorted(args.logs.glob("server-*.log"), key=lambda p: p.stat().st_mtime)
            if logs:  # the last server's own account (it may be the one that did not start)
                log(f"  the end of {logs[-1].name}:\n  " + "\n  ".join(logs[-1].read_text().splitlines()[-25:]))
            report["models"][target] = {"error": repr(exc)}
            passed = False
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    report["passed"] = passed
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    log(f"{'PASS' if passed else 'FAIL'}: results in {args.out / 'gpu_check.json'}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
