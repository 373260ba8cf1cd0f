from __future__ import annotations

import re

import pytest
from pydantic import ValidationError
from realtime_runtime.settings import (
    AuthSettings,
    HttpEdgeSettings,
    RabbitMQSettings,
    RedisSettings,
    ServiceSettings,
    TelemetrySettings,
    TokenSettings,
    load_settings,
)


def test_defaults_follow_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings(_env_file=None).realtime_token.get_secret_value() == (
        "change-me-realtime"
    )
    redis = RedisSettings(_env_file=None)
    assert redis.redis_url.get_secret_value() == "redis://localhost:6379/2"
    assert redis.activity_channel == "advanced:activity"
    assert redis.board_channel == "advanced:board"
    assert redis.redis_key_prefix == "advanced:"
    rabbitmq = RabbitMQSettings(_env_file=None)
    assert rabbitmq.rabbitmq_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert rabbitmq.rabbitmq_exchange == "advanced.board.events"
    assert rabbitmq.rabbitmq_queue == "advanced.board.events"
    assert rabbitmq.rabbitmq_retry_queue == "advanced.board.events.retry"
    assert rabbitmq.rabbitmq_dlq_queue == "advanced.board.events.dlq"
    edge = HttpEdgeSettings(_env_file=None)
    assert edge.rate_limit_default == "120/minute"
    assert edge.allowed_origins == [
        "http://localhost:3000",
        "http://127.0.0.1:3000",
        "http://localhost:5173",
    ]
    telemetry = TelemetrySettings(_env_file=None)
    assert (telemetry.telemetry_enabled, telemetry.metrics_path) == (True, "/metrics")
    assert telemetry.otel_exporter_otlp_endpoint is None


def test_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVANCED_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("ADVANCED_RABBITMQ_PARTITIONS", "3")
    assert HttpEdgeSettings(_env_file=None).allowed_origins == [
        "https://a.example",
        "https://b.example",
    ]
    assert RabbitMQSettings(_env_file=None).topology.partitions == 3


@pytest.mark.parametrize("part", [TokenSettings, ServiceSettings, AuthSettings])
@pytest.mark.parametrize("environment", ["test", "staging", "production"])
def test_the_default_token_is_refused_outside_development(
    environment: str, part: type[TokenSettings]
) -> None:
    with pytest.raises(ValidationError, match="ADVANCED_REALTIME_TOKEN"):
        part(_env_file=None, environment=environment)
    part(_env_file=None, environment=environment, realtime_token="a-real-secret")


def test_a_wildcard_origin_is_refused() -> None:
    with pytest.raises(ValidationError, match="wildcard"):
        HttpEdgeSettings(_env_file=None, allowed_origins=["*"])


@pytest.mark.parametrize("origin", ["null", "https://app.example/", "https://user@app.example"])
def test_an_origin_is_scheme_host_and_port_only(origin: str) -> None:
    with pytest.raises(ValidationError, match="not an origin"):
        HttpEdgeSettings(_env_file=None, allowed_origins=[origin])


def test_a_short_jwt_secret_is_refused() -> None:
    with pytest.raises(ValidationError, match="shorter than 32 bytes"):
        AuthSettings(_env_file=None, auth_jwt_secret="too-short")
    AuthSettings(_env_file=None, auth_jwt_secret="x" * 32)


def test_the_host_allowlist() -> None:
    assert ServiceSettings(_env_file=None).trusted_hosts == ["localhost", "127.0.0.1", "[::1]"]
    assert ServiceSettings(
        _env_file=None, environment="production", realtime_token="a-real-secret"
    ).trusted_hosts == ["*"]
    assert ServiceSettings(
        _env_file=None, allowed_hosts="App.Example, *.b.example"
    ).trusted_hosts == [
        "app.example",
        "*.b.example",
    ]
    with pytest.raises(ValidationError, match="not a host name"):
        ServiceSettings(_env_file=None, allowed_hosts="app.example:8004")


def test_secrets_do_not_show_in_the_settings_repr() -> None:
    settings = ServiceSettings(
        _env_file=None, realtime_token="s3cr3t-value", environment="production"
    )
    assert "s3cr3t-value" not in repr(settings)
    assert "guest:guest" not in repr(RabbitMQSettings(_env_file=None))


