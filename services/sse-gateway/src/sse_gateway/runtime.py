"""The gateway while it runs: its hub and open streams, admission, readiness and the drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypedDict

import structlog
from fastapi import FastAPI, HTTPException
from realtime_runtime.auth import Principal
from realtime_runtime.feed import ActivityHub
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.presence import PresenceFanout

from sse_gateway.response import EventStreamResponse, Feed
from sse_gateway.settings import GatewaySettings
from sse_gateway.streams import GatewayMetrics, activity_frame, board_frame, presence_frame
from sse_gateway.transport import open_transport

log = structlog.get_logger("sse_gateway")


class OpenStreams(set[EventStreamResponse]):
    """The streams open now (each adds and discards itself); `none` is set while empty."""

    def __init__(self) -> None:
        super().__init__()
        self.none = asyncio.Event()
        self.none.set()

    def add(self, stream: EventStreamResponse) -> None:
        super().add(stream)
        self.none.clear()

    def discard(self, stream: object) -> None:
        super().discard(stream)
        if not self:
            self.none.set()


@dataclass
class GatewayRuntime:
    """What the lifespan opened; the routes read it from the request's state."""

    hub: ActivityHub[bytes]
    feed_flag: str
    open_streams: OpenStreams = field(default_factory=OpenStreams)
    draining: bool = False


class GatewayState(TypedDict):
    gateway: GatewayRuntime


class Gateway:
    """Opens the feed for the lifespan; admits, answers and drains the streams."""

    def __init__(
        self, settings: GatewaySettings, metrics: GatewayMetrics, memory: MemoryTransport | None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.memory = memory
        self.runtime: GatewayRuntime | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[GatewayState]:
        async with open_transport(self.settings, self.memory) as transport:  # closes the client
            hub: ActivityHub[bytes] = ActivityHub(
                transport.store, render_board=board_frame, render_activity=activity_frame
            )
            hub.on_event = self.metrics.delivery.on_event
            hub.on_frame = self.metrics.feed_frames.inc
            runtime = self.runtime = GatewayRuntime(hub, transport.feed_flag)
            fanout = PresenceFanout(transport.presence, hub, presence_frame)
            background = [asyncio.create_task(hub.run()), asyncio.create_task(fanout.run())]
            try:
                yield {"gateway": runtime}
            finally:
                # By now uvicorn has waited for the streams (the drain ended them).
                for task in background:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def readiness(self) -> dict[str, bool | str]:
        runtime = self.runtime
        if runtime is None:
            return {"redis_connected": False}
        return {runtime.feed_flag: runtime.hub.connected.is_set()}

    async def drain(self) -> None:
        """The one way streams end at shutdown (SIGTERM, or any exit of the server).

        1. stop accepting: new streams get 503;
        2. tell every open stream to close: it ends after its current write, cleanly, and
           EventSource reconnects elsewhere;
        3. wait up to `ADVANCED_DRAIN_TIMEOUT_SECONDS` for them to end;
        4. cut what is left (a write blocked on a client that stopped reading);
        5. the clients close when the lifespan ends, after uvicorn closed the connections.
        """
        runtime = self.runtime
        if runtime is None:
            return
        runtime.draining = True
        for stream in list(runtime.open_streams):
            stream.end("shutdown")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                runtime.open_streams.none.wait(), self.settings.drain_timeout_seconds
            )
        if runtime.open_streams:
            log.warning("drain timed out; cutting the streams left", left=len(runtime.open_streams))
            for stream in list(runtime.open_streams):
                stream.cut()


def admit(runtime: GatewayRuntime, settings: GatewaySettings) -> None:
    if runtime.draining:
        raise HTTPException(503, "This gateway is shutting down; reconnect to another.")
    if not runtime.hub.connected.is_set():
        raise HTTPException(503, "The event feed is not connected; retry shortly.")
    if len(runtime.open_streams) >= settings.sse_max_connections:
        raise HTTPException(503, "This gateway is at its connection limit; retry shortly.")


def respond(
    runtime: GatewayRuntime,
    settings: GatewaySettings,
    metrics: GatewayMetrics,
    feed: Feed,
    principal: Principal,
) -> EventStreamResponse:
    return EventStreamResponse(
        feed,
        metrics,
        heartbeat=settings.sse_heartbeat_seconds,
        send_timeout=settings.sse_send_timeout_seconds,
        expires_at=principal.expires_at,
        registry=runtime.open_streams,
    )
