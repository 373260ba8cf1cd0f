"""A 500 carries the security headers too (in-process: a running service offers no way to
make itself fail on purpose, so a failing route is added to the real app)."""

from __future__ import annotations

import httpx
import pytest
from ingress_ws.app import create_app as create_ingress
from ingress_ws.settings import IngressSettings
from realtime_runtime.memory import MemoryTransport
from security.edge_client import TOKEN
from sse_gateway.app import create_app as create_gateway
from sse_gateway.settings import GatewaySettings


def boom() -> None:
    raise RuntimeError("a bug")


@pytest.mark.parametrize("which", ["ingress", "gateway"])
async def test_an_unhandled_error_is_a_bare_500_with_the_security_headers(which: str) -> None:
    common = {"_env_file": None, "event_transport": "memory", "realtime_token": TOKEN}
    app = (
        create_ingress(IngressSettings(**common), memory=MemoryTransport())  # type: ignore[arg-type]
        if which == "ingress"
        else create_gateway(GatewaySettings(**common), memory=MemoryTransport())  # type: ignore[arg-type]
    )
    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost"
    ) as http:  # development: localhost names only
        response = await http.get("/boom")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"  # no traceback, no detail
    for header in (
        "content-security-policy",
        "strict-transport-security",
        "referrer-policy",
        "permissions-policy",
        "x-content-type-options",
        "x-frame-options",
    ):
        assert header in response.headers, header
