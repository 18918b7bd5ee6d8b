"""`make kld-bench`: `logprobs-eval kld` measured on SmolLM2-135M-Instruct and WikiText-2, three ways
(writes bench_out/kld/; about 25 minutes on 2 cores, the first run also builds llama-perplexity):

1. llama:  against llama.cpp's own `llama-perplexity`, built once from the llama.cpp source that
           llama-cpp-python 0.3.36 vendors (cached under the server's cache folder). The base is the
           model whole in float32 (F32 GGUF), the build the default Q4_1. Four ways to one set of
           statistics: llama-perplexity on its own base file; `kld` exact; `kld --base` on
           llama-perplexity's file; llama-perplexity on the file `kld --save-base` wrote. The two
           files' tokens must be identical, and the statistics agree within the held margins (it
           exits non-zero where they do not).
2. table:  one model across runtimes, exact mode: base F32 GGUF; builds GGUF Q8_0, Q4_1, Q3_K_M
           (requantized from F32), MLX float32 and MLX 8-bit / 4-bit (`mlx_lm convert -q`); and
           one top-K row at K = 100.
3. speed:  the tool end to end against plain echo scoring (K = 1) of the same windows, both servers
           counted, best of 3, with the two servers sharing the 2 cores, and pinned to a core each
           (one thread each: what separate machines give, short of a second machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from bench.llama_tools import llama_tool
from bench.machine import cpu_model
from server.config import Settings
from server.models.default_model import ensure_default_model
from testing.fixture_model import WHOLE, make_fixture, quantize
from testing.live_server import DATA, ROOT, LiveServer

TEXT = DATA / "wikitext2_valid.txt"
CTX = 512
# Held margins for part 1 (measured on the 2-core Xeon, AVX-512; docs/kld.md has the figures).
# llama-perplexity prints 6 decimals (KLD, PPL) and 3 of a percent (RMS Δp, same top p): the margins
# sit above that rounding. PPL(base) from a 16-bit file is lower than the exact one (a true token more
# than 16 nats below the top is stored at that floor): 1.0e-3 measured, so kld exact's has its own.
MARGINS = {"ppl": 1e-5, "ppl_base": 1e-5, "kld_mean": 1e-3, "dp_rms": 2e-3, "same_top_p": 1e-4}
EXACT_PPL_BASE_MARGIN = 2e-3


def log(message: str) -> None:
    print(f"[kld-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


LLAMA_LINES = {  # llama-perplexity's printed statistics -> kld's JSON keys (percentages as fractions)
    "ppl": (r"Mean PPL\(Q\)\s*:\s*([\d.]+)", 1),
    "ppl_base": (r"Mean PPL\(base\)\s*:\s*([\d.]+)", 1),
    "kld_mean": (r"Mean\s+KLD:\s*([-\d.]+)", 1),
    "kld_max": (r"Maximum KLD:\s*([-\d.]+)", 1),
    "dp_mean": (r"Mean\s+Δp:\s*([-\d.]+)", 0.01),
    "dp_rms": (r"RMS Δp\s*:\s*([\d.]+)", 0.01),
    "same_top_p": (r"Same top p:\s*([\d.]+)", 0.01),
}


# What decides llama.cpp's numbers, set as the server sets them: batch = ubatch = 512, flash attention
# off, the KV cache in float32 (llama-perplexity's defaults are flash attention on for CPUs and a
# float16 KV cache: part 1 also runs it so, to show what those move).
SERVER_NUMERICS = ("-b", str(CTX), "-ub", str(CTX), "-fa", "off", "-ctk", "f32", "-ctv", "f32")


def run_llama(binary: Path, model: Path, out: Path, *args: str, numerics=SERVER_NUMERICS) -> dict:
    """llama-perplexity (-c 512, 2 threads); the statistics it printed, where it printed them."""
    command = [str(binary), "-m", str(model), "-c", str(CTX), "-t", "2", *numerics, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    out.write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({done.returncode}); see {out}")
    text = done.stdout + done.stderr
    return {
        key: float(m.group(1)) * scale
        for key, (pattern, scale) in LLAMA_LINES.items()
        if (m := re.search(pattern, text))
    }


# -- models and servers ---------------------------------------------------------------------------------


def models(cache: Path, out: Path, mlx: bool) -> dict[str, Path]:
    smol = ensure_default_model(cache)
    f32, hf_folder = make_fixture(smol, cache / "fixtures", n_layers=WHOLE)
    found = {
        "F32": f32,
        "Q8_0": quantize(f32, f32.with_name("model-q8_0.gguf"), "Q8_0"),
        "Q4_1": smol,
        "Q3_K_M": quantize(f32, f32.with_name("model-q3_k_m.gguf"), "Q3_K_M"),
    }
    if mlx:
        found["MLX f32"] = hf_folder
        for bits in (8, 4):
            target = hf_folder.with_name(f"mlx-{bits}bit")
            if not target.exists():
                log(f"mlx_lm convert -q --q-bits {bits} (group size 64)")
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "mlx_lm",
                        "convert",
                        "--hf-path",
                        str(hf_folder),
                        "--mlx-path",
                        str(target),
                        "-q",
                        "--q-bits",
                        str(bits),
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            found[f"MLX {bits}-bit"] = target
    return found


def serve(stack: ExitStack, model: Path, out: Path, name: str, *flags: str, prefix: tuple[str, ...] = ()) -> LiveServer:
    return stack.enter_context(
        LiveServer(
            model,
            out / f"{name}.log",
            "--max-logprobs",
            "100",
            "--prefix-cache-mb",
            "0",
            *flags,
            timeout=300,
            prefix=prefix,
        )
    )


def text(chunks: int) -> str:
    return TEXT.read_text(encoding="utf-8")[: chunks * CTX * 6]  # ~4.5 characters a token: room to spare


# -- 1. against llama-perplexity --------------------------------------------------------------------------


def part_llama(cache: Path, out: Path, chunks: int) -> list[str]:
    from logprobs_client import kld, kld_file

    binary = llama_tool(cache, "llama-perplexity")
    found = models(cache, out, mlx=False)
    base, build = found["F32"], found["Q4_1"]
    text_file = out / "text.txt"
    text_file.write_text(text(chunks))
    llama_file, our_file = out / "llama-base.kld", out / "kld-base.kld"
    log("llama-perplexity: the base file, then --kl-divergence on the build")
    run_llama(
        binary,
        base,
        out / "llama-base.log",
        "-f",
        str(text_file),
        "--chunks",
        str(chunks),
        "--kl-divergence-base",
        str(llama_file),
    )
    rows = {
        "llama-perplexity, its own base file": run_llama(
            binary, build, out / "llama-kld.log", "--kl-divergence-base", str(llama_file), "--kl-divergence"
        )
    }
    log("llama-perplexity with its own defaults (flash attention, float16 KV cache), for comparison")
    default_file = out / "llama-base-defaults.kld"
    run_llama(
        binary,
        base,
        out / "llama-base-defaults.log",
        "-f",
        str(text_file),
        "--chunks",
        str(chunks),
        "--kl-divergence-base",
        str(default_file),
        numerics=("-b", str(CTX)),
    )
    defaults = run_llama(
        binary,
        build,
        out / "llama-kld-defaults.log",
        "--kl-divergence-base",
        str(default_file),
        "--kl-divergence",
        numerics=("-b", str(CTX)),
    )
    with ExitStack() as stack:
        base_server, build_server = serve(stack, base, out, "base"), serve(stack, build, out, "build")
        log("kld exact (with --save-base), then kld --base on llama-perplexity's file")
        [rows["kld exact"]] = kld.run(
            base_server.url, [build_server.url], text_file.read_text(), ctx=CTX, chunks=chunks, save_base=our_file
        )
        [rows["kld --base (llama-perplexity's file)"]] = kld.run_from_file(llama_file, [build_server.url])
    rows["llama-perplexity --kl-divergence-base (kld's file)"] = run_llama(
        binary, build, out / "llama-on-kld-file.log", "--kl-divergence-base", str(our_file), "--kl-divergence"
    )
    theirs, ours = kld_file.read(llama_file), kld_file.read(our_file)
    same_tokens = theirs.tokens.shape == ours.tokens.shape and bool((theirs.tokens == ours.tokens).all())
    keys = ("ppl", "ppl_base", "kld_mean", "dp_rms", "same_top_p")
    reference = rows["llama-perplexity, its own base file"]
    lines = [
        f"Base {base.name} (F32), build {build.name} (Q4_1); {chunks} windows of {CTX} tokens of WikiText-2; "
        f"the two base files' tokens identical: {same_tokens}",
        "",
        "| how | PPL(Q) | PPL(base) | mean KLD | RMS Δp | same top p |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    failures = [] if same_tokens else ["the two base files hold different tokens"]
    for how, stats in rows.items():
        lines.append(
            f"| {how} | {stats['ppl']:.6f} | {stats['ppl_base']:.6f} | {stats['kld_mean']:.6f} | "
            f"{100 * stats['dp_rms']:.3f}% | {100 * stats['same_top_p']:.3f}% |"
        )
        for key in keys:
            off = abs(stats[key] - reference[key]) / (abs(reference[key]) if key != "same_top_p" else 1)
            margin = EXACT_PPL_BASE_MARGIN if (how, key) == ("kld exact", "ppl_base") else MARGINS[key]
            if off > margin:
                failures.append(
                    f"{how}: {key} {stats[key]:.6g} vs llama-perplexity's {reference[key]:.6g} "
                    f"({off:.2e} apart, margin {margin})"
                )
    largest = {
        key: max(
            abs(s[key] - reference[key]) / (abs(reference[key]) if key != "same_top_p" else 1) for s in rows.values()
        )
        for key in keys
    }
    lines += [
        "",
        "Largest difference from llama-perplexity's own run (relative; same top p: absolute): "
        + ", ".join(f"{k} {v:.1e}" for k, v in largest.items()),
        f"Margins: {MARGINS}; kld exact's PPL(base) {EXACT_PPL_BASE_MARGIN} (the file's 16 bits clamp it)",
    ]
    lines += [
        "",
        "llama-perplexity with its own defaults (flash attention on, float16 KV cache; not counted above): "
        f"PPL(Q) {defaults['ppl']:.6f}, PPL(base) {defaults['ppl_base']:.6f}, mean KLD {defaults['kld_mean']:.6f}, "
        f"RMS Δp {100 * defaults['dp_rms']:.3f}%, same top p {100 * defaults['same_top_p']:.3f}%",
    ]
    (out / "llama.json").write_text(
        json.dumps({k: {kk: v for kk, v in s.items() if kk != "worst"} for k, s in rows.items()}, indent=2)
    )
    if failures:
        lines += ["", "OUTSIDE THE MARGINS:", *failures]
    return lines


# -- 2. one model across runtimes ---------------------------------------------------------------------------


def part_table(cache: Path, out: Path, chunks: int) -> list[str]:
    from logprobs_client import kld

    found = models(cache, out, mlx=True)
    body = text(chunks)
    with ExitStack() as stack:
        servers = {name: serve(stack, path, out, f"table-{name.replace(' ', '_')}") for name, path in found.items()}
        urls = {s.url: name for name, s in servers.items()}
        log(f"exact mode: {len(servers) - 1} builds against F32, {chunks} windows")
        exact = kld.run(
            servers["F32"].url,
            [s.url for n, s in servers.items() if n != "F32"],
            body,
            ctx=CTX,
            chunks=chunks,
            progress=lambda d, t: log(f"window {d}/{t}"),
            chart=out / "table.png",
        )
        log("top-K mode, K = 100: Q4_1 against F32")
        [topk] = kld.run(servers["F32"].url, [servers["Q4_1"].url], body, ctx=CTX, chunks=chunks, top_k=100)
    for stats in [*exact, topk]:
        stats["build"] = urls[stats["build"]]
    (out / "table.json").write_text(
        json.dumps([{k: v for k, v in s.items() if k != "worst"} for s in [*exact, topk]], indent=2)
    )
    q4_1 = next(s for s in exact if s["build"] == "Q4_1")
    lines = [
        f"Base: SmolLM2-135M-Instruct whole in float32 (F32 GGUF), PPL {exact[0]['ppl_base']:.4f}; "
        f"{exact[0]['positions']} positions ({chunks} windows of {CTX}) of WikiText-2",
        "",
        kld.render_table([*exact, topk]).rstrip(),
        "",
        f"Top-K row: the bound recovers {topk['kld_mean'] / q4_1['kld_mean']:.2f} "
        f"of Q4_1's exact KLD, covering {100 * topk['coverage_mean']:.2f}% of the base mass on average "
        f"({100 * topk['coverage_p1']:.2f}% at the 1st percentile).",
    ]
    return lines


# -- 3. speed ------------------------------------------------------------------------------------------------


def _echo_k1(urls: list[str], cut: list[list[int]]) -> None:
    """Plain echo scoring of the windows (K = 1), every server at once, as lm-eval would score them."""
    from logprobs_client import Client

    clients = [Client(url, timeout=600) for url in urls]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            for window in cut:
                list(
                    pool.map(
                        lambda c, w=window: c.complete([w], max_tokens=0, echo=True, logprobs=1, temperature=0), clients
                    )
                )
    finally:
        for c in clients:
            c.close()


def _bytes(url: str, window: list[int], k: int | None) -> int:
    import httpx

    if k is None:
        body = {"prompt": window, "start": CTX // 2}
        return len(httpx.post(url + "/v1/distributions", json=body, timeout=600).content)
    body = {"prompt": [window], "max_tokens": 0, "echo": True, "logprobs": k, "temperature": 0}
    return len(httpx.post(url + "/v1/completions", json=body, timeout=600).content)


def part_speed(cache: Path, out: Path, chunks: int, repeats: int = 3) -> list[str]:
    from logprobs_client import Client, kld

    found = models(cache, out, mlx=False)
    body = text(chunks)
    lines = [
        f"{chunks} windows of {CTX} tokens, base F32 and build Q4_1, no prefix cache, best of {repeats}; "
        "the two servers' time counted together (they work on each window at once)",
        "",
        "| servers | echo K=1 | kld exact | ratio | kld top-K=100 | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    layouts = {
        "sharing 2 cores (2 threads each)": ((), (), ("--n-threads", "2")),
        "a core each (1 thread each, pinned)": (("taskset", "-c", "0"), ("taskset", "-c", "1"), ("--n-threads", "1")),
    }
    per_window = {}
    for layout, (pin_a, pin_b, flags) in layouts.items():
        with ExitStack() as stack:
            a = serve(stack, found["F32"], out, "speed-base", *flags, prefix=pin_a)
            b = serve(stack, found["Q4_1"], out, "speed-build", *flags, prefix=pin_b)
            with Client(a.url) as client:
                bos, _ = kld.check_tokenizers(client, [], body[:4000], exact=False)
                cut = kld.windows(client.tokenize(body, add_special_tokens=True).tokens, CTX, bos, chunks)
            runs = {
                "echo": partial(_echo_k1, [a.url, b.url], cut),
                "exact": partial(kld.run, a.url, [b.url], body, ctx=CTX, chunks=chunks),
                "top100": partial(kld.run, a.url, [b.url], body, ctx=CTX, chunks=chunks, top_k=100),
            }
            best = {name: float("inf") for name in runs}
            for r in range(repeats):
                for name, fn in runs.items():  # interleaved: drift on a shared machine hits all alike
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
                log(f"{layout}, repeat {r + 1}: " + ", ".join(f"{n} {t:.1f}s" for n, t in best.items()))
            if not per_window:
                per_window = {k: _bytes(a.url, cut[0], k) for k in (None, 100, 1)}
                with Client(a.url) as ca, Client(b.url) as cb:
                    rows = [c.distributions(cut[0], start=CTX // 2).array() for c in (ca, cb)]
                    tops = [kld._echo_topk(c, cut[0], CTX // 2, 100) for c in (ca, cb)]
                targets = np.asarray(cut[0][CTX // 2 + 1 :])
                start = time.perf_counter()
                kld.exact_positions(rows[0], rows[1], targets)
                per_window["exact statistics s"] = time.perf_counter() - start
                start = time.perf_counter()
                kld.topk_positions(tops[0][0], tops[1][0], tops[0][1], tops[1][1])
                per_window["top-100 statistics s"] = time.perf_counter() - start
        lines.append(
            f"| {layout} | {best['echo']:.2f} s | {best['exact']:.2f} s | {best['exact'] / best['echo']:.2f}x | "
            f"{best['top100']:.2f} s | {best['top100'] / best['echo']:.2f}x |"
        )
    lines += [
        "",
        f"Bytes a window moves from each server: exact {per_window[None] / 1e6:.1f} MB (float32 rows), "
        f"top-100 JSON {per_window[100] / 1e6:.1f} MB, echo K=1 JSON {per_window[1] / 1e3:.0f} kB. The tool's "
        f"own statistics per window: exact {1e3 * per_window['exact statistics s']:.0f} ms, top-100 "
        f"{1e3 * per_window['top-100 statistics s']:.0f} ms.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="llama,table,speed", help="which parts, comma-separated")
    parser.add_argument("--chunks", type=int, default=16, help="windows of WikiText-2 for parts 1 and 2 (default 16)")
    parser.add_argument("--speed-chunks", type=int, default=4, help="windows for part 3 (default 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "kld")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Settings().cache_path()
    report = [
        f"# kld bench, {time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores",
        "",
        f"`python -m bench.kld --parts {args.parts} --chunks {args.chunks} --speed-chunks {args.speed_chunks}`",
    ]
    failed = False
    for part in args.parts.split(","):
        log(f"part {part}")
        lines = {
            "llama": lambda: part_llama(cache, args.out, args.chunks),
            "table": lambda: part_table(cache, args.out, args.chunks),
            "speed": lambda: part_speed(cache, args.out, args.speed_chunks),
        }[part]()
        failed |= any(line == "OUTSIDE THE MARGINS:" for line in lines)
        report += ["", f"## {part}", "", *lines]
        (args.out / "report.md").write_text("\n".join(report) + "\n")
        print("\n".join(["", f"## {part}", "", *lines]), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
