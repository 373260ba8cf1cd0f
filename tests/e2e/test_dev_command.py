"""`just dev` as a new user runs it: what it says, and that it leaves nothing behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import suite_env
from support.brokers import Brokers, Names
from support.processes import LOG_DIR, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
STARTUP_SECONDS = 90  # three interpreters importing at once on a busy 2-core runner


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


class DevRun:
    """One `just dev` (or `scripts/dev.py`) process, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that the test can clean up whatever is left
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = STARTUP_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"exited {self.process.returncode} before {text!r}:\n{self.output}"
                )
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{self.output}"
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def cleanup(self) -> None:
        """Kill what is left: the descendants, and orphans still in the run's session."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in [*self.descendants(), psutil.Process(self.process.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def dev_runs() -> Iterator[list[DevRun]]:
    runs: list[DevRun] = []
    yield runs
    for run in runs:
        run.cleanup()


def test_sigterm_to_just_dev_in_memory_mode_leaves_nothing_listening(
    dev_runs: list[DevRun],
) -> None:
    port, closed = free_port(), free_port()  # nothing listens on `closed`: "no brokers"
    env = {
        "ADVANCED_INGRESS_PORT": str(port),
        "ADVANCED_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{closed}/",
        "ADVANCED_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
    }
    run = DevRun("just-dev-memory", [str(ROOT / "just"), "dev"], env)
    dev_runs.append(run)
    run.wait_for(f"ready: open http://localhost:{port}")
    assert f"Redis at 127.0.0.1:{closed} not reachable" in run.output
    assert "guest:guest" not in run.output  # the broker URL's password is not echoed
    everything = run.descendants()
    assert listening(port) and everything

    run.process.send_signal(signal.SIGTERM)
    run.process.wait(30)
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, [process.cmdline() for process in alive]
    assert not listening(port)


def test_ctrl_c_on_a_terminal_stops_the_in_memory_suite_without_a_traceback() -> None:
    port, closed = free_port(), free_port()
    env = {
        **os.environ,
        "ADVANCED_INGRESS_PORT": str(port),
        "ADVANCED_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{closed}/",
        "ADVANCED_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
    }
    leader, follower = pty.openpty()
    # On a terminal of its own, as a person runs it: Ctrl-C is the terminal's SIGINT to the
    # whole foreground process group (just, uv, the suite), not a signal to one process.
    process = subprocess.Popen(
        [str(ROOT / "just"), "dev"],
        cwd=ROOT,
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while f"ready: open http://localhost:{port}".encode() not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            output += os.read(leader, 65536)
        os.write(leader, b"\x03")  # Ctrl-C
        with contextlib.suppress(OSError):  # EIO once every process has let go of the terminal
            while chunk := os.read(leader, 65536):
                output += chunk
        process.wait(30)
    finally:
        os.close(leader)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode(errors="replace"))  # the colours
    assert "Shutting down" in text and "Traceback" not in text, text
    assert "service=dev-suite" in text  # a terminal gets the console format, not JSON
    assert not listening(port)


def three_process_env(brokers: Brokers, names: Names) -> tuple[dict[str, str], dict[str, int]]:
    ports = {"ingress": free_port(), "gateway": free_port(), "worker": free_port()}
    env = {
        **suite_env(brokers),
        **names.env(),
        "ADVANCED_INGRESS_PORT": str(ports["ingress"]),
        "ADVANCED_SSE_PORT": str(ports["gateway"]),
        "ADVANCED_WORKER_PORT": str(ports["worker"]),
    }
    return env, ports


def start_three(dev_runs: list[DevRun], name: str, env: dict[str, str]) -> DevRun:
    run = DevRun(name, [sys.executable, str(ROOT / "scripts" / "dev.py")], env)
    dev_runs.append(run)
    run.wait_for("dev: ready: open http://localhost:")
    return run


@pytest.mark.brokers
def test_a_service_killed_by_a_signal_is_reported_and_dev_exits_non_zero(
    brokers: Brokers, names: Names, dev_runs: list[DevRun]
) -> None:
    env, ports = three_process_env(brokers, names)
    run = start_three(dev_runs, "dev-three-kill", env)
    assert f"ready: open http://localhost:{ports['ingress']}" in run.output
    children = run.descendants()
    gateway = next(p for p in children if "sse_gateway" in " ".join(p.cmdline()))
    gateway.send_signal(signal.SIGKILL)

    assert run.process.wait(30) == 128 + signal.SIGKILL
    assert "dev: sse-gateway was killed by SIGKILL; stopping the others" in run.output
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive and not any(listening(port) for port in ports.values())


@pytest.mark.brokers
def test_sigterm_drains_all_three_services_and_exits_0(
    brokers: Brokers, names: Names, dev_runs: list[DevRun]
) -> None:
    env, ports = three_process_env(brokers, names)
    run = start_three(dev_runs, "dev-three-term", env)
    children = run.descendants()
    assert len(children) == 3

    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(30) == 0, run.output
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive and not any(listening(port) for port in ports.values())
    assert "was killed" not in run.output and "exited with" not in run.output
