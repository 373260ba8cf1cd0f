"""The ingress's port for accepted events (presence has its own: `presence.PresenceStore`).

Its adapters: `adapters.rabbitmq.RabbitPublisher` and `adapters.memory.MemoryPublisher`.
"""

from __future__ import annotations

from typing import Protocol

from envelope.models import BoardEventEnvelope


class PublishUnavailable(Exception):
    """The event could not be made durable; the client gets `error`/`unavailable`."""


class EventPublisher(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def node(self) -> str | None:
        """The broker node publishes go to now (`host:port`), if there is one."""
        ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(
        self, envelope: BoardEventEnvelope, body: bytes, headers: dict[str, str]
    ) -> None: ...
