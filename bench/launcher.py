"""Starts what is measured as real processes: the suite's three services, or the baseline's two.

Each deployment gets broker names of its own (the test suite's `Names` pattern), so a benchmark
never sees, nor disturbs, another engineer's traffic on the shared RabbitMQ and Redis.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

TOKEN = "bench-" + "token-for-load"
RABBITMQ_URL = os.environ.get("ADVANCED_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("ADVANCED_REDIS_URL", "redis://127.0.0.1:6379/2")
# The shared Redis the targets use is one standalone Redis, cleaned up with a plain client's
# SCAN; the suite on a Redis Cluster is the `suite-redis-cluster` target, on a private cluster.
if os.environ.get("ADVANCED_REDIS_MODE", "standalone") != "standalone" or "," in REDIS_URL:
    raise SystemExit(
        "bench: needs a standalone Redis (one ADVANCED_REDIS_URL); unset ADVANCED_REDIS_MODE "
        "(--targets suite-redis-cluster measures the suite on a private Redis Cluster)"
    )
LOG_DIR = Path("bench/results/tmp/logs")
UNLIMITED = "1000000/second"
PUBLISHER_MAX_RATE = 2000  # messages per second on one publishing WebSocket


def listening_process(url: str) -> psutil.Process | None:
    """The process listening on the port of `url` (a broker), if this user may see it."""
    port = urlsplit(url.split(",")[0]).port
    try:
        for connection in psutil.net_connections("tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return psutil.Process(connection.pid) if connection.pid else None
    except psutil.Error:
        return None
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One server process, its port, and its CPU and memory as psutil reads them."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    def start(self, tag: str) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with (LOG_DIR / f"{tag}-{self.name}.log").open("ab") as log:
            self.popen = subprocess.Popen(  # our own modules, fixed arguments
                self.argv,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def wait_ready(self, probe: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}; see {LOG_DIR}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{probe}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready on {probe} after {timeout:.0f}s; see {LOG_DIR}")

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class Deployment:
    """What one scenario runs against; `ws_url` and `sse_url` are the same shape for both."""

    kind: str
    processes: dict[str, ServerProcess]
    ingress: str  # the process that holds WebSockets
    gateway: str  # the process that holds SSE streams

    def ws_url(self, board: str) -> str:
        port = self.processes[self.ingress].port
        return f"ws://127.0.0.1:{port}/ws/boards/{board}?token={TOKEN}"

    def sse_url(self, board: str) -> str:
        port = self.processes[self.gateway].port
        return f"http://127.0.0.1:{port}/sse/boards/{board}?token={TOKEN}"

    def start(self) -> None:
        raise NotImplementedError

    def broker_processes(self) -> dict[str, psutil.Process] | None:
        """The RabbitMQ and Redis processes this target uses, when they are its own."""
        return None

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class SuiteDeployment(Deployment):
    """relay-worker, ingress-ws and sse-gateway against the shared brokers, limits raised."""

    kind = "suite"
    ingress = "ingress-ws"
    gateway = "sse-gateway"

    def __init__(self, partitions: int = 8, rabbitmq_url: str = RABBITMQ_URL) -> None:
        self.tag = "bench" + uuid.uuid4().hex[:10]
        self.partitions = partitions
        self.rabbitmq_url = rabbitmq_url
        env = {
            "ADVANCED_ENVIRONMENT": "test",
            "ADVANCED_REALTIME_TOKEN": TOKEN,
            "ADVANCED_RABBITMQ_URL": rabbitmq_url,
            "ADVANCED_REDIS_URL": REDIS_URL,
            "ADVANCED_EVENT_TRANSPORT": "rabbitmq",
            "ADVANCED_LOG_LEVEL": "warning",
            "ADVANCED_RABBITMQ_EXCHANGE": f"{self.tag}.events",
            "ADVANCED_RABBITMQ_QUEUE": f"{self.tag}.events",
            "ADVANCED_RABBITMQ_RETRY_QUEUE": f"{self.tag}.events.retry",
            "ADVANCED_RABBITMQ_DLQ_QUEUE": f"{self.tag}.events.dlq",
            "ADVANCED_RABBITMQ_PARTITIONS": str(partitions),
            "ADVANCED_ACTIVITY_CHANNEL": f"{self.tag}:activity",
            "ADVANCED_REDIS_KEY_PREFIX": f"{self.tag}:",
            # The defaults protect a production edge from one client; the load generator is
            # one client (one address) opening thousands of streams and sending thousands/s.
            # Counted in Redis per frame (a moving window: a list as long as the limit), so
            # high enough for the load generator's publishers, not astronomically high.
            "ADVANCED_WEBSOCKET_RATE_LIMIT": f"{PUBLISHER_MAX_RATE * 2}/second",
            "ADVANCED_RATE_LIMIT_DEFAULT": UNLIMITED,
            "ADVANCED_ACTIVITY_STREAM_RATE_LIMIT": UNLIMITED,
            "ADVANCED_WEBSOCKET_MAX_CONNECTIONS": "20000",
            "ADVANCED_WEBSOCKET_MAX_CONNECTIONS_PER_CREDENTIAL": "20000",
            "ADVANCED_WEBSOCKET_HANDSHAKE_RATE_LIMIT": UNLIMITED,
            "ADVANCED_SSE_MAX_CONNECTIONS": "20000",
        }
        python = sys.executable
        self.processes = {
            "relay-worker": ServerProcess(
                "relay-worker", [python, "-m", "relay_worker"], dict(env)
            ),
            "ingress-ws": ServerProcess("ingress-ws", [python, "-m", "ingress_ws"], dict(env)),
            "sse-gateway": ServerProcess("sse-gateway", [python, "-m", "sse_gateway"], dict(env)),
        }
        for name, variable in (
            ("relay-worker", "ADVANCED_WORKER_PORT"),
            ("ingress-ws", "ADVANCED_INGRESS_PORT"),
            ("sse-gateway", "ADVANCED_SSE_PORT"),
        ):
            self.processes[name].env[variable] = str(self.processes[name].port)

    def start(self) -> None:
        # The worker declares the topology; the ingress publishes with mandatory=True.
        worker = self.processes["relay-worker"]
        worker.start(self.tag)
        worker.wait_ready("/readyz")
        for name in ("ingress-ws", "sse-gateway"):
            self.processes[name].start(self.tag)
        for name in ("ingress-ws", "sse-gateway"):
            self.processes[name].wait_ready("/readyz")

    def stop(self) -> None:
        super().stop()
        asyncio.run(self._cleanup())

    async def _cleanup(self) -> None:
        """Delete this deployment's queues, exchanges and keys (nobody else's)."""
        import aio_pika

        connection = await aio_pika.connect(self.rabbitmq_url.split(",")[0])
        async with connection:
            channel = await connection.channel()
            queues = [f"{self.tag}.events.{p}" for p in range(self.partitions)]
            queues += [f"{self.tag}.events.retry", f"{self.tag}.events.dlq"]
            for queue in queues:
                try:
                    await channel.queue_delete(queue)
                except Exception:  # a missing queue closes the channel: open another
                    channel = await connection.channel()
            for exchange in (f"{self.tag}.events", f"{self.tag}.events.retry"):
                try:
                    await channel.exchange_delete(exchange)
                except Exception:
                    channel = await connection.channel()
        await self._cleanup_redis()

    async def _cleanup_redis(self) -> None:
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{self.tag}:*", count=1000)]
            for start in range(0, len(keys), 1000):
                await client.delete(*keys[start : start + 1000])
        finally:
            await client.aclose()


class BaselineDeployment(Deployment):
    """The textbook design: a FastAPI WebSocket process and an sse-starlette process on Redis."""

    kind = "baseline"
    ingress = "baseline-ws"
    gateway = "baseline-sse"

    def __init__(self) -> None:
        self.tag = "bench" + uuid.uuid4().hex[:10]
        env = {
            "BASELINE_REDIS_URL": REDIS_URL,
            "BASELINE_CHANNEL": f"{self.tag}:baseline",
            "BASELINE_TOKEN": TOKEN,
        }
        python = sys.executable
        self.processes = {}
        for name, module in (("baseline-ws", "ws_app"), ("baseline-sse", "sse_app")):
            process = ServerProcess(name, [], dict(env))
            # `uvicorn module:app`, as the textbook says: uvloop and httptools when installed.
            process.argv = [
                python,
                "-m",
                "uvicorn",
                f"bench.baseline.{module}:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(process.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
            self.processes[name] = process

    def start(self) -> None:
        for process in self.processes.values():
            process.start(self.tag)
        for process in self.processes.values():
            process.wait_ready("/healthz")


class QuorumSuiteDeployment(SuiteDeployment):
    """The suite on a private three-node RabbitMQ cluster with quorum queues: each service
    given the three nodes (each its own first), the queues led by the first node. The cluster
    (tests/support/rabbitmq_cluster.py) boots once per benchmark process and is killed at exit.
    """

    kind = "suite-quorum"
    _cluster: Any = None

    def __init__(self) -> None:
        cluster = self.cluster()
        super().__init__(rabbitmq_url=cluster.urls(0))
        self.processes["relay-worker"].env["ADVANCED_RABBITMQ_URL"] = cluster.urls(0)
        self.processes["ingress-ws"].env["ADVANCED_RABBITMQ_URL"] = cluster.urls(1)
        for process in self.processes.values():
            process.env["ADVANCED_RABBITMQ_QUEUE_TYPE"] = "quorum"

    @classmethod
    def cluster(cls) -> Any:
        if cls._cluster is None:
            cls._cluster = _private_cluster("rabbitmq_cluster", "RabbitCluster", "bench-rabbitmq-")
        return cls._cluster

    def broker_processes(self) -> dict[str, psutil.Process] | None:
        found = {}
        for node in self.cluster().nodes:
            pid = node.beam_pid()
            if pid is not None:
                found[f"rabbitmq-{node.name.partition('-')[0]}"] = psutil.Process(pid)
        redis = listening_process(REDIS_URL)
        if redis is not None:
            found["redis"] = redis
        return found


class RedisClusterSuiteDeployment(SuiteDeployment):
    """The suite on a private six-node Redis Cluster (three masters, one replica each), in
    cluster mode with the worker waiting for one replica per relay step
    (ADVANCED_REDIS_MIN_REPLICAS=1), on the shared RabbitMQ. The cluster
    (tests/support/redis_cluster.py) boots once per benchmark process and is killed at exit,
    so its keys need no cleanup.
    """

    kind = "suite-redis-cluster"
    _cluster: Any = None

    def __init__(self) -> None:
        super().__init__()
        for process in self.processes.values():
            process.env |= {
                "ADVANCED_REDIS_MODE": "cluster",
                "ADVANCED_REDIS_URL": self.cluster().seed_urls(),
                "ADVANCED_REDIS_MIN_REPLICAS": "1",
            }

    @classmethod
    def cluster(cls) -> Any:
        if cls._cluster is None:
            cls._cluster = _private_cluster(
                "redis_cluster", "LocalRedisCluster", "bench-redis-cluster-"
            )
        return cls._cluster

    async def _cleanup_redis(self) -> None:
        return None

    def broker_processes(self) -> dict[str, psutil.Process] | None:
        found = {}
        for n, node in enumerate(self.cluster().nodes):
            if node.running():
                found[f"redis-{n + 1}"] = psutil.Process(node.process.pid)
        rabbitmq = listening_process(RABBITMQ_URL)
        if rabbitmq is not None:
            found["rabbitmq"] = rabbitmq
        return found


TARGETS: dict[str, type[SuiteDeployment]] = {
    "suite": SuiteDeployment,
    "suite-quorum": QuorumSuiteDeployment,
    "suite-redis-cluster": RedisClusterSuiteDeployment,
}


def deployment(kind: str) -> Deployment:
    if kind == "baseline":
        return BaselineDeployment()
    if kind in TARGETS:
        return TARGETS[kind]()
    raise ValueError(f"unknown target {kind!r}: use 'baseline' or one of {sorted(TARGETS)}")


def _private_cluster(module: str, name: str, prefix: str) -> Any:
    """A private cluster of the test harness (`tests/support/<module>.py`), started once per
    benchmark process in a directory of its own and stopped at exit."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    cluster_class = getattr(importlib.import_module(f"support.{module}"), name)
    cluster = cluster_class(Path(tempfile.mkdtemp(prefix=prefix))).start()
    atexit.register(cluster.close)
    return cluster
