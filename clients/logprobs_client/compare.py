"""Paired comparison of two lm-eval runs of the same tasks (two builds of one model), from the
results JSON and the `--log_samples` samples files that lm-eval writes.

Items are joined on (doc_id, filter) and requests on their index within the item. For each task
metric: lm-eval's value on each side, the difference B - A, and a bootstrap confidence interval
over items (resampled in pairs, aggregated by lm-eval's own aggregation function, so a resample
of all items gives lm-eval's number back); the share of items whose answer flips; and, for
loglikelihood requests, the per-request difference in loglikelihood.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from numpy.typing import NDArray

LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
NOT_METRICS = {"alias", "name", "sample_len", "sample_count"}

# lm-eval's JSON (results, samples, task configs) is read as it comes: dict[str, Any].
Sample = dict[str, Any]
ItemKey = tuple[int, str]  # (doc_id, filter)
# An aggregation over the per-item metric values (lm-eval's own function, or one of _FAST's).
Aggregation = Callable[[list[Any]], float]


# -- reading lm-eval's output ------------------------------------------------------------------------


@dataclass
class Run:
    """One lm-eval run: its results JSON and, per task, its samples (one row per doc and filter)."""

    folder: Path
    results: dict[str, Any]
    samples: dict[str, list[Sample]]


def load_run(folder: str | Path) -> Run:
    """The newest results_*.json under `folder` (searched recursively) and its samples files."""
    folder = Path(folder)
    found = sorted(folder.rglob("results_*.json"), key=lambda p: (p.name, p.stat().st_mtime))
    if not found:
        raise FileNotFoundError(f"no lm-eval results_*.json under {folder}")
    results_file = found[-1]
    stamp = results_file.name.removeprefix("results_").removesuffix(".json")
    results = json.loads(results_file.read_text())
    samples: dict[str, list[Sample]] = {}
    for path in results_file.parent.glob(f"samples_*_{stamp}.jsonl"):
        task = path.name.removeprefix("samples_").removesuffix(f"_{stamp}.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not samples:
        raise FileNotFoundError(f"no samples files beside {results_file} (run lm-eval with --log_samples)")
    return Run(folder=results_file.parent, results=results, samples=samples)


def request_args(sample: Sample) -> list[tuple[Any, ...]]:
    """The arguments of each request of a sample, in request order."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}
        ordered = sorted(args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]))
        return [tuple(v[k] for k in sorted(v, key=lambda k: int(k.rsplit("_", 1)[-1]))) for _, v in ordered]
    return [tuple(a) for a in args]


def request_loglikelihoods(sample: Sample, output_type: str) -> list[tuple[float, bool | None]]:
    """(loglikelihood, is_greedy) of each request, as lm-eval logged them (is_greedy: None for
    rolling loglikelihoods, whose value is the sum over the document's windows)."""
    out: list[tuple[float, bool | None]] = []
    for resp in sample["resps"]:
        value = resp[0]
        if output_type == "loglikelihood_rolling":
            out.append((float(value[0] if isinstance(value, list) else value), None))
        else:
            out.append((float(value[0]), str(value[1]) == "True"))
    return out


# -- aggregation and the bootstrap ----------------------------------------------------------------------


def aggregation(config: dict[str, Any], metric: str) -> tuple[str, Aggregation | None]:
    """The task's aggregation for a metric (its metric_list entry, else lm-eval's default), by
    name and as lm-eval's own function."""
    name: str | None = None
    for entry in config.get("metric_list") or []:
        if (
            entry.get("metric") == metric
            and isinstance(entry.get("aggregation"), str)
            and not entry["aggregation"].lstrip().startswith("def ")
        ):
            name = entry["aggregation"]
    try:
        from lm_eval.api.registry import get_aggregation, get_metric_aggregation
    except ImportError:  # reading runs without lm-eval installed: the common aggregations by name
        fallback = {
            "acc": "mean",
            "acc_norm": "mean",
            "exact_match": "mean",
            "word_perplexity": "weighted_perplexity",
            "byte_perplexity": "weighted_perplexity",
            "bits_per_byte": "bits_per_byte",
            "perplexity": "perplexity",
        }
        name = name or fallback.get(metric)
        return (name or "?"), (_FAST[name][1] if name in _FAST else None)
    fn = get_aggregation(name) if name else get_metric_aggregation(metric)
    return (name if name else getattr(fn, "__name__", "?")), fn


