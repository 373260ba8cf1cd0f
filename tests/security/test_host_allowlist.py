"""The Host allowlist on both edges, HTTP and WebSocket: a DNS-rebinding page (its own name,
resolved to 127.0.0.1) must not reach a local suite, whose page trusts its own origin and which
runs with the development token. Probes and metrics answer any Host (kubelet, Prometheus)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import websockets
from security.edge_client import TOKEN, memory_env, running
from support.processes import Service

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def development_edges() -> Iterator[tuple[Service, Service]]:
    """Both edges in development, where no allowlist is configured: localhost names only."""
    env = memory_env(ADVANCED_ENVIRONMENT="development")
    with (
        running("ingress", "security-hosts-ingress", env) as ingress,
        running("gateway", "security-hosts-gateway", env) as gateway,
    ):
        yield ingress, gateway


def status(service: Service, path: str, host: str, method: str = "GET", **kwargs: object) -> int:
    headers = {"Host": f"{host}:{service.port}", "X-Forwarded-For": "192.0.2.60"}
    headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
    with httpx.stream(method, f"{service.url}{path}", headers=headers, timeout=10) as response:
        return response.status_code


async def handshake(service: Service, host: str) -> str:
    """'open', or the HTTP status the handshake was refused with."""
    url = f"ws://{host}:{service.port}/ws/boards/hosts?token={TOKEN}"
    try:
        async with websockets.connect(url, host="127.0.0.1", port=service.port, open_timeout=10):
            return "open"
    except websockets.InvalidStatus as refused:
        return str(refused.response.status_code)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
async def test_development_answers_localhost_names(
    development_edges: tuple[Service, Service], host: str
) -> None:
    ingress, gateway = development_edges
    assert await asyncio.to_thread(status, ingress, "/", host) == 200
    assert await handshake(ingress, host) == "open"
    assert (
        await asyncio.to_thread(
            status, gateway, "/sse/boards/hosts", host, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        == 200
    )


@pytest.mark.parametrize(
    "host", ["rebind.attacker.example", "localhost.attacker.example", "10.0.0.7"]
)
async def test_development_refuses_any_other_host(
    development_edges: tuple[Service, Service], host: str
) -> None:
    ingress, gateway = development_edges
    assert await asyncio.to_thread(status, ingress, "/", host) == 400
    assert await asyncio.to_thread(status, ingress, "/playground/config.json", host) == 400
    session = await asyncio.to_thread(
        status,
        ingress,
        "/session",
        host,
        "POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Origin": f"http://{host}:{ingress.port}"},
    )
    assert session == 400
    assert await handshake(ingress, host) == "400"
    assert (
        await asyncio.to_thread(
            status, gateway, "/sse/activity", host, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        == 400
    )
    for service in (ingress, gateway):  # the probes answer whatever Host the kubelet sends
        assert await asyncio.to_thread(status, service, "/healthz", host) == 200
        assert await asyncio.to_thread(status, service, "/metrics", host) == 200


async def test_configured_hosts_replace_the_default() -> None:
    env = memory_env(ADVANCED_ALLOWED_HOSTS="realtime.example.com,*.edge.example")
    with running("ingress", "security-hosts-configured", env) as ingress:
        for host, expected in [
            ("realtime.example.com", 200),
            ("a.edge.example", 200),
            ("edge.example.evil", 400),
            ("127.0.0.1", 400),
        ]:
            assert await asyncio.to_thread(status, ingress, "/", host) == expected, host
        assert await handshake(ingress, "realtime.example.com") == "open"
        assert await handshake(ingress, "localhost") == "400"
