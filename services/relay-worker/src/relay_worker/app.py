"""`build_worker(settings)`: the relay loop plus its health and metrics routes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as redis
import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from realtime_runtime.amqp import FailoverConnection, QueueTypeMismatch, connect_nodes
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.service import add_operations, keep_trying

from relay_worker.adapters.memory import consume_memory
from relay_worker.adapters.rabbitmq import declare_topology
from relay_worker.adapters.redis import PartitionLeases, RedisRelayStore
from relay_worker.consumer import PartitionedConsumer
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings

log = structlog.get_logger("relay_worker")


@dataclass
class WorkerRuntime:
    """What the lifespan opens and readiness reads; empty until each part is up."""

    connection: FailoverConnection | None = None
    consumer: PartitionedConsumer | None = None
    redis_up: Callable[[], Awaitable[bool]] | None = None


def build_worker(settings: WorkerSettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry)
    runtime = WorkerRuntime()
    memory_relay: list[asyncio.Task[None]] = []  # the relay loop of the in-memory transport

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if settings.event_transport == "memory":
                transport = memory or MemoryTransport()
                relay = Relay(transport.store, settings, metrics)
                task = asyncio.create_task(
                    consume_memory(transport.broker, relay, settings.rabbitmq_retry_delay_ms / 1000)
                )
                memory_relay.append(task)
                yield
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return

            # Timeouts bound every Redis call, so a dropped connection becomes an error (and
            # a retry of the message) instead of a relay step that hangs with the message.
            client = redis.from_url(
                settings.redis_url.get_secret_value(),
                health_check_interval=5,
                socket_timeout=5,
                socket_connect_timeout=5,
            )
            stack.push_async_callback(client.aclose)
            worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            keys = settings.redis_keys
            relay = Relay(
                RedisRelayStore(
                    client,
                    keys,
                    settings.replay_retention,
                    settings.board_idle_ttl_seconds,
                    settings.replay_retention_seconds,
                ),
                settings,
                metrics,
            )
            leases = PartitionLeases(
                client, keys, worker_id, settings.rabbitmq_partitions, settings.partition_lease_ms
            )

            async def redis_up() -> bool:
                try:
                    return bool(await client.ping())
                except (redis.RedisError, OSError):
                    return False

            runtime.redis_up = redis_up
            probe_key = f"{keys.prefix}worker-probe:{worker_id}"

            async def redis_writable() -> bool:
                # A small real write under the prefix, gone by itself: Redis can answer PING
                # while it refuses writes (OOM under noeviction, a READONLY replica, MISCONF).
                try:
                    return bool(await client.set(probe_key, b"1", px=10_000))
                except (redis.RedisError, OSError):
                    return False

            async def connect() -> None:
                # A name per process, so an operator (or a fault test) can tell workers apart.
                connection = await connect_nodes(
                    settings.rabbitmq_urls, f"relay-worker {worker_id}"
                )
                try:
                    async with connection.channel() as channel:
                        await declare_topology(
                            channel, settings.topology, settings.rabbitmq_retry_delay_ms
                        )
                except BaseException:
                    await connection.close()
                    raise
                runtime.connection = connection

            async def consume() -> None:
                # RabbitMQ may be down when the worker starts: keep trying, /readyz says 503
                # meanwhile, and /healthz answers from the start.
                # A queue of the other type stops the worker (QueueTypeMismatch says how to
                # migrate): consuming it under other arguments would be a silent mismatch.
                await keep_trying(connect, "RabbitMQ", log, fatal=(QueueTypeMismatch,))
                assert runtime.connection is not None
                consumer = PartitionedConsumer(
                    runtime.connection,
                    relay,
                    leases,
                    settings.topology,
                    prefetch=settings.rabbitmq_prefetch,
                    lease_ms=settings.partition_lease_ms,
                    registry=registry,
                    store_writable=redis_writable,
                    confirm_timeout=settings.rabbitmq_confirm_timeout_seconds,
                )
                runtime.consumer = consumer
                log.info(
                    "relay worker started",
                    worker_id=worker_id,
                    partitions=settings.rabbitmq_partitions,
                )
                await asyncio.gather(consumer.run(), consumer.measure())

            task = asyncio.create_task(consume())
            try:
                yield
            finally:
                # Drain: stop taking partitions, finish the message in hand, hand back the rest.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if runtime.consumer is not None:
                    await runtime.consumer.drain()
                if runtime.connection is not None:
                    await runtime.connection.close()

    app = FastAPI(title="relay-worker", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def readiness() -> dict[str, bool | str]:
        if settings.event_transport == "memory":
            # No brokers to speak of: the relay loop over the in-memory queue is the pipeline.
            return {"relay_running": any(not task.done() for task in memory_relay)}
        connection = runtime.connection
        # A robust connection is not "closed" while it reconnects; `connected` says whether
        # it is up right now.
        rabbit = bool(
            connection is not None and not connection.is_closed and connection.connected.is_set()
        )
        redis_ok = runtime.redis_up is not None and await runtime.redis_up()
        # False while an infrastructure fault holds the relay (Redis answering PING is not
        # Redis taking writes).
        flowing = runtime.consumer is None or runtime.consumer.flowing
        flags: dict[str, bool | str] = {
            "rabbitmq_connected": rabbit,
            "redis_connected": redis_ok,
            "relay_flowing": flowing,
        }
        if connection is not None and (node := connection.node) is not None:
            flags["rabbitmq_node"] = node
        return flags

    add_operations(app, settings, registry, readiness)
    return app
