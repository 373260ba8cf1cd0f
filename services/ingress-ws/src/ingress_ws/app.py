"""`create_app(settings)`: the WebSocket ingress and the playground page."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from envelope.codes import CloseCode
from envelope.models import is_board_id
from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from limits import parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from prometheus_client import CollectorRegistry
from realtime_runtime.amqp import QueueTypeMismatch
from realtime_runtime.auth import (
    HOST_SESSION_COOKIE,
    SESSION_COOKIE,
    Authenticator,
    Credential,
    Unauthorized,
    credential_source,
    session_cookie_name,
)
from realtime_runtime.feed import ActivityHub, RedisActivityStore
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.presence import PresenceFanout
from realtime_runtime.security import (
    rate_limit_exceeded,
    shows_browser_marks,
    websocket_origin_allowed,
)
from realtime_runtime.service import add_operations, keep_trying, redis_client
from realtime_runtime.settings import DEFAULT_TOKEN
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address
from starlette.routing import WebSocketRoute

from ingress_ws.adapters.rabbitmq import RabbitPublisher
from ingress_ws.adapters.redis import RedisPresence
from ingress_ws.admission import HandshakeRate, SocketSlots, credential_key
from ingress_ws.http_api import PublishRate, add_http_api
from ingress_ws.presence import BoardPresence, PresenceStore, is_client_id, render_event_frame
from ingress_ws.presence_api import add_presence_api
from ingress_ws.publisher import EventPublisher, MemoryPublisher
from ingress_ws.refresh import CredentialLease
from ingress_ws.sessions import (
    BoardSocket,
    IngressMetrics,
    IngressRuntime,
    MessageBudget,
    UnconfirmedBytes,
)
from ingress_ws.settings import IngressSettings

log = structlog.get_logger("ingress_ws")
STATIC = Path(__file__).parent / "static"


def origin_allowed(
    websocket: WebSocket, credential: Credential | None, settings: IngressSettings
) -> bool:
    """The handshake's `Origin` against the allowlist (see `websocket_origin_allowed`)."""
    headers = websocket.headers
    from_browser = shows_browser_marks(headers) or (
        credential is not None and credential.source == "cookie"
    )
    return websocket_origin_allowed(
        headers.get("origin"),
        headers.get("host"),
        settings.allowed_origins,
        from_browser=from_browser,
        require_origin=settings.websocket_require_origin,
    )


def rate_limit_storage(settings: IngressSettings) -> Storage:
    """Redis (redis-py's asyncio client, `async+redis://`) for the RabbitMQ transport, so limits
    hold across replicas; memory for the in-memory transport."""
    if settings.event_transport == "memory":
        return MemoryStorage()
    return RedisStorage(
        "async+" + settings.redis_url.get_secret_value(),
        implementation="redispy",
        key_prefix=f"{settings.redis_key_prefix}limits",
        wrap_exceptions=True,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )


