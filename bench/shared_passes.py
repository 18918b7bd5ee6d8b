"""Prompts in shared forward passes on llama.cpp: is it faster, and does it change any number?

The engine runs each prompt as its own forward pass. This measures the alternative on the same
HellaSwag-shaped prompts: k prompts per llama_decode, each in its own KV stream (kv_unified off),
each padded at its end to the group's longest prompt. Padding matters: with separate streams
llama.cpp splits a batch into ubatches with an equal number of tokens per sequence, so ragged
prompts fall into many small ubatches, some with ONE token of a sequence, and llama.cpp's
one-token path gives other numbers than its many-token path (up to 0.66 in a logit on SmolLM2,
see `probe`). Pad tokens come after a prompt's last real token, so causal attention keeps them out
of its rows; their logits are not asked for and their KV cells are dropped.

Layouts (parse_layout): "16", a KV stream per prompt, padded as above; "16u", one unified KV cache,
unpadded (llama.cpp then keeps a ragged batch in one ubatch, but a prompt's numbers depend on where
its cells start); "16u16", unified with each prompt padded to a multiple of 16 tokens, so that its
cells start at a multiple of 16, which gave the same floats as alone on this AVX-512 CPU. `--mlx
FOLDER` asks the same of an mlx-lm model (one padded batch per pass).

`python -m bench.shared_passes` prints the speed ratios (interleaved rounds, best of each) and the
exactness probes; `make bench` adds its speed rows (group 8). tests/test_shared_passes.py holds
the exactness rules on the default model.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RANDOM_MODEL = "random-llama-{shape}-{quant}.gguf"  # made by bench/make_random_gguf.py; speed only
# make_random_gguf.py's arguments for llama shapes people evaluate (SmolLM2-135M's, Llama 3.2 1B's
# without tied embeddings, Llama 3.1 8B's).
SHAPES = {
    "135m": ["--n-embd", "576", "--n-layer", "30", "--n-head", "9", "--n-head-kv", "3", "--n-ff", "1536"],
    "1b": ["--n-embd", "2048", "--n-layer", "16", "--n-head", "32", "--n-head-kv", "8", "--n-ff", "8192"],
    "8b": ["--n-embd", "4096", "--n-layer", "32", "--n-head", "32", "--n-head-kv", "8", "--n-ff", "14336"],
}
MAKE_RANDOM_GGUF = ROOT / "bench" / "make_random_gguf.py"
DATA = ROOT / "data"  # the data sets the repository carries (data/README.md)


class Passes:
    """A llama.cpp context of `streams` KV streams (f32 KV, no flash attention: the server's
    settings) that runs groups of prompts, one group per llama_decode, all logits rows asked for."""

    def __init__(
        self, model_path: Path, streams: int, threads: int, n_ctx: int = 512, unified: bool = False, repack: bool = True
    ):
        import logging

        import llama_cpp as ll

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs every tensor
        self._ll = ll
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        # repack=False keeps llama.cpp from converting Q4_0/Q4_K/... weights into its interleaved
        # CPU layouts, whose kernels take other paths for other numbers of tokens in a pass.
        model_params.use_extra_bufts = repack
        self.model = ll.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {model_path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        params = ll.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * streams, streams, unified
        params.n_batch = params.n_ubatch = n_ctx * streams  # a group is one ubatch, never split by size
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = params.type_v = ll.GGML_TYPE_F32
        self.ctx = ll.llama_init_from_model(self.model, params)
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_ctx * streams, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = (self._ll.llama_token * (len(data) + 8))()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), out, len(out), True, True)
        return list(out[:n])

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (sequence, token, position, wants logits); a copy of the logits rows."""
        batch = self.batch
        for j, (seq, token, position, wanted) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, position, 1, wanted
            batch.seq_id[j][0] = seq
        batch.n_tokens = len(entries)
        if self._ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = sum(1 for e in entries if e[3])
        return np.ctypeslib.as_array(self._ll.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab)).copy()

    def forget(self, seq: int = -1, start: int = -1) -> None:
        self._ll.llama_memory_seq_rm(self.memory, seq, start, -1)

    def group(self, prompts: Sequence[list[int]], pad: bool = True, align: int = 1) -> list[np.ndarray]:
        """The prompts in one forward pass, prompt i as sequence i; each one's logits rows. pad:
        each padded at its end to the longest (separate KV streams need equal lengths); align:
        each padded to a multiple of `align` tokens, so that in a unified KV cache every prompt's
        cells start at a multiple of it."""
        width = max(map(len, prompts))
        entries = []
        for seq, tokens in enumerate(prompts):
            length = width if pad else aligned(len(tokens), align)
            padded = tokens + [tokens[-1]] * (length - len(tokens))
            entries += [(seq, t, p, p < len(tokens)) for p, t in enumerate(padded)]
        logits = self.decode(entries)
        self.forget()
        bounds = np.cumsum([0] + [len(t) for t in prompts])
        return [logits[a:b] for a, b in itertools.pairwise(bounds)]

    def pieces(self, tokens: list[int], sizes: Sequence[int]) -> np.ndarray:
        """One prompt run as consecutive passes of the given sizes (as a prefix-cache hit or an
        n_batch-chunked prompt runs); its logits rows."""
        rows, start = [], 0
        for size in sizes:
            rows.append(self.decode([(0, tokens[p], p, True) for p in range(start, start + size)]))
            start += size
        self.forget()
        return np.concatenate(rows)

    def close(self) -> None:
        ll = self._ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


