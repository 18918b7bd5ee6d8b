"""Scale-out on Ray Serve, end to end on loopback (`make scale-test`; opt-in: LOGPROBS_SCALE_TEST=1).

Two Ray nodes on this machine (a head and a worker, each `ray start --block` with its own ports),
deploy/ray/serve.yaml run by `serve run` with LOGPROBS_SCALE_REPLICAS model replicas (default 2) of
one thread each behind the prefix-routing ingress, then unmodified lm-eval (`local-completions`,
num_concurrent=8, batch_size LOGPROBS_SCALE_BATCH, default 4, so multi-prompt requests are split)
through Serve's proxy on the HellaSwag items (LOGPROBS_SCALE_FEWSHOT shots, default 0), and the same
lm-eval run against a single server. Every loglikelihood must match the single server's; each
replica's counters are read from its own /metrics (responses name their replica in X-Serve-Replica):
the replicas must reuse >= 0.95 of the prompt tokens one server reuses, and no replica may get more
than 1.25x the mean share of prompts. Then `serve run` again: the new replicas answer a split
request with the single server's numbers.

Opt-in because it needs the `ray` extra and ~5-10 minutes on 2 cores: `make test` skips it.
Everything it starts (Ray nodes, `serve run`) is its own process group, stopped at the end."""

from __future__ import annotations

import contextlib
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
    pytest.mark.scale,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("LOGPROBS_SCALE_TEST"),
        reason="opt-in: make scale-test (LOGPROBS_SCALE_TEST=1; needs the ray extra)",
    ),
]

TASK, LIMIT = "hellaswag_dev", int(os.environ.get("LOGPROBS_SCALE_LIMIT", "40"))
REPLICAS = int(os.environ.get("LOGPROBS_SCALE_REPLICAS", "2"))
PER_NODE = -(-REPLICAS // 2)  # two Ray nodes
FEWSHOT = int(os.environ.get("LOGPROBS_SCALE_FEWSHOT", "0"))
BATCH = int(os.environ.get("LOGPROBS_SCALE_BATCH", "4"))
KEY = "sk-scale-test-key"
LL_TOLERANCE = 1e-4
BIN = Path(sys.executable).parent
REPLICA_HEADER = "x-serve-replica"
COUNTERS = (
    "logprobs_prefix_cache_lookups_total",
    "logprobs_prefix_cache_hits_total",
    "logprobs_prefix_cache_reused_tokens_total",
    "logprobs_prompt_tokens_run_total",
)


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True, and everything in its group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):  # what is left of the group (Ray's workers and agents)
        os.killpg(proc.pid, signal.SIGKILL)