def test_the_rabbitmq_url_may_list_several_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RabbitMQSettings(
        _env_file=None, rabbitmq_url="amqp://u:p@a:5672/, amqps://u:p@b:5671/vh"
    )
    assert settings.rabbitmq_urls == ["amqp://u:p@a:5672/", "amqps://u:p@b:5671/vh"]
    # A node without a scheme is refused, and the message never repeats the credentials.
    monkeypatch.setenv("ADVANCED_RABBITMQ_URL", "amqp://u:secret@a:5672/,b:5672")
    with pytest.raises(SystemExit, match="one amqp:// or amqps:// URL per node") as refused:
        load_settings(RabbitMQSettings)
    assert "secret" not in str(refused.value)


def test_the_redis_mode_is_standalone_unless_set_to_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert RedisSettings(_env_file=None).redis_mode == "standalone"
    monkeypatch.setenv("ADVANCED_REDIS_MODE", "cluster")
    monkeypatch.setenv("ADVANCED_REDIS_URL", "redis://a:7000, rediss://b:7001/0")
    settings = load_settings(RedisSettings)
    assert settings.redis_mode == "cluster"
    assert settings.redis_nodes == ["redis://a:7000", "rediss://b:7001/0"]
    monkeypatch.setenv("ADVANCED_REDIS_MODE", "sentinel")
    with pytest.raises(SystemExit, match="redis_mode: Input should be 'standalone' or 'cluster'"):
        load_settings(RedisSettings)


def test_standalone_redis_is_one_url() -> None:
    with pytest.raises(ValidationError, match="set ADVANCED_REDIS_MODE=cluster"):
        RedisSettings(_env_file=None, redis_url="redis://a:6379/2,redis://b:6379/2")
    # Its database is its own business: any number, in the path or as `?db=`.
    assert RedisSettings(_env_file=None, redis_url="redis://a:6379?db=5").redis_nodes == [
        "redis://a:6379?db=5"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "redis://a:7000/2",
        "redis://a:7000,redis://b:7001/3",
        "redis://a:7000/?db=1",  # redis-py reads `?db=` as the database too
        "rediss://u:p@a:7000/0?db=4",
    ],
)
def test_a_cluster_seed_naming_a_database_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="Redis Cluster has only database 0"):
        RedisSettings(_env_file=None, redis_mode="cluster", redis_url=url)


@pytest.mark.parametrize(
    "url", ["redis://a:7000", "redis://a:7000/", "redis://a:7000/0", "redis://a:7000/0?db=0"]
)
def test_a_cluster_seed_may_name_database_0(url: str) -> None:
    assert RedisSettings(_env_file=None, redis_mode="cluster", redis_url=url).redis_nodes == [url]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_key_prefix", "tenant-{a}:"),
        ("redis_key_prefix", "x}"),
        ("activity_channel", "advanced:{activity}"),
    ],
)
def test_names_with_a_hash_tag_of_their_own_are_refused(field: str, value: str) -> None:
    """A brace in the prefix or the channel would be the hash tag of every key or channel:
    the relay step's channels would leave its keys' slot, and every step fail on a cluster."""
    with pytest.raises(ValidationError, match=re.escape("no { or }")):
        RedisSettings(_env_file=None, **{field: value})


def test_a_redis_url_that_is_no_redis_url_is_refused_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADVANCED_REDIS_MODE", "cluster")
    for url in ("redis://a:7000,b:7001", "redis://a:7000,", "unix:///run/redis.sock"):
        monkeypatch.setenv("ADVANCED_REDIS_URL", url)
        with pytest.raises(SystemExit, match="must be redis:// or rediss:// URLs"):
            load_settings(RedisSettings)
    # A password with an unescaped `/` must not reach the message through the "database".
    monkeypatch.setenv("ADVANCED_REDIS_URL", "redis://u:top/secret@a:7000")
    with pytest.raises(SystemExit, match="only database 0") as refused:
        load_settings(RedisSettings)
    assert "secret" not in str(refused.value)


def test_the_queue_type_is_classic_or_quorum() -> None:
    assert RabbitMQSettings(_env_file=None).rabbitmq_queue_type == "classic"
    assert (
        RabbitMQSettings(_env_file=None, rabbitmq_queue_type="quorum").topology.queue_type
        == "quorum"
    )
    with pytest.raises(ValidationError):
        RabbitMQSettings(_env_file=None, rabbitmq_queue_type="stream")


def test_a_part_checks_only_its_own_fields() -> None:
    """A service that does not compose a part neither reads nor checks its variables."""
    assert "rabbitmq_url" not in RedisSettings.model_fields
    RedisSettings(_env_file=None, rabbitmq_url="not-a-url", allowed_origins=["*"])
    ServiceSettings(_env_file=None, auth_jwt_secret="too-short", allowed_origins=["*"])
