"""A load driver for a live server: concurrent clients sending a mix of lm-eval-style scoring
batches, generation (streamed and not), tokenizer calls, malformed bodies and clients that hang
up mid-request, while a sampler probes /health and reads the queue gauge from /metrics.

Two layers:
- `run_load(url, clients, duration_s, seed)`: one bounded burst of load (each client stops at a
  wall-clock deadline or after `max_requests`), returning what it saw (`LoadStats`). Every
  scoring answer is compared with the same request's answer on the idle server (`Workload`).
- `run_scenario(...)`: the whole check: references on the idle server, a warm-up with the same
  mix, the measured run, the references again, RSS after each phase; `Report.failures()` lists
  every pass criterion not met, `Report.table()` prints the numbers.

Only loopback URLs are driven: this is a test of the machine it runs on, not a load generator
for other hosts. Used by tests/load/test_load.py (short) and `python -m testing.load` (make load).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

# The server's limits under load: tight enough that the admission bound is hit (429s) with 16
# clients, several sequences generating at once, a small prefix cache that is full (and evicting)
# before the warm-up ends, so RSS after the warm-up is the steady state. The clients run on the
# same machine: the model gets half of its CPUs (llama.cpp's threads spin at each barrier, and
# slow down several times over when they share cores with 16 busy clients).
SERVER_FLAGS = {
    "--max-queued-tokens": 768,
    "--max-request-tokens": 768,
    "--max-sequences": 4,
    "--max-prompts": 8,
    "--max-n": 2,
    "--max-logprobs": 5,
    "--max-body-bytes": 65536,
    "--request-timeout": 120,
    "--prefix-cache-mb": 32,
    "--n-threads": max(1, len(os.sched_getaffinity(0)) // 2),
}
# The mix: relative frequency of each kind of request.
MIX = {
    "score": 30,  # lm-eval loglikelihood batch: token ids, echo, logprobs=1, max_tokens 0/1, greedy
    "generate": 10,  # non-streamed generation from a string prompt
    "stream": 10,  # streamed generation, read to [DONE]
    "tokenize": 8,
    "detokenize": 8,
    "malformed": 14,  # bad JSON, wrong types, unknown fields, oversize, out-of-range values
    "leave": 6,  # send a request, close the socket before reading the response (or mid-body)
    "leave_stream": 6,  # start a streamed generation, read a little, close the socket
}
TOLERANCE = 1e-4  # per token logprob, a scoring answer under load vs the same request alone
CLOSED = "closed"  # the "status" of a request whose client hung up before reading an answer
REQUEST_TIMEOUT = 180.0  # no single client call may take longer (so every client stops by itself)

WORDS = (  # one text, split: easier to read and extend than a list of words
    "the model reads each token and scores what comes next while other clients wait in the queue for "
    "their turn at the forward pass so that nothing they get depends on the traffic around them "
    "numbers multiple choice answer question context because therefore however Paris river mountain "
    "café naïve 東京 emoji 🙂 code def f(x): return x * 2"
).split()


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load driver only drives a server on this machine (loopback), not {host!r}")


# -- the workload: fixed, from a seed, so each scoring request has a reference answer ------------


def scoring_pool(seed: int, size: int = 12, vocab: tuple[int, int] = (100, 40000)) -> list[dict]:
    """lm-eval-style loglikelihood batches: one context shared by 2-4 continuations (a multiple-
    choice question), as token-id prompts with echo, logprobs=1, temperature 0, max_tokens 0 or 1.
    Each costs at most 4 x (96 + 8 + 32) + 4 tokens (32: --job-overhead-tokens), under --max-request-tokens."""
    rng = random.Random(f"score-{seed}")
    pool = []
    for _ in range(size):
        context = [rng.randrange(*vocab) for _ in range(rng.randrange(16, 97))]
        prompts = [
            context + [rng.randrange(*vocab) for _ in range(rng.randrange(1, 9))] for _ in range(rng.randrange(2, 5))
        ]
        pool.append(
            {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": rng.choice((0, 1)), "temperature": 0}
        )
    return pool


def texts(seed: int, size: int = 12) -> list[str]:
    rng = random.Random(f"text-{seed}")
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 40))) for _ in range(size)]


@dataclass
class Workload:
    """The fixed requests of a run and their answers on the idle server: scoring answers (the
    references) and each text's token ids (tokenize and detokenize are checked against them)."""

    scoring: list[dict]
    references: list[dict]
    texts: list[str]
    text_tokens: list[list[int]]

    @classmethod
    def build(cls, url: str, seed: int = 0) -> Workload:
        """Sends each request once, one at a time: the server must be idle."""
        _check_loopback(url)
        pool, strings = scoring_pool(seed), texts(seed)
        with requests.Session() as session:
            references = [_ok(session.post(url + "/v1/completions", json=p, timeout=REQUEST_TIMEOUT)) for p in pool]
            tokens = [
                _ok(
                    session.post(
                        url + "/tokenize", json={"prompt": t, "add_special_tokens": False}, timeout=REQUEST_TIMEOUT
                    )
                )["tokens"]
                for t in strings
            ]
        return cls(pool, references, strings, tokens)

    def recheck(self, url: str) -> list[str]:
        """The scoring requests again, one at a time on the idle server: problems, if any answer moved."""
        problems = []
        with requests.Session() as session:
            for i, payload in enumerate(self.scoring):
                answer = _ok(session.post(url + "/v1/completions", json=payload, timeout=REQUEST_TIMEOUT))
                problems += [
                    f"scoring request {i} after the load: {p}" for p in compare_scoring(self.references[i], answer)[0]
                ]
        return problems


