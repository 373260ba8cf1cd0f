"""The shared parts of the services' settings; each service composes the parts it reads.

Every part reads flat `ADVANCED_*` variables (and an optional `.env`), so a service's class is
`class GatewaySettings(ServiceSettings, AuthSettings, RedisSettings, HttpEdgeSettings)` plus
the fields only it reads, and callers keep writing `settings.redis_url`. A part's validators
travel with it: a service that does not compose the RabbitMQ part never checks its URL.

- `ServiceSettings`: what every service reads (bind, logs, drain, Host allowlist, security
  headers of its operations routes, telemetry) and the default-token refusal.
- `AuthSettings`: the credentials an edge checks (the token, the JWT keys and claims).
- `RedisSettings`, `RabbitMQSettings`: the brokers' addresses and the names they share.
- `HttpEdgeSettings`: what a browser-facing edge applies (CORS origins, the default rate limit).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

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


def _comma_separated(value: object, *, lower: bool = False) -> object:
    if isinstance(value, str):
        items = (item.strip() for item in value.split(","))
        return [item.lower() if lower else item for item in items if item]
    return value


class SettingsPart(BaseSettings):
    """The prefix and `.env` every part reads, and the environment several parts' checks
    consult (the token refusal, the default Host allowlist)."""

    model_config = SettingsConfigDict(env_prefix="ADVANCED_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "staging", "production"] = "development"


class TelemetrySettings(SettingsPart):
    """Metrics and traces (`realtime_runtime.observability`)."""

    telemetry_enabled: bool = True
    metrics_path: str = "/metrics"
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    otel_exporter_otlp_headers: SecretStr | None = None


class TokenSettings(SettingsPart):
    """The shared token, which every service refuses to start with outside development
    (CONTRACT section 2 says "a service", so the worker, which checks no credential, refuses
    it too: a deployment that forgot its secrets fails closed everywhere)."""

    realtime_token: SecretStr = SecretStr(DEFAULT_TOKEN)

    @model_validator(mode="after")
    def _refuse_the_default_token(self) -> Self:
        if self.environment != "development" and (
            self.realtime_token.get_secret_value() == DEFAULT_TOKEN
        ):
            raise ValueError(
                "ADVANCED_REALTIME_TOKEN is the documented default 'change-me-realtime': "
                "set a secret token, or ADVANCED_ENVIRONMENT=development for local runs."
            )
        return self


class ServiceSettings(TokenSettings, TelemetrySettings):
    """What every service reads: serving (`realtime_runtime.service`), its operations routes'
    headers and Host allowlist, logs, drain, telemetry, the token refusal."""

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
    event_transport: Literal["rabbitmq", "memory"] = "rabbitmq"
    # Host names (Host header, port aside) the services answer; `*.example.com` for a domain's
    # subdomains. Unset: localhost, 127.0.0.1 and [::1] in development (a DNS-rebinding page
    # then cannot reach a local suite running with the default token), any host otherwise.
    allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    # Sent on every HTTP response, the worker's /healthz and /metrics included.
    content_security_policy: str = DEFAULT_CSP
    strict_transport_security: str = "max-age=63072000; includeSubDomains; preload"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return _comma_separated(value, lower=True)

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


class AuthSettings(TokenSettings):
    """The credentials an edge accepts (`realtime_runtime.auth.Authenticator`)."""

    auth_jwt_secret: SecretStr | None = None
    auth_jwt_public_key: SecretStr | None = None
    auth_jwt_audience: str | None = None  # when set, a JWT's `aud` must name it
    auth_jwt_issuer: str | None = None  # when set, a JWT's `iss` must equal it

    @model_validator(mode="after")
    def _refuse_a_short_jwt_secret(self) -> Self:
        if self.auth_jwt_secret is not None and len(self.auth_jwt_secret.get_secret_value()) < 32:
            raise ValueError(
                "ADVANCED_AUTH_JWT_SECRET is shorter than 32 bytes, too short for HS256 "
                "(RFC 7518 3.2): use a longer random secret."
            )
        return self


class RedisSettings(SettingsPart):
    """Where Redis is and the names every service shares in it."""

    redis_url: SecretStr = SecretStr("redis://localhost:6379/2")
    # standalone: one Redis (or a primary behind a stable address). cluster: Redis Cluster,
    # `redis_url` naming one or more seed nodes, comma-separated; every key of one relay step
    # shares a hash tag (`envelope.topology.RedisKeys`), and live frames go by sharded pub/sub.
    redis_mode: Literal["standalone", "cluster"] = "standalone"
    redis_key_prefix: str = "advanced:"
    # The seed's section 6 names it ("logical identifier used in payload metadata"); no code
    # reads it today, and it stays so that a deployment setting it is not told it is unknown.
    board_channel: str = "advanced:board"
    activity_channel: str = "advanced:activity"
    # Set on every Redis client `realtime_runtime.service.redis_client` builds (redis-py's
    # default is no timeout at all: a Redis that stops answering would hold a command, and
    # whatever waits on it, for ever).
    redis_socket_timeout_seconds: float = Field(default=10, gt=0)
    redis_connect_timeout_seconds: float = Field(default=5, gt=0)

    @model_validator(mode="after")
    def _check_redis_nodes(self) -> Self:
        nodes = [node.strip() for node in self.redis_url.get_secret_value().split(",")]
        if not all(node.startswith(("redis://", "rediss://")) for node in nodes):
            raise ValueError(
                "ADVANCED_REDIS_URL must be redis:// or rediss:// URLs (comma-separated seed "
                "nodes in cluster mode)"
            )
        for name, value in (
            ("ADVANCED_REDIS_KEY_PREFIX", self.redis_key_prefix),
            ("ADVANCED_ACTIVITY_CHANNEL", self.activity_channel),
        ):
            if "{" in value or "}" in value:
                # Redis Cluster hashes a name by its first {...}: the suite's own hash tags
                # (`{part-N}`) must be that first pair, or a relay step leaves its slot.
                raise ValueError(f"{name} must have no {{ or }} (Redis Cluster hash tags)")
        if self.redis_mode == "standalone" and len(nodes) > 1:
            raise ValueError(
                "ADVANCED_REDIS_URL names several nodes: set ADVANCED_REDIS_MODE=cluster for a "
                "Redis Cluster (a standalone Redis is one URL)"
            )
        if self.redis_mode == "cluster":
            for node in nodes:
                # The path, or redis-py's `?db=`: either names the database.
                url = urlsplit(node)
                databases = {url.path.strip("/"), *parse_qs(url.query).get("db", [])}
                if databases - {"", "0"}:
                    raise ValueError(
                        "ADVANCED_REDIS_URL: Redis Cluster has only database 0; drop the "
                        "database from the seed URLs (ADVANCED_REDIS_KEY_PREFIX separates "
                        "deployments)"
                    )
        return self

    @property
    def redis_nodes(self) -> list[str]:
        return [node.strip() for node in self.redis_url.get_secret_value().split(",")]

    @property
    def redis_keys(self) -> RedisKeys:
        return RedisKeys(prefix=self.redis_key_prefix, activity_channel=self.activity_channel)


class RabbitMQSettings(SettingsPart):
    """Where RabbitMQ is and the topology the publisher and the consumer both declare."""

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
    rabbitmq_partitions: int = Field(default=8, ge=1, le=1024)

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


class HttpEdgeSettings(SettingsPart):
    """What an edge browsers call applies: CORS origins and the default HTTP rate limit."""

    allowed_origins: Annotated[list[str], NoDecode] = [
        "http://localhost:3000",
        "http://127.0.0.1:3000",
        "http://localhost:5173",
    ]
    rate_limit_default: str = "120/minute"

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return _comma_separated(value)

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        if any("*" in origin for origin in value):
            raise ValueError(
                "ADVANCED_ALLOWED_ORIGINS must list exact origins; a wildcard is refused."
            )
        for origin in value:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"ADVANCED_ALLOWED_ORIGINS entry {origin!r} is not an origin: write "
                    "scheme://host[:port] with no path or trailing slash ('null' is refused)."
                )
        return value


SettingsT = TypeVar("SettingsT", bound=SettingsPart)


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
