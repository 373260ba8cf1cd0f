"""The in-memory adapters: the ingress's ports on the process's RabbitMQ and Redis stand-ins
(`realtime_runtime.memory`), for the one-process suite and the unit tests."""

from __future__ import annotations

from envelope.models import BoardEventEnvelope
from limits.aio.storage import MemoryStorage
from realtime_runtime.memory import MemoryBroker, MemoryTransport

from ingress_ws.ports import Adapters
from ingress_ws.publisher import PublishUnavailable


class MemoryPublisher:
    """The `EventPublisher` on the in-memory broker: ready while the broker is available."""

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


def memory_adapters(transport: MemoryTransport) -> Adapters:
    return Adapters(
        publisher=MemoryPublisher(transport.broker),
        activity=transport.store,
        presence=transport.presence,
        rate_limits=MemoryStorage(),
        reports_brokers=False,
    )
