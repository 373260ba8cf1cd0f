"""`create_app(settings)`: the WebSocket ingress and the playground page."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as redis
import structlog
from envelope.auth import Authenticator, Unauthorized, credential_from
from envelope.feed import ActivityHub, RedisActivityStore
from envelope.memory import MemoryTransport
from envelope.models import BOARD_ID_PATTERN
from envelope.service import add_operations, keep_trying
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from prometheus_client import CollectorRegistry
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIMiddleware
from slowapi.util import get_remote_address

from ingress_ws.adapters.rabbitmq import RabbitPublisher
from ingress_ws.adapters.redis import RedisPresence
from ingress_ws.presence import BoardPresence
from ingress_ws.publisher import EventPublisher, MemoryPublisher, PresenceStore
from ingress_ws.sessions import (
    CLOSE_BAD_BOARD,
    CLOSE_FORBIDDEN,
    CLOSE_GOING_AWAY,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORISED,
    BoardSocket,
    IngressMetrics,
    IngressRuntime,
    render_event_frame,
)
from ingress_ws.settings import IngressSettings

log = structlog.get_logger("ingress_ws")
STATIC = Path(__file__).parent / "static"
BOARD_ID = re.compile(BOARD_ID_PATTERN)


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Browsers always send Origin: it must be listed, or the page's own origin."""
    if origin is None:
        return True  # not a browser (scripts, websocat): the credential is what protects us
    if origin in allowed:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


def create_app(settings: IngressSettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = IngressMetrics(registry)
    authenticator = Authenticator(settings)
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[settings.rate_limit_default],
    )
    instance = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    holder: dict[str, IngressRuntime] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            publisher: EventPublisher
            presence_store: PresenceStore
            if settings.event_transport == "memory":
                transport = memory or MemoryTransport()
                publisher = MemoryPublisher(transport.broker)
                store = transport.store
                presence_store, activity = store, store
            else:
                client = redis.from_url(
                    settings.redis_url.get_secret_value(), health_check_interval=5
                )
                stack.push_async_callback(client.aclose)
                publisher = RabbitPublisher(
                    settings.rabbitmq_url.get_secret_value(), settings.topology
                )
                presence_store = RedisPresence(client, settings.redis_keys)
                activity = RedisActivityStore(client, settings.redis_keys)  # type: ignore[assignment]
            stack.push_async_callback(publisher.close)

            presence = BoardPresence(presence_store, instance)
            hub: ActivityHub[str] = ActivityHub(
                activity,
                render_board=render_event_frame(presence, metrics),
                render_activity=lambda e: "",
            )
            runtime = IngressRuntime(
                settings=settings,
                publisher=publisher,
                hub=hub,
                presence=presence,
                limiter=MovingWindowRateLimiter(MemoryStorage()),
                limit=parse(settings.websocket_rate_limit),
                metrics=metrics,
            )
            holder["runtime"] = runtime
            tasks = [
                asyncio.create_task(keep_trying(publisher.connect, "RabbitMQ", log)),
                asyncio.create_task(hub.run()),
                asyncio.create_task(presence.run()),
            ]
            try:
                yield
            finally:
                await drain()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await presence.clear()

    async def drain() -> None:
        """Tell every open socket that this instance is going away (close 1001)."""
        runtime = holder.get("runtime")
        if runtime is not None:
            await asyncio.gather(
                *(
                    sock.close(CLOSE_GOING_AWAY, "server shutting down")
                    for sock in list(runtime.sockets)
                )
            )

    app = FastAPI(title="ingress-ws", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.limiter = limiter
    app.state.drain = drain
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIMiddleware)

    async def readiness() -> dict[str, bool]:
        runtime = holder.get("runtime")
        rabbit = runtime is not None and runtime.publisher.ready
        redis_ok = runtime is not None and runtime.hub.connected.is_set()
        return {
            "event_pipeline_ready": rabbit and redis_ok,
            "rabbitmq_connected": rabbit,
            "redis_connected": redis_ok,
        }

    add_operations(app, settings, registry, readiness, exempt=limiter.exempt)

    @app.get("/", include_in_schema=False)
    async def playground(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/playground/config.json", include_in_schema=False)
    async def playground_config(request: Request) -> dict[str, object]:
        return {
            "sse_public_url": settings.sse_public_url,
            "reconnect_initial_ms": settings.reconnect_initial_ms,
            "reconnect_max_ms": settings.reconnect_max_ms,
        }

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.websocket("/ws/boards/{board_id}")
    async def board_socket(websocket: WebSocket, board_id: str) -> None:
        runtime = holder["runtime"]
        await websocket.accept()
        if not BOARD_ID.match(board_id):
            await websocket.close(CLOSE_BAD_BOARD, "board id must be 1-64 of [A-Za-z0-9_.-]")
            return
        if not origin_allowed(
            websocket.headers.get("origin"), websocket.headers.get("host"), settings.allowed_origins
        ):
            await websocket.close(CLOSE_FORBIDDEN, "origin not allowed")
            return
        try:
            principal = authenticator.authenticate(
                credential_from(websocket.query_params, websocket.headers, websocket.cookies)
            )
        except Unauthorized as exc:
            await websocket.close(CLOSE_UNAUTHORISED, str(exc)[:120])
            return
        if not principal.may_access(board_id):
            await websocket.close(CLOSE_FORBIDDEN, "this token does not grant the board")
            return
        if runtime.presence.connections >= settings.websocket_max_connections:
            await websocket.close(CLOSE_TRY_AGAIN, "instance at its connection limit")
            return
        cursor = websocket.query_params.get("after") or websocket.query_params.get("last_event_id")
        resume_after = int(cursor) if cursor and cursor.isdigit() else None
        await BoardSocket(websocket, board_id, principal, runtime).run(resume_after)

    return app
