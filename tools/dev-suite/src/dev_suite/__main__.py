"""Development only: ingress, relay worker and gateway in one process, no brokers needed.

Everything is served on the ingress port: the page and `/ws/...` by the ingress, `/sse/...` by
the gateway, all three wired to one in-memory transport.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from envelope.memory import MemoryTransport
from envelope.observability import configure_logging
from envelope.service import serve
from fastapi import FastAPI
from ingress_ws.app import create_app as create_ingress
from ingress_ws.settings import IngressSettings
from relay_worker.app import build_worker
from relay_worker.settings import WorkerSettings
from sse_gateway.app import create_app as create_gateway
from sse_gateway.settings import GatewaySettings

log = structlog.get_logger("dev_suite")


class DevSuite:
    """Routes `/sse/` to the gateway and the rest to the ingress; runs all three lifespans."""

    def __init__(self, ingress: FastAPI, gateway: FastAPI, worker: FastAPI) -> None:
        self.ingress, self.gateway, self.worker = ingress, gateway, worker
        self.state = ingress.state

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for app in (self.worker, self.gateway, self.ingress):
                await stack.enter_async_context(app.router.lifespan_context(app))
            yield

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        target = self.gateway if scope.get("path", "").startswith("/sse/") else self.ingress
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
    )


def main() -> None:
    settings = IngressSettings(event_transport="memory")
    configure_logging("dev-suite", settings.log_level)
    log.info(
        "running the whole suite in one process on the in-memory transport "
        "(no RabbitMQ, no Redis); nothing survives a restart",
        url=f"http://{settings.host}:{settings.ingress_port}",
    )
    suite = create_suite()
    serve(suite, settings, settings.ingress_port, drain=suite.ingress.state.drain)


if __name__ == "__main__":
    main()
