"""`create_app(settings)`: the SSE gateway that EventSource clients reach directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from envelope.models import is_board_id
from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from realtime_runtime.auth import Authenticator, Principal, Unauthorized, credential_from
from realtime_runtime.feed import ActivityHub, ActivityStore, RedisActivityStore
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.presence import PresenceChanges, PresenceFanout, RedisPresenceChanges
from realtime_runtime.security import rate_limit_exceeded
from realtime_runtime.service import add_operations, redis_client
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address
from sse_starlette.sse import EventSourceResponse
from starlette.routing import Route

from sse_gateway.response import EventStreamResponse, Feed, pass_server_send
from sse_gateway.settings import GatewaySettings
from sse_gateway.streams import (
    ActivityFeed,
    BoardFeed,
    GatewayMetrics,
    activity_frame,
    board_frame,
    presence_frame,
)

log = structlog.get_logger("sse_gateway")


async def until_server_exit() -> None:
    """Until uvicorn is told to exit (a signal, or `should_exit` set on the server).

    sse-starlette's own watcher: one per process here, instead of an event per stream.
    """
    await EventSourceResponse._listen_for_exit_signal()


def create_app(settings: GatewaySettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    authenticator = Authenticator(settings)
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[settings.rate_limit_default],
    )
    hubs: dict[str, ActivityHub[bytes]] = {}
    open_streams: set[EventStreamResponse] = set()
    draining: list[bool] = []

    def end_streams() -> None:
        draining.append(True)
        for stream in list(open_streams):
            stream.end("shutdown")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            store: ActivityStore
            presence: PresenceChanges
            if settings.event_transport == "memory":
                transport = memory or MemoryTransport()
                store, presence = transport.store, transport.presence
            else:
                client = redis_client(settings)
                stack.push_async_callback(client.aclose)
                store = RedisActivityStore(client, settings.redis_keys)
                presence = RedisPresenceChanges(client, settings.redis_keys)
            hub: ActivityHub[bytes] = ActivityHub(
                store, render_board=board_frame, render_activity=activity_frame
            )
            hub.on_event = metrics.delivery.on_event
            hubs["hub"] = hub
            task = asyncio.create_task(hub.run())
            fanout = asyncio.create_task(PresenceFanout(presence, hub, presence_frame).run())

            async def end_streams_on_exit() -> None:
                await until_server_exit()
                end_streams()

            watcher = asyncio.create_task(end_streams_on_exit())
            try:
                yield
            finally:
                end_streams()
                for background in (task, fanout, watcher):
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background

    async def drain() -> None:
        end_streams()  # every open stream ends; EventSource clients reconnect elsewhere

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

    async def readiness() -> dict[str, bool | str]:
        hub = hubs.get("hub")
        connected = hub is not None and hub.connected.is_set()
        if settings.event_transport == "memory":
            return {"event_feed_connected": connected}  # no Redis to speak of
        return {"redis_connected": connected}

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

    def admit() -> None:
        hub = hubs["hub"]
        if draining:
            raise HTTPException(503, "This gateway is shutting down; reconnect to another.")
        if not hub.connected.is_set():
            raise HTTPException(503, "The event feed is not connected; retry shortly.")
        if len(open_streams) >= settings.sse_max_connections:
            raise HTTPException(503, "This gateway is at its connection limit; retry shortly.")

    def respond(feed: Feed, principal: Principal) -> EventStreamResponse:
        return EventStreamResponse(
            feed,
            metrics,
            heartbeat=settings.sse_heartbeat_seconds,
            send_timeout=settings.sse_send_timeout_seconds,
            expires_at=principal.expires_at,
            registry=open_streams,
        )

    def cursor_of(request: Request) -> str | None:
        return request.headers.get("last-event-id") or request.query_params.get("last_event_id")

    async def board_events(request: Request) -> EventStreamResponse:
        board_id: str = request.path_params["board_id"]
        if not is_board_id(board_id):
            raise HTTPException(422, "The board id must be 1-64 of [A-Za-z0-9_.-].")
        principal = authenticate(request)
        if not principal.may_access(board_id):
            raise HTTPException(403, "This token does not grant the board.")
        admit()
        feed = BoardFeed(
            hubs["hub"], metrics, board_id, cursor_of(request), settings.sse_send_queue
        )
        return respond(feed, principal)

    async def all_events(request: Request) -> EventStreamResponse:
        principal = authenticate(request)
        admit()
        feed = ActivityFeed(
            hubs["hub"], metrics, principal.boards, cursor_of(request), settings.sse_send_queue
        )
        return respond(feed, principal)

    # Starlette's routes, not FastAPI's: a stream lives for hours, and FastAPI's request
    # handling (dependency resolution, its exit stacks) held ≈ 4 KiB per idle stream.
    limit = limiter.limit(settings.activity_stream_rate_limit)
    app.router.routes += [
        Route("/sse/boards/{board_id}", limit(board_events), methods=["GET"]),
        Route("/sse/activity", limit(all_events), methods=["GET"]),
    ]
    pass_server_send(app)  # last: outside the security headers and every other middleware
    return app
