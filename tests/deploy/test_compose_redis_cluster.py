"""compose.redis-cluster.yaml's nodes and its one-shot `redis-cli --cluster create` job, run
without a container engine: six `redis-server`s started with the file's own command line on
loopback addresses in place of the network's fixed ones (port 6379 each, as in the file), and
the job's own script. It forms the cluster with a synced replica per master, does nothing on a
formed cluster, and the cluster comes back whole after every node is killed and restarted on
its nodes.conf and AOF (what the fixed addresses are for)."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "deploy" / "compose" / "compose.redis-cluster.yaml"
NODES = ["redis", *(f"redis-{n}" for n in range(2, 7))]
PASSWORD = "compose-test-password"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CLUSTER_FILE.read_text())
    return loaded


def unescape(text: str) -> str:
    """Compose's `$$` is a literal `$` for the container's shell."""
    return text.replace("$$", "$")


class Nodes:
    """The six nodes on 127.<a>.<b>.11-16 (a /24 of loopback addresses, chosen at random so
    that two runs on one machine do not meet), each in its own directory and session."""

    def __init__(self, directory: Path) -> None:
        self.net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
        self.directory = directory
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, name: str) -> str:
        return f"{self.net}.{11 + NODES.index(name)}"

    def argv(self, name: str) -> list[str]:
        # The file's command line (after `exec`), with the node's own address, plus what a
        # container gives it for free: its own address to listen on, and /data as the dir.
        node = compose()["services"][name]
        script = unescape(node["command"][2]).split("exec ", 1)[1]
        script = script.replace('"$REDIS_NODE_IP"', self.address(name))
        script = script.replace('"$REDIS_PASSWORD"', PASSWORD)
        script = script.replace("/data/", f"{self.directory / name}/")
        argv = shlex.split(script)
        assert argv[0] == "redis-server", argv
        return [
            *argv,
            *("--bind", self.address(name), "--port", "6379"),
            *("--dir", str(self.directory / name), "--logfile", "redis.log"),
        ]

    def start(self) -> None:
        for name in NODES:
            (self.directory / name).mkdir(parents=True, exist_ok=True)
            self.processes[name] = subprocess.Popen(
                self.argv(name),
                cwd=self.directory / name,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        for name in NODES:
            self.await_ping(name)

    def await_ping(self, name: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                log = self.directory / name / "redis.log"
                raise RuntimeError(f"{name} exited: {log.read_text() if log.exists() else ''}")
            if self.cli(name, "ping").strip() == "PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"{name} not answering")

    def cli(self, name: str, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-h", self.address(name), *args],
            env={**os.environ, "REDISCLI_AUTH": PASSWORD},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout

    def kill_all(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def create(self) -> subprocess.CompletedProcess[str]:
        """The `redis-cluster-create` job's script, with its environment."""
        job = compose()["services"]["redis-cluster-create"]
        assert job["command"][:2] == ["sh", "-euc"]
        return subprocess.run(
            ["sh", "-euc", unescape(job["command"][2])],
            env={**os.environ, "REDISCLI_AUTH": PASSWORD, "NET": self.net},
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )

    def roles(self) -> dict[str, str]:
        roles = {}
        for name in NODES:
            info = self.cli(name, "info", "replication")
            roles[name] = "master" if "role:master" in info else "replica"
        return roles


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    # As the fault tests: Redis's own binaries are a test requirement, never a skip.
    assert shutil.which("redis-server") and shutil.which("redis-cli"), "install redis-server"
    started = Nodes(tmp_path)
    try:
        started.start()
        yield started
    finally:
        started.kill_all()


def assert_whole(nodes: Nodes) -> None:
    for name in NODES:
        assert "cluster_state:ok" in nodes.cli(name, "cluster", "info"), name
    roles = nodes.roles()
    masters = [n for n, role in roles.items() if role == "master"]
    assert len(masters) == 3, roles
    for master in masters:
        assert "connected_slaves:1" in nodes.cli(master, "info", "replication"), master


@pytest.mark.timeout(300)
def test_the_create_job_forms_the_cluster_once_and_it_survives_a_full_restart(
    nodes: Nodes,
) -> None:
    created = nodes.create()
    assert created.returncode == 0, created.stdout + created.stderr
    assert "All 16384 slots covered" in created.stdout, created.stdout
    assert_whole(nodes)
    nodes.cli("redis", "-c", "set", "{part-0}:probe", "kept")

    again = nodes.create()  # the job runs again on every `up`
    assert again.returncode == 0, again.stdout + again.stderr
    assert "formed already" in again.stdout and "Performing" not in again.stdout

    nodes.kill_all()
    nodes.start()  # the same addresses, nodes.conf and AOF: what a restarted stack has
    restarted = nodes.create()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "formed already" in restarted.stdout
    assert_whole(nodes)
    assert nodes.cli("redis", "-c", "get", "{part-0}:probe").strip() == "kept"
