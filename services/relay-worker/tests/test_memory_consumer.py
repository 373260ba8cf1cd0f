"""The memory transport runs the same `PartitionedConsumer` as RabbitMQ: batches, acks, the
hand-back of unsettled messages on a drain, and the worker's app on top of it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import orjson
from envelope.topology import Topology
from prometheus_client import CollectorRegistry
from realtime_runtime.memory import MemoryBroker, MemoryStore, MemoryTransport, RelayOutcome
from redis import exceptions as redis_errors
from relay_worker.adapters.memory import MEMORY_PAUSE, MemoryLeases, MemoryPartitions
from relay_worker.app import build_worker
from relay_worker.consumer import PartitionedConsumer
from relay_worker.relay import AcknowledgeInOrder, D, Outcome, Relay, RelayMetrics
from relay_worker.settings import WorkerSettings
from support.envelopes import board_event

TOPOLOGY = Topology("t", "t.partition", "t.retry", "t.dlq", 2)


def settings() -> WorkerSettings:
    return WorkerSettings(_env_file=None, event_transport="memory", rabbitmq_partitions=2)  # type: ignore[call-arg]


def body(board_id: str, correlation_id: str) -> bytes:
    return orjson.dumps(board_event(board_id, correlation_id).model_dump(mode="json"))


class RecordingRelay(Relay):
    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store, settings(), RelayMetrics(CollectorRegistry()))
        self.batches: list[int] = []

    async def handle_batch(
        self, deliveries: Sequence[D], *, acknowledge: AcknowledgeInOrder[D] | None = None
    ) -> list[Outcome]:
        self.batches.append(len(deliveries))
        if acknowledge is None:
            return await super().handle_batch(deliveries)
        return await super().handle_batch(deliveries, acknowledge=acknowledge)


def consumer_on(broker: MemoryBroker, relay: Relay) -> PartitionedConsumer:
    return PartitionedConsumer(
        MemoryPartitions(broker, TOPOLOGY, 0.01),
        relay,
        MemoryLeases(TOPOLOGY.partitions),
        prefetch=64,
        lease_ms=6000,
        registry=CollectorRegistry(),
        pause=MEMORY_PAUSE,
    )


async def test_waiting_messages_are_relayed_as_one_batch_and_acked() -> None:
    broker, store = MemoryBroker(), MemoryStore()
    for n in range(10):
        await broker.publish(body("b", f"c{n}"), partition=1)
    relay = RecordingRelay(store)
    consumer = consumer_on(broker, relay)
    running = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(5):
            while len(await store.board_after("b", 0)) < 10:
                await asyncio.sleep(0.01)
        assert consumer.owned == {0, 1}
    finally:
        running.cancel()
        await consumer.drain()
    assert relay.batches == [10]
    # Every message was acked: the drain handed nothing back.
    assert broker.partition(1).empty() and not broker.dead_letters


async def test_a_drain_hands_the_held_messages_back_in_order() -> None:
    class Refusing(MemoryStore):
        async def relay(
            self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
        ) -> RelayOutcome:
            raise redis_errors.OutOfMemoryError("command not allowed when used memory")

    broker = MemoryBroker()
    for n in range(5):
        await broker.publish(body("b", f"c{n}"))
    consumer = consumer_on(broker, Relay(Refusing(), settings(), RelayMetrics(CollectorRegistry())))
    running = asyncio.create_task(consumer.run())
    async with asyncio.timeout(5):
        while not consumer.paused:
            await asyncio.sleep(0.01)
    running.cancel()
    await consumer.drain()
    queue = broker.partition(0)
    returned = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [orjson.loads(m.body)["correlation_id"] for m in returned] == [f"c{n}" for n in range(5)]


async def test_the_memory_worker_relays_through_its_partitions_and_reports_them() -> None:
    transport = MemoryTransport()
    app = build_worker(settings(), memory=transport)
    async with app.router.lifespan_context(app):
        await transport.broker.publish(body("board", "one"))
        async with asyncio.timeout(5):
            while not await transport.store.board_after("board", 0):
                await asyncio.sleep(0.01)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        )
        async with client:
            ready = (await client.get("/readyz")).json()
            metrics = (await client.get("/metrics")).text
        await app.state.drain()
    assert ready["relay_running"] is True
    assert "advanced_worker_partitions_owned 2.0" in metrics


async def test_a_drain_out_of_time_abandons_the_partition_and_hands_its_message_back() -> None:
    class Hanging(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.called = asyncio.Event()

        async def relay(
            self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
        ) -> RelayOutcome:
            self.called.set()
            await asyncio.sleep(3600)  # a relay step that never ends
            raise AssertionError("unreachable")

    store = Hanging()
    transport = MemoryTransport(store=store)
    quick = settings().model_copy(update={"drain_timeout_seconds": 0.3})
    app = build_worker(quick, memory=transport)
    async with app.router.lifespan_context(app):
        await transport.broker.publish(body("board", "stuck"))
        async with asyncio.timeout(5):
            await store.called.wait()
        async with asyncio.timeout(2):
            await app.state.drain()
    [returned] = [
        transport.broker.queue.get_nowait() for _ in range(transport.broker.queue.qsize())
    ]
    assert orjson.loads(returned.body)["correlation_id"] == "stuck"
