"""A live server for tests and benchmarks: `python -m server` in a subprocess on a free loopback
port, waited for until /health answers, stopped afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"  # the data sets the tests read (hellaswag_dev, gsm8k, wikitext2; data/README.md)
SERVER_N_CTX = 2048  # the context the tests' servers (and the load driver's) run with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command in a subprocess on loopback `port`, its output in `log_path`, waited for
    (up to `timeout` seconds) until `health_path` answers; stop() (or leaving a `with`) ends it.
    `env`: variables added to its environment; `ca`: the CA file of a server that speaks https."""

    def __init__(
        self,
        command: list[str],
        port: int,
        log_path: Path,
        *,
        health_path: str = "/health",
        env: dict[str, str] | None = None,
        ca: str | None = None,
        timeout: float = 120,
    ):
        self.port = port
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
        self.completions_url = self.url + "/v1/completions"
        self.verify = ca or True  # for requests' verify=
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited early:\n{self.log()}")
            try:
                if requests.get(self.url + health_path, timeout=1, verify=self.verify).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{command[:4]} did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class LiveServer(ServerProcess):
    """This server (`python -m server --model MODEL`) on a free loopback port; `prefix`: a command
    it runs under (e.g. `taskset -c 0`)."""

    def __init__(
        self,
        model: Path,
        log_path: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        ca: str | None = None,
        timeout: float = 120,
        prefix: tuple[str, ...] = (),
    ):
        self.model = model
        port = free_port()
        super().__init__(
            [*prefix, sys.executable, "-m", "server", "--model", str(model), "--port", str(port), *extra_args],
            port,
            log_path,
            env=env,
            ca=ca,
            timeout=timeout,
        )

    def post(self, path: str, payload=None, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=300, **{"verify": self.verify, **kwargs})

    def complete(self, **payload) -> dict:
        response = self.post("/v1/completions", payload)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, path: str, **payload) -> list:
        """The `data:` payloads of a streamed request (`stream: true` is added), checking the
        Server-Sent Events framing on the way; the final [DONE] is checked and left out."""
        with requests.post(self.url + path, json=payload | {"stream": True}, stream=True, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
            events = []
            for line in r.iter_lines(decode_unicode=True):
                if not line:
                    continue
                assert line.startswith("data: "), line
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        return events[:-1]
