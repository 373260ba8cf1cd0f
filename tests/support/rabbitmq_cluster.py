"""A private three-node RabbitMQ cluster on this machine, for fault tests and benchmarks.

Each node has its own name (unique per run), AMQP and distribution ports, data, log and
config files, and the cluster its own Erlang cookie and HOME: `rabbitmqctl` with that cookie
cannot reach the shared broker (node `rabbit@localhost`, ports 5672 and 25672) by mistake.
The nodes run Debian's real `rabbitmq-server` script (the /usr/sbin wrapper would switch to
the rabbitmq user and the shared cookie). `close()` kills every process it started, on
failure too; epmd is shared with the shared broker and is left alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from support.processes import free_port

SBIN = Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/sbin"))
SHARED_PORTS = {5672, 25672}


@dataclass
class ClusterNode:
    name: str  # rabbitN-<tag>@localhost
    amqp_port: int
    dist_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbit.pid"

    def beam_pid(self) -> int | None:
        """The Erlang VM's own pid, as the node wrote it."""
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None


class RabbitCluster:
    """Three nodes joined into one cluster; kill, stop and restart them; find queue leaders."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        if not (SBIN / "rabbitmq-server").exists():
            raise RuntimeError(
                f"RabbitMQ is not installed at {SBIN} (apt-get install rabbitmq-server)"
            )
        tag = uuid.uuid4().hex[:8]
        self.directory = directory
        self.home = directory / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        self.nodes: list[ClusterNode] = []
        for n in range(1, size + 1):
            ports = {free_port(), free_port()}
            while len(ports) < 2 or ports & SHARED_PORTS:
                ports = {free_port(), free_port()}
            amqp_port, dist_port = sorted(ports)
            self.nodes.append(
                ClusterNode(f"rabbit{n}-{tag}@localhost", amqp_port, dist_port, directory / f"n{n}")
            )

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 120) -> RabbitCluster:
        """Boot the nodes side by side, then join the second and third to the first."""
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self.await_startup(node, timeout)
            first = self.nodes[0]
            for node in self.nodes[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "reset")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
            running = self.ctl(first, "eval", "length(rabbit_nodes:all_running()).").strip()
            if running != str(len(self.nodes)):
                raise RuntimeError(f"cluster has {running} running nodes: {self.logs()}")
        except BaseException:
            self.close()
            raise
        return self

    def _env(self, node: ClusterNode) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(node.directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.directory / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.directory / "log"),
            "RABBITMQ_PID_FILE": str(node.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # No busy-waiting schedulers: three idle nodes must not eat a shared 2-core machine.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+sbwt none +sbwtdcpu none +sbwtdio none",
        }

    def _spawn(self, node: ClusterNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        (node.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (node.directory / "advanced.config").write_text("[].\n")
        (node.directory / "rabbitmq-env.conf").write_text("")
        (node.directory / "enabled_plugins").write_text("[].\n")
        node.pid_file.unlink(missing_ok=True)
        with (node.directory / "stdout.log").open("ab") as out:
            # A session of its own: the whole process group is killed on close.
            node.process = subprocess.Popen(
                [str(SBIN / "rabbitmq-server")],
                env=self._env(node),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def await_startup(self, node: ClusterNode, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited: {self.logs(node)}")
            result = self._run(node, ["await_startup", "--timeout", "10"], timeout=30)
            if result.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{node.name} not up after {timeout}s: {self.logs(node)}")

    def ctl(self, node: ClusterNode, *args: str, timeout: float = 90) -> str:
        """`rabbitmqctl --node <node> args…` with the cluster's own HOME and cookie."""
        result = self._run(node, list(args), timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name}: {result.stderr}")
        return result.stdout

    def _run(
        self, node: ClusterNode, args: list[str], *, timeout: float, tool: str = "rabbitmqctl"
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SBIN / tool), "--node", node.name, *args],
            env=self._env(node),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # ---------------------------------------------------------------------- faults

    def kill9(self, node: ClusterNode) -> int:
        """kill -9 of the node's Erlang VM: no goodbye to the other nodes or the clients."""
        pid = node.beam_pid()
        if pid is None:
            raise RuntimeError(f"{node.name} wrote no pid file")
        os.kill(pid, signal.SIGKILL)
        self._reap(node)
        return pid

    def stop(self, node: ClusterNode) -> None:
        """A graceful stop of the whole node (`rabbitmqctl stop`): it leaves the cluster
        running, hands its quorum queue leaderships over and closes its clients' connections."""
        self.ctl(node, "stop")
        self._reap(node)

    def restart(self, node: ClusterNode, timeout: float = 120) -> None:
        """Start a stopped or killed node again, with its data: it rejoins the cluster."""
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"{node.name} is still running")
        self._spawn(node)
        self.await_startup(node, timeout)

    def _reap(self, node: ClusterNode, timeout: float = 60) -> None:
        if node.process is None:
            return
        try:
            node.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(node)

    def _kill_group(self, node: ClusterNode) -> None:
        if node.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, signal.SIGKILL)
        pid = node.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(30)

    def close(self) -> None:
        for node in self.nodes:
            self._kill_group(node)

    # --------------------------------------------------------------------- reading

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def leaders(self, queues: list[str]) -> dict[str, str]:
        """The node leading each of these quorum queues (name -> node name)."""
        node = self.running()[0]
        listing = self.ctl(node, "list_queues", "name", "leader", "-q", "--no-table-headers")
        found = dict(line.split("\t")[:2] for line in listing.splitlines() if "\t" in line)
        return {name: found[name].strip() for name in queues if name in found}

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    def urls(self, first: int = 0) -> str:
        """ADVANCED_RABBITMQ_URL for all nodes, starting with `first` (each process its own)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.url for n in order)

    def logs(self, node: ClusterNode | None = None, lines: int = 20) -> str:
        out = []
        for each in [node] if node else self.nodes:
            path = each.directory / "stdout.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {each.name}\n" + "\n".join(tail))
        return "\n".join(out)
