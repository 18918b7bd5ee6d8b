"""`logprobs-eval kld`: how far builds of a model move its token distributions from a base build,
with llama-perplexity's statistics (--kl-divergence), between any servers that speak HTTP.

The text is tokenized once, by the base server, and cut into windows as llama-perplexity does:
`ctx` tokens each (the model's BOS first where its tokenizer adds one), only the second half of
each window scored. Each window goes to every server as token ids.

- Exact mode (servers with logprobs-server's /v1/distributions): each scored position's full
  log-distribution comes from every server, and KL(base || build) is computed in float64.
- Top-K mode (--top-k K, or a server without the extension, such as vLLM): from echo's top-K
  alternatives, the KL over the partition {tokens both servers returned} + {the rest}. Merging
  outcomes cannot raise a KL divergence, so this is a lower bound of the full KL, never the KLD.

Both: PPL of each side, delta-p = p_build(true) - p_base(true), same top = equal argmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from logprobs_client import kld_file
from logprobs_client.client import Client, Verify
from logprobs_client.kld_file import normalized
from logprobs_client.types import APIError

ROWS_PER_STEP = 32  # positions whose float64 distributions are held at once (bounds memory)
PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)

A = TypeVar("A")  # what one server answers for a window (its rows, or its top-K dicts and true logprobs)
TopK = tuple[list[dict[str, float]], list[float]]  # echo's top-K dicts and the true tokens' logprobs
# One build's statistics (summarize; `worst` and, from a base file, `base_file` added): the JSON
# object `--json` prints, read back by key by render and render_table.
Stats = dict[str, Any]


class WorstPosition(TypedDict):
    """One of the positions where a build moved the distribution most."""

    window: int
    position: int
    kld: float
    context: str
    token: str


class Refused(Exception):
    """The servers cannot be compared (their tokenizers differ, a server lacks what the mode needs)."""


@dataclass
class Positions:
    """Per scored position, in float64, for one build against the base."""

    nll_base: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    coverage: list[np.ndarray] = field(default_factory=list)  # base mass the partition covers (1: exact)

    def add(self, **arrays: np.ndarray) -> None:
        for name, values in arrays.items():
            getattr(self, name).append(np.asarray(values))

    def array(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.empty(0)


def exact_positions(base: np.ndarray, build: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """KL(base || build), NLLs, delta-p and same-top at each row, in float64, from full
    log-distributions [rows, vocab] (float32 or float16 as sent)."""
    out = {k: np.empty(len(targets)) for k in ("nll_base", "nll", "kld", "dp")}
    out["same_top"] = np.empty(len(targets), dtype=bool)
    for lo in range(0, len(targets), ROWS_PER_STEP):
        hi = min(lo + ROWS_PER_STEP, len(targets))
        lb, lq = normalized(base[lo:hi]), normalized(build[lo:hi])
        rows, t = np.arange(hi - lo), targets[lo:hi]
        out["nll_base"][lo:hi], out["nll"][lo:hi] = -lb[rows, t], -lq[rows, t]
        out["dp"][lo:hi] = np.exp(lq[rows, t]) - np.exp(lb[rows, t])
        out["same_top"][lo:hi] = base[lo:hi].argmax(axis=1) == build[lo:hi].argmax(axis=1)
        p = np.exp(lb)
        lb -= lq  # the log ratio, in place: one [rows, vocab] buffer fewer
        kl = np.einsum("ij,ij->i", p, lb)
        for i in np.flatnonzero(np.isnan(kl)):  # a token at -inf on both sides: 0 * nan, counted as 0
            kl[i] = np.where(p[i] > 0, p[i] * lb[i], 0.0).sum()
        out["kld"][lo:hi] = np.maximum(kl, 0.0)
    out["coverage"] = np.ones(len(targets))
    return out


# The rest's mass is 1 - (the returned tokens' mass), from float32 log-probabilities: each p is
# known to about 1e-6 of itself (a float32 log-probability near -10 has an ulp of 1e-6), so with
# up to ~1000 tokens the difference is noise below about 1e-6. Below that floor it is taken as the
# floor on both sides, so rounding cannot make a rest of 0 on one side and a huge log ratio.
REST_FLOOR = 1e-6


def _log_rest(log_mass: float) -> float:
    """log(max(1 - e^log_mass, REST_FLOOR)): the log of the mass outside the returned tokens."""
    rest = -math.expm1(log_mass) if log_mass < 0 else 0.0
    return math.log(max(rest, REST_FLOOR))


def topk_positions(
    base: list[dict[str, float]], build: list[dict[str, float]], base_true: list[float], build_true: list[float]
) -> dict[str, np.ndarray]:
    """The partition bound of KL(base || build) at each position from echo's top-K dicts (token
    string -> logprob, best first; the true token included), with the base mass it covers."""
    kld, coverage, same = [], [], []
    for top_b, top_q in zip(base, build):
        shared = [s for s in top_b if s in top_q]
        lb = np.array([top_b[s] for s in shared], dtype=np.float64)
        lq = np.array([top_q[s] for s in shared], dtype=np.float64)
        pb = np.exp(lb)
        rest_b = _log_rest(float(np.logaddexp.reduce(lb))) if len(lb) else 0.0
        rest_q = _log_rest(float(np.logaddexp.reduce(lq))) if len(lq) else 0.0
        value = float((pb * (lb - lq)).sum()) + math.exp(rest_b) * (rest_b - rest_q)
        kld.append(max(value, 0.0))
        coverage.append(float(pb.sum()))
        same.append(next(iter(top_b)) == next(iter(top_q)))
    lb, lq = np.asarray(base_true, dtype=np.float64), np.asarray(build_true, dtype=np.float64)
    return {
        "nll_base": -lb,
        "nll": -lq,
        "kld": np.array(kld),
        "dp": np.exp(lq) - np.exp(lb),
        "same_top": np.array(same),
        "coverage": np.array(coverage),
    }


# -- statistics, as llama-perplexity prints them ----------------------------------------------------


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def _percentiles(x: np.ndarray) -> dict[str, float]:
    values = np.percentile(x, PERCENTILES)
    return {"max": float(x.max()), **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, values)}, "min": float(x.min())}


def summarize(build: str, positions: Positions, mode: str, top_k: int | None) -> Stats:
    """One build's statistics against the base (the JSON `--json` prints, one object per build)."""
    nll_b, nll_q = positions.array("nll_base"), positions.array("nll")
    kld, dp = positions.array("kld"), positions.array("dp")
    same, coverage = positions.array("same_top").astype(np.float64), positions.array("coverage")
    n = len(kld)
    ln_ratio, ln_ratio_err = _mean_err(nll_q - nll_b)
    ppl_b, ppl_q = math.exp(nll_b.mean()), math.exp(nll_q.mean())
    kld_mean, kld_err = _mean_err(kld)
    dp_mean, dp_err = _mean_err(dp)
    rms = math.sqrt(float((dp**2).mean()))
    rms_err = float((dp**2).std(ddof=1) / math.sqrt(n)) / (2 * rms) if n > 1 and rms > 0 else 0.0
    same_p = float(same.mean())
    return {
        "build": build,
        "mode": mode,
        "top_k": top_k,
        "positions": n,
        "ppl_base": ppl_b,
        "ppl_base_err": ppl_b * _mean_err(nll_b)[1],
        "ppl": ppl_q,
        "ppl_err": ppl_q * _mean_err(nll_q)[1],
        "ln_ppl_correlation": float(np.corrcoef(nll_b, nll_q)[0, 1]) if n > 1 and nll_b.std() and nll_q.std() else 1.0,
        "ln_ppl_ratio_mean": ln_ratio,
        "ln_ppl_ratio_err": ln_ratio_err,
        "ppl_ratio": math.exp(ln_ratio),
        "ppl_ratio_err": math.exp(ln_ratio) * ln_ratio_err,
        "kld_mean": kld_mean,
        "kld_err": kld_err,
        "kld_max": float(kld.max()),
        "kld_percentiles": _percentiles(kld),
        "dp_mean": dp_mean,
        "dp_err": dp_err,
        "dp_percentiles": _percentiles(dp),
        "dp_rms": rms,
        "dp_rms_err": rms_err,
        "same_top_p": same_p,
        "same_top_p_err": math.sqrt(same_p * (1 - same_p) / (n - 1)) if n > 1 else 0.0,
        "coverage_mean": float(coverage.mean()),
        "coverage_p1": float(np.percentile(coverage, 1)),
    }