def _weighted(items: NDArray[np.float64]) -> Any:
    """sum(value) / sum(weight) over the items axis: one value per resample (an array), or a numpy
    float64 for a single list of items (hence Any: numpy's sum over an axis is either)."""
    return items[..., 0].sum(-1) / items[..., 1].sum(-1)


# Vectorized forms of lm-eval's common aggregations, over arrays whose last axis is the items
# (scalars) or items x (value, weight): the bootstrap's 2000 resamples in one go.
_FAST: dict[str, tuple[Callable[[NDArray[np.float64]], NDArray[np.float64]], Aggregation]] = {
    "mean": (lambda x: x.mean(-1), lambda items: float(np.mean(items))),
    "perplexity": (lambda x: np.exp(-x.mean(-1)), lambda items: math.exp(-float(np.mean(items)))),
    "weighted_perplexity": (lambda x: np.exp(-_weighted(x)), lambda items: math.exp(-_weighted(np.array(items)))),
    "bits_per_byte": (lambda x: -_weighted(x) / math.log(2), lambda items: -_weighted(np.array(items)) / math.log(2)),
}


def _as_items(values: list[Any]) -> list[Any]:
    return [tuple(v) if isinstance(v, list) else v for v in values]


def paired_bootstrap(
    a: list[Any], b: list[Any], name: str, fn: Aggregation, resamples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of agg(B*) - agg(A*) over `resamples` resamples of the items (the same
    indices on both sides)."""
    n = len(a)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    if name in _FAST and fn is not None and fn.__name__ == name:
        vector = _FAST[name][0]
        xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        diffs = vector(xb[index]) - vector(xa[index])
    else:
        items_a, items_b = _as_items(a), _as_items(b)
        diffs = np.array([fn([items_b[i] for i in row]) - fn([items_a[i] for i in row]) for row in index])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


# -- the comparison ----------------------------------------------------------------------------------


@dataclass
class MetricDiff:
    metric: str
    filter: str
    a: float | None  # lm-eval's value (results JSON)
    b: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    aggregation: str
    higher_is_better: bool | None
    n: int
    flips: int | None  # items whose answer differs (None: no answer to compare, e.g. perplexity)
    flip_share: float | None
    a_recomputed: float | None  # the aggregation over the joined samples (equals `a` unless items are missing)
    b_recomputed: float | None


@dataclass
class Request:
    """One lm-eval request (loglikelihood types) on both sides."""

    task: str
    doc_id: int
    index: int
    a: float
    b: float
    greedy_a: bool | None
    greedy_b: bool | None
    text: str

    @property
    def delta(self) -> float:
        return self.b - self.a


class LoglikelihoodSummary(TypedDict):
    """A task's per-request loglikelihood differences, B - A."""

    n: int
    mean_abs_delta: float
    max_abs_delta: float
    mean_delta: float
    greedy_changed: int | None  # requests whose is_greedy differs (None: rolling loglikelihoods)


class WorstRequest(TypedDict):
    """One of the requests whose loglikelihood moved most."""

    doc_id: int
    request: int
    a: float
    b: float
    delta: float
    text: str


@dataclass
class TaskDiff:
    task: str
    output_type: str
    n_docs: int
    n_requests: int
    metrics: list[MetricDiff]
    loglikelihood: LoglikelihoodSummary | None
    worst: list[WorstRequest]
    only_in_a: int = 0
    only_in_b: int = 0


@dataclass
class Comparison:
    a: dict[str, str | None]  # the side's output folder, url, model, ... (see compare_runs)
    b: dict[str, str | None]
    resamples: int
    seed: int
    confidence: float
    tasks: list[TaskDiff]
    warnings: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("requests")
        return out


def snippet(args: tuple[Any, ...], width: int = 90) -> str:
    """A request's text, shortened: the end of its context, '|', the start of its continuation."""
    flat = [re.sub(r"\s+", " ", a) if isinstance(a, str) else "" for a in args]
    if len(flat) >= 2 and flat[0]:
        context, continuation = flat[0], flat[1]
        room = max(20, width - min(len(continuation), width // 2) - 1)
        head = context if len(context) <= room else "…" + context[-(room - 1) :]
        text = f"{head}|{continuation}"
    else:
        text = flat[-1] if len(flat) >= 2 else (flat[0] if flat else "")
    return text if len(text) <= width else text[: width - 1] + "…"


def _answers(
    metric: str,
    output_type: str,
    rows: dict[ItemKey, Sample],
    requests: dict[int, list[tuple[float, bool | None]]],
    delimiter: str,
) -> dict[ItemKey, object] | None:
    """Each item's answer under a metric, for counting flips: the chosen choice of a multiple-choice
    item (argmax of loglikelihood; divided by the choice's length in characters for acc_norm, in
    bytes for acc_bytes), the filtered response of a generation, else the per-item metric value
    when it is a number (None when there is nothing to call an answer)."""
    answers: dict[ItemKey, object] = {}
    for key, row in rows.items():
        if output_type == "multiple_choice" and metric in ("acc", "acc_norm", "acc_bytes"):
            lls = np.array([ll for ll, _ in requests[key[0]]])
            if metric != "acc":
                choices = [
                    args[1][len(delimiter) :] if args[1].startswith(delimiter) else args[1]
                    for args in request_args(row)
                ]
                lengths = np.array(
                    [float(len(c.encode("utf-8")) if metric == "acc_bytes" else len(c)) for c in choices]
                )
                lls = lls / lengths
            answers[key] = int(np.argmax(lls))
        elif output_type == "generate_until":
            answers[key] = json.dumps(row.get("filtered_resps"))
        elif isinstance(row.get(metric), (int, float, bool)):
            answers[key] = row[metric]
        else:
            return None
    return answers


def compare_task(
    task: str, run_a: Run, run_b: Run, *, resamples: int, seed: int, confidence: float, worst: int, warnings: list[str]
) -> tuple[TaskDiff, list[Request]]:
    config = run_a.results.get("configs", {}).get(task, {})
    output_type = config.get("output_type", "")
    delimiter = config.get("target_delimiter", " ")
    rows_a: dict[ItemKey, Sample] = {(s["doc_id"], s.get("filter", "none")): s for s in run_a.samples[task]}
    rows_b: dict[ItemKey, Sample] = {(s["doc_id"], s.get("filter", "none")): s for s in run_b.samples[task]}
    keys = sorted(set(rows_a) & set(rows_b), key=lambda k: (str(k[1]), k[0]))
    only_a, only_b = len(set(rows_a) - set(rows_b)), len(set(rows_b) - set(rows_a))
    if only_a or only_b:
        warnings.append(f"{task}: {only_a} items only in A, {only_b} only in B; compared on the {len(keys)} in both")
    for key in keys:
        if request_args(rows_a[key]) != request_args(rows_b[key]):
            raise ValueError(
                f"{task} doc {key[0]}: the two runs sent different requests (not the same task "
                "data or settings); nothing to pair"
            )
    doc_ids = sorted({k[0] for k in keys})
    first_row: dict[int, ItemKey] = {}
    for key in keys:
        first_row.setdefault(key[0], key)

    # Per-request loglikelihoods (each item's requests once, whatever the filters).
    requests: list[Request] = []
    lls_a: dict[int, list[tuple[float, bool | None]]] = {}
    lls_b: dict[int, list[tuple[float, bool | None]]] = {}
    if output_type in LOGLIKELIHOOD_TYPES:
        for doc_id in doc_ids:
            key = first_row[doc_id]
            lls_a[doc_id] = request_loglikelihoods(rows_a[key], output_type)
            lls_b[doc_id] = request_loglikelihoods(rows_b[key], output_type)
            for i, (args, (la, ga), (lb, gb)) in enumerate(
                zip(request_args(rows_a[key]), lls_a[doc_id], lls_b[doc_id])
            ):
                requests.append(Request(task, doc_id, i, la, lb, ga, gb, snippet(args)))
    n_requests = len(requests) if requests else sum(len(rows_a[first_row[d]]["resps"]) for d in doc_ids)

    task_results_a = run_a.results["results"].get(task, {})
    task_results_b = run_b.results["results"].get(task, {})
    higher = run_a.results.get("higher_is_better", {}).get(task, {})
    metrics = []
    for name in task_results_a:
        metric, sep, filt = name.partition(",")
        if not sep or metric in NOT_METRICS or metric.endswith("_stderr"):
            continue
        rows = {k: rows_a[k] for k in keys if k[1] == filt}
        if not rows or not all(metric in r for r in rows.values()):
            continue
        rows_b_f = {k: rows_b[k] for k in rows}
        values_a = [rows[k][metric] for k in rows]
        values_b = [rows_b_f[k][metric] for k in rows]
        agg_name, fn = aggregation(config, metric)
        recomputed_a = recomputed_b = low = high = None
        if fn is not None:
            recomputed_a, recomputed_b = float(fn(_as_items(values_a))), float(fn(_as_items(values_b)))
            low, high = paired_bootstrap(values_a, values_b, agg_name, fn, resamples, seed, confidence)
        a_value, b_value = task_results_a.get(name), task_results_b.get(name)
        a_value = a_value if isinstance(a_value, (int, float)) else None
        b_value = b_value if isinstance(b_value, (int, float)) else None
        for side, official, mine in (("A", a_value, recomputed_a), ("B", b_value, recomputed_b)):
            if (
                official is not None
                and mine is not None
                and not math.isclose(official, mine, rel_tol=1e-9, abs_tol=1e-12)
            ):
                warnings.append(
                    f"{task} {name}: lm-eval reports {official!r} for {side}, the joined samples give {mine!r}"
                )
        answers_a = _answers(metric, output_type, rows, lls_a, delimiter)
        answers_b = _answers(metric, output_type, rows_b_f, lls_b, delimiter)
        flips = None if answers_a is None or answers_b is None else sum(answers_a[k] != answers_b[k] for k in rows)
        metrics.append(
            MetricDiff(
                metric=metric,
                filter=filt,
                a=a_value,
                b=b_value,
                delta=None if a_value is None or b_value is None else b_value - a_value,
                ci_low=low,
                ci_high=high,
                aggregation=agg_name,
                higher_is_better=higher.get(metric),
                n=len(rows),
                flips=flips,
                flip_share=None if flips is None else flips / len(rows),
                a_recomputed=recomputed_a,
                b_recomputed=recomputed_b,
            )
        )

    loglikelihood: LoglikelihoodSummary | None = None
    worst_items: list[WorstRequest] = []
    if requests:
        deltas = np.array([r.delta for r in requests])
        changed = sum(r.greedy_a != r.greedy_b for r in requests if r.greedy_a is not None)
        loglikelihood = {
            "n": len(requests),
            "mean_abs_delta": float(np.abs(deltas).mean()),
            "max_abs_delta": float(np.abs(deltas).max()),
            "mean_delta": float(deltas.mean()),
            "greedy_changed": changed if output_type != "loglikelihood_rolling" else None,
        }
        ranked = sorted(requests, key=lambda r: abs(r.delta), reverse=True)[:worst]
        worst_items = [
            {"doc_id": r.doc_id, "request": r.index, "a": r.a, "b": r.b, "delta": r.delta, "text": r.text}
            for r in ranked
            if r.delta != 0
        ]
    return TaskDiff(
        task=task,
        output_type=output_type,
        n_docs=len(doc_ids),
        n_requests=n_requests,
        metrics=metrics,
        loglikelihood=loglikelihood,
        worst=worst_items,
        only_in_a=only_a,
        only_in_b=only_b,
    ), requests


def run_info(run: Run) -> dict[str, str]:
    """The served model and URL of a run, from the model_args lm-eval recorded."""
    model_args = run.results.get("config", {}).get("model_args") or {}
    if isinstance(model_args, str):
        model_args = dict(kv.split("=", 1) for kv in model_args.split(",") if "=" in kv)
    info: dict[str, str] = {}
    if model_args.get("base_url"):
        info["url"] = re.sub(r"/v1(/(chat/)?completions)?/?$", "", str(model_args["base_url"]))
    if model_args.get("model"):
        info["model"] = str(model_args["model"])
    return info


def compare_runs(
    run_a: Run,
    run_b: Run,
    *,
    a_info: dict[str, str | None] | None = None,
    b_info: dict[str, str | None] | None = None,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    worst: int = 5,
) -> Comparison:
    warnings: list[str] = []
    tasks = [t for t in run_a.samples if t in run_b.samples]
    missing = sorted(set(run_a.samples) ^ set(run_b.samples))
    if missing:
        warnings.append(f"tasks in only one run, left out: {', '.join(missing)}")
    if not tasks:
        raise ValueError("the two runs have no task in common")
    diffs, requests = [], []
    for task in sorted(tasks):
        diff, reqs = compare_task(
            task, run_a, run_b, resamples=resamples, seed=seed, confidence=confidence, worst=worst, warnings=warnings
        )
        diffs.append(diff)
        requests += reqs
    # (The sides joined outside the call: mypy cannot infer `|` of two value types in its context.)
    side_a = {"output": str(run_a.folder)} | run_info(run_a) | (a_info or {})
    side_b = {"output": str(run_b.folder)} | run_info(run_b) | (b_info or {})
    return Comparison(
        a=side_a,
        b=side_b,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        tasks=diffs,
        warnings=warnings,
        requests=requests,
    )


# -- the text report ----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 10**-digits)):
        return f"{value:+.2e}" if sign else f"{value:.3e}"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _side(label: str, info: dict[str, str | None]) -> str:
    parts = [info.get("url"), info.get("model"), info.get("system_fingerprint")]
    return f"{label}: " + "  ".join(p for p in parts if p)


def render_text(comparison: Comparison) -> str:
    c = comparison
    lines = [
        _side("A", c.a),
        _side("B", c.b),
        f"Paired over the same items; delta = B - A; {c.confidence:.0%} bootstrap CI over items "
        f"({c.resamples} resamples, seed {c.seed}).",
        "",
    ]
    rows = []
    for t in c.tasks:
        for m in t.metrics:
            ci = "-" if m.ci_low is None else f"[{_num(m.ci_low, sign=True)}, {_num(m.ci_high, sign=True)}]"
            flips = "-" if m.flips is None else f"{m.flips} ({m.flip_share:.1%})"
            rows.append(
                [t.task, m.metric, m.filter, str(m.n), _num(m.a), _num(m.b), _num(m.delta, sign=True), ci, flips]
            )
    lines += _table(
        [
            "task",
            "metric",
            "filter",
            "n",
            "A",
            "B",
            "delta",
            "95% CI" if c.confidence == 0.95 else f"{c.confidence:.0%} CI",
            "flips",
        ],
        rows,
        right={3, 4, 5, 6},
    )
    ll_rows = [
        [
            t.task,
            str(t.loglikelihood["n"]),
            _num(t.loglikelihood["mean_abs_delta"], 6),
            _num(t.loglikelihood["max_abs_delta"], 6),
            _num(t.loglikelihood["mean_delta"], 6, sign=True),
            "-" if t.loglikelihood["greedy_changed"] is None else str(t.loglikelihood["greedy_changed"]),
        ]
        for t in c.tasks
        if t.loglikelihood
    ]
    if ll_rows:
        lines += ["", "Per-request loglikelihood, B - A:"]
        lines += _table(
            ["task", "requests", "mean |delta|", "max |delta|", "mean delta", "is_greedy changed"],
            ll_rows,
            right={1, 2, 3, 4, 5},
        )
    worst_rows = [
        [
            t.task,
            str(w["doc_id"]),
            str(w["request"]),
            _num(w["a"], 3),
            _num(w["b"], 3),
            _num(w["delta"], 4, sign=True),
            w["text"],
        ]
        for t in c.tasks
        for w in t.worst
    ]
    if worst_rows:
        lines += ["", "Largest |delta loglikelihood| (text: end of context|continuation):"]
        lines += _table(["task", "doc", "req", "A", "B", "delta", "text"], worst_rows, right={1, 2, 3, 4, 5})
    elif ll_rows:
        lines += ["", "Every request's loglikelihood is identical on both sides."]
    for w in c.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines) + "\n"
