"""RabbitMQ side of the worker: topology, per-partition consumers, retries and the DLQ."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import aio_pika
import aiormq.abc
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import ChannelInvalidStateError
from envelope.topology import Topology
from realtime_runtime.amqp import declare_queue

from relay_worker.ports import PartitionDelivery

log = structlog.get_logger("relay_worker")

REASON_HEADER = "x-advanced-failure-reason"
ATTEMPTS_HEADER = "x-advanced-attempts"
ROUTING_KEY_HEADER = "x-advanced-routing-key"


async def declare_topology(
    channel: AbstractChannel, topology: Topology, retry_delay_ms: int
) -> None:
    """Durable exchange, one durable single-active-consumer queue per partition, retry and DLQ.

    A rejected message dead-letters to the retry exchange; the retry queue holds it for the
    back-off delay, then dead-letters it back to the main exchange under its own routing key.
    Every queue is of `topology.queue_type`; one of the other type raises `QueueTypeMismatch`.
    """
    exchange = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    retry_exchange = await channel.declare_exchange(
        topology.retry_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    for partition in range(topology.partitions):
        queue = await declare_queue(
            channel, topology.partition_queue(partition), topology.partition_queue_arguments
        )
        await queue.bind(exchange, topology.partition_routing_key(partition))
    retry = await declare_queue(
        channel, topology.retry_queue, topology.retry_queue_arguments(retry_delay_ms)
    )
    await retry.bind(retry_exchange, "#")
    await declare_queue(channel, topology.dlq_queue, topology.dlq_queue_arguments)


def failed_attempts(message: AbstractIncomingMessage, queue_name: str) -> int:
    """How often this message was rejected from `queue_name`, read from RabbitMQ's x-death."""
    deaths: Any = (message.headers or {}).get("x-death") or []
    return sum(
        int(death.get("count", 0))
        for death in deaths
        if isinstance(death, dict)
        and death.get("queue") == queue_name
        and death.get("reason") == "rejected"
    )


class AmqpDelivery:
    def __init__(
        self,
        message: AbstractIncomingMessage,
        channel: AbstractChannel,
        topology: Topology,
        queue: str,
        *,
        confirm_timeout: float = 15.0,
    ) -> None:
        self.body = message.body
        self._confirm_timeout = confirm_timeout
        self.attempts = failed_attempts(message, queue)
        self._message = message
        self._channel = channel
        self._topology = topology
        try:
            # The AMQP channel that delivered it: delivery tags count per channel, and a
            # robust reconnect replaces it under the same aio-pika channel.
            self.delivered_on: aiormq.abc.AbstractChannel | None = message.channel
        except ChannelInvalidStateError:
            self.delivered_on = None  # closed already: settling it fails, RabbitMQ redelivers

    @property
    def channel_lost(self) -> bool:
        return self.delivered_on is None or self.delivered_on.is_closed

    async def ack(self, *, multiple: bool = False) -> None:
        """`multiple=True` also acks every earlier unsettled delivery of the channel."""
        await self._message.ack(multiple=multiple)

    async def retry(self, reason: str) -> None:
        await self._message.reject(requeue=False)  # dead-letters into the retry queue

    async def dead_letter(self, reason: str) -> None:
        headers = {
            key: value for key, value in (self._message.headers or {}).items() if key != "x-death"
        }
        headers.update(
            {
                REASON_HEADER: reason[:1000],
                ATTEMPTS_HEADER: self.attempts + 1,
                ROUTING_KEY_HEADER: self._message.routing_key or "",
            }
        )
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                self.body,
                headers=headers,
                message_id=self._message.message_id or str(uuid.uuid4()),
                content_type=self._message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self._topology.dlq_queue,
            mandatory=True,  # unroutable raises, as a nack does (x-overflow=reject-publish)
            timeout=self._confirm_timeout,  # no confirm by then: refused, the partition pauses
        )
        await self._message.ack()  # only once the DLQ holds it (publisher confirm)


class PartitionAcks:
    """Acks a partition's deliveries, a run of them with one `basic.ack(multiple=True)`.

    A multiple ack settles every unacked delivery of its channel up to its delivery tag, so it
    is sent only where nothing before it can still be pending: a partition takes deliveries in
    order and settles each batch before it takes the next, the relay hands over a run only
    once every earlier delivery of the batch is settled (acked, retried or dead-lettered), and
    a channel on which a batch was left part-settled is acked one message at a time from then
    on (`left_unsettled`).
    """

    def __init__(self) -> None:
        self._one_by_one: weakref.WeakSet[aiormq.abc.AbstractChannel] = weakref.WeakSet()
        self.frames = 0  # ack frames sent, for the tests

    def left_unsettled(self, deliveries: Sequence[AmqpDelivery]) -> None:
        for delivery in deliveries:
            if delivery.delivered_on is not None:
                self._one_by_one.add(delivery.delivered_on)

    async def ack_in_order(self, deliveries: Sequence[AmqpDelivery]) -> None:
        start = 0
        while start < len(deliveries):
            channel = deliveries[start].delivered_on
            end = start + 1
            while end < len(deliveries) and deliveries[end].delivered_on is channel:
                end += 1
            run = deliveries[start:end]
            if len(run) > 1 and channel is not None and channel not in self._one_by_one:
                await run[-1].ack(multiple=True)
                self.frames += 1
            else:
                for delivery in run:
                    await delivery.ack()
                    self.frames += 1
            start = end


