"""Development only: ingress, relay worker and gateway in one process, no brokers needed.

Everything is served on the ingress port: the page and `/ws/...` by the ingress, `/sse/...` by
the gateway, all three wired to one in-memory transport. `/readyz` and `/metrics` answer for all
three services: what each would report on its own port, side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, cast

import structlog
from fastapi import FastAPI
from ingress_ws.app import create_app as create_ingress
from ingress_ws.settings import IngressSettings
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.observability import configure_logging
from realtime_runtime.service import serve
from realtime_runtime.settings import TelemetrySettings, load_settings
from relay_worker.app import build_worker
from relay_worker.settings import WorkerSettings
from sse_gateway.app import create_app as create_gateway
from sse_gateway.settings import GatewaySettings
from starlette.responses import JSONResponse, PlainTextResponse, Response

log = structlog.get_logger("dev_suite")


class ServiceMetrics(Collector):
    """The three services' registries as one exposition, each sample labelled `service`.

    Their families share names (every service has `advanced_http_requests_total`): one family
    per name with the label apart keeps the text valid for Prometheus.
    """

    def __init__(self, registries: dict[str, CollectorRegistry]) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for service, registry in self.registries.items():
            for family in registry.collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                into.samples += [
                    sample._replace(labels={**sample.labels, "service": service})
                    for sample in family.samples
                ]
        yield from merged.values()


class DevSuite:
    """Routes `/sse/` to the gateway and the rest to the ingress; runs all three lifespans;
    answers `/readyz` and `/metrics` for all three; drains all three."""

    def __init__(
        self, ingress: FastAPI, gateway: FastAPI, worker: FastAPI, settings: TelemetrySettings
    ) -> None:
        self.ingress, self.gateway, self.worker = ingress, gateway, worker
        self.state = ingress.state
        self.services = {"ingress-ws": ingress, "sse-gateway": gateway, "relay-worker": worker}
        self.metrics = CollectorRegistry()
        self.metrics.register(
            ServiceMetrics({name: app.state.registry for name, app in self.services.items()})
        )
        self.metrics_path, self.telemetry_enabled = (
            settings.metrics_path,
            settings.telemetry_enabled,
        )

    async def readiness(self) -> Response:
        flags = {name: await app.state.readiness() for name, app in self.services.items()}
        ready = all(all(service.values()) for service in flags.values())
        body = {"status": "ready" if ready else "not_ready", "transport": "memory", **flags}
        return JSONResponse(body, status_code=200 if ready else 503)

    def exposition(self) -> Response:
        if not self.telemetry_enabled:
            return PlainTextResponse("telemetry disabled", status_code=503)
        return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

    async def drain(self) -> None:
        """Each service's own drain, side by side: the ingress closes its sockets, the gateway
        its streams, the worker hands back its partitions."""
        await asyncio.gather(*(app.state.drain() for app in self.services.values()))

    @contextlib.asynccontextmanager
    async def lifespan(self, state: dict[str, Any]) -> AsyncIterator[None]:
        """Every service's lifespan; what each yields goes into the requests' state, as
        Starlette's router does for one app."""
        async with contextlib.AsyncExitStack() as stack:
            for app in (self.worker, self.gateway, self.ingress):
                lifespan = cast(
                    contextlib.AbstractAsyncContextManager[Mapping[str, Any] | None],
                    app.router.lifespan_context(app),  # a union of two context types
                )
                yielded = await stack.enter_async_context(lifespan)
                state.update(yielded or {})
            yield

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            async with self.lifespan(scope.setdefault("state", {})):
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope.get("path", "")
        if scope["type"] == "http" and path in {"/readyz", self.metrics_path}:
            response = await self.readiness() if path == "/readyz" else self.exposition()
            await response(scope, receive, send)
            return
        target = self.gateway if path.startswith("/sse/") else self.ingress
        await target(scope, receive, send)


def create_suite(transport: MemoryTransport | None = None) -> DevSuite:
    transport = transport or MemoryTransport()
    ingress = IngressSettings(event_transport="memory")
    if "sse_public_url" not in ingress.model_fields_set:
        # `/sse/` is served on this same port: an empty URL makes the page use its own origin.
        ingress = ingress.model_copy(update={"sse_public_url": ""})
    gateway = GatewaySettings(event_transport="memory")
    worker = WorkerSettings(event_transport="memory")
    return DevSuite(
        create_ingress(ingress, memory=transport),
        create_gateway(gateway, memory=transport),
        build_worker(worker, memory=transport),
        ingress,
    )


def main() -> None:
    settings = load_settings(IngressSettings).model_copy(update={"event_transport": "memory"})
    configure_logging("dev-suite", settings.log_level, settings.log_format)
    log.info(
        "running the whole suite in one process on the in-memory transport "
        "(no RabbitMQ, no Redis); nothing survives a restart",
        port=settings.ingress_port,
    )
    suite = create_suite()
    serve(
        suite,
        settings,
        settings.ingress_port,
        drain=suite.drain,
        ready="ready: open {url} (the playground; /ws/boards/{{board_id}}, /sse/..., /readyz, "
        "/metrics all on this port)",
    )


if __name__ == "__main__":
    main()
