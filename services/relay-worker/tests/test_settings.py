"""The worker's own settings: the retry ladder and what Redis keeps, checked here only."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from realtime_runtime.settings import load_settings
from relay_worker.settings import WorkerSettings


def test_the_ladder_and_retention_defaults_follow_the_seed() -> None:
    settings = WorkerSettings(_env_file=None)
    assert (settings.rabbitmq_max_retries, settings.rabbitmq_retry_delay_ms) == (5, 5000)
    assert settings.redis_idempotency_ttl_seconds == 300
    assert (settings.replay_retention, settings.replay_retention_seconds) == (10_000, 0)
    assert settings.board_idle_ttl_seconds == 7 * 24 * 3600
    assert (settings.redis_min_replicas, settings.redis_min_replicas_timeout_ms) == (0, 1000)


def test_the_wait_timeout_stays_below_the_workers_socket_timeout() -> None:
    # A WAIT the socket timeout cut would read as a lost connection, not as too few replicas.
    with pytest.raises(ValidationError, match="below the worker's Redis socket timeout"):
        WorkerSettings(_env_file=None, redis_min_replicas=1, redis_min_replicas_timeout_ms=5000)
    with pytest.raises(ValidationError):  # WAIT n 0 would block for ever
        WorkerSettings(_env_file=None, redis_min_replicas_timeout_ms=0)
    WorkerSettings(_env_file=None, redis_min_replicas=1, redis_min_replicas_timeout_ms=4999)


def test_the_idempotency_ttl_must_outlive_the_retry_ladder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="outlive the retry ladder"):
        WorkerSettings(_env_file=None, redis_idempotency_ttl_seconds=30)
    # (2 + 1) x 10 s = 30 s: a TTL of 30 s does not outlive it, 31 s does.
    ladder = {"rabbitmq_max_retries": 2, "rabbitmq_retry_delay_ms": 10_000}
    with pytest.raises(ValidationError, match="outlive the retry ladder"):
        WorkerSettings(_env_file=None, redis_idempotency_ttl_seconds=30, **ladder)
    WorkerSettings(_env_file=None, redis_idempotency_ttl_seconds=31, **ladder)
    monkeypatch.chdir(tmp_path)  # no .env file
    monkeypatch.setenv("ADVANCED_RABBITMQ_RETRY_DELAY_MS", "60000")
    with pytest.raises(SystemExit, match="ADVANCED_REDIS_IDEMPOTENCY_TTL_SECONDS"):
        load_settings(WorkerSettings)


def test_the_worker_refuses_the_default_token_outside_development() -> None:
    """CONTRACT section 2: every service, though the worker checks no credential itself."""
    with pytest.raises(ValidationError, match="ADVANCED_REALTIME_TOKEN"):
        WorkerSettings(_env_file=None, environment="production")
    WorkerSettings(_env_file=None, environment="production", realtime_token="a-real-secret")


def test_the_worker_does_not_read_the_edges_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Browser origins and JWT keys are the edges' (the gateway's and the ingress's): the
    worker neither reads nor checks them."""
    monkeypatch.setenv("ADVANCED_ALLOWED_ORIGINS", "*")
    monkeypatch.setenv("ADVANCED_AUTH_JWT_SECRET", "too-short")
    settings = WorkerSettings(_env_file=None)
    assert not {"allowed_origins", "auth_jwt_secret", "rate_limit_default"} & set(
        type(settings).model_fields
    )
