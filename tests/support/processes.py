"""The suite's services as real processes (uvicorn), for end-to-end and fault tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOG_DIR = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts")) / "logs"
COMMANDS = {
    "ingress": ("ingress_ws", "ADVANCED_INGRESS_PORT"),
    "gateway": ("sse_gateway", "ADVANCED_SSE_PORT"),
    "worker": ("relay_worker", "ADVANCED_WORKER_PORT"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """One service process; its output goes to a log file kept as a test artifact."""

    kind: str
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, name: str) -> Service:
        module, port_variable = COMMANDS[self.kind]
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        env = {**os.environ, **self.env, port_variable: str(self.port)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 60.0, probe: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.process.returncode}: {self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}{probe}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.kind} not answering {probe} after {timeout}s: {self.tail()}")

    def wait_live(self, timeout: float = 60.0) -> None:
        self.wait_ready(timeout, probe="/healthz")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, as an orchestrator would; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """kill -9: no drain, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Suite:
    """Starts and stops services that share one set of broker names."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.env = dict(env)
        self.services: list[Service] = []

    def start(
        self, kind: str, *, wait: bool = True, port: int | None = None, **overrides: str
    ) -> Service:
        """`port` pins the port, so that a restarted service is found at the same URL."""
        service = Service(kind, {**self.env, **overrides})
        if port is not None:
            service.port = port
        service.start(f"{self.name}-{kind}-{len(self.services)}")
        self.services.append(service)
        if wait:
            service.wait_ready()
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            try:
                service.stop()
            except subprocess.TimeoutExpired:
                pass
