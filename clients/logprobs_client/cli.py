"""logprobs-eval: stock lm-eval against a logprobs-server, and a paired comparison of two servers.

logprobs-eval run URL --tasks T [--limit N] [options] [-- lm-eval args]
logprobs-eval compare URL_A URL_B --tasks T [--limit N] [--json] [--chart out.png] [-- lm-eval args]
logprobs-eval report DIR_A DIR_B [--json] [--chart out.png]     (two existing --log_samples runs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import httpx

from logprobs_client import lm_eval_run
from logprobs_client.lm_eval_run import Options, ServerInfo, Target
from logprobs_client.types import APIError

if TYPE_CHECKING:  # compare needs numpy (the [eval] extra): imported at run time only where used
    from logprobs_client.compare import Comparison


def _server_options(parser: argparse.ArgumentParser, suffix: str = "", server: str = "") -> None:
    """--api-key and --ca-cert, or with `suffix` ("-b") those of another server (`server`: "server B")."""
    key_help = (
        f"API key of {server} (default: --api-key)"
        if suffix
        else "API key (default: $LOGPROBS_API_KEY, "
        "else $OPENAI_API_KEY); lm-eval gets it as OPENAI_API_KEY and as auth_token"
    )
    parser.add_argument(f"--api-key{suffix}", metavar="KEY", help=key_help)
    whose = f"{server}'s" if suffix else "the server's"
    parser.add_argument(
        f"--ca-cert{suffix}",
        metavar="PEM",
        help=f"CA certificate that signed {whose} certificate (https with a private CA)"
        + ("" if not suffix else "; default: --ca-cert"),
    )


def _lm_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", required=True, help="lm-eval tasks, comma-separated")
    parser.add_argument("--limit", help="items per task (lm-eval's --limit)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request (default 8)")
    parser.add_argument("--num-concurrent", type=int, default=2, help="requests in flight (default 2)")
    parser.add_argument("--max-retries", type=int, default=5, help="lm-eval's attempts per request (default 5)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per request (default 600)")
    parser.add_argument(
        "--max-length", type=int, help="lm-eval's max_length (default: the server's context size, from /v1/models)"
    )
    parser.add_argument(
        "--include-path",
        help="lm-eval task folder (default: this project's clients/lm_eval_tasks when present; 'none' for none)",
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another lm-eval model_args entry, or one to replace (repeatable)",
    )
    parser.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="evaluate an instruct model with its own chat template, which the server publishes "
        "(lm-eval's --apply_chat_template, few-shot examples as turns: --fewshot_as_multiturn); "
        "no Hugging Face tokenizer needed",
    )


def _key(explicit: str | None) -> str | None:
    return explicit or os.environ.get("LOGPROBS_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


def _options(args: argparse.Namespace, extra: list[str], *, output_path: str | None, log_samples: bool) -> Options:
    return Options(
        tasks=args.tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        num_concurrent=args.num_concurrent,
        max_retries=args.max_retries,
        timeout=args.timeout,
        max_length=args.max_length,
        include_path=args.include_path,
        model_args=args.model_arg,
        apply_chat_template=args.apply_chat_template,
        extra=extra,
        output_path=output_path,
        log_samples=log_samples,
    )


def _describe(label: str, target: Target, info: ServerInfo) -> str:
    tok = info.tokenizer
    return (
        f"logprobs-eval: {label}{target.root}: model {info.model.id}, context {info.max_length} tokens, "
        f"fingerprint {info.model.system_fingerprint}, tokenizer bos={tok.bos_token!r} eos={tok.eos_token!r} "
        f"add_bos={tok.add_bos_token}"
    )


def _side_info(label: str, target: Target, info: ServerInfo) -> dict[str, str | None]:
    return {
        "label": label,
        "url": target.root,
        "model": info.model.id,
        "system_fingerprint": info.model.system_fingerprint,
        "model_sha256": info.model.fingerprint.get("model_sha256"),
    }


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    target = Target(args.url, _key(args.api_key), args.ca_cert)
    info = lm_eval_run.probe(target)
    print(_describe("", target, info), file=sys.stderr, flush=True)
    options = _options(args, extra, output_path=args.output_path, log_samples=args.log_samples)
    if args.dry_run:
        print(lm_eval_run.redacted(lm_eval_run.command(target, info, options), target.api_key))
        return 0
    return lm_eval_run.run(target, info, options)


def _compare() -> ModuleType:
    """The comparison module, which needs numpy (the [eval] extra): imported only by the commands
    that compare, so that the client and `run` need httpx alone."""
    try:
        from logprobs_client import compare
    except ImportError as exc:
        raise SystemExit(
            f"logprobs-eval: comparing runs needs {exc.name}: pip install './clients[eval]' "
            "(from a checkout of logprobs-server)"
        ) from None
    return compare


def _report(comparison: Comparison, args: argparse.Namespace) -> None:
    if args.chart:
        from logprobs_client.chart import write_chart

        print(f"logprobs-eval: chart written to {write_chart(comparison, args.chart)}", file=sys.stderr)
    if args.json:
        print(json.dumps(comparison.to_json(), indent=2))
    else:
        print(_compare().render_text(comparison), end="")


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    key = _key(args.api_key)
    target_a = Target(args.url_a, key, args.ca_cert)
    target_b = Target(args.url_b, args.api_key_b or key, args.ca_cert_b or args.ca_cert)
    info_a, info_b = lm_eval_run.probe(target_a), lm_eval_run.probe(target_b)
    print(_describe("A ", target_a, info_a), file=sys.stderr)
    print(_describe("B ", target_b, info_b), file=sys.stderr, flush=True)
    if info_a.tokenizer != info_b.tokenizer:
        print(
            "logprobs-eval: warning: the two servers' tokenizers differ (special tokens or BOS rule); the "
            "requests are compared by their text",
            file=sys.stderr,
        )
    output = Path(args.output_path or Path("lm_eval_out") / time.strftime("compare-%Y%m%d-%H%M%S"))
    folders = {"A": output / "A", "B": output / "B"}
    for label, target, info in (("A", target_a, info_a), ("B", target_b, info_b)):
        options = _options(args, extra, output_path=str(folders[label]), log_samples=True)
        # With --json, stdout is the report's: lm-eval's own printout goes to stderr.
        status = lm_eval_run.run(target, info, options, stdout=sys.stderr if args.json else None)
        if status != 0:
            print(
                f"logprobs-eval: lm-eval failed against {label} ({target.root}), exit status {status}", file=sys.stderr
            )
            return status
    compare = _compare()
    comparison = compare.compare_runs(
        compare.load_run(folders["A"]),
        compare.load_run(folders["B"]),
        a_info=_side_info("A", target_a, info_a),
        b_info=_side_info("B", target_b, info_b),
        resamples=args.resamples,
        seed=args.bootstrap_seed,
        worst=args.worst,
    )
    (output / "comparison.json").write_text(json.dumps(comparison.to_json(), indent=2))
    print(f"logprobs-eval: lm-eval outputs and comparison.json in {output}", file=sys.stderr)
    _report(comparison, args)
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit("report takes no lm-eval arguments")
    compare = _compare()
    comparison = compare.compare_runs(
        compare.load_run(args.dir_a),
        compare.load_run(args.dir_b),
        resamples=args.resamples,
        seed=args.bootstrap_seed,
        worst=args.worst,
    )
    _report(comparison, args)
    return 0


def cmd_kld(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit("kld takes no lm-eval arguments")
    try:
        from logprobs_client import kld
    except ImportError as exc:
        raise SystemExit(f"logprobs-eval: kld needs {exc.name}: pip install './clients[eval]'") from None

    def progress(done: int, total: int) -> None:
        print(f"\rlogprobs-eval: window {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    if args.base is not None:
        if args.text is not None or args.save_base is not None or args.top_k is not None or args.ctx is not None:
            raise SystemExit(
                "logprobs-eval kld: --base FILE holds the tokens and the windows: it takes no --text, "
                "--ctx, --top-k or --save-base"
            )
    elif args.text is None:
        raise SystemExit("logprobs-eval kld: give the text (--text FILE), or a base file (--base FILE)")
    elif len(args.urls) < 2 and args.save_base is None:
        raise SystemExit(
            "logprobs-eval kld: give the base server and at least one build's server "
            "(or only the base with --save-base FILE)"
        )
    common = {
        "chunks": args.chunks,
        "dtype": args.dtype,
        "api_key": _key(args.api_key),
        "verify": args.ca_cert or True,
        "progress": progress,
        "chart": args.chart,
    }
    try:
        if args.base is not None:
            results = kld.run_from_file(args.base, args.urls, **common)
        else:
            assert args.text is not None  # refused above without --base
            results = kld.run(
                args.urls[0],
                args.urls[1:],
                args.text.read_text(encoding="utf-8"),
                ctx=args.ctx or 512,
                top_k=args.top_k,
                save_base=args.save_base,
                **common,
            )
    except kld.Refused as exc:
        print(f"logprobs-eval: refused: {exc}", file=sys.stderr)
        return 2
    if args.save_base is not None:
        print(
            f"logprobs-eval: wrote the base's distributions to {args.save_base} (llama-perplexity's "
            "--kl-divergence-base format)",
            file=sys.stderr,
        )
    if not results:
        return 0
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for stats in results:
        print(kld.render(stats))
        print("Positions where the distributions moved most (context|token):")
        for w in stats["worst"]:
            print(
                f"  window {w['window']:>3} position {w['position']:>4}  KLD {w['kld']:.4f}  "
                f"{w['context']!r}|{w['token']!r}"
            )
        print()
    print(kld.render_table(results), end="")
    return 0


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON instead of tables")
    parser.add_argument("--chart", metavar="PNG", help="write a chart of the per-request differences (matplotlib)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    parser.add_argument("--worst", type=int, default=5, help="items listed with the largest |delta| (default 5)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="logprobs-eval",
        description="Run lm-eval (local-completions) against a logprobs-server, or compare "
        "two servers of one model item by item. Arguments after `--` go to lm-eval unchanged.",
    )
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="lm-eval against one server, set up from what the server reports")
    run.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    _server_options(run)
    _lm_eval_options(run)
    run.add_argument("--output-path", help="lm-eval's --output_path")
    run.add_argument("--log-samples", action="store_true", help="lm-eval's --log_samples (needs --output-path)")
    run.add_argument("--dry-run", action="store_true", help="print the lm-eval command (key redacted) and stop")
    run.set_defaults(handler=cmd_run)

    compare = sub.add_parser("compare", help="the same tasks against two servers, compared item by item")
    compare.add_argument("url_a")
    compare.add_argument("url_b")
    _server_options(compare)
    _server_options(compare, "-b", "server B")
    _lm_eval_options(compare)
    compare.add_argument(
        "--output-path",
        help="folder for both lm-eval runs (A/, B/) and comparison.json (default: lm_eval_out/compare-DATE-TIME)",
    )
    _report_options(compare)
    compare.set_defaults(handler=cmd_compare)

    kld = sub.add_parser(
        "kld",
        help="KL divergence and llama-perplexity's statistics of builds against a base server, over a text",
        description="The text is tokenized by the base server and cut into "
        "llama-perplexity's windows (--ctx tokens, BOS first where the model adds one, the second "
        "half of each scored); every window goes to every server. Exact KL from each position's "
        "full distribution (logprobs-server's /v1/distributions), or with --top-k K a lower bound "
        "from echo's top-K alternatives (any OpenAI-style server with echo). The base's distributions can be "
        "saved (--save-base FILE) and used in place of its server (--base FILE), in "
        "llama-perplexity's --kl-divergence-base format: files pass between the two tools.",
    )
    kld.add_argument(
        "urls",
        nargs="+",
        metavar="url",
        help="the base build's server (the reference distribution), "
        "then the builds' servers; with --base FILE, the builds' servers only",
    )
    kld.add_argument("--text", type=Path, help="a UTF-8 text file, e.g. WikiText-2 (not with --base)")
    kld.add_argument("--ctx", type=int, help="tokens per window (llama-perplexity's -c; default 512)")
    kld.add_argument("--chunks", type=int, help="at most this many windows (default: all the text holds)")
    kld.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="top-K mode: a lower bound of the KL from K "
        "alternatives per position (the servers' --max-logprobs must allow K)",
    )
    kld.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how the distributions travel (exact mode; float16 halves the bytes)",
    )
    kld.add_argument(
        "--save-base",
        metavar="FILE",
        help="also write the base's distributions as llama-perplexity's "
        "--kl-divergence-base file (16 bits a value), for later runs with --base and for llama-perplexity",
    )
    kld.add_argument(
        "--base",
        metavar="FILE",
        type=Path,
        help="take the base from a --kl-divergence-base file "
        "(llama-perplexity's or --save-base's) instead of a server; the statistics then follow "
        "llama-perplexity's rule for such files (tokens below e^-16 left out)",
    )
    kld.add_argument(
        "--api-key", metavar="KEY", help="API key for every server (default: $LOGPROBS_API_KEY, else $OPENAI_API_KEY)"
    )
    kld.add_argument("--ca-cert", metavar="PEM", help="CA certificate that signed the servers' certificates")
    kld.add_argument("--json", action="store_true", help="print a JSON list, one object per build, instead of text")
    kld.add_argument(
        "--chart",
        metavar="PNG",
        help="write the distribution of per-position KLD of each build (matplotlib: the [chart] extra)",
    )
    kld.set_defaults(handler=cmd_kld)

    report = sub.add_parser("report", help="compare two existing lm-eval --log_samples output folders")
    report.add_argument("dir_a")
    report.add_argument("dir_b")
    _report_options(report)
    report.set_defaults(handler=cmd_report)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    if getattr(args, "log_samples", False) and not getattr(args, "output_path", None):
        raise SystemExit("--log-samples needs --output-path")
    try:
        status: int = args.handler(args, extra)  # the subcommand's cmd_* function
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the report piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (APIError, httpx.HTTPError, FileNotFoundError, ValueError) as exc:
        print(f"logprobs-eval: {exc}", file=sys.stderr)
        return 2
