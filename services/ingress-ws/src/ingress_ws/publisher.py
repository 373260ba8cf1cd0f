"""The ingress's port for accepted events (presence has its own: `presence.PresenceStore`)."""

from __future__ import annotations

from typing import Protocol

from envelope.models import BoardEventEnvelope
from realtime_runtime.memory import MemoryBroker


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


class MemoryPublisher:
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def connect(self) -> None:
        return None

    @property
    def node(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    @property
    def ready(self) -> bool:
        return self._broker.available

    async def publish(
        self, envelope: BoardEventEnvelope, body: bytes, headers: dict[str, str]
    ) -> None:
        try:
            await self._broker.publish(body, dict(headers))
        except ConnectionError as exc:
            raise PublishUnavailable(str(exc)) from exc
