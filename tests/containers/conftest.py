"""The container tests run against a compose project that scripts/containers/ci.sh built and
started (`just containers`): it passes the compose command, the project's token and the engine
in the environment. Run alone, the tests fail and say so, they do not skip."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Stack:
    compose: list[str]  # the compose command with its -p and -f arguments
    docker: str
    token: str
    network: str

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [*self.compose, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"compose {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout

    def docker_run(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        done = subprocess.run(
            [self.docker, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check:
            assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout.strip()

    def containers(self, service: str) -> list[str]:
        return self.run("ps", "--quiet", service).split()

    def probe(self, count: int) -> None:
        """`realtime-probe` through the published ports: `count` events sent over the
        WebSocket, each awaited on the SSE stream. Delivery is the subject here, not latency
        (a board's first event waits for the worker to take its partition, seconds on a busy
        machine): a generous threshold."""
        probe = shutil.which("realtime-probe", path=str(Path(sys.executable).parent))
        assert probe, "realtime-probe is not installed in this environment (uv sync --all-packages)"
        done = subprocess.run(
            [probe, "--ws-url", "ws://127.0.0.1:8004", "--sse-url", "http://127.0.0.1:8005",
             "--count", str(count), "--interval", "0.2", "--threshold-ms", "30000", "--json"],
            capture_output=True, text=True, timeout=90, check=False,
            env={**os.environ, "ADVANCED_REALTIME_TOKEN": self.token},
        )  # fmt: skip
        print(done.stdout, done.stderr)
        assert done.returncode == 0, f"probe exit {done.returncode}: {done.stdout}{done.stderr}"


@pytest.fixture(scope="session")
def stack() -> Stack:
    compose = os.environ.get("REALTIME_CI_COMPOSE")
    token = os.environ.get("ADVANCED_REALTIME_TOKEN")
    if not compose or not token or not os.environ.get("DOCKER_HOST"):
        pytest.fail(
            "the container tests need the suite started by scripts/containers/ci.sh: "
            "run `just containers` (it sets REALTIME_CI_COMPOSE, ADVANCED_REALTIME_TOKEN "
            "and DOCKER_HOST)"
        )
    # Debian's docker.io client, as the scripts use (lib.sh).
    docker = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")
    assert docker, "no docker client on PATH"
    return Stack(
        shlex.split(compose),
        docker,
        token,
        os.environ.get("REALTIME_CI_NETWORK", "realtime_default"),
    )
