"""The comparison's chart: per-request loglikelihood differences (matplotlib, imported only here:
`pip install './clients[chart]'`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logprobs_client.compare import Comparison


def write_chart(comparison: Comparison, path: str | Path, title: str | None = None) -> Path:
    """A PNG: left, the histogram of per-request delta loglikelihood (B - A) by task; right, each
    request's delta against its loglikelihood on A (longer, less likely continuations move more)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--chart needs matplotlib: pip install './clients[chart]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
