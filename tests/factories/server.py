"""`pascaline serve` as a real process on a free loopback port, and a small SSE reader.

with ServerProcess(models.comfy, out, token="t") as server:
    client = server.client()               # an httpx.Client with the token
    events = list(read_events(client, f"/v1/jobs/{job_id}/events"))
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT = 180.0  # seconds for torch, the web stack and the tiny models on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One ``python -m pascaline serve`` on the tiny models (CPU, unquantized)."""

    def __init__(self, models: Path, out: Path, *, token: str | None = None, extra: tuple[str, ...] = ()):
        self.out, self.token, self.port = Path(out), token, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "pascaline", "serve", "--models", str(models),
                        "--device", "cpu", "--quant", "none", "--port", str(self.port), "--out", str(out),
                        *(("--token", token) if token else ()), *extra]  # fmt: skip
        self.log = Path(out).with_name(f"{Path(out).name}-server-{self.port}.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.out.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:  # a file, not a pipe: a full pipe would block the server
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),  # the test's threads: its pixels match in-process runs
            )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json()["pipeline"] == "ready":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not get ready in {START_TIMEOUT} s:\n{self.output()}")

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or a power cut of the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM, the graceful way (uvicorn's shutdown, then the worker's)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_events(client: httpx.Client, path: str, headers: dict | None = None):
    """The server-sent events of ``path`` as dicts (``id`` added), until the server ends the stream."""
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if fields:
                event = json.loads(fields["data"])
                assert event["type"] == fields["event"]
                yield {**event, "id": int(fields["id"])}
                fields = {}
