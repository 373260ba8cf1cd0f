"""What every service process exposes: /healthz, /readyz, /metrics and its HTTP metrics.

Needs the `service` extra (FastAPI, prometheus-fastapi-instrumentator).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
import structlog
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_fastapi_instrumentator import Instrumentator
from redis.asyncio.cluster import ClusterNode, RedisCluster
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

# Re-exported: the services take the client type from here, beside `redis_client`.
from realtime_runtime.feed.store import RedisClient as RedisClient
from realtime_runtime.observability import instrument_app
from realtime_runtime.security import hardened_http_protocol, secure_app
from realtime_runtime.settings import RedisSettings, ServiceSettings

# Flags (all true: ready) and facts such as the RabbitMQ node a process is on.
Readiness = Callable[[], Awaitable[dict[str, bool | str]]]
log = structlog.get_logger("realtime_runtime.service")

REDIS_HEALTH_CHECK_SECONDS = 5


def redis_client(settings: RedisSettings, **overrides: Any) -> RedisClient:
    """The Redis client of a process, with its timeouts set rather than redis-py's defaults
    (none): a command on a Redis that stopped answering fails after
    `ADVANCED_REDIS_SOCKET_TIMEOUT_SECONDS`, a connect after `..._CONNECT_TIMEOUT_SECONDS`, and
    a connection idle past the health-check interval is checked before it is used. The
    pub/sub feed reads with its own, shorter timeouts, so an idle channel is not an error.

    In cluster mode the seeds are every node of the URL: the first that answers gives the
    slot map, and redis-py follows it (MOVED, failovers) from then on. `overrides` are passed
    to the client as they are (the worker's own timeouts, for example).
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_seconds,
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
        "health_check_interval": REDIS_HEALTH_CHECK_SECONDS,
        **overrides,
    }
    first, *others = settings.redis_nodes
    if settings.redis_mode == "standalone":
        return redis.from_url(first, **options)
    seeds = [
        ClusterNode(url.hostname or "localhost", url.port or 6379) for url in map(urlsplit, others)
    ]
    return RedisCluster.from_url(first, startup_nodes=seeds or None, **options)


def feed_frames_counter(registry: CollectorRegistry) -> Counter:
    """Frames this edge process read from Redis pub/sub (before de-duplication), on both edges:
    with channels per board, a process draws only its own clients' boards' traffic."""
    return Counter(
        "advanced_feed_frames_received",
        "Relay frames this process received from Redis pub/sub, duplicates included.",
        registry=registry,
    )


def delivery_latency_histogram(registry: CollectorRegistry) -> Histogram:
    """`occurred_at` to the socket write, on both edges (label `transport`: websocket, sse)."""
    return Histogram(
        "advanced_delivery_latency_seconds",
        "From the ingress receiving an event to its write on a subscriber's socket.",
        ["transport"],
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=registry,
    )


