"""A private Redis Cluster on this machine (three masters, one replica each), for fault tests.

Every node is a `redis-server` of its own on two free ports (client and cluster bus, never the
shared 6379/16379), with its own directory for `nodes.conf` and the append-only file, and its
own session so that `close()` can kill it by process group, on failure too. The cluster is
formed with `redis-cli --cluster create` and is ready when every node says `cluster_state:ok`.
Administration (topology, kills, restarts) goes through plain per-node connections, so the
harness does not depend on the cluster client it is there to test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from support.processes import free_port

SHARED_PORTS = {6379, 16379}
# Low enough that a kill -9 is noticed and its replica promoted in a few seconds.
NODE_TIMEOUT_MS = 2000


@dataclass
class RedisNode:
    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    slots: tuple[tuple[int, int], ...] = ()  # what it served when it was last killed

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        """A plain connection to this one node (no redirections), for administration."""
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES, as a running node sees the cluster."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...] = ()

    @property
    def is_master(self) -> bool:
        return "master" in self.flags and not self.failed

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)


def slot_of(slot_or_key: int | str | bytes) -> int:
    if isinstance(slot_or_key, int):
        return slot_or_key
    raw = slot_or_key.encode() if isinstance(slot_or_key, str) else slot_or_key
    return int(key_slot(raw))


class LocalRedisCluster:
    """Six nodes formed into one cluster; find, kill and restart masters and replicas."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.replicas = replicas
        self._masters = masters
        self.nodes: list[RedisNode] = []
        taken = set(SHARED_PORTS)
        for n in range(masters * (1 + replicas)):
            port, bus_port = free_port(), free_port()
            while len({port, bus_port} - taken) < 2:
                port, bus_port = free_port(), free_port()
            taken |= {port, bus_port}
            self.nodes.append(RedisNode(port, bus_port, directory / f"n{n}"))

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 60) -> LocalRedisCluster:
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._await_ping(node, timeout)
            addresses = [n.address for n in self.nodes]
            created = subprocess.run(
                [
                    *("redis-cli", "--cluster", "create", *addresses),
                    *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}")
            for node in self.nodes:
                with node.client() as client:
                    node.node_id = str(client.execute_command("CLUSTER", "MYID"))
            self.wait_until_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, node: RedisNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        # Own session: kill -9 and close() reach the node and nothing else.
        node.process = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(node.port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-port", str(node.bus_port)),
                *("--cluster-config-file", str(node.directory / "nodes.conf")),
                *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
                *("--dir", str(node.directory), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "everysec"),
                # The replicas' first sync starts at once instead of after the 5 s default.
                *("--repl-diskless-sync-delay", "0"),
                *("--daemonize", "no", "--logfile", str(node.log)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _await_ping(self, node: RedisNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.running():
                raise RuntimeError(f"redis-server on {node.port} exited: {self.logs(node)}")
            with contextlib.suppress(redis.ConnectionError), node.client() as client:
                if client.ping():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on {node.port} not up after {timeout}s")

    def close(self) -> None:
        for node in self.nodes:
            self._kill(node)

    def _kill(self, node: RedisNode) -> None:
        if node.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(10)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------- reading

    def seed_urls(self) -> str:
        """ADVANCED_REDIS_URL in cluster mode: every node as a seed, comma-separated."""
        return ",".join(n.url for n in self.nodes)

    def state(self, node: RedisNode) -> str:
        with node.client() as client:
            info = str(client.execute_command("CLUSTER", "INFO"))
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return fields.get("cluster_state", "").strip()

    def view(self, seen_from: RedisNode | None = None) -> list[NodeView]:
        """CLUSTER NODES as one running node sees it."""
        node = seen_from or next(n for n in self.nodes if n.running())
        with node.client() as client:
            text = str(client.execute_command("CLUSTER", "NODES"))
        return [parse_node_line(line) for line in text.splitlines() if line.strip()]

    def node_by_id(self, node_id: str) -> RedisNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def masters(self) -> list[RedisNode]:
        return [self.node_by_id(v.node_id) for v in self.view() if v.is_master and v.slots]

    def master_of(self, slot_or_key: int | str | bytes) -> RedisNode:
        """The node serving this slot (or the slot of this key) now."""
        slot = slot_of(slot_or_key)
        owner = next(v for v in self.view() if v.is_master and v.owns(slot))
        return self.node_by_id(owner.node_id)

    def replicas_of(self, master: RedisNode) -> list[RedisNode]:
        return [
            self.node_by_id(v.node_id)
            for v in self.view()
            if v.master_id == master.node_id and not v.failed
        ]

    def logs(self, node: RedisNode | None = None, lines: int = 20) -> str:
        out = []
        for each in [node] if node else self.nodes:
            if each.log.exists():
                tail = each.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {each.address}\n" + "\n".join(tail))
        return "\n".join(out)

    # ---------------------------------------------------------------------- faults

    def kill9(self, node: RedisNode) -> None:
        """kill -9: no goodbye to the other nodes, the replicas or the clients. The slots
        it served are remembered for `wait_for_failover`."""
        node.slots = next((v.slots for v in self.view() if v.node_id == node.node_id), ())
        self._kill(node)

    def kill_master(self, slot_or_key: int | str | bytes) -> RedisNode:
        """kill -9 of the master serving this slot or key; returns the killed node."""
        master = self.master_of(slot_or_key)
        self.kill9(master)
        return master

    def kill_replica(self, slot_or_key: int | str | bytes) -> RedisNode:
        """kill -9 of a replica of the master serving this slot or key; returns it."""
        replica = self.replicas_of(self.master_of(slot_or_key))[0]
        self.kill9(replica)
        return replica

    def wait_for_failover(self, killed: RedisNode, timeout: float = 30) -> RedisNode:
        """Wait until a replica of the killed master serves its slots and every running
        node says cluster_state:ok again; returns the promoted node."""
        if not killed.slots:
            raise ValueError(f"{killed.address} served no slots when it was killed")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                serving = [v for v in self.view() if v.slots]
                taken_over = all(not v.failed and v.node_id != killed.node_id for v in serving)
                if taken_over and self._all_ok():
                    return self.master_of(killed.slots[0][0])
            time.sleep(0.2)
        raise TimeoutError(f"no failover of {killed.address} after {timeout}s: {self.logs()}")

    def restart(self, node: RedisNode, timeout: float = 30) -> None:
        """Start a killed node again with its nodes.conf and AOF: it rejoins the cluster
        (a former master as a replica of the node that took its slots)."""
        if node.running():
            raise RuntimeError(f"{node.address} is still running")
        self._spawn(node)
        self._await_ping(node, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StopIteration):
                if self._rejoined(node) and self._all_ok():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{node.address} did not rejoin after {timeout}s: {self.logs(node)}")

    def _rejoined(self, node: RedisNode) -> bool:
        # Right after start a former master still believes its old nodes.conf; it has
        # rejoined once it and the others agree on its role and nobody marks it failing.
        others = next(n for n in self.nodes if n.running() and n is not node)
        seen = next(v for v in self.view(others) if v.node_id == node.node_id)
        itself = next(v for v in self.view(node) if v.node_id == node.node_id)
        return not seen.failed and seen.is_master == itself.is_master

    def wait_until_ok(self, timeout: float = 30) -> None:
        """Every running node says cluster_state:ok and every running replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self._all_ok():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ok after {timeout}s: {self.logs()}")

    def _all_ok(self) -> bool:
        running = [n for n in self.nodes if n.running()]
        return all(self.state(n) == "ok" and self._synced(n) for n in running) and all(
            self._sees_whole_cluster(n) for n in running
        )

    def _sees_whole_cluster(self, node: RedisNode) -> bool:
        # Gossip spreads the replicas' roles a little after `cluster_state:ok`: a node is
        # ready once it sees as many serving masters and live replicas as there are running.
        views = [v for v in self.view(node) if not v.failed]
        running = {n.node_id for n in self.nodes if n.running()}
        serving = [v for v in views if v.is_master and v.slots]
        replicas = [v for v in views if v.master_id is not None]
        return (
            {v.node_id for v in views} >= running
            and len(serving) == self._masters
            and len(replicas) == len(running) - self._masters
        )

    def _synced(self, node: RedisNode) -> bool:
        # A replica that never finished its first sync is not promoted when its master dies
        # (its data counts as too old), so readiness includes every replica's link.
        with node.client() as client:
            replication = client.info("replication")
        return replication["role"] == "master" or replication.get("master_link_status") == "up"


def parse_node_line(line: str) -> NodeView:
    # <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot> <slot> ...
    parts = line.split()
    slots = []
    for item in parts[8:]:
        if item.startswith("["):  # a slot being migrated: not served yet
            continue
        start, _, end = item.partition("-")
        slots.append((int(start), int(end or start)))
    return NodeView(
        node_id=parts[0],
        port=int(parts[1].split("@")[0].rsplit(":", 1)[1]),
        flags=frozenset(parts[2].split(",")),
        master_id=None if parts[3] == "-" else parts[3],
        slots=tuple(slots),
    )


@contextlib.contextmanager
def redis_cluster(directory: Path) -> Iterator[LocalRedisCluster]:
    """A started private cluster, torn down on exit."""
    cluster = LocalRedisCluster(directory).start()
    try:
        yield cluster
    finally:
        cluster.close()
