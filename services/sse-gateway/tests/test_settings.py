"""The gateway's settings: the edge's checks run here, the worker's do not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from realtime_runtime.settings import load_settings
from sse_gateway.settings import GatewaySettings


def test_the_gateway_starts_with_a_ladder_the_worker_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The retry ladder and the RabbitMQ URL are the worker's: set so that the worker refuses
    to start (relay_worker's test_settings), the gateway still starts."""
    monkeypatch.chdir(tmp_path)  # no .env file
    monkeypatch.setenv("ADVANCED_REDIS_IDEMPOTENCY_TTL_SECONDS", "30")
    monkeypatch.setenv("ADVANCED_RABBITMQ_RETRY_DELAY_MS", "60000")
    monkeypatch.setenv("ADVANCED_RABBITMQ_URL", "not-a-node-list")
    settings = load_settings(GatewaySettings)
    assert not {
        "redis_idempotency_ttl_seconds",
        "rabbitmq_max_retries",
        "rabbitmq_retry_delay_ms",
        "rabbitmq_url",
        "replay_retention",
    } & set(type(settings).model_fields)


def test_the_gateway_refuses_unsafe_edge_settings() -> None:
    with pytest.raises(ValidationError, match="ADVANCED_REALTIME_TOKEN"):
        GatewaySettings(_env_file=None, environment="staging")
    with pytest.raises(ValidationError, match="wildcard"):
        GatewaySettings(_env_file=None, allowed_origins=["https://*.example"])
    with pytest.raises(ValidationError, match="shorter than 32 bytes"):
        GatewaySettings(_env_file=None, auth_jwt_secret="too-short")


def test_the_gateway_defaults() -> None:
    settings = GatewaySettings(_env_file=None)
    assert (settings.sse_port, settings.sse_heartbeat_seconds) == (8005, 15)
    assert settings.activity_stream_rate_limit == "30/minute"
    assert settings.redis_keys.activity_channel == "advanced:activity"
