"""The worker's adapters, chosen once from `ADVANCED_EVENT_TRANSPORT`: RabbitMQ and Redis, or
the in-process stand-ins of one-process development and the unit tests."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import redis.asyncio as redis
import structlog
from realtime_runtime.amqp import FailoverConnection, connect_nodes
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.service import redis_client

from relay_worker.adapters.memory import MEMORY_PAUSE, MemoryLeases, MemoryPartitions
from relay_worker.adapters.rabbitmq import AmqpPartitions, declare_topology
from relay_worker.adapters.redis import PartitionLeases, RedisRelayStore
from relay_worker.consumer import PAUSE, PartitionedConsumer
from relay_worker.ports import Leases, PartitionBroker
from relay_worker.relay import RelayStore
from relay_worker.settings import WORKER_REDIS_TIMEOUT_SECONDS, WorkerSettings

log = structlog.get_logger("relay_worker")


class WorkerTransport(Protocol):
    """What the relay runs on; the lifespan opens it once and closes it last."""

    store: RelayStore
    leases: Leases
    pause: tuple[float, float]  # a paused partition's back-off (first, longest), seconds

    async def connect(self) -> PartitionBroker:
        """The broker's partitions, once the broker answers (trying meanwhile)."""
        ...

    async def store_writable(self) -> bool: ...

    async def readiness(
        self, consumer: PartitionedConsumer | None, running: bool
    ) -> dict[str, bool | str]: ...


@contextlib.asynccontextmanager
async def open_transport(
    settings: WorkerSettings, memory: MemoryTransport | None = None
) -> AsyncIterator[WorkerTransport]:
    """The transport the settings name; its clients close when the context ends."""
    if settings.event_transport == "memory":
        yield InMemoryTransport(settings, memory or MemoryTransport())
        return
    brokers = BrokerTransport(settings)
    try:
        yield brokers
    finally:
        await brokers.close()


class InMemoryTransport:
    def __init__(self, settings: WorkerSettings, transport: MemoryTransport) -> None:
        self.store: RelayStore = transport.store
        self.leases: Leases = MemoryLeases(settings.rabbitmq_partitions)
        self.pause = MEMORY_PAUSE
        retry_delay = settings.rabbitmq_retry_delay_ms / 1000
        self._partitions = MemoryPartitions(transport.broker, settings.topology, retry_delay)

    async def connect(self) -> PartitionBroker:
        return self._partitions

    async def store_writable(self) -> bool:
        return True

    async def readiness(
        self, consumer: PartitionedConsumer | None, running: bool
    ) -> dict[str, bool | str]:
        # No brokers to speak of: the relay loop over the in-memory queues is the pipeline.
        return {"relay_running": running}


class BrokerTransport:
    """RabbitMQ (the partitions) and Redis (the relay step and the leases)."""

    pause = PAUSE

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        # A name per process, so an operator (or a fault test) can tell workers apart.
        self.worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        # Timeouts bound every Redis call, so a dropped connection becomes an error (and
        # the message held) instead of a relay step that hangs with the message. A standalone
        # Redis or a Redis Cluster, as ADVANCED_REDIS_MODE says.
        self._client = redis_client(
            settings,
            socket_timeout=WORKER_REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=WORKER_REDIS_TIMEOUT_SECONDS,
        )
        keys = settings.redis_keys
        self._store = RedisRelayStore(
            self._client,
            keys,
            settings.replay_retention,
            settings.board_idle_ttl_seconds,
            settings.replay_retention_seconds,
            min_replicas=settings.redis_min_replicas,
            replicas_timeout_ms=settings.redis_min_replicas_timeout_ms,
        )
        self.store: RelayStore = self._store
        self.leases: Leases = PartitionLeases(
            self._client,
            keys,
            self.worker_id,
            settings.rabbitmq_partitions,
            settings.partition_lease_ms,
        )
        self._probe_key = f"{keys.prefix}worker-probe:{self.worker_id}"
        self.connection: FailoverConnection | None = None

    async def connect(self) -> PartitionBroker:
        settings = self._settings
        connection = await connect_nodes(settings.rabbitmq_urls, f"relay-worker {self.worker_id}")
        try:
            async with connection.channel() as channel:
                await declare_topology(channel, settings.topology, settings.rabbitmq_retry_delay_ms)
        except BaseException:
            await connection.close()
            raise
        self.connection = connection
        return AmqpPartitions(
            connection, settings.topology, settings.rabbitmq_confirm_timeout_seconds
        )

    async def store_writable(self) -> bool:
        # A small real write under the prefix, gone by itself: Redis can answer PING
        # while it refuses writes (OOM under noeviction, a READONLY replica, MISCONF).
        try:
            return bool(await self._client.set(self._probe_key, b"1", px=10_000))
        except (redis.RedisError, OSError):
            return False

    async def _redis_up(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (redis.RedisError, OSError):
            return False

    async def readiness(
        self, consumer: PartitionedConsumer | None, running: bool
    ) -> dict[str, bool | str]:
        connection = self.connection
        # A robust connection is not "closed" while it reconnects; `connected` says whether
        # it is up right now.
        rabbit = bool(
            connection is not None and not connection.is_closed and connection.connected.is_set()
        )
        # False while an infrastructure fault holds the relay (Redis answering PING is not
        # Redis taking writes).
        flags: dict[str, bool | str] = {
            "rabbitmq_connected": rabbit,
            "redis_connected": await self._redis_up(),
            "relay_flowing": consumer is None or consumer.flowing,
        }
        if connection is not None and (node := connection.node) is not None:
            flags["rabbitmq_node"] = node
        return flags

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        await self._store.aclose()
        await self._client.aclose()