def render(stats: Stats) -> str:
    """llama-perplexity's blocks for one build (a lower bound is printed as one, never as the KLD)."""
    exact = stats["mode"] == "exact"
    kl = "KLD" if exact else "KLD lower bound"
    lines = [
        f"====== {stats['build']} against the base: {stats['positions']} positions, "
        + ("exact" if exact else f"top-{stats['top_k']} partition bound")
        + " ======",
        f"Mean PPL(Q)                   : {stats['ppl']:10.6f} ± {stats['ppl_err']:.6f}",
        f"Mean PPL(base)                : {stats['ppl_base']:10.6f} ± {stats['ppl_base_err']:.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * stats['ln_ppl_correlation']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {stats['ln_ppl_ratio_mean']:10.6f} ± {stats['ln_ppl_ratio_err']:.6f}",
        f"Mean PPL(Q)/PPL(base)         : {stats['ppl_ratio']:10.6f} ± {stats['ppl_ratio_err']:.6f}",
        "",
        f"Mean    {kl}: {stats['kld_mean']:10.6f} ± {stats['kld_err']:.6f}",
    ]
    names = {"max": "Maximum", "min": "Minimum", "p50": "Median "}
    lines += [
        f"{names.get(k, f'{k[1:]:>5}%'):<7} {kl}: {v:10.6f}"
        for k, v in stats["kld_percentiles"].items()
        if k in ("max", "p99.9", "p99", "p95", "p90", "p50", "p10", "p5", "p1", "p0.1", "min")
    ]
    if not exact:
        lines.append(
            f"Base mass covered: mean {100 * stats['coverage_mean']:.2f}%, "
            f"1st percentile {100 * stats['coverage_p1']:.2f}%"
        )
    lines += ["", f"Mean    Δp: {100 * stats['dp_mean']:8.3f} ± {100 * stats['dp_err']:.3f} %"]
    lines += [f"{names.get(k, f'{k[1:]:>5}%'):<7} Δp: {100 * v:8.3f}%" for k, v in stats["dp_percentiles"].items()]
    lines += [
        f"RMS Δp    : {100 * stats['dp_rms']:8.3f} ± {100 * stats['dp_rms_err']:.3f} %",
        f"Same top p: {100 * stats['same_top_p']:8.3f} ± {100 * stats['same_top_p_err']:.3f} %",
    ]
    return "\n".join(lines) + "\n"


