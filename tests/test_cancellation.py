"""A client that goes away cancels its request, streamed or not: on the real server, over a real
loopback connection that the client closes (as lm-eval's timed-out retries do)."""

from __future__ import annotations

import http.client
import json
import random
import re
import time

import requests

CANCELLED = re.compile(
    r"request cancelled \(the client went away\): (\d+) queued job\(s\) dropped before running, "
    r"(\d+) running job\(s\) stopped early, (\d+) had finished"
)


def send_and_leave(server, payload: dict, after: float) -> None:
    """POST a non-streamed request, wait `after` seconds without reading, then close the socket."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(
        "POST", "/v1/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"}
    )
    time.sleep(after)
    connection.close()


def wait_for_cancellation(server, seen: int, timeout: float = 60) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = CANCELLED.findall(server.log())
        if len(found) > seen:
            return tuple(map(int, found[seen]))
        time.sleep(0.1)
    raise AssertionError(f"no cancellation logged:\n{server.log()[-3000:]}")


def test_non_streamed_scoring_request_is_dropped_when_its_client_leaves(server):
    """300 prompts of 200 tokens (minutes of work): the client leaves after 1 s; the queued
    prompts never run, and the server is free for the next client at once."""
    seen = len(CANCELLED.findall(server.log()))
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 40000) for _ in range(200)] for _ in range(300)]
    send_and_leave(server, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}, after=1.0)
    dropped, stopped, finished = wait_for_cancellation(server, seen)
    assert dropped + stopped + finished == 300
    assert dropped >= 250, (dropped, stopped, finished)
    # The server went back to work for others: a small request is answered (it would wait for
    # minutes behind the abandoned prompts otherwise).
    out = requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert out.status_code == 200


def test_non_streamed_generation_stops_when_its_client_leaves(server):
    seen = len(CANCELLED.findall(server.log()))
    send_and_leave(
        server,
        {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.8, "seed": 1, "stop": ["zzzzzzzz"]},
        after=1.0,
    )
    assert wait_for_cancellation(server, seen) == (0, 1, 0)
