"""The worker's acks on the real RabbitMQ: one `basic.ack(multiple=True)` per run of a batch,
never one that covers a delivery which is not settled.

What RabbitMQ holds afterwards is the proof: a multiple ack that covered a rejected delivery
would make its reject fail (and it would never reach the dead-letter queue); one that covered
a delivery left unsettled would lose it instead of handing it back when the channel closes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import orjson
import pytest
import redis.asyncio as redis
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from envelope.topology import RedisKeys, Topology
from prometheus_client import CollectorRegistry
from realtime_runtime.memory import MemoryStore, RelayOutcome
from redis.exceptions import ResponseError
from relay_worker.adapters.rabbitmq import AmqpDelivery, PartitionAcks, PartitionInbox
from relay_worker.adapters.redis import RedisRelayStore
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings
from support.brokers import Brokers
from support.envelopes import envelope_body

pytestmark = [pytest.mark.brokers]


class FailingStore(MemoryStore):
    """Redis as the memory store, except that the relay step of the ids in `failing` fails."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__()
        self.failing = failing

    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome:
        if correlation_id in self.failing:
            # A failure of the message (not of Redis): it takes the retry path.
            raise ResponseError("value is not an integer or out of range")
        return await super().relay(board_id, correlation_id, body, ttl_seconds)


@dataclass
class Partition:
    connection: AbstractRobustConnection
    channel: AbstractChannel
    queue: AbstractQueue
    rejected: AbstractQueue  # where a rejected delivery dead-letters (the retry queue's role)
    topology: Topology


@pytest.fixture
async def partition(brokers: Brokers) -> AsyncIterator[Partition]:
    tag = f"t.acks.{uuid.uuid4().hex[:12]}"
    topology = Topology(
        exchange=f"{tag}.events",
        queue=f"{tag}.events",
        retry_queue=f"{tag}.retry",
        dlq_queue=f"{tag}.dlq",
        partitions=1,
    )
    connection = await aio_pika.connect_robust(brokers.rabbitmq_url)
    setup = await connection.channel()
    retry_exchange = await setup.declare_exchange(
        topology.retry_exchange, aio_pika.ExchangeType.FANOUT
    )
    rejected = await setup.declare_queue(topology.retry_queue)
    await rejected.bind(retry_exchange)
    await setup.declare_queue(
        topology.partition_queue(0), arguments={"x-dead-letter-exchange": retry_exchange.name}
    )
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=64)
    queue = await channel.declare_queue(topology.partition_queue(0), passive=True)
    try:
        yield Partition(connection, channel, queue, rejected, topology)
    finally:
        cleanup = await connection.channel()
        for name in (topology.partition_queue(0), topology.retry_queue):
            await cleanup.queue_delete(name)
        await cleanup.exchange_delete(topology.retry_exchange)
        await connection.close()


async def publish(partition: Partition, bodies: list[bytes]) -> None:
    for body in bodies:
        await partition.channel.default_exchange.publish(
            aio_pika.Message(body), routing_key=partition.queue.name
        )


async def take(partition: Partition, inbox: PartitionInbox, count: int) -> list[AmqpDelivery]:
    """One batch of exactly `count` deliveries, once RabbitMQ has pushed them all."""
    for _ in range(100):
        if inbox.waiting >= count:
            break
        await asyncio.sleep(0.05)
    batch = await inbox.next_batch(count)
    assert batch is not None and len(batch) == count
    name = partition.queue.name
    return [AmqpDelivery(message, partition.channel, partition.topology, name) for message in batch]


async def count_in(connection: AbstractRobustConnection, name: str) -> int:
    async with connection.channel() as channel:
        declared = await channel.declare_queue(name, passive=True)
        return declared.declaration_result.message_count or 0


def relay_on(store: MemoryStore) -> Relay:
    return Relay(
        store, WorkerSettings(environment="development"), RelayMetrics(CollectorRegistry())
    )


