"""The one-process dev suite serves `/sse/` itself: its playground must look for it there."""

from __future__ import annotations

import httpx
import pytest
from dev_suite.__main__ import create_suite


async def config_of(app: object) -> dict[str, object]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        response = await client.get("/playground/config.json")
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


async def test_the_page_finds_the_sse_routes_on_its_own_origin() -> None:
    # Empty means "this page's origin" to playground.js; the default would be :8005.
    assert (await config_of(create_suite()))["sse_public_url"] == ""


async def test_an_explicit_public_url_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "https://realtime.example.com")
    assert (await config_of(create_suite()))["sse_public_url"] == "https://realtime.example.com"
