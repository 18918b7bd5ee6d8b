"""The short load test (CI): 16 clients for 45 s, after a 20 s warm-up of the same mix, against a
server whose admission bound is small enough to be hit. `make load` runs the same scenario for
minutes, and then sends the scoring requests alone once more. The criteria are in
testing/load/driver.py (Report.failures): no 5xx, scoring answers equal to the idle server's, the
queue bound held and answered with 429 + Retry-After, RSS steady, /health answered throughout,
the server cancelling for the clients that hung up."""

from __future__ import annotations

import pytest

from testing.load.driver import SERVER_FLAGS, run_scenario
from tests.conftest import serve

CLIENTS, WARMUP_S, DURATION_S = 16, 20, 45


@pytest.fixture(scope="module")
def loaded_server(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "load", *(str(x) for pair in SERVER_FLAGS.items() for x in pair))


@pytest.mark.slow
def test_short_load(loaded_server):
    report = run_scenario(
        loaded_server.url,
        loaded_server.proc.pid,
        clients=CLIENTS,
        duration_s=DURATION_S,
        warmup_s=WARMUP_S,
        log_path=loaded_server.log_path,
        recheck=False,
    )
    table = report.table()
    print(table)
    failures = report.failures()
    assert not failures, "\n".join(failures) + "\n\n" + table
