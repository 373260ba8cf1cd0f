"""`build_worker(settings)`: the relay loop plus its health and metrics routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypedDict

import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from realtime_runtime.amqp import QueueTypeMismatch
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.service import add_operations, keep_trying

from relay_worker.consumer import PartitionedConsumer
from relay_worker.ports import PartitionBroker
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings
from relay_worker.transport import WorkerTransport, open_transport

log = structlog.get_logger("relay_worker")


@dataclass
class WorkerRuntime:
    """What runs while the lifespan does: the transport, the relay task and its consumer."""

    transport: WorkerTransport
    relaying: asyncio.Task[None] | None = None
    consumer: PartitionedConsumer | None = None  # once the broker answered
    drained: asyncio.Task[None] | None = field(default=None, repr=False)


class WorkerState(TypedDict):
    worker: WorkerRuntime


class Worker:
    """The relay process: consumes while its lifespan runs, and drains in numbered steps."""

    def __init__(
        self, settings: WorkerSettings, registry: CollectorRegistry, memory: MemoryTransport | None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = RelayMetrics(registry)
        self.memory = memory
        self.runtime: WorkerRuntime | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[WorkerState]:
        async with open_transport(self.settings, self.memory) as transport:  # closes clients
            runtime = self.runtime = WorkerRuntime(transport)
            runtime.relaying = asyncio.create_task(self._relay(runtime))
            try:
                yield {"worker": runtime}
            finally:
                await self.drain()

    async def _relay(self, runtime: WorkerRuntime) -> None:
        settings, transport = self.settings, runtime.transport
        # RabbitMQ may be down when the worker starts: keep trying, /readyz says 503
        # meanwhile, and /healthz answers from the start.
        # A queue of the other type stops the worker (QueueTypeMismatch says how to
        # migrate): consuming it under other arguments would be a silent mismatch.
        broker: PartitionBroker | None = None

        async def connect() -> None:
            nonlocal broker
            broker = await transport.connect()

        await keep_trying(connect, "RabbitMQ", log, fatal=(QueueTypeMismatch,))
        assert broker is not None
        consumer = runtime.consumer = PartitionedConsumer(
            broker,
            Relay(transport.store, settings, self.metrics),
            transport.leases,
            prefetch=settings.rabbitmq_prefetch,
            lease_ms=settings.partition_lease_ms,
            registry=self.registry,
            store_writable=transport.store_writable,
            pause=transport.pause,
        )
        log.info("relay worker started", partitions=settings.rabbitmq_partitions)
        await asyncio.gather(consumer.run(), consumer.measure())

    async def readiness(self) -> dict[str, bool | str]:
        runtime = self.runtime
        if runtime is None:
            return {"relay_running": False}
        running = runtime.relaying is not None and not runtime.relaying.done()
        return await runtime.transport.readiness(runtime.consumer, running)

    async def drain(self) -> None:
        """Once, however often asked (SIGTERM in the dev suite, then the lifespan's end)."""
        runtime = self.runtime
        if runtime is None:
            return
        if runtime.drained is None:
            runtime.drained = asyncio.create_task(self._drain(runtime))
        await asyncio.shield(runtime.drained)

    async def _drain(self, runtime: WorkerRuntime) -> None:
        # 1. Stop accepting: no more lease renewals, so no partition is taken up again.
        if runtime.relaying is not None:
            runtime.relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runtime.relaying
        consumer = runtime.consumer
        if consumer is None:
            return
        try:
            # 2. Tell the partitions to stop: each finishes the message in hand, hands the
            # rest back and releases its lease; 3. wait for that, up to the drain timeout.
            await asyncio.wait_for(consumer.drain(), self.settings.drain_timeout_seconds)
        except TimeoutError:
            # 4. Cancel what is left: RabbitMQ redelivers what those partitions held.
            log.warning("drain timed out; abandoning the partitions left", left=consumer.owned)
            consumer.abandon()
        # 5. Close the clients: the transport's context, when the lifespan leaves it.


def build_worker(settings: WorkerSettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    worker = Worker(settings, registry, memory)
    app = FastAPI(title="relay-worker", lifespan=worker.lifespan, docs_url=None, redoc_url=None)
    app.state.drain = worker.drain
    add_operations(app, settings, registry, worker.readiness)
    return app
