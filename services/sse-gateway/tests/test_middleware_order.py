"""The order of the gateway's outer middleware, which `create_app` sets by the order of its calls."""

from __future__ import annotations

from realtime_runtime.memory import MemoryTransport
from realtime_runtime.security import SecurityHeadersMiddleware
from sse_gateway.app import create_app
from sse_gateway.response import ServerSendPassthrough
from sse_gateway.settings import GatewaySettings


def test_the_server_send_passthrough_is_outside_the_security_headers_and_the_rest() -> None:
    settings = GatewaySettings(_env_file=None, event_transport="memory", realtime_token="t" * 32)  # type: ignore[call-arg]
    app = create_app(settings, memory=MemoryTransport())
    outer = [entry.cls for entry in app.user_middleware[:2]]
    assert outer == [ServerSendPassthrough, SecurityHeadersMiddleware]
