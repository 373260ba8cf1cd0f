"""The `ADVANCED_*` variables every service reads. Each service subclasses `SuiteSettings`."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self, TypeVar

from envelope.topology import QueueType, RedisKeys, Topology
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_TOKEN = "change-me-realtime"  # noqa: S105 - the documented development default
DEFAULT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss: http: https:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'; object-src 'none'"
)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_HOST_PATTERN = re.compile(r"(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\]", re.ASCII)

# An origin as browsers send it: scheme, host, optional port; no path, no userinfo, no "null".
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)


class SuiteSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADVANCED_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "staging", "production"] = "development"
    host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: readable text on a terminal, JSON lines otherwise (collectors, files, containers).
    log_format: Literal["auto", "json", "console"] = "auto"
    forwarded_allow_ips: str = "127.0.0.1"
    # How long a client may take to send a request's head and body (uvicorn sets no limit).
    http_request_timeout_seconds: float = Field(default=10, gt=0)
    # SIGTERM: how long the drain waits for sockets, streams and in-flight work before it
    # cancels what is left; under the contract's 10 s, with room to close the clients after.
    drain_timeout_seconds: float = Field(default=5, gt=0, le=8)

    realtime_token: SecretStr = SecretStr(DEFAULT_TOKEN)
    auth_jwt_secret: SecretStr | None = None
    auth_jwt_public_key: SecretStr | None = None
    auth_jwt_audience: str | None = None  # when set, a JWT's `aud` must name it
    auth_jwt_issuer: str | None = None  # when set, a JWT's `iss` must equal it

    event_transport: Literal["rabbitmq", "memory"] = "rabbitmq"
    board_channel: str = "advanced:board"
    activity_channel: str = "advanced:activity"
    redis_url: SecretStr = SecretStr("redis://localhost:6379/2")
    redis_key_prefix: str = "advanced:"
    # Set on every Redis client the services build (redis-py's default is no timeout at all:
    # a Redis that stops answering would hold a command, and whatever waits on it, for ever).
    redis_socket_timeout_seconds: float = Field(default=10, gt=0)
    redis_connect_timeout_seconds: float = Field(default=5, gt=0)
    redis_idempotency_ttl_seconds: int = Field(default=300, ge=1)
    replay_retention: int = Field(default=10_000, ge=1)
    # Beside the count: events older than this may be trimmed from the retained streams (the
    # relay trims on each write; an idle board's stream expires this long after its last
    # event). 0, the default: by count only, and ADVANCED_BOARD_IDLE_TTL_SECONDS bounds an
    # idle board's history instead.
    replay_retention_seconds: int = Field(default=0, ge=0)

    # One node, or a cluster's nodes comma-separated: every process uses the first that answers.
    rabbitmq_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    # classic: one copy on one node (a single-node broker, and what every deployment so far
    # declared). quorum: replicated over a cluster's nodes, survives the loss of a minority.
    # Changing it means new queues (docs/operations.md), so it is never switched by default.
    rabbitmq_queue_type: QueueType = "classic"
    rabbitmq_exchange: str = "advanced.board.events"
    rabbitmq_queue: str = "advanced.board.events"
    rabbitmq_retry_queue: str = "advanced.board.events.retry"
    rabbitmq_dlq_queue: str = "advanced.board.events.dlq"
    rabbitmq_max_retries: int = Field(default=5, ge=0)
    rabbitmq_retry_delay_ms: int = Field(default=5000, ge=1)
    rabbitmq_partitions: int = Field(default=8, ge=1, le=1024)

    allowed_origins: Annotated[list[str], NoDecode] = [
        "http://localhost:3000",
        "http://127.0.0.1:3000",
        "http://localhost:5173",
    ]
    # Host names (Host header, port aside) the services answer; `*.example.com` for a domain's
    # subdomains. Unset: localhost, 127.0.0.1 and [::1] in development (a DNS-rebinding page
    # then cannot reach a local suite running with the default token), any host otherwise.
    allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    rate_limit_default: str = "120/minute"
    telemetry_enabled: bool = True
    metrics_path: str = "/metrics"
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    otel_exporter_otlp_headers: SecretStr | None = None
    content_security_policy: str = DEFAULT_CSP
    strict_transport_security: str = "max-age=63072000; includeSubDomains; preload"

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("rabbitmq_url")
    @classmethod
    def _check_rabbitmq_nodes(cls, value: SecretStr) -> SecretStr:
        nodes = value.get_secret_value().split(",")
        if not all(node.strip().startswith(("amqp://", "amqps://")) for node in nodes):
            raise ValueError(
                "ADVANCED_RABBITMQ_URL must be one amqp:// or amqps:// URL per node, "
                "comma-separated (amqp://user:pass@host1:5672/,amqp://user:pass@host2:5672/)."
            )
        return value

    @property
    def rabbitmq_urls(self) -> list[str]:
        """The nodes of `ADVANCED_RABBITMQ_URL`, in the order they are tried."""
        return [node.strip() for node in self.rabbitmq_url.get_secret_value().split(",")]

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip().lower() for host in value.split(",") if host.strip()]
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str] | None) -> list[str] | None:
        for host in value or []:
            if host != "*" and not _HOST_PATTERN.fullmatch(host):
                raise ValueError(
                    f"ADVANCED_ALLOWED_HOSTS entry {host!r} is not a host name: write names "
                    "like app.example.com, *.example.com, 127.0.0.1 or [::1], without a port."
                )
        return value

    @property
    def trusted_hosts(self) -> list[str]:
        """The Host allowlist in force (see `allowed_hosts`)."""
        if self.allowed_hosts:
            return self.allowed_hosts
        return list(LOCAL_HOSTS) if self.environment == "development" else ["*"]

    @model_validator(mode="after")
    def _enforce_safe_defaults(self) -> Self:
        if self.environment != "development" and (
            self.realtime_token.get_secret_value() == DEFAULT_TOKEN
        ):
            raise ValueError(
                "ADVANCED_REALTIME_TOKEN is the documented default 'change-me-realtime': "
                "set a secret token, or ADVANCED_ENVIRONMENT=development for local runs."
            )
        if any("*" in origin for origin in self.allowed_origins):
            raise ValueError(
                "ADVANCED_ALLOWED_ORIGINS must list exact origins; a wildcard is refused."
            )
        if self.auth_jwt_secret is not None and len(self.auth_jwt_secret.get_secret_value()) < 32:
            raise ValueError(
                "ADVANCED_AUTH_JWT_SECRET is shorter than 32 bytes, too short for HS256 "
                "(RFC 7518 3.2): use a longer random secret."
            )
        for origin in self.allowed_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"ADVANCED_ALLOWED_ORIGINS entry {origin!r} is not an origin: write "
                    "scheme://host[:port] with no path or trailing slash ('null' is refused)."
                )
        ladder_seconds = (self.rabbitmq_max_retries + 1) * self.rabbitmq_retry_delay_ms / 1000
        if self.redis_idempotency_ttl_seconds <= ladder_seconds:
            raise ValueError(
                "ADVANCED_REDIS_IDEMPOTENCY_TTL_SECONDS must outlive the retry ladder "
                f"({ladder_seconds:.0f}s = (MAX_RETRIES + 1) x RETRY_DELAY_MS); raise it."
            )
        return self

    @property
    def topology(self) -> Topology:
        return Topology(
            exchange=self.rabbitmq_exchange,
            queue=self.rabbitmq_queue,
            retry_queue=self.rabbitmq_retry_queue,
            dlq_queue=self.rabbitmq_dlq_queue,
            partitions=self.rabbitmq_partitions,
            queue_type=self.rabbitmq_queue_type,
        )

    @property
    def redis_keys(self) -> RedisKeys:
        return RedisKeys(prefix=self.redis_key_prefix, activity_channel=self.activity_channel)


SettingsT = TypeVar("SettingsT", bound=SuiteSettings)


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Build a service's settings from the environment, or exit with a plain message.

    pydantic's own error text echoes the input values, which here include the token and the
    broker passwords: print only where each problem is and what to do, never the values.
    """
    try:
        return cls()
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise SystemExit(
            f"{cls.__name__}: the configuration is not valid, the service will not start.\n"
            + "\n".join(problems)
        ) from None
