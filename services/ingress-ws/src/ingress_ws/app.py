"""`create_app(settings)`: the WebSocket ingress and the playground page."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry
from realtime_runtime.amqp import QueueTypeMismatch
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.presence import PresenceFanout
from realtime_runtime.security import rate_limit_exceeded
from realtime_runtime.service import add_operations, keep_trying
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address

from ingress_ws.adapters import open_adapters
from ingress_ws.drain import drain, shut_down
from ingress_ws.handshake import board_socket_route
from ingress_ws.http_api import add_http_api
from ingress_ws.metrics import IngressMetrics
from ingress_ws.playground import add_playground
from ingress_ws.presence_api import add_presence_api
from ingress_ws.session_api import add_session_api
from ingress_ws.settings import IngressSettings
from ingress_ws.state import IngressRuntime, build_runtime

log = structlog.get_logger("ingress_ws")


def create_app(settings: IngressSettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    """The ingress; on the in-memory transport its ports share `memory` (the stand-ins of
    the other services in this process), or a set of its own."""
    registry = CollectorRegistry()
    metrics = IngressMetrics(registry)  # one per app: its families are registered once
    instance = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            adapters = open_adapters(settings, stack, memory)
            runtime = build_runtime(settings, metrics, adapters, instance)
            # On app.state rather than Starlette's lifespan state: the dev suite runs this
            # lifespan inside its own, which does not pass the state on.
            app.state.runtime = runtime
            start(runtime)
            try:
                yield
            finally:
                await shut_down(runtime)

    async def drain_app() -> None:
        runtime: IngressRuntime | None = getattr(app.state, "runtime", None)
        if runtime is not None:
            await drain(runtime)

    limiter = Limiter(key_func=get_remote_address, default_limits=[settings.rate_limit_default])
    app = FastAPI(title="ingress-ws", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.limiter = limiter
    app.state.drain = drain_app  # what `__main__` hands `serve` for SIGTERM
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

    async def ready() -> dict[str, bool | str]:
        runtime: IngressRuntime | None = getattr(app.state, "runtime", None)
        return readiness(runtime)

    add_operations(app, settings, registry, ready, exempt=limiter.exempt)
    add_http_api(app, settings, exempt=limiter.exempt)
    add_presence_api(app)
    add_playground(app, settings)
    add_session_api(app, settings)
    app.router.routes.append(board_socket_route())
    return app


def start(runtime: IngressRuntime) -> None:
    """The background loops, owned by the runtime and cancelled by its drain."""
    publisher, hub, presence = runtime.publisher, runtime.hub, runtime.presence
    runtime.tasks += [
        # A partition queue of the other type stops the ingress (QueueTypeMismatch).
        asyncio.create_task(
            keep_trying(publisher.connect, "RabbitMQ", log, fatal=(QueueTypeMismatch,))
        ),
        asyncio.create_task(hub.run()),
        asyncio.create_task(presence.run()),
        asyncio.create_task(PresenceFanout(presence.store, hub, bytes.decode).run()),
    ]


def readiness(runtime: IngressRuntime | None) -> dict[str, bool | str]:
    """`/readyz`'s flags: publishing needs the broker's connection and the feed's."""
    rabbit = runtime is not None and runtime.publisher.ready
    redis_ok = runtime is not None and runtime.hub.connected.is_set()
    if runtime is None or not runtime.reports_brokers:
        return {"event_pipeline_ready": rabbit and redis_ok}  # no broker to speak of
    flags: dict[str, bool | str] = {
        "event_pipeline_ready": rabbit and redis_ok,
        "rabbitmq_connected": rabbit,
        "redis_connected": redis_ok,
    }
    node = runtime.publisher.node
    if node is not None:
        flags["rabbitmq_node"] = node  # which node of ADVANCED_RABBITMQ_URL it is on
    return flags