def _ok(response: requests.Response) -> dict:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.url} on the idle server: {response.status_code} {response.text[:500]}"
        )
    return response.json()


def compare_scoring(reference: dict, answer: dict) -> tuple[list[str], float]:
    """Problems (empty: equal) and the largest |difference| of a logprob between two answers to
    one scoring request: same text, tokens, offsets and finish reasons, every logprob within
    TOLERANCE, the same top-logprob keys with values within TOLERANCE."""
    problems, worst = [], 0.0
    if len(reference["choices"]) != len(answer["choices"]):
        return [f"{len(answer['choices'])} choices, {len(reference['choices'])} alone"], math.inf
    for ref, got in zip(reference["choices"], answer["choices"]):
        where = f"choice {ref['index']}"
        for key in ("index", "text", "finish_reason"):
            if ref[key] != got[key]:
                problems.append(f"{where}: {key} {got[key]!r}, alone {ref[key]!r}")
        rl, gl = ref["logprobs"], got["logprobs"]
        for key in ("tokens", "text_offset"):
            if rl[key] != gl[key]:
                problems.append(f"{where}: {key} differ")
        if len(rl["token_logprobs"]) != len(gl["token_logprobs"]):
            problems.append(f"{where}: {len(gl['token_logprobs'])} token logprobs, alone {len(rl['token_logprobs'])}")
            continue
        for position, (a, b, top_a, top_b) in enumerate(
            zip(rl["token_logprobs"], gl["token_logprobs"], rl["top_logprobs"], gl["top_logprobs"])
        ):
            if (a is None) != (b is None) or (top_a is None) != (top_b is None):
                problems.append(f"{where}, token {position}: null in one answer only")
                continue
            if a is None:
                continue
            if top_a.keys() != top_b.keys():
                problems.append(f"{where}, token {position}: top keys {sorted(top_b)}, alone {sorted(top_a)}")
                continue
            diff = max([abs(a - b)] + [abs(top_a[k] - top_b[k]) for k in top_a])
            worst = max(worst, diff)
            if diff > TOLERANCE:
                problems.append(f"{where}, token {position}: logprob differs by {diff:.3g} from the answer alone")
    return problems, worst


# -- malformed requests: each with the status it must get ------------------------------------------


def malformed_cases(max_body_bytes: int) -> list[tuple[str, str, bytes | None, int]]:
    """(name, path, raw body, expected status). A None body is sent chunked (no Content-Length)
    and oversize, so that only the streamed body limit can stop it."""
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    return [
        ("bad JSON", "/v1/completions", b'{"prompt": [1, 2, ', 400),
        ("not an object", "/v1/completions", b"[1, 2, 3]", 400),
        ("empty body", "/v1/completions", b"", 400),
        ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 1}', 400),
        ("prompt of the wrong type", "/v1/completions", j({"prompt": 5, "max_tokens": 1}), 400),
        ("max_tokens of the wrong type", "/v1/completions", j({"prompt": "a", "max_tokens": "many"}), 400),
        ("mixed prompt list", "/v1/completions", j({"prompt": [[1, 2], "a"], "max_tokens": 1}), 400),
        ("unknown field", "/v1/completions", j({"prompt": "a", "max_tokens": 1, "frobnicate": True}), 400),
        (
            "token id outside the vocabulary",
            "/v1/completions",
            j({"prompt": [[5, 6, 10**9]], "echo": True, "logprobs": 1, "max_tokens": 0}),
            400,
        ),
        ("negative max_tokens", "/v1/completions", j({"prompt": "a", "max_tokens": -1}), 400),
        ("logprobs above the limit", "/v1/completions", j({"prompt": "a", "logprobs": 50, "max_tokens": 1}), 400),
        ("too many prompts", "/v1/completions", j({"prompt": ["a"] * 9, "max_tokens": 1}), 400),
        (
            "over the request token limit",
            "/v1/completions",
            j({"prompt": [[7] * 1000, [8] * 1000], "echo": True, "logprobs": 1, "max_tokens": 0}),
            400,
        ),
        ("unknown model", "/v1/completions", j({"prompt": "a", "max_tokens": 1, "model": "no-such-model"}), 404),
        ("oversize body", "/v1/completions", j({"prompt": "x" * (max_body_bytes + 10), "max_tokens": 1}), 413),
        ("oversize body, chunked", "/v1/completions", None, 413),
        ("chat without messages", "/v1/chat/completions", j({"messages": [], "max_tokens": 1}), 400),
        ("tokenize: wrong type", "/tokenize", j({"prompt": 5}), 400),
        ("detokenize: unknown field", "/detokenize", j({"tokens": [1, 2], "text": "x"}), 400),
        ("detokenize: id outside the vocabulary", "/detokenize", j({"tokens": [1, -4]}), 400),
    ]


# -- what a run saw -------------------------------------------------------------------------------


