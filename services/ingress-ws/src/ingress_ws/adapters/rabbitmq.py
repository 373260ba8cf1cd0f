"""Publishing board events to RabbitMQ: durable, persistent, confirmed, never silently dropped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange, AbstractRobustChannel
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from envelope.models import BoardEventEnvelope
from envelope.topology import Topology
from realtime_runtime.amqp import NODE_CONNECT_TIMEOUT_SECONDS, FailoverConnection, declare_queue

from ingress_ws.publisher import PublishUnavailable

# A publish the broker neither confirms nor refuses within this long (a connection that
# died silently, a broker blocking publishers on a resource alarm) is answered `unavailable`;
# the client resends with the same id, and the relay's idempotency makes that safe.
CONFIRM_TIMEOUT_SECONDS = 15.0

log = structlog.get_logger("ingress_ws")


class RabbitPublisher:
    def __init__(self, urls: Sequence[str], topology: Topology) -> None:
        self._urls = urls
        self._topology = topology
        self._connection: FailoverConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def connect(self) -> None:
        # Kept before connecting: a stop during the first attempt must be able to close it,
        # or aio-pika's reconnect task survives the cancellation (aio-pika #414) and the
        # process never exits (seen when uvicorn cannot bind its port).
        # The first node of ADVANCED_RABBITMQ_URL that answers; another one when it fails.
        self._connection = FailoverConnection(
            self._urls,
            client_properties={
                "connection_name": f"ingress-ws {socket.gethostname()} pid {os.getpid()}"
            },
        )
        await self._connection.connect(timeout=NODE_CONNECT_TIMEOUT_SECONDS)
        # Confirms tell us the broker has the message; mandatory + on_return_raises turn an
        # unroutable publish (no queue bound yet) into an error instead of a silent drop.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange = await self._channel.declare_exchange(
            self._topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await self._declare_partition_queues()

    async def _declare_partition_queues(self) -> None:
        """Durable partition queues, bound, as the worker declares them: an event acked before
        any worker ever ran waits in its queue instead of being refused as unroutable."""
        assert self._connection is not None
        topology = self._topology
        channel = await self._connection.channel()
        try:
            for partition in range(topology.partitions):
                # A queue of the other type raises QueueTypeMismatch, which stops the service.
                queue = await declare_queue(
                    channel,
                    topology.partition_queue(partition),
                    topology.partition_queue_arguments,
                )
                await queue.bind(topology.exchange, topology.partition_routing_key(partition))
        except AMQPError as exc:
            # Queues that exist with other arguments (an older deployment): publishing still
            # works through them, and an unroutable publish is still refused, never lost.
            log.warning(
                "could not declare the partition queues; publishing through what exists",
                error=repr(exc),
            )
        finally:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError):
                await channel.close()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    @property
    def node(self) -> str | None:
        """The RabbitMQ node (`host:port`) publishes go to now; None while not connected."""
        return self._connection.node if self._connection is not None else None

    @property
    def ready(self) -> bool:
        # A robust connection is not "closed" while it reconnects: `connected` tells.
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def publish(
        self, envelope: BoardEventEnvelope, body: bytes, headers: dict[str, str]
    ) -> None:
        if self._exchange is None or not self.ready:
            raise PublishUnavailable("RabbitMQ is not connected")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(envelope.event_id),
            correlation_id=envelope.correlation_id,
            headers=dict(headers),
        )
        try:
            # mandatory + on_return_raises: a message no queue takes raises instead of vanishing.
            async with asyncio.timeout(CONFIRM_TIMEOUT_SECONDS):
                await self._exchange.publish(
                    message,
                    routing_key=self._topology.routing_key(envelope.board_id),
                    mandatory=True,
                )
        except (
            TimeoutError,
            AMQPError,  # DeliveryError and PublishError (nack, return) included
            ChannelInvalidStateError,  # the channel closed under the publish
            ConnectionError,
        ) as exc:
            raise PublishUnavailable(
                f"RabbitMQ did not confirm the publish: {type(exc).__name__}"
            ) from exc
