"""The ingress's runtime state: built by the lifespan, read by every route and socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from limits import parse
from realtime_runtime.auth import Authenticator
from realtime_runtime.feed import ActivityHub
from starlette.requests import HTTPConnection

from ingress_ws.admission import HandshakeRate, SocketSlots
from ingress_ws.budgets import MessageBudget, PublishRate, UnconfirmedBytes
from ingress_ws.metrics import IngressMetrics
from ingress_ws.ports import Adapters
from ingress_ws.presence import BoardPresence, render_event_frame
from ingress_ws.publisher import EventPublisher
from ingress_ws.settings import IngressSettings

if TYPE_CHECKING:
    from ingress_ws.sessions import BoardSocket


class OpenSockets:
    """The board sockets open in this process; the drain waits until none is left."""

    def __init__(self) -> None:
        self._open: set[BoardSocket] = set()
        self._none_open = asyncio.Event()
        self._none_open.set()

    def add(self, sock: BoardSocket) -> None:
        self._open.add(sock)
        self._none_open.clear()

    def discard(self, sock: BoardSocket) -> None:
        self._open.discard(sock)
        if not self._open:
            self._none_open.set()

    def __iter__(self) -> Iterator[BoardSocket]:
        return iter(list(self._open))  # a copy: sockets leave while it is walked

    def __len__(self) -> int:
        return len(self._open)

    async def wait_closed(self) -> None:
        """Return once no socket is open."""
        await self._none_open.wait()


@dataclass
class IngressRuntime:
    """What every route and socket of one process shares (`app.state.runtime`)."""

    settings: IngressSettings
    authenticator: Authenticator
    publisher: EventPublisher
    hub: ActivityHub[str]
    presence: BoardPresence
    budget: MessageBudget
    publish_rate: PublishRate
    metrics: IngressMetrics
    unconfirmed: UnconfirmedBytes
    slots: SocketSlots
    handshakes: HandshakeRate
    # False on the in-memory transport: no broker to speak of in /readyz.
    reports_brokers: bool
    sockets: OpenSockets = field(default_factory=OpenSockets)
    accepting: bool = True  # False once the drain has begun: handshakes get 1001
    # The background loops (the broker connect, the feed, presence), cancelled by the drain.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def build_runtime(
    settings: IngressSettings, metrics: IngressMetrics, adapters: Adapters, instance: str
) -> IngressRuntime:
    """The runtime on `adapters`; its background loops are started by `start`."""
    presence = BoardPresence(adapters.presence, instance, ttl=settings.presence_ttl_seconds)
    hub: ActivityHub[str] = ActivityHub(
        adapters.activity,
        render_board=render_event_frame(presence),
        render_activity=lambda e: "",
    )
    hub.on_event = metrics.delivery.on_event
    hub.on_frame = metrics.feed_frames.inc
    client_limit = settings.websocket_client_rate_limit
    return IngressRuntime(
        settings=settings,
        authenticator=Authenticator(settings),
        publisher=adapters.publisher,
        hub=hub,
        presence=presence,
        budget=MessageBudget(
            adapters.rate_limits,
            parse(settings.websocket_rate_limit),
            parse(client_limit) if client_limit else None,
        ),
        publish_rate=PublishRate(adapters.rate_limits, parse(settings.http_publish_rate_limit)),
        metrics=metrics,
        unconfirmed=UnconfirmedBytes(
            settings.websocket_unconfirmed_max_bytes, metrics.unconfirmed_bytes
        ),
        slots=SocketSlots(settings.websocket_max_connections_per_credential),
        handshakes=HandshakeRate(parse(settings.websocket_handshake_rate_limit)),
        reports_brokers=adapters.reports_brokers,
    )


def runtime_of(connection: HTTPConnection) -> IngressRuntime:
    """The running app's state, which its lifespan set before any request was served."""
    runtime: IngressRuntime = connection.app.state.runtime
    return runtime
