from __future__ import annotations

import pytest
from pydantic import ValidationError
from realtime_runtime.settings import SuiteSettings, load_settings


def test_defaults_follow_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = SuiteSettings(_env_file=None)
    assert settings.realtime_token.get_secret_value() == "change-me-realtime"
    assert settings.redis_url.get_secret_value() == "redis://localhost:6379/2"
    assert settings.rabbitmq_exchange == "advanced.board.events"
    assert settings.rabbitmq_retry_queue == "advanced.board.events.retry"
    assert settings.rabbitmq_dlq_queue == "advanced.board.events.dlq"
    assert (settings.rabbitmq_max_retries, settings.rabbitmq_retry_delay_ms) == (5, 5000)
    assert settings.redis_idempotency_ttl_seconds == 300
    assert settings.activity_channel == "advanced:activity"
    assert settings.redis_key_prefix == "advanced:"
    assert settings.replay_retention == 10_000
    assert settings.rate_limit_default == "120/minute"


def test_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVANCED_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("ADVANCED_RABBITMQ_PARTITIONS", "3")
    settings = SuiteSettings(_env_file=None)
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.topology.partitions == 3


@pytest.mark.parametrize("environment", ["test", "staging", "production"])
def test_the_default_token_is_refused_outside_development(environment: str) -> None:
    with pytest.raises(ValidationError, match="ADVANCED_REALTIME_TOKEN"):
        SuiteSettings(_env_file=None, environment=environment)
    SuiteSettings(_env_file=None, environment=environment, realtime_token="a-real-secret")


def test_a_wildcard_origin_is_refused() -> None:
    with pytest.raises(ValidationError, match="wildcard"):
        SuiteSettings(_env_file=None, allowed_origins=["*"])


def test_the_idempotency_ttl_must_outlive_the_retry_ladder() -> None:
    with pytest.raises(ValidationError, match="outlive the retry ladder"):
        SuiteSettings(_env_file=None, redis_idempotency_ttl_seconds=30)


def test_secrets_do_not_show_in_the_settings_repr() -> None:
    settings = SuiteSettings(
        _env_file=None, realtime_token="s3cr3t-value", environment="production"
    )
    assert "s3cr3t-value" not in repr(settings)
    assert "guest:guest" not in repr(settings)


def test_the_rabbitmq_url_may_list_several_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = SuiteSettings(
        _env_file=None, rabbitmq_url="amqp://u:p@a:5672/, amqps://u:p@b:5671/vh"
    )
    assert settings.rabbitmq_urls == ["amqp://u:p@a:5672/", "amqps://u:p@b:5671/vh"]
    # A node without a scheme is refused, and the message never repeats the credentials.
    monkeypatch.setenv("ADVANCED_RABBITMQ_URL", "amqp://u:secret@a:5672/,b:5672")
    with pytest.raises(SystemExit, match="one amqp:// or amqps:// URL per node") as refused:
        load_settings(SuiteSettings)
    assert "secret" not in str(refused.value)


def test_the_queue_type_is_classic_or_quorum() -> None:
    assert SuiteSettings(_env_file=None).rabbitmq_queue_type == "classic"
    assert SuiteSettings(_env_file=None, rabbitmq_queue_type="quorum").topology.queue_type == (
        "quorum"
    )
    with pytest.raises(ValidationError):
        SuiteSettings(_env_file=None, rabbitmq_queue_type="stream")