def add_operations(
    app: FastAPI,
    settings: ServiceSettings,
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    exempt: Callable[[Any], Any] = lambda route: route,
) -> None:
    """Mount the probes and metrics, instrument HTTP and add the security headers.

    `exempt` marks the probe routes as free of rate limits (slowapi's `Limiter.exempt`).
    `app.state.readiness` and `app.state.registry` keep both, so the one-process development
    suite can answer `/readyz` and `/metrics` for all three services at once.
    """
    app.state.readiness, app.state.registry = readiness, registry
    probes = {"/healthz", "/readyz", settings.metrics_path}
    # The Host allowlist; probes and metrics stay open to any Host, since the kubelet and
    # Prometheus address a pod by its IP.
    app.add_middleware(HostAllowlistMiddleware, allowed_hosts=settings.trusted_hosts, exempt=probes)
    Instrumentator(
        excluded_handlers=[*probes],
        registry=registry,
        should_group_status_codes=False,
        should_exclude_streaming_duration=True,  # SSE streams would swamp the histogram
    ).instrument(app, metric_namespace="advanced")
    instrument_app(app, settings)  # request spans, when an OTLP endpoint is configured
    # Outside ServerErrorMiddleware too, so 500s carry the headers like every other answer.
    secure_app(app, settings)

    @app.get("/healthz", include_in_schema=False)
    @exempt
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    @exempt
    async def readyz() -> Response:
        flags = await readiness()
        ready = all(value for value in flags.values() if isinstance(value, bool))
        body: dict[str, Any] = {
            "status": "ready" if ready else "not_ready",
            "transport": settings.event_transport,
            **flags,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(settings.metrics_path, include_in_schema=False)
    @exempt
    async def metrics() -> Response:
        if not settings.telemetry_enabled:
            return PlainTextResponse("telemetry disabled", status_code=503)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class HostAllowlistMiddleware:
    """Starlette's `TrustedHostMiddleware` (HTTP and WebSocket handshakes get 400 for a Host
    not listed), except on the `exempt` paths.

    Starlette's middleware runs the app inside its own call, so its frame (the request's
    headers, the parsed host) would stay alive for as long as a stream does, at 10,000 idle
    streams about 1 KiB each. Here it only checks: its app merely marks the scope, and the real
    app is called from a frame that holds nothing else; on exempt paths, from no frame at all.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], exempt: set[str]) -> None:
        self.app = app
        self.check = TrustedHostMiddleware(
            _host_allowed, allowed_hosts=allowed_hosts, www_redirect=False
        )
        self.exempt = exempt

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] in ("http", "websocket") and scope["path"] not in self.exempt:
            return self._checked(scope, receive, send)
        return self.app(scope, receive, send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.check(scope, receive, send)  # answers 400 itself for a Host not listed
        if scope.pop(_HOST_ALLOWED, False):
            await self.app(scope, receive, send)


_HOST_ALLOWED = "advanced.host_allowed"


async def _host_allowed(scope: Scope, receive: Receive, send: Send) -> None:
    scope[_HOST_ALLOWED] = True


Drain = Callable[[], Awaitable[None]]

# After the drain, what uvicorn gives in-flight requests before it cancels them: the drain's
# own wait plus this (8 s with the default drain timeout of 5 s).
GRACE_AFTER_DRAIN_SECONDS = 3


class DrainingServer(uvicorn.Server):
    """SIGTERM is an orchestrator's normal stop: drain (close sockets with 1001), then let
    uvicorn finish in-flight requests, and exit 0 rather than re-raising the signal. A first
    Ctrl-C (SIGINT) does the same, so a terminal sees a clean stop, not a KeyboardInterrupt
    traceback; a second one is uvicorn's forced exit.

    The drain is given `drain_timeout` seconds (`ADVANCED_DRAIN_TIMEOUT_SECONDS`), then
    cancelled. Once started, the objects of start-up are frozen out of the garbage collector's
    scans."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Drain | None,
        ready: str = "",
        *,
        drain_timeout: float = 5,
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_timeout = drain_timeout
        self._ready = ready
        self._draining: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._ready:  # not when the port was taken: uvicorn exits then
            log.info(self._ready)
        # What exists now (modules, app, broker connections) lives as long as the process:
        # moved out of the collector's sight, a full collection stops scanning ~90,000 objects
        # (31 ms on a slow core, a spike on every stream of the process).
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is None and sig in (signal.SIGTERM, signal.SIGINT):
            self._draining = asyncio.get_running_loop().create_task(self._drain_then_exit())
        elif sig != signal.SIGTERM:
            super().handle_exit(sig, frame)  # a second Ctrl-C: force the exit

    async def _drain_then_exit(self) -> None:
        try:
            await self._drained()
        finally:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # An exit that came without a signal (`should_exit` set by the code that runs the
        # server) drains too, before uvicorn waits for the open connections.
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drained())
        with contextlib.suppress(Exception):
            await self._draining
        await super().shutdown(sockets)

    async def _drained(self) -> None:
        if self._drain is not None:
            try:
                await asyncio.wait_for(self._drain(), timeout=self._drain_timeout)
            except TimeoutError:
                log.warning("the drain timed out", seconds=self._drain_timeout)


def local_url(settings: ServiceSettings, port: int) -> str:
    """Where a person on this machine reaches a service bound to `ADVANCED_HOST`."""
    host = settings.host
    if host in {"127.0.0.1", "0.0.0.0", "::", "::1", ""}:
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(
    app: Any,
    settings: ServiceSettings,
    port: int,
    drain: Drain | None = None,
    ready: str = "ready: listening on {url}",
    **options: Any,
) -> None:
    """Run one service process: uvloop and httptools where available, logs left to structlog.

    Once the port is bound, `ready` (with `{url}` filled in) is logged: the line that tells a
    person where to go.
    """
    # uvicorn has no deadline for a request's head: without one, slow clients hold sockets.
    options.setdefault("http", hardened_http_protocol(settings.http_request_timeout_seconds))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_config=None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        proxy_headers=True,
        timeout_graceful_shutdown=math.ceil(
            settings.drain_timeout_seconds + GRACE_AFTER_DRAIN_SECONDS
        ),
        server_header=False,
        **options,
    )
    ready = ready.format(url=local_url(settings, port))
    DrainingServer(config, drain, ready, drain_timeout=settings.drain_timeout_seconds).run()


async def keep_trying(
    connect: Callable[[], Awaitable[None]],
    what: str,
    log: Any,
    *,
    fatal: tuple[type[Exception], ...] = (),
) -> None:
    """Connect at start-up without blocking it: /readyz stays 503 until this succeeds.

    A `fatal` error (a configuration the broker refuses, which no retry mends) stops the
    process: SystemExit leaves the event loop, and the process exits 1 with the message.
    """
    delay = 0.5
    while True:
        try:
            await connect()
        except fatal as exc:
            log.error("refusing to start", broker=what, error=str(exc))
            raise SystemExit(f"{what}: {exc}") from None
        except Exception as exc:  # any failure to connect: report, back off, try again
            log.warning(
                "broker not reachable yet, retrying", broker=what, error=str(exc), retry_in=delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        else:
            return