def render_table(all_stats: list[Stats]) -> str:
    """The quantization PRs' table: one row per build."""
    lines = [
        "| build | PPL | ΔPPL | KLD | mean Δp | RMS Δp | same top p |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in all_stats:
        kld = f"{s['kld_mean']:.6f}" if s["mode"] == "exact" else f">= {s['kld_mean']:.6f} (top-{s['top_k']})"
        lines.append(
            f"| {s['build']} | {s['ppl']:.4f} | {s['ppl'] - s['ppl_base']:+.4f} | {kld} | "
            f"{100 * s['dp_mean']:+.3f}% | {100 * s['dp_rms']:.3f}% | {100 * s['same_top_p']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


# -- windows and servers ------------------------------------------------------------------------------


def windows(tokens: list[int], ctx: int, bos: int | None, chunks: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: consecutive `ctx`-token pieces, BOS put in place of the first
    token where the model adds one; at most `chunks`."""
    n = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    out = []
    for i in range(n):
        window = list(tokens[i * ctx : (i + 1) * ctx])
        if bos is not None:
            window[0] = bos
        out.append(window)
    return out


def _vocabulary(client: Client, probe: list[int]) -> int:
    """The vocabulary size, from one /v1/distributions row; a server without it is refused."""
    try:
        return client.distributions(probe, start=0).vocab
    except APIError as exc:
        if exc.status in (404, 405):
            raise Refused(
                f"{client.base_url} has no /v1/distributions (not a logprobs-server?): exact KL needs "
                "each position's full distribution; use --top-k K for the top-K lower bound"
            ) from None
        raise


def check_tokenizers(base: Client, others: list[Client], sample: str, exact: bool) -> tuple[int | None, int | None]:
    """(the BOS id the windows start with, or None where the model adds none; the vocabulary size
    in exact mode), after refusing servers whose tokenizers differ from the base's: special tokens,
    the BOS rule, the ids of a sample of the text and (exact mode) the vocabulary size."""
    info = base.tokenizer_info()
    ids = base.tokenize(sample, add_special_tokens=False).tokens
    probe = ids[:2] if len(ids) >= 2 else [0, 0]
    vocab = _vocabulary(base, probe) if exact else None
    for other in others:
        theirs = other.tokenizer_info()
        differ = [
            name for name in ("bos_token", "eos_token", "add_bos_token") if getattr(info, name) != getattr(theirs, name)
        ]
        if differ:
            raise Refused(
                f"{other.base_url}'s tokenizer differs from the base's in "
                + ", ".join(f"{n} ({getattr(theirs, n)!r} vs {getattr(info, n)!r})" for n in differ)
            )
        other_ids = other.tokenize(sample, add_special_tokens=False).tokens
        if other_ids != ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, other_ids)) if a != b), min(len(ids), len(other_ids)))
            raise Refused(
                f"{other.base_url} tokenizes the text differently from the base (first at token {at}: "
                f"{other_ids[at : at + 3]} vs {ids[at : at + 3]}); the distributions cannot be compared"
            )
        if exact and (other_vocab := _vocabulary(other, probe)) != vocab:
            raise Refused(f"{other.base_url}'s vocabulary has {other_vocab} tokens, the base's {vocab}")
    bos = None
    if info.add_bos_token and info.bos_token is not None:
        bos = base.tokenize(info.bos_token, add_special_tokens=False).tokens[0]
    return bos, vocab


def _echo_topk(client: Client, window: list[int], first: int, k: int) -> TopK:
    choice = client.complete([window], max_tokens=0, echo=True, logprobs=k, temperature=0).choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None  # asked for (logprobs=k)
    # Past the first echoed token, every position has its logprob and its top dict (not None).
    return (
        list(cast("list[dict[str, float]]", logprobs.top_logprobs[first + 1 :])),
        list(cast("list[float]", logprobs.token_logprobs[first + 1 :])),
    )


def _clients(urls: list[str], api_key: str | None, verify: Verify) -> list[Client]:
    return [Client(url, api_key=api_key, verify=verify, timeout=600) for url in urls]


def _score(
    cut: list[list[int]],
    n_builds: int,
    fetch: Callable[[list[int]], list[A]],
    compute: Callable[[int, list[int], list[A]], list[dict[str, np.ndarray]]],
    progress: Callable[[int, int], None] | None,
) -> list[Positions]:
    """Every window to every server at once (fetch(window): each server's answer), and while the
    servers work on the next window, the statistics of this one (compute(i, window, answers): one
    dict of per-position arrays per build): the tool's own arithmetic hides behind the servers'."""
    positions = [Positions() for _ in range(n_builds)]
    if not cut:
        return positions
    with ThreadPoolExecutor(1) as ahead:  # at most two windows' answers held at once
        coming = ahead.submit(fetch, cut[0])
        for i, window in enumerate(cut):
            answers = coming.result()
            if i + 1 < len(cut):
                coming = ahead.submit(fetch, cut[i + 1])
            for values, into in zip(compute(i, window, answers), positions):
                into.add(**values)
            if progress is not None:
                progress(i + 1, len(cut))
    return positions


def _rows_from(first: int, dtype: str) -> Callable[[Client, list[int]], NDArray[np.float32 | np.float16]]:
    """ask for _on_every_server: a window's full log-distributions from row `first` on."""

    def rows_of(client: Client, window: list[int]) -> NDArray[np.float32 | np.float16]:
        return client.distributions(window, start=first, dtype=dtype).array()

    return rows_of


def _on_every_server(
    clients: list[Client], ask: Callable[[Client, list[int]], A]
) -> tuple[ThreadPoolExecutor, Callable[[list[int]], list[A]]]:
    """fetch for _score: ask(client, window) of every server at once."""
    pool = ThreadPoolExecutor(len(clients))

    def fetch(window: list[int]) -> list[A]:
        return list(pool.map(lambda c: ask(c, window), clients))

    return pool, fetch


def _results(
    urls: list[str],
    positions: list[Positions],
    mode: str,
    top_k: int | None,
    chart: str | Path | None,
    worst: Callable[[Positions], list[WorstPosition]],
) -> list[Stats]:
    if chart is not None and urls:  # (--save-base with the base alone: nothing to draw)
        from logprobs_client.chart import write_kld_chart

        write_kld_chart({url: p.array("kld") for url, p in zip(urls, positions)}, chart, mode, top_k)
    return [summarize(url, p, mode, top_k) | {"worst": worst(p)} for url, p in zip(urls, positions)]


def run(
    base_url: str,
    urls: list[str],
    text: str,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    top_k: int | None = None,
    dtype: str = "float32",
    api_key: str | None = None,
    verify: Verify = True,
    progress: Callable[[int, int], None] | None = None,
    chart: str | Path | None = None,
    save_base: str | Path | None = None,
) -> list[Stats]:
    """The statistics of each build at `urls` against the base at `base_url`, one dict per build;
    `chart`: a PNG path for the KLD distribution of each build; `save_base`: also write the base's
    rows as llama-perplexity's --kl-divergence-base file (exact mode; `urls` may then be empty)."""
    if save_base is not None and top_k is not None:
        raise Refused("--save-base keeps each position's full distribution: it cannot come from --top-k")
    if save_base is not None and dtype != "float32":
        raise Refused(
            "--save-base with --dtype float16 would round the base to float16 (steps of 0.008 nats "
            "near -10) before its 16 bits: leave --dtype at float32"
        )
    clients = _clients([base_url, *urls], api_key, verify)
    base = clients[0]
    writer = None
    try:
        bos, vocab = check_tokenizers(base, clients[1:], text[:4000], exact=top_k is None)
        # As llama-perplexity tokenizes: the whole text with the model's special tokens (BOS first
        # where it adds one), so the windows, and a saved file's tokens, are the same as its.
        tokens = base.tokenize(text, add_special_tokens=True).tokens
        cut = windows(tokens, ctx, bos, chunks)
        if not cut:
            raise Refused(f"the text has {len(tokens)} tokens: fewer than one window of --ctx {ctx}")
        first = ctx // 2
        if save_base is not None:
            assert vocab is not None  # exact mode (--save-base refuses --top-k above)
            writer = kld_file.Writer(save_base, ctx, vocab, np.asarray(tokens[: len(cut) * ctx]).reshape(len(cut), ctx))

        def exact(
            i: int, window: list[int], rows: list[NDArray[np.float32 | np.float16]]
        ) -> list[dict[str, np.ndarray]]:
            if writer is not None:
                writer.add(rows[0])
            targets = np.asarray(window[first + 1 :])  # the tokens the rows predict
            return [exact_positions(rows[0], build_rows, targets) for build_rows in rows[1:]]

        def top(i: int, window: list[int], tops: list[TopK]) -> list[dict[str, np.ndarray]]:
            return [topk_positions(tops[0][0], top_q, tops[0][1], true_q) for top_q, true_q in tops[1:]]

        def top_of(client: Client, window: list[int]) -> TopK:
            assert top_k is not None  # top-K mode
            return _echo_topk(client, window, first, top_k)

        # (One branch per mode: a server's answers are rows in one, top-K dicts in the other.)
        if top_k is None:
            pool, fetch_rows = _on_every_server(clients, _rows_from(first, dtype))
            with pool:
                positions = _score(cut, len(urls), fetch_rows, exact, progress)
        else:
            pool, fetch_top = _on_every_server(clients, top_of)
            with pool:
                positions = _score(cut, len(urls), fetch_top, top, progress)
        if writer is not None:
            writer.close()
            writer = None
        return _results(
            urls, positions, "exact" if top_k is None else "top-k", top_k, chart, lambda p: _worst(base, p, cut, first)
        )
    finally:
        if writer is not None:
            writer.abandon()  # no half-written base file left behind
        for client in clients:
            client.close()


def run_from_file(
    path: str | Path,
    urls: list[str],
    *,
    chunks: int | None = None,
    dtype: str = "float32",
    api_key: str | None = None,
    verify: Verify = True,
    progress: Callable[[int, int], None] | None = None,
    chart: str | Path | None = None,
) -> list[Stats]:
    """The statistics of each build at `urls` against a base file (llama-perplexity's
    --kl-divergence-base, or `kld --save-base`), computed as llama-perplexity computes them from it."""
    base = kld_file.read(path)
    clients = _clients(urls, api_key, verify)
    try:
        first_build = clients[0]
        sample = first_build.detokenize([int(t) for t in base.tokens[0, 1:513]])
        bos, vocab = check_tokenizers(first_build, clients[1:], sample, exact=True)
        if vocab != base.n_vocab:
            raise Refused(
                f"{path} holds distributions over {base.n_vocab} tokens; {first_build.base_url}'s "
                f"vocabulary has {vocab}: the file was made with another model's tokenizer"
            )
        if bos is not None and int(base.tokens[0, 0]) != bos:
            raise Refused(
                f"{path} starts with token {int(base.tokens[0, 0])}, not the BOS ({bos}) that "
                f"{first_build.base_url}'s tokenizer adds: the file was made with another tokenizer"
            )
        n = base.n_chunk if chunks is None else min(chunks, base.n_chunk)
        cut = [
            [bos if (j == 0 and bos is not None) else int(t) for j, t in enumerate(base.tokens[i])] for i in range(n)
        ]
        first = base.n_ctx // 2

        def from_file(
            i: int, window: list[int], rows: list[NDArray[np.float32 | np.float16]]
        ) -> list[dict[str, np.ndarray]]:
            targets = np.asarray(window[first + 1 :])
            return [kld_file.file_positions(base.rows[i], base.n_vocab, build_rows, targets) for build_rows in rows]

        pool, fetch = _on_every_server(clients, _rows_from(first, dtype))
        with pool:
            positions = _score(cut, len(urls), fetch, from_file, progress)
        return [
            stats | {"base_file": str(path)}
            for stats in _results(urls, positions, "exact", None, chart, lambda p: _worst(first_build, p, cut, first))
        ]
    finally:
        for client in clients:
            client.close()


def _worst(base: Client, positions: Positions, cut: list[list[int]], first: int, n: int = 5) -> list[WorstPosition]:
    """The positions where the build moved the distribution most, with the text before them."""
    kld = positions.array("kld")
    per_window = len(cut[0]) - first - 1
    found: list[WorstPosition] = []
    for index in np.argsort(-kld, kind="stable")[:n]:
        window, offset = cut[index // per_window], first + 1 + index % per_window
        found.append(
            {
                "window": int(index // per_window),
                "position": int(offset),
                "kld": float(kld[index]),
                "context": base.detokenize(window[max(0, offset - 12) : offset]),
                "token": base.detokenize(window[offset : offset + 1]),
            }
        )
    return found