class RayNodes:
    """A head and a worker node on this machine, each `ray start --block` in its own process group."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env, self.procs = folder, env, []
        # Ray's socket paths must stay short (108 bytes): a temp dir under /tmp, not pytest's.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-scale-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, name: str, *args: str) -> None:
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
        ]
        command = [
            str(BIN / "ray"),
            "start",
            "--block",
            f"--num-cpus={PER_NODE}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            *args,
            *(f"{p}={free_port()}" for p in ports),
        ]
        log = open(self.folder / f"ray-{name}.log", "w")
        self.procs.append(
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )
        )

    def start(self) -> None:
        self._start(
            "head",
            "--head",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
        )
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (self.folder / "ray-head.log").read_text():
            assert self.procs[0].poll() is None and time.monotonic() < deadline, (
                self.folder / "ray-head.log"
            ).read_text()
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
        if len(seen) >= n:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"only reached replicas {sorted(seen)} in {timeout:.0f} s")


def run_lm_eval(url: str, out_dir: Path, key: str | None) -> tuple[float, dict[int, list]]:
    """lm-eval as the README runs it; returns the wall time and doc_id -> [(loglikelihood, is_greedy)]."""
    model_args = (
        f"base_url={url}/v1/completions,tokenized_requests=True,tokenizer_backend=remote,"
        f"num_concurrent=8,max_retries=1,timeout=300" + (f",auth_token={key}" if key else "")
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        {
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(out_dir / "hf_cache"),
            "TOKENIZERS_PARALLELISM": "false",
            **({"OPENAI_API_KEY": key} if key else {}),
        }
    )
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        TASK,
        "--include_path",
        str(ROOT / "clients" / "lm_eval_tasks"),
        "--limit",
        str(LIMIT),
        "--batch_size",
        str(BATCH),
        "--num_fewshot",
        str(FEWSHOT),
        "--log_samples",
        "--output_path",
        str(out_dir),
    ]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.monotonic() - start
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    lines = next(out_dir.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()
    samples = {s["doc_id"]: s for s in map(json.loads, lines)}
    assert len(samples) == LIMIT
    return wall, {d: [(float(r[0][0]), str(r[0][1]) == "True") for r in s["resps"]] for d, s in samples.items()}


def deploy_config(folder: Path, port: int, key_file: Path, generation: int = 1) -> Path:
    """deploy/ray/serve.yaml as shipped, with this test's port, loopback, replicas, one thread each and
    the key file; `generation` changes the environment, so Serve replaces every replica (a redeploy
    of an unchanged config keeps them)."""
    import yaml  # PyYAML: a dependency of ray (and lm-eval)

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    model = next(d for d in application["deployments"] if d["name"] == "LogprobsModel")
    assert model["num_replicas"] == 2 and model["max_replicas_per_node"] == 1
    model.update({"num_replicas": REPLICAS, "max_replicas_per_node": PER_NODE})
    application["runtime_env"]["env_vars"].update(
        {
            "LOGPROBS_N_THREADS": "1",
            "LOGPROBS_API_KEY_FILE": str(key_file),
            "LOGPROBS_N_CTX": str(SERVER_N_CTX),
            "SCALE_TEST_GENERATION": str(generation),
        }
    )
    path = folder / f"serve-{generation}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class ServeRun:
    """`serve run CONFIG` against the nodes, until it is stopped (Ctrl-C: it deletes its app)."""

    def __init__(self, nodes: RayNodes, config: Path, folder: Path, env: dict, url: str, name: str):
        self.log_path = folder / f"serve-run-{name}.log"
        self.proc = subprocess.Popen(
            [str(BIN / "serve"), "run", "--address", nodes.address, str(config)],
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, self.log_path.read_text()[-4000:]
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGINT, timeout=60)


SPLIT_PROMPTS = [[504, 3458, 282, 4649, 314, 1345, 28], [504, 3458, 282, 1065, 30], [1345, 28, 504], [42, 43, 44, 45]]


def split_request(url: str, headers: dict) -> tuple[dict, str]:
    """A multi-prompt echo request (the ingress splits it): the body and the replicas that answered."""
    response = requests.post(
        url + "/v1/completions",
        headers=headers,
        timeout=120,
        json={"prompt": SPLIT_PROMPTS, "max_tokens": 2, "echo": True, "logprobs": 3, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    return response.json(), response.headers.get(REPLICA_HEADER, "")


def test_lm_eval_through_ray_serve_matches_one_server(model_path, tmp_path, tmp_path_factory):
    pytest.importorskip("ray.serve")
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY + "\n")
    headers = {"Authorization": f"Bearer {KEY}"}
    # Replicas import this checkout's `server` (PYTHONPATH is passed from `ray start` to its workers).
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    }
    nodes = RayNodes(tmp_path, env)
    running = None
    try:
        started = time.monotonic()
        nodes.start()
        proxy_port = free_port()
        config = deploy_config(tmp_path, proxy_port, key_file)
        url = f"http://127.0.0.1:{proxy_port}"
        running = ServeRun(nodes, config, tmp_path, env, url, "first")
        before = scrape_replicas(url, REPLICAS, headers)
        ready = time.monotonic() - started
        # The Host check: proxied requests keep the client's Host; with a key, any is accepted.
        assert requests.get(url + "/v1/models", headers={**headers, "Host": "scale.example.org"}, timeout=30).ok
        assert requests.get(url + "/v1/models", timeout=30).status_code == 401  # the key is checked

        ray_wall, ray_lls = run_lm_eval(url, tmp_path_factory.mktemp("lm-eval-ray"), KEY)
        after = scrape_replicas(url, REPLICAS, headers)
        # A redeploy: new replicas, and the router (rebuilt with the ingress) knows only them.
        running.stop()
        running = ServeRun(nodes, deploy_config(tmp_path, proxy_port, key_file, 2), tmp_path, env, url, "again")
        deadline = time.monotonic() + 300  # the old replicas answer until the new ones are up
        while set(scrape_replicas(url, REPLICAS, headers)) & set(after):
            assert time.monotonic() < deadline, "the redeploy kept the old replicas"
            time.sleep(2)
        split_body, split_replicas = split_request(url, headers)
    finally:
        if running is not None:
            running.stop()
        nodes.stop()

    single = serve(model_path, tmp_path_factory, "scale-single", "--n-threads", "1")
    server = next(single)
    try:
        single_wall, single_lls = run_lm_eval(server.url, tmp_path_factory.mktemp("lm-eval-single"), None)
        _, single_counters = scrape(server.url, {})
        single_split, _ = split_request(server.url, {})
    finally:
        next(single, None)

    worst = max(abs(a[0] - b[0]) for d in single_lls for a, b in zip(ray_lls[d], single_lls[d]))
    greedy_same = all(a[1] == b[1] for d in single_lls for a, b in zip(ray_lls[d], single_lls[d]))
    report = [
        f"Ray Serve, 2 nodes, {REPLICAS} model replicas x 1 thread behind the prefix-routing ingress: "
        f"ready in {ready:.0f} s; lm-eval {TASK} --limit {LIMIT} --num_fewshot {FEWSHOT} (num_concurrent=8, "
        f"batch_size {BATCH}): {ray_wall:.1f} s through Serve, {single_wall:.1f} s on one server (1 thread); "
        f"max |d loglik| = {worst:.1e}"
    ]
    total = dict.fromkeys(COUNTERS, 0.0)
    shares = []
    for replica in sorted(after):
        delta = {name: after[replica][name] - before.get(replica, {}).get(name, 0.0) for name in COUNTERS}
        for name in COUNTERS:
            total[name] += delta[name]
        lookups, hits, reused, run = (delta[name] for name in COUNTERS)
        shares.append(lookups)
        report.append(
            f"  replica {replica}: {lookups:.0f} prompts, {hits:.0f} prefix-cache hits, "
            f"{reused:.0f} prompt tokens reused, {run:.0f} computed"
        )
    lookups, hits, reused, run = (total[name] for name in COUNTERS)
    lookups1, hits1, reused1, run1 = (single_counters[name] for name in COUNTERS)
    mean_share = sum(shares) / len(shares)
    report.append(
        f"  all replicas: {hits:.0f} hits, {reused:.0f} tokens reused, {run:.0f} computed; one server: "
        f"{hits1:.0f} hits, {reused1:.0f} reused, {run1:.0f} computed"
    )
    report.append(
        f"  replicas reused {reused / max(reused1, 1):.2f} of what one server did; computed "
        f"{run / max(run1, 1):.3f}x its prompt tokens; largest share of prompts {max(shares) / mean_share:.2f}x "
        f"the mean"
    )
    print("\n".join(report))
    (ROOT / "scale_out").mkdir(exist_ok=True)
    (ROOT / "scale_out" / "report.txt").write_text("\n".join(report) + "\n")
    assert worst <= LL_TOLERANCE and greedy_same
    assert lookups == lookups1 == 4 * LIMIT  # every choice was scored once, and on some replica
    assert reused >= 0.95 * reused1, "the replicas lost prefix reuse"
    assert max(shares) <= 1.25 * mean_share, f"unbalanced: {shares}"
    # After the redeploy (other replicas): the same numbers as one server for a split request.
    assert split_body["choices"] == single_split["choices"] and split_body["usage"] == single_split["usage"]
    assert split_replicas, "no X-Serve-Replica on the joined response"
