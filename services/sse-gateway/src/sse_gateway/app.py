"""`create_app(settings)`: the SSE gateway that EventSource clients reach directly."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from realtime_runtime.auth import Unauthorized
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.security import rate_limit_exceeded
from realtime_runtime.service import add_operations
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address

from sse_gateway.response import pass_server_send
from sse_gateway.routes import stream_routes
from sse_gateway.runtime import Gateway
from sse_gateway.settings import GatewaySettings
from sse_gateway.streams import GatewayMetrics


def create_app(settings: GatewaySettings, *, memory: MemoryTransport | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    gateway = Gateway(settings, metrics, memory)
    limiter = Limiter(key_func=get_remote_address, default_limits=[settings.rate_limit_default])

    app = FastAPI(title="sse-gateway", lifespan=gateway.lifespan, docs_url=None, redoc_url=None)
    app.state.limiter = limiter
    app.state.drain = gateway.drain
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_middleware(SlowAPIASGIMiddleware)  # pure ASGI: no BaseHTTPMiddleware around SSE
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=True,
        allow_methods=["GET"],
        allow_headers=["Authorization", "Last-Event-ID", "Cache-Control"],
    )
    add_operations(app, settings, registry, gateway.readiness, exempt=limiter.exempt)
    app.router.routes += stream_routes(settings, metrics, limiter)
    pass_server_send(app)  # last: outside the security headers and every other middleware
    return app


async def unauthorized(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )
