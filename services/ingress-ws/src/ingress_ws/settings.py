from __future__ import annotations

from envelope.settings import SuiteSettings
from pydantic import Field


class IngressSettings(SuiteSettings):
    ingress_port: int = 8004
    websocket_max_connections: int = Field(default=128, ge=1)
    max_payload_bytes: int = Field(default=16_384, ge=1)
    websocket_rate_limit: str = "100/second"
    websocket_rate_limit_strikes: int = Field(default=20, ge=1)
    websocket_send_queue: int = Field(default=1000, ge=1)
    websocket_idle_timeout_seconds: float = Field(default=300, gt=0)
    sse_public_url: str = "http://localhost:8005"
    reconnect_initial_ms: int = Field(default=500, ge=50)
    reconnect_max_ms: int = Field(default=15_000, ge=100)
