"""Moving the gateway's port moves the page's EventSource with it (the probe's default follows
the same variables: tools/probe/tests/test_options.py)."""

from __future__ import annotations

import httpx
import pytest
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings


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
