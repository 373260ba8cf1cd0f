"""`create_app(settings)`: the SSE gateway that EventSource clients reach directly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import orjson
import redis.asyncio as redis
import structlog
from envelope.auth import Authenticator, Principal, Unauthorized, credential_from
from envelope.feed import ActivityHub, ActivityStore, RedisActivityStore
from envelope.memory import MemoryTransport
from envelope.models import BOARD_ID_PATTERN
from envelope.security import rate_limit_exceeded
from envelope.service import add_operations
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address
from sse_starlette import EventSourceResponse, ServerSentEvent

from sse_gateway.settings import GatewaySettings
from sse_gateway.streams import (
    GatewayMetrics,
    activity_frame,
    activity_stream,
    board_stream,
    live_board_frame,
)

log = structlog.get_logger("sse_gateway")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def until_expiry(events: AsyncIterator[object], expires_at: float) -> AsyncIterator[object]:
    """The stream until its credential's `exp`, then a `close` event and the end.

    EventSource reconnects on its own; with the expired credential it then gets 401 and stops.
    """
    try:
        while (remaining := expires_at - time.time()) > 0:
            try:
                # In this task (no task per event): on timeout the generator is cancelled at
                # its await and its subscription released.
                async with asyncio.timeout(remaining):
                    item = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                break
            yield item
        yield ServerSentEvent(
            orjson.dumps({"reason": "token_expired", "detail": "authenticate again"}).decode(),
            event="close",
        )
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


def create_app(settings: GatewaySettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    authenticator = Authenticator(settings)
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[settings.rate_limit_default],
    )
    shutdown = anyio.Event()
    hubs: dict[str, ActivityHub[bytes]] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            store: ActivityStore
            if settings.event_transport == "memory":
                store = (memory or MemoryTransport()).store
            else:
                client = redis.from_url(
                    settings.redis_url.get_secret_value(), health_check_interval=5
                )
                stack.push_async_callback(client.aclose)
                store = RedisActivityStore(client, settings.redis_keys)
            hub: ActivityHub[bytes] = ActivityHub(
                store, render_board=live_board_frame(metrics), render_activity=activity_frame
            )
            hub.on_event = metrics.delivery.on_event
            hubs["hub"] = hub
            task = asyncio.create_task(hub.run())
            try:
                yield
            finally:
                shutdown.set()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def drain() -> None:
        shutdown.set()  # every open stream ends; EventSource clients reconnect elsewhere

    app = FastAPI(title="sse-gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.limiter = limiter
    app.state.drain = drain
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded)
    app.add_middleware(SlowAPIASGIMiddleware)  # pure ASGI: no BaseHTTPMiddleware around SSE
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=True,
        allow_methods=["GET"],
        allow_headers=["Authorization", "Last-Event-ID", "Cache-Control"],
    )

    async def readiness() -> dict[str, bool]:
        hub = hubs.get("hub")
        return {"redis_connected": hub is not None and hub.connected.is_set()}

    add_operations(app, settings, registry, readiness, exempt=limiter.exempt)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    def authenticate(request: Request) -> Principal:
        return authenticator.authenticate(
            credential_from(request.query_params, request.headers, request.cookies)
        )

    open_streams: set[object] = set()

    def admit() -> None:
        hub = hubs["hub"]
        if not hub.connected.is_set():
            raise HTTPException(503, "The event feed is not connected; retry shortly.")
        if len(open_streams) >= settings.sse_max_connections:
            raise HTTPException(503, "This gateway is at its connection limit; retry shortly.")

    def respond(
        route: str, events: AsyncIterator[object], principal: Principal
    ) -> EventSourceResponse:
        gauge = metrics.connections.labels(route)

        token = object()

        async def counted() -> AsyncIterator[object]:
            gauge.inc()
            open_streams.add(token)
            try:
                if principal.expires_at is None:
                    async for item in events:
                        yield item
                else:
                    async for item in until_expiry(events, principal.expires_at):
                        yield item
            finally:
                gauge.dec()
                open_streams.discard(token)

        return EventSourceResponse(
            counted(),
            headers=STREAM_HEADERS,
            ping=settings.sse_heartbeat_seconds,
            send_timeout=settings.sse_send_timeout_seconds,
            shutdown_event=shutdown,
        )

    def cursor_of(request: Request) -> str | None:
        return request.headers.get("last-event-id") or request.query_params.get("last_event_id")

    @app.get("/sse/boards/{board_id}")
    @limiter.limit(settings.activity_stream_rate_limit)
    async def board_events(
        request: Request, board_id: Annotated[str, Path(pattern=BOARD_ID_PATTERN)]
    ) -> EventSourceResponse:
        principal = authenticate(request)
        if not principal.may_access(board_id):
            raise HTTPException(403, "This token does not grant the board.")
        admit()
        events = board_stream(
            hubs["hub"],
            metrics,
            board_id,
            cursor_of(request),
            settings.sse_send_queue,
            send_timeout=settings.sse_send_timeout_seconds,
        )
        return respond("board", events, principal)

    @app.get("/sse/activity")
    @limiter.limit(settings.activity_stream_rate_limit)
    async def all_events(request: Request) -> EventSourceResponse:
        principal = authenticate(request)
        admit()
        events = activity_stream(
            hubs["hub"],
            metrics,
            principal.boards,
            cursor_of(request),
            settings.sse_send_queue,
            send_timeout=settings.sse_send_timeout_seconds,
        )
        return respond("activity", events, principal)

    return app
