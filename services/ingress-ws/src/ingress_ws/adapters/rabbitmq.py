"""Publishing board events to RabbitMQ: durable, persistent, confirmed, never silently dropped."""

from __future__ import annotations

import socket

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError
from envelope.models import BoardEventEnvelope
from envelope.topology import Topology

from ingress_ws.publisher import PublishUnavailable


class RabbitPublisher:
    def __init__(self, url: str, topology: Topology) -> None:
        self._url = url
        self._topology = topology
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": f"ingress-ws {socket.gethostname()}"},
        )
        # Confirms tell us the broker has the message; mandatory + on_return_raises turn an
        # unroutable publish (no queue bound yet) into an error instead of a silent drop.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange = await self._channel.declare_exchange(
            self._topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    @property
    def ready(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
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
            await self._exchange.publish(
                message, routing_key=self._topology.routing_key(envelope.board_id), mandatory=True
            )
        except (TimeoutError, DeliveryError, PublishError, AMQPError, ConnectionError) as exc:
            raise PublishUnavailable(
                f"RabbitMQ did not confirm the publish: {type(exc).__name__}"
            ) from exc
