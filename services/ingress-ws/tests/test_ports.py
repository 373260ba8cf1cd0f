"""Moving the gateway's port moves the page's EventSource and the probe's default with it."""

from __future__ import annotations

import socket

import httpx
import pytest
from ingress_ws.app import create_app
from ingress_ws.probe import parse_options
from ingress_ws.settings import IngressSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def page_config(base_url: str = "http://localhost:8004") -> dict[str, object]:
    app = create_app(IngressSettings(event_transport="memory"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
        response = await client.get("/playground/config.json")
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


async def test_the_page_follows_the_gateway_port(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await page_config())["sse_public_url"] == "http://localhost:8005"
    monkeypatch.setenv("ADVANCED_SSE_PORT", "9105")
    assert (await page_config())["sse_public_url"] == "http://localhost:9105"
    # The page's own host name, so the session cookie it was given reaches the gateway.
    assert (await page_config("http://127.0.0.1:8004"))["sse_public_url"] == (
        "http://127.0.0.1:9105"
    )


async def test_an_explicit_public_url_wins_over_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVANCED_SSE_PORT", "9105")
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "https://events.example.com/realtime")
    assert (await page_config())["sse_public_url"] == "https://events.example.com/realtime"


def test_the_probe_follows_the_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    # No ingress listens there, so the probe cannot ask it and falls back to the SSE port.
    ingress, gateway = free_port(), free_port()
    monkeypatch.delenv("ADVANCED_SSE_PUBLIC_URL", raising=False)
    monkeypatch.setenv("ADVANCED_INGRESS_PORT", str(ingress))
    monkeypatch.setenv("ADVANCED_SSE_PORT", str(gateway))
    options, _ = parse_options([])
    assert (options.ws_url, options.sse_url) == (
        f"ws://localhost:{ingress}",
        f"http://localhost:{gateway}",
    )
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "")  # the SSE routes on the ingress's port
    assert parse_options([])[0].sse_url == f"http://localhost:{ingress}"
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "https://events.example.com/")
    assert parse_options([])[0].sse_url == "https://events.example.com"