async def test_a_batch_is_acked_with_one_multiple_ack(partition: Partition) -> None:
    await publish(partition, [envelope_body("acks", f"ok-{n}") for n in range(5)])
    inbox = PartitionInbox(partition.channel)
    await partition.queue.consume(inbox.deliver)
    acks = PartitionAcks()

    deliveries = await take(partition, inbox, 5)
    outcomes = await relay_on(MemoryStore()).handle_batch(deliveries, acknowledge=acks.ack_in_order)

    assert outcomes == ["delivered"] * 5
    assert acks.frames == 1
    await partition.channel.close()  # anything not acked would go back to the queue now
    assert await count_in(partition.connection, partition.queue.name) == 0
    inbox.close()


async def test_a_failed_delivery_in_the_middle_is_not_acked_by_the_multiple_ack(
    partition: Partition,
) -> None:
    ids = [f"m-{n}" for n in range(6)]
    await publish(partition, [envelope_body("acks", i) for i in ids])
    inbox = PartitionInbox(partition.channel)
    await partition.queue.consume(inbox.deliver)
    acks = PartitionAcks()

    deliveries = await take(partition, inbox, 6)
    outcomes = await relay_on(FailingStore({"m-2"})).handle_batch(
        deliveries, acknowledge=acks.ack_in_order
    )

    assert outcomes == ["delivered", "delivered", "retried", "delivered", "delivered", "delivered"]
    # m-0..m-1 acked before the reject of m-2, then m-3..m-5: two frames, each a multiple ack.
    assert acks.frames == 2
    await partition.channel.close()
    assert await count_in(partition.connection, partition.queue.name) == 0
    # m-2 was rejected (into the retry queue), not swallowed by the ack of m-5.
    async with partition.connection.channel() as channel:
        retry = await channel.declare_queue(partition.rejected.name, passive=True)
        message = await retry.get(timeout=5)
        assert message is not None
        assert orjson.loads(message.body)["correlation_id"] == "m-2"
        await message.ack()
    inbox.close()


async def test_a_channel_with_a_delivery_left_unsettled_is_acked_one_by_one(
    partition: Partition,
) -> None:
    await publish(partition, [envelope_body("acks", f"u-{n}") for n in range(5)])
    inbox = PartitionInbox(partition.channel)
    await partition.queue.consume(inbox.deliver)
    acks = PartitionAcks()

    first = await take(partition, inbox, 2)
    await first[0].ack()
    # Settling the second failed (as when the DLQ refuses a publish): it stays unacked.
    acks.left_unsettled(first[1:])
    rest = await take(partition, inbox, 3)
    await acks.ack_in_order(rest)

    assert acks.frames == 3  # one by one: a multiple ack would have covered u-1
    await partition.channel.close()
    async with partition.connection.channel() as channel:
        queue = await channel.declare_queue(partition.queue.name, passive=True)
        assert queue.declaration_result.message_count == 1
        message = await queue.get(timeout=5)
        assert message is not None
        assert orjson.loads(message.body)["correlation_id"] == "u-1"
        await message.ack()
    inbox.close()


async def test_the_inbox_ends_when_the_channel_is_closed_for_good(partition: Partition) -> None:
    inbox = PartitionInbox(partition.channel)
    await partition.queue.consume(inbox.deliver)
    waiting = asyncio.create_task(inbox.next_batch(10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await partition.channel.close()
    assert await asyncio.wait_for(waiting, 5) is None


async def test_the_relay_pipeline_reloads_a_script_redis_lost(brokers: Brokers) -> None:
    keys = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=f"t:{uuid.uuid4().hex}")
    client = redis.from_url(brokers.redis_url)
    store = RedisRelayStore(client, keys, 100)
    # As after a Redis restart without its script cache (never SCRIPT FLUSH a shared Redis):
    # the pipeline's EVALSHA meets NOSCRIPT.
    store.sha = "0" * 40
    try:
        steps = [("lost", f"id-{n}", envelope_body("lost", f"id-{n}")) for n in range(3)]
        outcomes = await store.relay_many(steps, 60)
        assert [(o.delivered, o.sequence) for o in outcomes if isinstance(o, RelayOutcome)] == [
            (True, 1),
            (True, 2),
            (True, 3),
        ]
    finally:
        stale = [key async for key in client.scan_iter(match=f"{keys.prefix}*")]
        if stale:
            await client.delete(*stale)
        await client.aclose()
