"""Scale-out on Ray Serve, end to end on loopback (`make scale-test`; opt-in: LOGPROBS_SCALE_TEST=1).

Two Ray nodes on this machine (a head and a worker, each `ray start --block` with its own ports),
deploy/ray/serve.yaml run by `serve run` with two replicas of one thread each (one per node),
then unmodified lm-eval (`local-completions`, num_concurrent=4) through Serve's proxy on the
HellaSwag items, and the same lm-eval run against a single server. Every loglikelihood must
match the single server's to 1e-4; each replica's prefix-cache counters are read from its own
/metrics (responses name their replica in X-Serve-Replica) and reported.

Opt-in because it needs the `ray` extra and ~3-5 minutes on 2 cores: `make test` skips it.
Everything it starts (Ray nodes, `serve run`) is its own process group, stopped at the end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from testing.live_server import ROOT, free_port
from tests.conftest import SERVER_N_CTX, serve

pytestmark = [
    pytest.mark.scale, pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("LOGPROBS_SCALE_TEST"), reason="opt-in: make scale-test "
                       "(LOGPROBS_SCALE_TEST=1; needs the ray extra)"),
]

TASK, LIMIT = "hellaswag_dev", int(os.environ.get("LOGPROBS_SCALE_LIMIT", "40"))
KEY = "sk-scale-test-key"
LL_TOLERANCE = 1e-4
BIN = Path(sys.executable).parent
REPLICA_HEADER = "x-serve-replica"
COUNTERS = ("logprobs_prefix_cache_lookups_total", "logprobs_prefix_cache_hits_total",
            "logprobs_prefix_cache_reused_tokens_total")


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True, and everything in its group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (Ray's workers and agents)
    except ProcessLookupError:
        pass


class RayNodes:
    """A head and a worker node on this machine, each `ray start --block` in its own process group."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env, self.procs = folder, env, []
        # Ray's socket paths must stay short (108 bytes): a temp dir under /tmp, not pytest's.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-scale-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, name: str, *args: str) -> None:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        command = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
                   "--disable-usage-stats", *args, *(f"{p}={free_port()}" for p in ports)]
        log = open(self.folder / f"ray-{name}.log", "w")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           cwd=ROOT, start_new_session=True))

    def start(self) -> None:
        self._start("head", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                    f"--temp-dir={self.temp_dir}")
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (self.folder / "ray-head.log").read_text():
            assert self.procs[0].poll() is None and time.monotonic() < deadline, (self.folder / "ray-head.log").read_text()
            time.sleep(0.5)
        self._start("worker", f"--address={self.address}", "--node-ip-address=127.0.0.1")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def scrape(url: str, headers: dict) -> tuple[str, dict[str, float]]:
    response = requests.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    values = {}
    for name in COUNTERS:
        found = re.search(rf"^{name} ([0-9.e+-]+)$", response.text, re.M)
        values[name] = float(found[1]) if found else 0.0
    return response.headers.get(REPLICA_HEADER, ""), values


def scrape_replicas(url: str, n: int, headers: dict, timeout: float = 180) -> dict[str, dict[str, float]]:
    """Each replica's counters: /metrics through the proxy reaches one replica, and says which.
    (Serve answers once one replica is up; the others may still be loading their model.)"""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replica, values = scrape(url, headers)
        assert replica, "no X-Serve-Replica header"
        seen[replica] = values
        if len(seen) == n:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"only reached replicas {sorted(seen)} in {timeout:.0f} s")


