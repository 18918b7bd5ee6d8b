"""`python -m testing.load` (make load): start the server on a loopback port with the load test's
limits, run the scenario (references, warm-up, measured run), print the table, and exit 1 if a
pass criterion was not met. --url drives a server that is already running instead."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from testing.load.driver import SERVER_FLAGS, run_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.load", description=__doc__)
    parser.add_argument("--duration", type=float, default=180, help="seconds of the measured run (default 180)")
    parser.add_argument("--warmup", type=float, default=45, help="seconds of the warm-up, same mix (default 45)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="model file (default: the default SmolLM2-135M Q4_1)")
    parser.add_argument(
        "--url",
        help="a running loopback server to drive instead of starting one; it must "
        "have the limits of testing/load/driver.py's SERVER_FLAGS",
    )
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for RSS")
    parser.add_argument("--log", type=Path, help="with --url: the server's log, to count cancellations")
    args = parser.parse_args(argv)

    flags = [str(x) for pair in SERVER_FLAGS.items() for x in pair]
    scenario = {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "seed": args.seed}
    if args.url:
        report = run_scenario(args.url, args.pid, log_path=args.log, **scenario)
    else:
        from server.config import Settings
        from server.models.default_model import ensure_default_model
        from testing.live_server import SERVER_N_CTX, LiveServer

        model = args.model or ensure_default_model(Settings().cache_path())
        log_path = Path(tempfile.mkdtemp(prefix="load-")) / "server.log"
        print(f"server: {model.name} --n-ctx {SERVER_N_CTX} {' '.join(flags)}; log: {log_path}", flush=True)
        server = LiveServer(model, log_path, "--n-ctx", str(SERVER_N_CTX), *flags)
        try:
            report = run_scenario(server.url, server.proc.pid, log_path=log_path, **scenario)
        finally:
            server.stop()
    print(report.table())
    failures = report.failures()
    for failure in failures:
        print(f"FAIL: {failure}")
    print(
        "FAILED"
        if failures
        else "passed: no 5xx, answers equal to the idle server's, queue bounded, "
        "RSS steady, /health answered throughout"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
