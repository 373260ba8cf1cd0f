"""RabbitMQ side of the worker: topology, per-partition consumers, retries and the DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from envelope.topology import Topology

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
    """
    exchange = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    retry_exchange = await channel.declare_exchange(
        topology.retry_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    for partition in range(topology.partitions):
        queue = await channel.declare_queue(
            topology.partition_queue(partition),
            durable=True,
            arguments=topology.partition_queue_arguments,
        )
        await queue.bind(exchange, topology.partition_routing_key(partition))
    retry = await channel.declare_queue(
        topology.retry_queue,
        durable=True,
        arguments={"x-message-ttl": retry_delay_ms, "x-dead-letter-exchange": topology.exchange},
    )
    await retry.bind(retry_exchange, "#")
    await channel.declare_queue(topology.dlq_queue, durable=True)


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
    ) -> None:
        self.body = message.body
        self.attempts = failed_attempts(message, queue)
        self._message = message
        self._channel = channel
        self._topology = topology

    async def ack(self) -> None:
        await self._message.ack()

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
            mandatory=True,
        )
        await self._message.ack()  # only once the DLQ holds it (publisher confirm)


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
