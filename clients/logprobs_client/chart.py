"""The charts of `logprobs-eval compare` (per-request loglikelihood differences) and `kld`
(per-position KL divergence), with matplotlib, imported only here: `pip install './clients[chart]'`."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
from numpy.typing import NDArray

from logprobs_client.compare import Comparison


def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only backend, or a one-line exit saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--chart needs matplotlib: pip install './clients[chart]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_chart(comparison: Comparison, path: str | Path, title: str | None = None) -> Path:
    """A PNG: left, the histogram of per-request delta loglikelihood (B - A) by task; right, each
    request's delta against its loglikelihood on A (longer, less likely continuations move more)."""
    plt = _pyplot()

    requests = comparison.requests
    if not requests:
        raise SystemExit("--chart: no loglikelihood requests to plot (generation tasks only)")
    tasks = sorted({r.task for r in requests})
    fig, (hist, scatter) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    deltas = np.array([r.delta for r in requests])
    span = float(np.abs(deltas).max()) or 1.0
    bins = np.linspace(-span, span, 41)
    for task in tasks:
        d = np.array([r.delta for r in requests if r.task == task])
        hist.hist(d, bins=bins, alpha=0.6, label=f"{task} ({len(d)})")
        a = np.array([r.a for r in requests if r.task == task])
        scatter.scatter(a, d, s=8, alpha=0.6, label=task)
    hist.set_xlabel("delta loglikelihood per request (B - A), nats")
    hist.set_ylabel("requests")
    hist.axvline(0, color="black", linewidth=0.6)
    hist.legend(fontsize=8)
    scatter.axhline(0, color="black", linewidth=0.6)
    scatter.set_xlabel("loglikelihood on A, nats")
    scatter.set_ylabel("delta (B - A), nats")
    a_name = comparison.a.get("model") or "A"
    b_name = comparison.b.get("model") or "B"
    fig.suptitle(title or f"B = {b_name}  vs  A = {a_name}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_kld_chart(
    kld_by_build: dict[str, NDArray[np.float64]], path: str | Path, mode: str, top_k: int | None
) -> None:
    """A PNG: the distribution of per-position KLD (log scale) for each build."""
    plt = _pyplot()
    floor = 1e-12  # a KLD of 0 (an identical build) is drawn at the left edge
    values = {build: np.log10(np.maximum(kld, floor)) for build, kld in kld_by_build.items()}
    low, high = min(v.min() for v in values.values()), max(v.max() for v in values.values())
    bins = np.linspace(low, high if high > low else low + 1, 51)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for build, v in values.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=build)
    ax.set_xlabel("log10 KLD per position" + ("" if mode == "exact" else f" (top-{top_k} lower bound)"))
    ax.set_ylabel("positions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
