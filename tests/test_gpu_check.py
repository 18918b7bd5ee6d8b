"""bench/gpu_check.sh, the CUDA path's check (issue 13), run on this machine's CPU build: the script
a GPU machine runs works end to end, and its exactness check fails when the server's numbers move."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from testing.live_server import ROOT

pytestmark = pytest.mark.slow


def test_cpu_run_checks_server_against_in_process(tmp_path):
    run = subprocess.run(
        ["bench/gpu_check.sh", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OUT": str(tmp_path), "ITEMS": "3"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["gpu_offload"] is False
    assert report["import_order"] == {"numpy_first": 0, "llama_cpp_first": 0}
    (result,) = report["models"].values()
    assert set(result["server"]) == {f"{reuse}_{n}_clients" for reuse in ("no_reuse", "reuse") for n in (2, 8)}
    for row in result["server"].values():
        assert row["max_abs_logprob_diff"] <= 1e-4 and row["tokens_per_s"] > 0
    # The default model keeps its prefix cache (the start-up check finds reuse exact), and the
    # HellaSwag contexts shared by 4 endings were reused.
    assert result["server"]["reuse_2_clients"]["tokens_reused"] > 0
    assert not result["server"]["reuse_2_clients"]["cache_turned_off_at_start"]
    ip = result["in_process"]
    assert ip["last_position"] > 0 and ip["all_positions_scored"] > 0 and 0 <= ip["host_share"] < 1
    assert {"1", "4", "16", "4u", "16u"} <= set(result["shared_passes"])


def test_check_fails_when_the_server_numbers_move(tmp_path):
    """A server with a float16 KV cache gives other logprobs than llama.cpp in-process with float32."""
    from server.config import Settings
    from server.models.default_model import ensure_default_model

    model = ensure_default_model(Settings().cache_path())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--model",
            str(model),
            "--shapes",
            "",
            "--items",
            "2",
            "--shared-items",
            "0",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--models",
            str(tmp_path),
            "--tokenizer-from",
            str(model),
            "--out",
            str(tmp_path),
            "--server-flag=--kv-cache-type",
            "--server-flag=f16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (result,) = report["models"].values()
    assert not report["passed"] and not result["exact"]
    assert max(row["max_abs_logprob_diff"] for row in result["server"].values()) > 1e-3
