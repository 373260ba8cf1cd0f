"""The ingress's settings: every shared part, and the WebSocket, session and page fields."""

from __future__ import annotations

from limits import parse
from pydantic import Field, field_validator
from realtime_runtime.settings import (
    AuthSettings,
    HttpEdgeSettings,
    RabbitMQSettings,
    RedisSettings,
    ServiceSettings,
)


class IngressSettings(
    ServiceSettings, AuthSettings, RedisSettings, RabbitMQSettings, HttpEdgeSettings
):
    ingress_port: int = 8004
    websocket_max_connections: int = Field(default=128, ge=1)
    # One credential's share of the instance's sockets (a JWT's subject; the shared token per
    # client address), and WebSocket handshakes per client address: past either, close 1013.
    websocket_max_connections_per_credential: int = Field(default=32, ge=1)
    websocket_handshake_rate_limit: str = "60/10 seconds"
    max_payload_bytes: int = Field(default=16_384, ge=1)
    # Envelope bytes awaiting RabbitMQ's confirm, summed over every socket of the process;
    # past it frames get `error`/`unavailable` at once. Measured (bench/blackhole_memory.py,
    # 128 sockets of full-size frames, RabbitMQ blackholed): 260 MiB peak RSS, 1362 without.
    websocket_unconfirmed_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    websocket_rate_limit: str = "100/second"
    websocket_rate_limit_strikes: int = Field(default=20, ge=1)
    websocket_send_queue: int = Field(default=1000, ge=1)
    # Resume frames per socket (a leaky bucket): each may replay the board's whole history.
    websocket_resume_rate_limit: str = "6/minute"
    websocket_idle_timeout_seconds: float = Field(default=300, gt=0)
    # Optional: one message budget per client address across all its sockets and replicas
    # (counted in Redis); unset by default, since clients behind one NAT share an address.
    websocket_client_rate_limit: str | None = None
    websocket_ping_interval_seconds: float = Field(default=20, gt=0)
    websocket_ping_timeout_seconds: float = Field(default=20, gt=0)
    websocket_max_pings: int = Field(default=50, ge=1)  # client pings per 10 s before 1008
    websocket_write_stall_seconds: float = Field(default=30, gt=0)
    # Refuse handshakes without an Origin header (no scripts or websocat then).
    websocket_require_origin: bool = False
    # An `expiring` frame goes out this long before a socket's credential expires, so the
    # client can send a `refresh` frame in time (contract section 13).
    auth_refresh_warning_seconds: float = Field(default=30, ge=0)
    session_ttl_seconds: int = Field(default=3600, ge=60)
    # None: Secure outside development (browsers treat http://localhost as secure anyway).
    session_cookie_secure: bool | None = None
    session_cookie_domain: str | None = None
    # Where browsers reach the SSE gateway; unset: this host at ADVANCED_SSE_PORT (the port the
    # gateway listens on), so moving the gateway's port moves the page with it.
    sse_public_url: str | None = None
    sse_port: int = 8005  # the gateway's own default (sse_gateway.settings), read for the URL
    # Events published over the HTTP API per credential (a JWT's subject; the shared token per
    # client address), across replicas: a batch counts each of its events.
    http_publish_rate_limit: str = "100/second"
    reconnect_initial_ms: int = Field(default=500, ge=50)
    reconnect_max_ms: int = Field(default=15_000, ge=100)
    # A crashed replica's board members are gone within this: instances beat every quarter of
    # it and expire after half, and any live replica reaps an expired one.
    presence_ttl_seconds: float = Field(default=30, ge=1)

    @field_validator("websocket_resume_rate_limit", "http_publish_rate_limit")
    @classmethod
    def _a_rate_limit(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate limit; write it as `6/minute` or `1/10 seconds`"
            ) from None
        return value
