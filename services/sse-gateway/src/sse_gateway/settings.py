"""The gateway's settings: no RabbitMQ part, since the gateway reads only Redis."""

from __future__ import annotations

from pydantic import Field
from realtime_runtime.settings import AuthSettings, HttpEdgeSettings, RedisSettings, ServiceSettings


class GatewaySettings(ServiceSettings, AuthSettings, RedisSettings, HttpEdgeSettings):
    sse_port: int = 8005
    sse_heartbeat_seconds: float = Field(default=15, gt=0)
    activity_stream_rate_limit: str = "30/minute"
    sse_max_connections: int = Field(default=10_000, ge=1)
    sse_send_queue: int = Field(default=1000, ge=1)
    sse_send_timeout_seconds: float = Field(default=30, gt=0)