class PartitionInbox:
    """What RabbitMQ pushed to a partition's consumer, waiting for the next batch, in order.

    The consumer callback only appends: no queue iterator, no task of our own per delivery.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self._messages: collections.deque[AbstractIncomingMessage] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        # A robust channel completes `closed()` only when it is closed for good.
        self._closed = asyncio.ensure_future(channel.closed())
        self._closed.add_done_callback(lambda _: self._wake_up())

    async def deliver(self, message: AbstractIncomingMessage) -> None:
        self._messages.append(message)
        self._wake_up()

    @property
    def waiting(self) -> int:
        return len(self._messages)

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def next_batch(self, limit: int) -> list[AbstractIncomingMessage] | None:
        """The next message and whatever else is already waiting on the same AMQP channel;
        None once the channel is closed for good."""
        while not self._messages:
            if self._closed.done():
                return None
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        messages = self._messages
        first = messages.popleft()
        batch = [first]
        channel = _delivered_on(first)
        # A batch never spans a reconnect: its acks go to the channel that delivered it.
        while messages and len(batch) < limit and _delivered_on(messages[0]) is channel:
            batch.append(messages.popleft())
        return batch

    def close(self) -> None:
        self._closed.cancel()


def _delivered_on(message: AbstractIncomingMessage) -> aiormq.abc.AbstractChannel | None:
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


@contextlib.asynccontextmanager
async def partition_messages(
    connection: AbstractRobustConnection, queue_name: str, prefetch: int
) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
    """A channel of its own per partition: closing it hands every unacked message back in order.

    The queue is declared (passively) on the channel, not merely named: only a declared queue
    is restored with its consumer when the robust connection reconnects. A queue that is
    just named keeps a consumer that silently never receives again.
    """
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        yield channel, queue
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


class AmqpPartitionSource:
    """A partition's consumer on its own channel: the inbox it reads, the acks it sends."""

    def __init__(
        self, channel: AbstractChannel, topology: Topology, queue: str, confirm_timeout: float
    ) -> None:
        self.inbox = PartitionInbox(channel)
        self.acks = PartitionAcks()
        self._channel = channel
        self._topology = topology
        self._queue = queue
        self._confirm_timeout = confirm_timeout

    async def next_batch(self, limit: int) -> list[AmqpDelivery] | None:
        batch = await self.inbox.next_batch(limit)
        if batch is None:
            return None
        return [
            AmqpDelivery(
                message,
                self._channel,
                self._topology,
                self._queue,
                confirm_timeout=self._confirm_timeout,
            )
            for message in batch
        ]

    async def ack_in_order(self, deliveries: Sequence[PartitionDelivery]) -> None:
        await self.acks.ack_in_order(cast(Sequence[AmqpDelivery], deliveries))

    def left_unsettled(self, deliveries: Sequence[PartitionDelivery]) -> None:
        self.acks.left_unsettled(cast(Sequence[AmqpDelivery], deliveries))


class AmqpPartitions:
    """The partition queues of the topology on one robust connection (`PartitionBroker`)."""

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, confirm_timeout: float
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._confirm_timeout = confirm_timeout
        self._depth_channel: AbstractChannel | None = None

    @contextlib.asynccontextmanager
    async def partition(self, partition: int, prefetch: int) -> AsyncIterator[AmqpPartitionSource]:
        name = self._topology.partition_queue(partition)
        async with partition_messages(self._connection, name, prefetch) as (channel, queue):
            source = AmqpPartitionSource(channel, self._topology, name, self._confirm_timeout)
            try:
                # A consumer of the queue object itself, so that the robust channel restores
                # it after a reconnect. Closing the channel (on the way out) hands every
                # unacked message back to RabbitMQ, in order.
                await queue.consume(source.inbox.deliver)
                yield source
            finally:
                source.inbox.close()

    async def queue_depths(self) -> dict[str, int]:
        """On one channel kept open: each reading costs RabbitMQ a passive declaration per
        queue, a cost paid whatever the traffic."""
        if self._depth_channel is None or self._depth_channel.is_closed:
            self._depth_channel = await self._connection.channel()
        channel = self._depth_channel
        topology = self._topology
        names = [topology.partition_queue(p) for p in range(topology.partitions)]
        names += [topology.retry_queue, topology.dlq_queue]
        depths: dict[str, int] = {}
        try:
            # On the AMQP channel itself: aio-pika's robust channel answers a repeated passive
            # declaration from its cache, with the count of the first.
            underlay = await channel.get_underlay_channel()
            for name in names:
                declared = await underlay.queue_declare(name, passive=True)
                depths[name] = declared.message_count or 0
        except BaseException:
            # A queue that is gone closes the channel (404); start afresh next time.
            self._depth_channel = None
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        return depths


async def dlq_messages(
    connection: AbstractRobustConnection, topology: Topology
) -> AsyncIterator[tuple[AbstractChannel, AbstractIncomingMessage]]:
    """Every message now in the DLQ, unacked; closing the channel puts back what is not acked."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(topology.dlq_queue, passive=True)
    depth = queue.declaration_result.message_count or 0
    seen = 0
    try:
        while seen < depth:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                return
            seen += 1
            yield channel, message
    finally:
        await asyncio.shield(channel.close())