def create_app(settings: IngressSettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = IngressMetrics(registry)
    authenticator = Authenticator(settings)
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[settings.rate_limit_default],
    )
    instance = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    slots = SocketSlots(settings.websocket_max_connections_per_credential)
    handshakes = HandshakeRate(parse(settings.websocket_handshake_rate_limit))
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
                presence_store, activity = transport.presence, store
            else:
                client = redis_client(settings)
                stack.push_async_callback(client.aclose)
                publisher = RabbitPublisher(settings.rabbitmq_urls, settings.topology)
                presence_store = RedisPresence(client, settings.redis_keys)
                activity = RedisActivityStore(client, settings.redis_keys)  # type: ignore[assignment]
            stack.push_async_callback(publisher.close)

            presence = BoardPresence(presence_store, instance, ttl=settings.presence_ttl_seconds)
            hub: ActivityHub[str] = ActivityHub(
                activity,
                render_board=render_event_frame(presence),
                render_activity=lambda e: "",
            )
            hub.on_event = metrics.delivery.on_event
            budget = MessageBudget(
                rate_limit_storage(settings),
                parse(settings.websocket_rate_limit),
                parse(settings.websocket_client_rate_limit)
                if settings.websocket_client_rate_limit
                else None,
            )
            runtime = IngressRuntime(
                settings=settings,
                publisher=publisher,
                hub=hub,
                presence=presence,
                budget=budget,
                metrics=metrics,
                unconfirmed=UnconfirmedBytes(
                    settings.websocket_unconfirmed_max_bytes, metrics.unconfirmed_bytes
                ),
            )
            holder["runtime"] = runtime
            tasks = [
                # A partition queue of the other type stops the ingress (QueueTypeMismatch).
                asyncio.create_task(
                    keep_trying(publisher.connect, "RabbitMQ", log, fatal=(QueueTypeMismatch,))
                ),
                asyncio.create_task(hub.run()),
                asyncio.create_task(presence.run()),
                asyncio.create_task(PresenceFanout(presence_store, hub, bytes.decode).run()),
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
                    sock.close(CloseCode.GOING_AWAY, "server shutting down")
                    for sock in list(runtime.sockets)
                )
            )

    app = FastAPI(title="ingress-ws", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.limiter = limiter
    app.state.drain = drain
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded)
    app.add_middleware(SlowAPIASGIMiddleware)  # pure ASGI: no BaseHTTPMiddleware around SSE
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=True,  # POST /session from a listed page sets the session cookie
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        expose_headers=["Retry-After"],
    )

    async def readiness() -> dict[str, bool | str]:
        runtime = holder.get("runtime")
        rabbit = runtime is not None and runtime.publisher.ready
        redis_ok = runtime is not None and runtime.hub.connected.is_set()
        node = runtime.publisher.node if runtime is not None else None
        if settings.event_transport == "memory":
            return {"event_pipeline_ready": rabbit and redis_ok}  # no broker to speak of
        flags: dict[str, bool | str] = {
            "event_pipeline_ready": rabbit and redis_ok,
            "rabbitmq_connected": rabbit,
            "redis_connected": redis_ok,
        }
        if node is not None:
            flags["rabbitmq_node"] = node  # which node of ADVANCED_RABBITMQ_URL it is on
        return flags

    add_operations(app, settings, registry, readiness, exempt=limiter.exempt)
    publish_rate = PublishRate(
        rate_limit_storage(settings), parse(settings.http_publish_rate_limit)
    )
    add_http_api(
        app, settings, authenticator, lambda: holder["runtime"], publish_rate, exempt=limiter.exempt
    )
    add_presence_api(app, authenticator, lambda: holder["runtime"].presence)

    @app.get("/", include_in_schema=False)
    async def playground(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/playground/config.json", include_in_schema=False)
    async def playground_config(request: Request) -> dict[str, object]:
        sse_url = settings.sse_public_url
        if sse_url is None:
            # The page's own host name, so a session cookie set here is sent there too.
            host = request.url.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            sse_url = f"{request.url.scheme}://{host}:{settings.sse_port}"
        return {
            "sse_public_url": sse_url,
            # The page hints at the documented default only where it is accepted.
            "development_token": DEFAULT_TOKEN
            if settings.environment == "development"
            and settings.realtime_token.get_secret_value() == DEFAULT_TOKEN
            else None,
            "reconnect_initial_ms": settings.reconnect_initial_ms,
            "reconnect_max_ms": settings.reconnect_max_ms,
        }

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    cookie_secure = (
        settings.session_cookie_secure
        if settings.session_cookie_secure is not None
        else settings.environment != "development"
    )
    cookie_name = session_cookie_name(secure=cookie_secure, domain=settings.session_cookie_domain)
    # The same attributes on set and delete, or browsers keep the old cookie.
    cookie_attributes: dict[str, Any] = {
        "path": "/",
        "domain": settings.session_cookie_domain,
        "secure": cookie_secure,
        "httponly": True,
        "samesite": "strict",
    }

    def refuse(status: int, detail: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def page_origin_allowed(request: Request) -> bool:
        origin = request.headers.get("origin")
        return websocket_origin_allowed(
            origin, request.headers.get("host"), settings.allowed_origins, from_browser=False
        )

    @app.post("/session")
    async def create_session(request: Request) -> Response:
        """Trade a bearer credential for an HttpOnly session cookie (EventSource sends no headers).

        Only `Authorization: Bearer` is accepted here: a token in the URL would be logged by
        proxies, and accepting the cookie would let a page extend a session it cannot read.
        """
        if not page_origin_allowed(request):
            return refuse(403, "This origin may not create sessions.")
        found = credential_source({}, request.headers, {})
        if found is None:
            return refuse(401, "Send the token as Authorization: Bearer to create a session.")
        try:
            principal = authenticator.authenticate(found.value)
        except Unauthorized as exc:
            return refuse(401, str(exc))
        value, expires_at = authenticator.issue_session(principal, settings.session_ttl_seconds)
        body = {
            "boards": "*" if principal.boards is None else sorted(principal.boards),
            "expires_at": expires_at,
        }
        response = JSONResponse(body, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            cookie_name,
            value,
            max_age=max(int(expires_at - time.time()), 0),
            **cookie_attributes,
        )
        return response

    @app.delete("/session")
    async def end_session(request: Request) -> Response:
        if not page_origin_allowed(request):
            return refuse(403, "This origin may not end sessions.")
        response = Response(status_code=204, headers={"Cache-Control": "no-store"})
        response.delete_cookie(cookie_name, **cookie_attributes)
        for other in {SESSION_COOKIE, HOST_SESSION_COOKIE} - {cookie_name}:
            if other in request.cookies:  # set before a change of settings: end it too
                secure = cookie_secure or other == HOST_SESSION_COOKIE
                response.delete_cookie(
                    other, path="/", secure=secure, httponly=True, samesite="strict"
                )
        return response

    async def board_socket(websocket: WebSocket) -> None:
        runtime = holder["runtime"]
        board_id = websocket.path_params["board_id"]
        # The contract closes with codes, which needs an accepted socket; nothing flows before
        # every check below has passed.
        await websocket.accept()
        # Every handshake counts, refused ones included. Through uvicorn's trusted-proxy list:
        # X-Forwarded-For counts only from those proxies.
        client = websocket.client.host if websocket.client else "unknown"
        if not await handshakes.allow(client):
            await websocket.close(CloseCode.TRY_AGAIN, "too many connection attempts: back off")
            return
        if not is_board_id(board_id):
            await websocket.close(CloseCode.BAD_BOARD, "board id must be 1-64 of [A-Za-z0-9_.-]")
            return
        client_id = websocket.query_params.get("client_id")
        if client_id is not None and not is_client_id(client_id):
            await websocket.close(CloseCode.BAD_BOARD, "client_id must be 1-64 of [A-Za-z0-9_.:-]")
            return
        credential = credential_source(websocket.query_params, websocket.headers, websocket.cookies)
        if not origin_allowed(websocket, credential, settings):
            await websocket.close(CloseCode.FORBIDDEN, "origin not allowed")
            return
        try:
            principal = authenticator.authenticate(credential.value if credential else None)
        except Unauthorized as exc:
            await websocket.close(CloseCode.UNAUTHORISED, str(exc)[:120])
            return
        if not principal.may_access(board_id):
            await websocket.close(CloseCode.FORBIDDEN, "this token does not grant the board")
            return
        # No await between this check and `presence.join` counting the socket (the first thing
        # `run` does), so concurrent handshakes cannot all pass it and overshoot the limit.
        if runtime.presence.connections >= settings.websocket_max_connections:
            await websocket.close(CloseCode.TRY_AGAIN, "instance at its connection limit")
            return
        assert credential is not None  # authenticate() refused a missing one
        key = credential_key(principal, credential.value, client)
        if not slots.take(key):
            await websocket.close(CloseCode.TRY_AGAIN, "too many sockets for this credential")
            return
        lease = CredentialLease(
            principal,
            key,
            slots=slots,
            authenticator=authenticator,
            board_id=board_id,
            client=client,
            warning_seconds=settings.auth_refresh_warning_seconds,
        )
        try:
            # Validated where it is replayed (`parse_board_cursor`): an invalid one gets a reset.
            query = websocket.query_params
            cursor = query.get("after") or query.get("last_event_id")
            resume = None if cursor is None else (cursor, query.get("epoch") or None)
            await BoardSocket(websocket, board_id, lease, runtime).run(resume)
        finally:
            lease.release()  # the credential's place, the refreshed one's if it changed

    # Starlette's route, not FastAPI's: no dependency injection to resolve, and none of its
    # per-request state held for the socket's whole life (≈ 4 KiB per idle socket).
    app.router.routes.append(WebSocketRoute("/ws/boards/{board_id}", board_socket))
    return app