@dataclass
class LoadStats:
    """Everything one run_load saw. `records`: (kind, status or CLOSED, seconds) per request."""

    clients: int
    duration_s: float
    records: list[tuple[str, int | str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # anything wrong, with what was sent and got
    compared: int = 0  # scoring answers compared with their reference
    worst_diff: float = 0.0
    refused: int = 0  # 429s
    refused_without_retry_after: int = 0
    health: list[float] = field(default_factory=list)  # /health latencies (seconds) of answered probes
    health_failures: list[str] = field(default_factory=list)
    queue_tokens: list[float] = field(default_factory=list)  # logprobs_queue_tokens samples
    queue_jobs: list[float] = field(default_factory=list)
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    elapsed: float = 0.0
    stuck_clients: int = 0  # clients still running long after the deadline

    def grew(self, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.metrics_after.get(key, 0.0) - self.metrics_before.get(key, 0.0)

    def server_statuses(self) -> Counter:
        """Requests the server counted during the run, by status (logprobs_requests_total)."""
        counts: Counter = Counter()
        for (name, labels), value in self.metrics_after.items():
            if name == "logprobs_requests_total":
                counts[dict(labels)["status"]] += value - self.metrics_before.get((name, labels), 0.0)
        return +counts

    def tokens(self) -> dict[str, float]:
        return {
            "prompt tokens run": self.grew("logprobs_prompt_tokens_run_total"),
            "prompt tokens reused": self.grew("logprobs_prompt_tokens_reused_total"),
            "generated tokens": self.grew("logprobs_generated_tokens_total"),
        }


# -- the clients ----------------------------------------------------------------------------------


class Client(threading.Thread):
    """One client: random requests of the mix, one at a time, until the deadline or max_requests."""

    def __init__(
        self,
        index: int,
        url: str,
        workload: Workload,
        deadline: float,
        seed: int,
        max_requests: int,
        stats: LoadStats,
        lock: threading.Lock,
        max_body_bytes: int,
    ):
        super().__init__(name=f"load-client-{index}", daemon=True)
        self.url, self.workload, self.deadline, self.max_requests = url, workload, deadline, max_requests
        self.rng = random.Random(f"client-{seed}-{index}")
        self.stats, self.lock = stats, lock
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.session = requests.Session()
        self.bad_requests = malformed_cases(max_body_bytes)
        self.max_body_bytes = max_body_bytes
        self.kinds, self.weights = list(MIX), list(MIX.values())
        self.retry_after = 1.0  # the last 429's Retry-After

    def run(self) -> None:
        try:
            for _ in range(self.max_requests):
                if time.monotonic() >= self.deadline:
                    break
                kind = self.rng.choices(self.kinds, self.weights)[0]
                started = time.perf_counter()
                try:
                    status = getattr(self, kind)()
                except (requests.RequestException, OSError, http.client.HTTPException) as exc:
                    self.problem(f"{kind}: the connection failed: {exc!r}")
                    status = "error"
                except Exception as exc:  # an answer this client could not read: a problem, not a crash
                    self.problem(f"{kind}: {exc!r}")
                    status = "error"
                self.record(kind, status, time.perf_counter() - started)
                if status == 429:  # lm-eval waits Retry-After; a shorter pause keeps the pressure on
                    time.sleep(self.rng.uniform(0.5, 1.0) * min(self.retry_after, 2.0))
        finally:
            self.session.close()

    def record(self, kind: str, status, seconds: float) -> None:
        with self.lock:
            self.stats.records.append((kind, status, seconds))

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.stats.problems) < 200:
                self.stats.problems.append(text)

    def post(self, path: str, payload: dict, **kwargs) -> requests.Response:
        response = self.session.post(self.url + path, json=payload, timeout=REQUEST_TIMEOUT, **kwargs)
        self.check_refusal(path, response.status_code, response.headers, response.text)
        return response

    def check_refusal(self, what: str, status: int, headers, text: str) -> None:
        if status >= 500:
            self.problem(f"{what}: {status} {text[:300]}")
        if status == 429:
            retry_after = headers.get("Retry-After", "")
            self.retry_after = float(retry_after) if retry_after.isdigit() else 1.0
            with self.lock:
                self.stats.refused += 1
                if not (retry_after.isdigit() and int(retry_after) >= 1):
                    self.stats.refused_without_retry_after += 1

    def expect(self, what: str, response: requests.Response, allowed=(200, 429)) -> bool:
        """True if the request was answered 200; a problem if its status is not among `allowed`."""
        if response.status_code not in allowed:
            self.problem(f"{what}: unexpected {response.status_code} {response.text[:300]}")
        return response.status_code == 200

    # -- the kinds: each returns the status it got (or CLOSED) --------------------------------------
    def score(self):
        i = self.rng.randrange(len(self.workload.scoring))
        response = self.post("/v1/completions", self.workload.scoring[i])
        if self.expect(f"scoring request {i}", response):
            problems, worst = compare_scoring(self.workload.references[i], response.json())
            with self.lock:
                self.stats.compared += 1
                self.stats.worst_diff = max(self.stats.worst_diff, worst)
            for p in problems[:3]:
                self.problem(f"scoring request {i} under load: {p}")
        return response.status_code

    def generation_payload(self) -> dict:
        rng = self.rng
        payload = {"prompt": rng.choice(self.workload.texts), "max_tokens": rng.randrange(1, 17)}
        if rng.random() < 0.5:
            payload["temperature"] = 0
        else:
            payload |= {"temperature": 0.8, "seed": rng.randrange(1000), "n": rng.choice((1, 2))}
        if rng.random() < 0.3:
            payload["logprobs"] = rng.randrange(0, 6)
        if rng.random() < 0.2:
            payload["stop"] = [rng.choice(WORDS)]
        return payload

    def generate(self):
        payload = self.generation_payload()
        response = self.post("/v1/completions", payload)
        if self.expect("generation", response):
            body = response.json()
            n = payload.get("n", 1)
            if (
                len(body["choices"]) != n
                or body["usage"]["completion_tokens"] > n * payload["max_tokens"]
                or any(c["finish_reason"] not in ("stop", "length") for c in body["choices"])
            ):
                self.problem(f"generation {payload}: malformed answer {json.dumps(body)[:300]}")
        return response.status_code

    def stream(self):
        payload = self.generation_payload() | {"stream": True, "stream_options": {"include_usage": True}}
        with self.session.post(
            self.url + "/v1/completions", json=payload, stream=True, timeout=REQUEST_TIMEOUT
        ) as response:
            if response.status_code != 200:
                self.check_refusal("stream", response.status_code, response.headers, response.text)
                self.expect("stream", response)
                return response.status_code
            events = [line for line in response.iter_lines(decode_unicode=True) if line]
        if not events or events[-1] != "data: [DONE]" or not all(e.startswith("data: ") for e in events):
            self.problem(f"stream {payload}: bad framing, last events {events[-2:]}")
            return 200
        last = json.loads(events[-2].removeprefix("data: "))
        finishes = [c.get("finish_reason") for e in events[:-2] for c in json.loads(e[6:]).get("choices", ())]
        if "error" in last or last.get("usage") is None or sum(f is not None for f in finishes) != payload.get("n", 1):
            self.problem(f"stream {payload}: bad events, last {events[-2][:300]}")
        return 200

    def tokenize(self):
        i = self.rng.randrange(len(self.workload.texts))
        response = self.post("/tokenize", {"prompt": self.workload.texts[i], "add_special_tokens": False})
        if self.expect("tokenize", response) and response.json()["tokens"] != self.workload.text_tokens[i]:
            self.problem(f"tokenize {self.workload.texts[i]!r}: other tokens than on the idle server")
        return response.status_code

    def detokenize(self):
        i = self.rng.randrange(len(self.workload.texts))
        response = self.post("/detokenize", {"tokens": self.workload.text_tokens[i]})
        if self.expect("detokenize", response) and response.json()["prompt"] != self.workload.texts[i]:
            self.problem(f"detokenize of {self.workload.texts[i]!r}: {response.json()['prompt']!r}")
        return response.status_code

    def malformed(self):
        name, path, body, expected = self.rng.choice(self.bad_requests)
        headers = {"Content-Type": "application/json"}
        if body is None:
            chunk = b"x" * 8192
            data = (chunk for _ in range(self.max_body_bytes // len(chunk) + 2))
        else:
            data = body
        response = self.session.post(self.url + path, data=data, headers=headers, timeout=REQUEST_TIMEOUT)
        self.check_refusal(f"malformed ({name})", response.status_code, response.headers, response.text)
        if response.status_code != expected:
            self.problem(f"malformed ({name}): {response.status_code}, expected {expected}: {response.text[:200]}")
        return response.status_code

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT)

    def leave(self):
        """A request whose client goes away: after sending it whole (at once, or after up to half a
        second), or halfway through its body."""
        rng = self.rng
        if rng.random() < 0.5:  # a scoring batch of the pool
            payload = rng.choice(self.workload.scoring)
        else:  # a long generation
            payload = {
                "prompt": rng.choice(self.workload.texts),
                "max_tokens": 64,
                "temperature": 0.8,
                "seed": rng.randrange(1000),
            }
        body = json.dumps(payload).encode()
        conn = self.connection()
        try:
            if rng.random() < 0.2:
                conn.putrequest("POST", "/v1/completions")
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                conn.send(body[: len(body) // 2])
                time.sleep(rng.uniform(0, 0.2))
            else:
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                time.sleep(rng.choice((0, rng.uniform(0, 0.5))))
        finally:
            conn.close()
        return CLOSED

    def leave_stream(self):
        """A streamed generation whose client reads the status and a few events, then hangs up."""
        rng = self.rng
        payload = {
            "prompt": rng.choice(self.workload.texts),
            "max_tokens": 64,
            "temperature": 0.8,
            "seed": rng.randrange(1000),
            "stream": True,
        }
        conn = self.connection()
        try:
            conn.request(
                "POST", "/v1/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            status = response.status
            if status == 200:
                for _ in range(rng.randrange(1, 4)):
                    if not response.fp.readline():
                        break
            else:
                text = response.read().decode(errors="replace")
                self.check_refusal("leave_stream", status, response.headers, text)
                if status != 429:
                    self.problem(f"leave_stream: unexpected {status} {text[:300]}")
        finally:
            conn.close()
        return status


# -- the sampler: /health and the queue gauge, throughout -----------------------------------------


def scrape(url: str, timeout: float = 30) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=timeout).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


_GAUGE = re.compile(r"^(logprobs_queue_tokens|logprobs_queue_jobs) (\S+)$", re.M)


def sample(url: str, stats: LoadStats, stop: threading.Event, interval: float, health_timeout: float) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = session.get(url + "/health", timeout=health_timeout)
                seconds = time.perf_counter() - started
                if response.status_code == 200:
                    stats.health.append(seconds)
                else:
                    stats.health_failures.append(f"/health answered {response.status_code}")
            except requests.RequestException as exc:
                stats.health_failures.append(f"/health: {exc!r}")
            try:
                gauges = dict(_GAUGE.findall(session.get(url + "/metrics", timeout=health_timeout).text))
                stats.queue_tokens.append(float(gauges["logprobs_queue_tokens"]))
                stats.queue_jobs.append(float(gauges["logprobs_queue_jobs"]))
            except (requests.RequestException, KeyError) as exc:
                stats.health_failures.append(f"/metrics: {exc!r}")
            stop.wait(interval)


def run_load(
    url: str,
    clients: int = 16,
    duration_s: float = 60,
    seed: int = 0,
    *,
    workload: Workload | None = None,
    max_requests: int = 10_000,
    interval: float = 0.2,
    health_timeout: float = 5.0,
    max_body_bytes: int = SERVER_FLAGS["--max-body-bytes"],
) -> LoadStats:
    """`clients` threads send the mix for `duration_s` seconds (each at most `max_requests`
    requests; a request started before the deadline is waited for, at most REQUEST_TIMEOUT), while
    /health and the queue gauge are sampled every `interval` s. Without a workload, one is built
    first (the server must be idle then)."""
    _check_loopback(url)
    workload = workload or Workload.build(url, seed)
    stats = LoadStats(clients, duration_s)
    stats.metrics_before = scrape(url)
    lock, stop = threading.Lock(), threading.Event()
    sampler = threading.Thread(target=sample, args=(url, stats, stop, interval, health_timeout), daemon=True)
    started = time.monotonic()
    deadline = started + duration_s
    threads = [
        Client(i, url, workload, deadline, seed, max_requests, stats, lock, max_body_bytes) for i in range(clients)
    ]
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + REQUEST_TIMEOUT + 10 - time.monotonic()))
    stats.elapsed = time.monotonic() - started
    stats.stuck_clients = sum(thread.is_alive() for thread in threads)
    stop.set()
    sampler.join(health_timeout * 2 + 5)
    stats.metrics_after = scrape(url)
    return stats


# -- the scenario: references, warm-up, the run, RSS ----------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def wait_idle(url: str, timeout: float = 60) -> None:
    """Until nothing waits in the queue, then a moment more for running jobs of hung-up clients to stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = scrape(url)
        if metrics.get(("logprobs_queue_jobs", ()), 0) == 0:
            break
        time.sleep(0.2)
    time.sleep(1.0)


@dataclass
class Report:
    """A scenario's outcome: the warm-up's and the run's stats, RSS, and the server's own counts."""

    warmup: LoadStats
    run: LoadStats
    max_queued_tokens: int
    rss_after_warmup: int | None
    rss_after_run: int | None
    recheck_problems: list[str]
    cancellations: int | None  # "request cancelled" lines in the server log, if it was read
    rss_tolerance: float = 0.10

    def failures(self) -> list[str]:
        """Every pass criterion not met (empty: passed)."""
        out = []
        for phase, stats in (("warm-up", self.warmup), ("run", self.run)):
            statuses = Counter(s for _, s, _ in stats.records)
            if any(isinstance(s, int) and s >= 500 for s in statuses):
                out.append(f"{phase}: 5xx answers: {dict(statuses)}")
            server_5xx = {s: n for s, n in stats.server_statuses().items() if s.startswith("5")}
            if server_5xx:
                out.append(f"{phase}: the server counted 5xx responses (logprobs_requests_total): {server_5xx}")
            out += [f"{phase}: {p}" for p in stats.problems[:20]]
            if stats.compared == 0:
                out.append(f"{phase}: no scoring answer was compared (all refused?)")
            if stats.refused_without_retry_after:
                out.append(f"{phase}: {stats.refused_without_retry_after} 429s without a valid Retry-After")
            if stats.queue_tokens and max(stats.queue_tokens) > self.max_queued_tokens:
                out.append(
                    f"{phase}: logprobs_queue_tokens reached {max(stats.queue_tokens):.0f}, "
                    f"above --max-queued-tokens {self.max_queued_tokens}"
                )
            if not stats.queue_tokens:
                out.append(f"{phase}: the queue gauge was never read")
            if stats.health_failures:
                out.append(
                    f"{phase}: /health or /metrics failed {len(stats.health_failures)} time(s): "
                    f"{stats.health_failures[:3]}"
                )
            if stats.stuck_clients:
                out.append(f"{phase}: {stats.stuck_clients} client(s) did not stop")
        if self.run.refused == 0:
            out.append("run: no 429: the admission bound was never reached")
        if self.cancellations == 0:
            out.append("run: the server logged no cancelled request, though clients hung up mid-request")
        out += self.recheck_problems[:20]
        if self.rss_after_warmup and self.rss_after_run:
            growth = self.rss_after_run / self.rss_after_warmup - 1
            if abs(growth) > self.rss_tolerance:
                out.append(
                    f"RSS after the run {self.rss_after_run / 2**20:.0f} MiB is {growth:+.1%} from "
                    f"{self.rss_after_warmup / 2**20:.0f} MiB after the warm-up "
                    f"(limit ±{self.rss_tolerance:.0%})"
                )
        return out

    def table(self) -> str:
        return format_table(self)


def run_scenario(
    url: str,
    pid: int | None = None,
    clients: int = 16,
    duration_s: float = 180,
    warmup_s: float = 30,
    seed: int = 0,
    max_queued_tokens: int = SERVER_FLAGS["--max-queued-tokens"],
    log_path: Path | None = None,
    recheck: bool = True,
    **load_options,
) -> Report:
    """References on the idle server; a warm-up of the same mix; RSS; the measured run; RSS; with
    `recheck`, the references again. `pid`: the server's process, for RSS (None: not measured);
    `log_path`: its log, to count the cancellations it logged."""
    workload = Workload.build(url, seed)
    warmup = run_load(url, clients, warmup_s, seed + 1, workload=workload, **load_options)
    wait_idle(url)
    rss_warm = rss_bytes(pid) if pid else None
    cancelled_before = _cancellations(log_path)
    run = run_load(url, clients, duration_s, seed + 2, workload=workload, **load_options)
    wait_idle(url)
    rss_run = rss_bytes(pid) if pid else None
    cancelled = _cancellations(log_path)
    return Report(
        warmup,
        run,
        max_queued_tokens,
        rss_warm,
        rss_run,
        workload.recheck(url) if recheck else [],
        None if cancelled is None else cancelled - cancelled_before,
    )


def _cancellations(log_path: Path | None) -> int | None:
    return None if log_path is None else log_path.read_text(errors="replace").count("request cancelled (")


# -- the table ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def format_table(report: Report) -> str:
    stats = report.run
    by_kind: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    for kind, status, seconds in stats.records:
        by_kind[kind][status] += 1
        if status != 429:
            latency[kind].append(seconds)
    columns = sorted({s for c in by_kind.values() for s in c}, key=lambda s: (isinstance(s, str), str(s)))
    header = ["kind", "requests", *map(str, columns), "p50 ms", "p99 ms"]  # latency of those not refused
    rows = []
    for kind in [k for k in MIX if k in by_kind]:
        counts = by_kind[kind]
        rows.append(
            [
                kind,
                str(sum(counts.values())),
                *(str(counts.get(c, 0)) for c in columns),
                f"{percentile(latency[kind], 50) * 1e3:.0f}",
                f"{percentile(latency[kind], 99) * 1e3:.0f}",
            ]
        )
    total = Counter(s for _, s, _ in stats.records)
    all_latency = [seconds for _, status, seconds in stats.records if status != 429]
    rows.append(
        [
            "all",
            str(len(stats.records)),
            *(str(total.get(c, 0)) for c in columns),
            f"{percentile(all_latency, 50) * 1e3:.0f}",
            f"{percentile(all_latency, 99) * 1e3:.0f}",
        ]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    out = [
        line(header),
        "|" + "|".join(("-" * (w + 1) + ":") if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|",
        *map(line, rows),
        "",
    ]
    tokens = stats.tokens()
    scored = tokens["prompt tokens run"] + tokens["prompt tokens reused"]
    rate = (scored + tokens["generated tokens"]) / max(stats.elapsed, 1e-9)
    health = stats.health
    out += [
        f"{stats.clients} clients for {stats.elapsed:.0f} s ({stats.duration_s:.0f} s of sending); "
        f"closed: the client hung up before reading a status; latency: of the requests not refused (429)",
        f"tokens: {scored:.0f} prompt tokens scored ({tokens['prompt tokens run']:.0f} run, "
        f"{tokens['prompt tokens reused']:.0f} from the prefix cache) + {tokens['generated tokens']:.0f} generated"
        f" = {rate:.0f} tokens/s",
        f"scoring answers compared with the idle server's: {stats.compared} (warm-up: {report.warmup.compared}),"
        f" largest |difference| {max(stats.worst_diff, report.warmup.worst_diff):.2g} (allowed {TOLERANCE:g})",
        f"queue: largest logprobs_queue_tokens seen {max(stats.queue_tokens, default=0):.0f} "
        f"(bound {report.max_queued_tokens}) in {len(stats.queue_tokens)} samples; {stats.refused} answered 429, "
        f"{stats.refused - stats.refused_without_retry_after} with Retry-After",
        f"/health: {len(health)} probes answered, {len(stats.health_failures)} failed; latency p50 "
        f"{percentile(health, 50) * 1e3:.1f} ms, p99 {percentile(health, 99) * 1e3:.1f} ms, "
        f"max {max(health, default=math.nan) * 1e3:.1f} ms",
        "server-side statuses (logprobs_requests_total): "
        + ", ".join(f"{s}: {n:.0f}" for s, n in sorted(stats.server_statuses().items())),
    ]
    if report.cancellations is not None:
        out.append(f"requests cancelled by the server after their client left (logged): {report.cancellations}")
    if report.rss_after_warmup and report.rss_after_run:
        out.append(
            f"server RSS: {report.rss_after_warmup / 2**20:.0f} MiB after the warm-up "
            f"({report.warmup.elapsed:.0f} s), {report.rss_after_run / 2**20:.0f} MiB after the run "
            f"({report.rss_after_run / report.rss_after_warmup - 1:+.1%})"
        )
    return "\n".join(out)