def run_lm_eval(url: str, out_dir: Path, key: str | None) -> tuple[float, dict[int, list]]:
    """lm-eval as the README runs it; returns the wall time and doc_id -> [(loglikelihood, is_greedy)]."""
    model_args = (f"base_url={url}/v1/completions,tokenized_requests=True,tokenizer_backend=remote,"
                  f"num_concurrent=4,max_retries=1,timeout=120" + (f",auth_token={key}" if key else ""))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out_dir / "hf_cache"),
                "TOKENIZERS_PARALLELISM": "false", **({"OPENAI_API_KEY": key} if key else {})})
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", TASK, "--include_path", str(ROOT / "clients" / "lm_eval_tasks"), "--limit", str(LIMIT),
               "--batch_size", "1", "--log_samples", "--output_path", str(out_dir)]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    lines = next(out_dir.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()
    samples = {s["doc_id"]: s for s in map(json.loads, lines)}
    assert len(samples) == LIMIT
    return wall, {d: [(float(r[0][0]), str(r[0][1]) == "True") for r in s["resps"]] for d, s in samples.items()}


def deploy_config(folder: Path, port: int, key_file: Path) -> Path:
    """deploy/ray/serve.yaml as shipped, with this test's port, loopback, one thread and the key file."""
    import yaml  # PyYAML: a dependency of ray (and lm-eval)

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    deployment = config["applications"][0]["deployments"][0]
    assert deployment["num_replicas"] == 2 and deployment["max_replicas_per_node"] == 1
    deployment["ray_actor_options"]["runtime_env"]["env_vars"].update({
        "LOGPROBS_N_THREADS": "1", "LOGPROBS_API_KEY_FILE": str(key_file), "LOGPROBS_N_CTX": str(SERVER_N_CTX)})
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lm_eval_through_ray_serve_matches_one_server(model_path, tmp_path, tmp_path_factory):
    pytest.importorskip("ray.serve")
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY + "\n")
    headers = {"Authorization": f"Bearer {KEY}"}
    # Replicas import this checkout's `server` (PYTHONPATH is passed from `ray start` to its workers).
    # Serve's proxies prefer their own node's replicas while those have room (max_ongoing_requests):
    # one client through one proxy then reaches one machine only. README: turn that off on every node.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    nodes = RayNodes(tmp_path, env)
    serve_run = None
    try:
        started = time.monotonic()
        nodes.start()
        proxy_port = free_port()
        config = deploy_config(tmp_path, proxy_port, key_file)
        serve_log = open(tmp_path / "serve-run.log", "w")
        serve_run = subprocess.Popen([str(BIN / "serve"), "run", "--address", nodes.address, str(config)],
                                     stdout=serve_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        url = f"http://127.0.0.1:{proxy_port}"
        deadline = time.monotonic() + 300
        while True:
            assert serve_run.poll() is None, (tmp_path / "serve-run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "serve-run.log").read_text()[-4000:]
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        before = scrape_replicas(url, 2, headers)
        ready = time.monotonic() - started
        # The Host check: proxied requests keep the client's Host; with a key, any is accepted.
        assert requests.get(url + "/v1/models", headers={**headers, "Host": "scale.example.org"}, timeout=30).ok

        ray_wall, ray_lls = run_lm_eval(url, tmp_path_factory.mktemp("lm-eval-ray"), KEY)
        after = scrape_replicas(url, 2, headers)
    finally:
        if serve_run is not None:
            stop_group(serve_run, signal.SIGINT, timeout=60)  # Ctrl-C: `serve run` deletes its app
        nodes.stop()

    single = serve(model_path, tmp_path_factory, "scale-single", "--n-threads", "1")
    server = next(single)
    try:
        single_wall, single_lls = run_lm_eval(server.url, tmp_path_factory.mktemp("lm-eval-single"), None)
        _, single_counters = scrape(server.url, {})
    finally:
        next(single, None)

    worst = max(abs(a[0] - b[0]) for d in single_lls for a, b in zip(ray_lls[d], single_lls[d]))
    greedy_same = all(a[1] == b[1] for d in single_lls for a, b in zip(ray_lls[d], single_lls[d]))
    report = [f"Ray Serve, 2 nodes x 1 replica x 1 thread: cluster + replicas ready in {ready:.0f} s; "
              f"lm-eval {TASK} --limit {LIMIT} (num_concurrent=4, batch_size 1): {ray_wall:.1f} s through Serve, "
              f"{single_wall:.1f} s on one server (1 thread); max |d loglik| = {worst:.1e}"]
    total = dict.fromkeys(COUNTERS, 0.0)
    for replica in sorted(after):
        delta = {name: after[replica][name] - before.get(replica, {}).get(name, 0.0) for name in COUNTERS}
        for name in COUNTERS:
            total[name] += delta[name]
        lookups, hits, reused = (delta[name] for name in COUNTERS)
        report.append(f"  replica {replica}: {lookups:.0f} lookups, {hits:.0f} prefix-cache hits "
                      f"({hits / max(lookups, 1):.2f}), {reused:.0f} prompt tokens reused")
    lookups, hits, reused = (total[name] for name in COUNTERS)
    lookups1, hits1, reused1 = (single_counters[name] for name in COUNTERS)
    report.append(f"  all replicas: {hits:.0f} hits, {reused:.0f} tokens reused; one server: {hits1:.0f} hits, "
                  f"{reused1:.0f} tokens reused (replicas reused {reused / max(reused1, 1):.2f} of what one server did)")
    print("\n".join(report))
    (ROOT / "scale_out").mkdir(exist_ok=True)
    (ROOT / "scale_out" / "report.txt").write_text("\n".join(report) + "\n")
    assert worst <= LL_TOLERANCE and greedy_same
    assert lookups == lookups1 == 4 * LIMIT  # every choice was scored once, and on some replica
    per_replica = [after[r][COUNTERS[0]] - before.get(r, {}).get(COUNTERS[0], 0.0) for r in after]
    assert min(per_replica) > 0, "one replica got all the work: the proxy did not spread it"