def hellaswag_prompts(passes: Passes, n_items: int) -> list[list[int]]:
    """Context + " " + ending for every ending, with BOS where the model adds one."""
    import json

    lines = (DATA / "hellaswag_dev.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines[:n_items]]
    return [passes.tokenize(item["ctx"] + " " + ending) for item in items for ending in item["endings"]]


def groups_of(prompts: list[list[int]], k: int) -> tuple[list[list[int]], list[int]]:
    """Groups of k prompts of similar length (sorted: little padding), and the prompt order."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[g : g + k] for g in range(0, len(order), k)], order


def aligned(n: int, align: int) -> int:
    """n rounded up to a multiple of align."""
    return -(-n // align) * align


def parse_layout(name: str) -> tuple[int, bool, int]:
    """ "16": 16 prompts per pass, a KV stream each, padded to the longest; "16u": in one unified KV
    cache, unpadded (llama.cpp keeps a ragged batch in one ubatch then); "16u16": unified, each
    prompt padded to a multiple of 16 tokens. Returns (k, unified, align)."""
    match = re.fullmatch(r"(\d+)(u(\d*))?", name)
    if not match:
        raise ValueError(f"not a layout: {name!r} (e.g. 16, 16u, 16u16)")
    return int(match.group(1)), bool(match.group(2)), int(match.group(3) or 1)


def speed_and_exactness(
    model: Path, n_items: int, layouts: Sequence[str], threads: int, rounds: int, log=print, repack: bool = True
) -> dict[str, dict]:
    """tokens/s of one prompt per pass and of each layout (see parse_layout; interleaved rounds,
    best kept), whether every row of every prompt came out the same float as alone, and the
    padding's share of the tokens run."""
    alone_ctx = Passes(model, 1, threads, repack=repack)
    parsed = {name: parse_layout(name) for name in layouts}
    shared = {
        name: Passes(model, k, threads, repack=repack, unified=unified) for name, (k, unified, _) in parsed.items()
    }
    prompts = hellaswag_prompts(alone_ctx, n_items)
    n_tokens = sum(map(len, prompts))
    log(f"{model.name}: {len(prompts)} prompts, {n_tokens} tokens, {threads} threads")
    alone_ctx.group(prompts[:1])  # warm-up
    speeds: dict[str, list[float]] = {"1": [], **{name: [] for name in parsed}}
    results: dict[str, dict] = {}
    for r in range(rounds):
        started = time.perf_counter()
        alone = [alone_ctx.group([p])[0] for p in prompts]
        speeds["1"].append(n_tokens / (time.perf_counter() - started))
        for name, (k, unified, align) in parsed.items():
            groups, _ = groups_of(prompts, k)
            started = time.perf_counter()
            outs = [shared[name].group([prompts[i] for i in g], pad=not unified, align=align) for g in groups]
            speeds[name].append(n_tokens / (time.perf_counter() - started))
            pairs = [(out, alone[i]) for g, group_out in zip(groups, outs) for i, out in zip(g, group_out)]
            if unified:
                run = sum(aligned(len(prompts[i]), align) for g in groups for i in g)
            else:
                run = sum(len(g) * max(len(prompts[i]) for i in g) for g in groups)
            results[name] = {
                "identical": all(np.array_equal(a, b) for a, b in pairs),
                "max_abs_logit_diff": max(float(np.abs(a - b).max()) for a, b in pairs),
                "padding": run / n_tokens - 1,
            }
        log(f"     round {r + 1}/{rounds}: " + ", ".join(f"{k}/pass {s[-1]:.0f} tok/s" for k, s in speeds.items()))
    results = {"1": {"identical": True, "max_abs_logit_diff": 0.0, "padding": 0.0}, **results}
    for name, s in speeds.items():
        results[name]["tokens_per_s"] = max(s)
    for p in [alone_ctx, *shared.values()]:
        p.close()
    return results


def probe(model: Path, threads: int, log=print) -> None:
    """What moves a prompt's numbers in llama.cpp: the pass sizes it runs in, ragged groups, and
    where its cells sit in a unified KV cache."""
    p = Passes(model, 8, threads)
    prompts = hellaswag_prompts(p, 25)
    alone = [p.pieces(t, [len(t)]) for t in prompts]

    def differs(a: np.ndarray, b: np.ndarray) -> str:
        d = np.abs(a - b).max(axis=1)
        return "identical" if not d.any() else f"{np.count_nonzero(d)} rows differ, max |d logit| {d.max():.2f}"

    log("one prompt in consecutive passes (as after a prefix-cache hit), against one pass:")
    for i in (8, 51):
        t = prompts[i]
        for name, sizes in (
            ("L-6, 6", [len(t) - 6, 6]),
            ("10, L-10", [10, len(t) - 10]),
            ("L-6, 2, 2, 2", [len(t) - 6, 2, 2, 2]),
            ("L-6, then 1 x 6", [len(t) - 6] + [1] * 6),
        ):
            log(f"  prompt {i} ({len(t)} tokens) in passes of {name}: {differs(p.pieces(t, sizes), alone[i])}")
    log("groups of 8 in one llama_decode, separate KV streams, unpadded (llama.cpp splits them) vs padded:")
    for g in (range(8, 16), range(48, 56)):
        for pad in (False, True):
            outs = p.group([prompts[i] for i in g], pad=pad)
            worst = max((np.abs(o - alone[i]).max(), i) for o, i in zip(outs, g))
            log(
                f"  prompts {g.start}-{g.stop - 1}, {'padded' if pad else 'ragged'}: worst max |d logit| "
                f"{worst[0]:.2f} (prompt {worst[1]})"
            )
    p.close()
    u = Passes(model, 4, threads, unified=True)
    log("unified KV cache: one prompt alone, after another sequence took the first n cells:")
    base = u.pieces(prompts[0], [len(prompts[0])])
    for n in (1, 3, 7, 8, 16, 17, 24, 32, 48):
        u.decode([(1, prompts[1][j % len(prompts[1])], j, False) for j in range(n)])
        moved = u.decode([(0, t, j, True) for j, t in enumerate(prompts[0])])
        u.forget()
        log(f"  {n:2d} cells taken: {differs(moved, base)}")
    u.close()


def random_model(
    cache: Path, shape: str, quant: str, log=print, tokenizer_from: Path | None = None, tool: Path = MAKE_RANDOM_GGUF
) -> Path:
    """A llama GGUF of one of SHAPES with random weights (speed only) and the tokenizer of
    `tokenizer_from` (default: the default model's), quantized; made once into the cache."""

    target = cache / RANDOM_MODEL.format(shape=shape, quant=quant)
    if target.exists():
        return target
    if tokenizer_from is None:
        from server.models.default_model import ensure_default_model

        tokenizer_from = ensure_default_model(cache)
    f16 = cache / RANDOM_MODEL.format(shape=shape, quant="f16")
    if not f16.exists():
        log(f"making {f16.name} (random weights, the tokenizer of {tokenizer_from.name})")
        subprocess.run(
            [sys.executable, str(tool), "--tokenizer-from", str(tokenizer_from), str(f16), *SHAPES[shape]],
            check=True,
            capture_output=True,
        )
    log(f"quantizing {f16.name} to {quant}")
    return quantize(f16, target, quant)


def quantize(source: Path, target: Path, quant: str) -> Path:
    """llama.cpp's quantizer (llama_model_quantize): source GGUF -> target, of a type such as q4_1,
    q4_k_m, q5_k_m or q8_0."""
    import logging

    import llama_cpp as ll

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs every tensor
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    if ll.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"quantizing {source} failed")
    return target


