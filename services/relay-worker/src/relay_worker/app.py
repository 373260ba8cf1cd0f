"""`build_worker(settings)`: the relay loop plus its health and metrics routes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import aio_pika
import redis.asyncio as redis
import structlog
from envelope.memory import MemoryTransport
from envelope.service import add_operations
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from relay_worker.adapters.memory import consume_memory
from relay_worker.adapters.rabbitmq import declare_topology
from relay_worker.adapters.redis import PartitionLeases, RedisRelayStore
from relay_worker.consumer import PartitionedConsumer
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings

log = structlog.get_logger("relay_worker")


def build_worker(settings: WorkerSettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry)
    state: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if settings.event_transport == "memory":
                transport = memory or MemoryTransport()
                relay = Relay(transport.store, settings, metrics)
                task = asyncio.create_task(
                    consume_memory(transport.broker, relay, settings.rabbitmq_retry_delay_ms / 1000)
                )
                state["ready"] = lambda: True
                yield
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return

            client = redis.from_url(settings.redis_url.get_secret_value(), health_check_interval=5)
            stack.push_async_callback(client.aclose)
            connection = await aio_pika.connect_robust(
                settings.rabbitmq_url.get_secret_value(),
                client_properties={"connection_name": f"relay-worker {socket.gethostname()}"},
            )
            stack.push_async_callback(connection.close)
            async with connection.channel() as channel:
                await declare_topology(channel, settings.topology, settings.rabbitmq_retry_delay_ms)

            keys = settings.redis_keys
            relay = Relay(
                RedisRelayStore(client, keys, settings.replay_retention), settings, metrics
            )
            worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            leases = PartitionLeases(
                client, keys, worker_id, settings.rabbitmq_partitions, settings.partition_lease_ms
            )
            consumer = PartitionedConsumer(
                connection,
                relay,
                leases,
                settings.topology,
                prefetch=settings.rabbitmq_prefetch,
                lease_ms=settings.partition_lease_ms,
                registry=registry,
            )

            async def redis_up() -> bool:
                try:
                    return bool(await client.ping())
                except (redis.RedisError, OSError):
                    return False

            state["connection"] = connection
            state["redis_up"] = redis_up
            task = asyncio.create_task(consumer.run())
            log.info(
                "relay worker started", worker_id=worker_id, partitions=settings.rabbitmq_partitions
            )
            try:
                yield
            finally:
                # Drain: stop taking partitions, finish the message in hand, hand back the rest.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await consumer.drain()

    app = FastAPI(title="relay-worker", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def readiness() -> dict[str, bool]:
        if settings.event_transport == "memory":
            return {"rabbitmq_connected": True, "redis_connected": True}
        connection = state.get("connection")
        redis_up = state.get("redis_up")
        rabbit = bool(connection is not None and not connection.is_closed)  # type: ignore[attr-defined]
        redis_ok = bool(redis_up is not None and await redis_up())  # type: ignore[operator]
        return {"rabbitmq_connected": rabbit, "redis_connected": redis_ok}

    add_operations(app, settings, registry, readiness)
    return app