def mlx_speed_and_exactness(
    model_dir: Path, n_items: int, ks: Sequence[int], rounds: int, log=print
) -> dict[str, dict]:
    """The same question for an mlx-lm model: k prompts as one (k, longest) batch, each padded at its
    end (causal attention keeps the pad out of its rows), against each prompt alone as a (1, n)
    batch: tokens/s (interleaved rounds, best kept) and how far the rows moved, in logits and in
    log-softmax (float64) over the whole vocabulary."""
    import json

    import mlx.core as mx
    from mlx_lm import load

    from testing.oracle import log_softmax64

    model, tokenizer = load(str(model_dir))
    lines = (DATA / "hellaswag_dev.jsonl").read_text().splitlines()[:n_items]
    prompts = [
        tokenizer.encode(item["ctx"] + " " + ending) for item in map(json.loads, lines) for ending in item["endings"]
    ]
    n_tokens = sum(map(len, prompts))

    def forward(batch: list[list[int]]) -> np.ndarray:
        logits = model(mx.array(batch))
        mx.eval(logits)
        return np.array(logits)

    def run(k: int) -> list[np.ndarray]:
        if k == 1:
            return [forward([p])[0] for p in prompts]
        groups, _ = groups_of(prompts, k)
        rows: list = [None] * len(prompts)
        for g in groups:
            width = max(len(prompts[i]) for i in g)
            out = forward([prompts[i] + [prompts[i][-1]] * (width - len(prompts[i])) for i in g])
            for j, i in enumerate(g):
                rows[i] = out[j, : len(prompts[i])]
        return rows

    log(f"{model_dir.name} (MLX): {len(prompts)} prompts, {n_tokens} tokens")
    alone = run(1)  # warm-up, and the reference
    speeds: dict[str, list[float]] = {str(k): [] for k in (1, *ks)}
    results: dict[str, dict] = {"1": {"identical": True, "max_abs_logit_diff": 0.0, "max_abs_logprob_diff": 0.0}}
    for r in range(rounds):
        for k in (1, *ks):
            started = time.perf_counter()
            rows = run(k)
            speeds[str(k)].append(n_tokens / (time.perf_counter() - started))
            if k > 1:
                pairs = list(zip(rows, alone))
                results[str(k)] = {
                    "identical": all(np.array_equal(a, b) for a, b in pairs),
                    "max_abs_logit_diff": max(float(np.abs(a - b).max()) for a, b in pairs),
                    "max_abs_logprob_diff": max(
                        float(np.abs(log_softmax64(a) - log_softmax64(b)).max()) for a, b in pairs
                    ),
                }
        log(f"     round {r + 1}/{rounds}: " + ", ".join(f"{k}/pass {s[-1]:.0f} tok/s" for k, s in speeds.items()))
    for name, s in speeds.items():
        results[name]["tokens_per_s"] = max(s)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="GGUF files (default: the default model)")
    parser.add_argument("--items", type=int, default=25, help="HellaSwag items (4 prompts each)")
    parser.add_argument(
        "--per-pass",
        default="4,16",
        help="layouts to try: 16 (a KV stream per prompt, padded), 16u (one unified KV cache), "
        "16u16 (unified, each prompt padded to a multiple of 16 tokens)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-probe", action="store_true", help="skip the exactness probes")
    parser.add_argument("--mlx", type=Path, help="an mlx-lm model folder to measure instead (k per pass: --per-pass)")
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="load weights as stored (llama.cpp's use_extra_bufts off): no repacked CPU kernels",
    )
    args = parser.parse_args()
    from server.config import Settings
    from server.models.default_model import ensure_default_model

    if args.mlx:
        results = mlx_speed_and_exactness(args.mlx, args.items, [int(k) for k in args.per_pass.split(",")], args.rounds)
        for name, r in results.items():
            print(
                f"{args.mlx.name} (MLX): {name:>2} prompt(s)/pass {r['tokens_per_s']:6.0f} tok/s "
                f"{r['tokens_per_s'] / results['1']['tokens_per_s']:.2f}x  same floats as alone: {r['identical']} "
                f"(max |d logit| {r['max_abs_logit_diff']:.2g}, max |d logprob| {r['max_abs_logprob_diff']:.2g})"
            )
        return
    models = args.models or [ensure_default_model(Settings().cache_path())]
    if not args.no_probe:
        probe(models[0], args.threads)
    layouts = [name for name in args.per_pass.split(",") if name]
    for model in models:
        results = speed_and_exactness(model, args.items, layouts, args.threads, args.rounds, repack=not args.no_repack)
        base = results["1"]["tokens_per_s"]
        for name, r in results.items():
            print(
                f"{model.name}: {name:>5} prompt(s)/pass {r['tokens_per_s']:6.0f} tok/s "
                f"{r['tokens_per_s'] / base:.2f}x  padding {r['padding']:.0%}  "
                f"same floats as alone: {r['identical']} (max |d logit| {r['max_abs_logit_diff']:.2g})"
            )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
