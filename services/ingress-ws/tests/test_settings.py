"""The ingress's settings: every shared part's checks, none of the worker's."""

from __future__ import annotations

import pytest
from ingress_ws.settings import IngressSettings
from pydantic import ValidationError


def test_the_ingress_does_not_check_the_workers_ladder() -> None:
    settings = IngressSettings(_env_file=None)
    assert "redis_idempotency_ttl_seconds" not in type(settings).model_fields
    IngressSettings(_env_file=None, redis_idempotency_ttl_seconds=30)


def test_the_ingress_refuses_unsafe_settings() -> None:
    with pytest.raises(ValidationError, match="ADVANCED_REALTIME_TOKEN"):
        IngressSettings(_env_file=None, environment="production")
    with pytest.raises(ValidationError, match="not an origin"):
        IngressSettings(_env_file=None, allowed_origins=["null"])
    with pytest.raises(ValidationError, match="shorter than 32 bytes"):
        IngressSettings(_env_file=None, auth_jwt_secret="too-short")
    with pytest.raises(ValidationError, match="one amqp:// or amqps:// URL per node"):
        IngressSettings(_env_file=None, rabbitmq_url="rabbitmq:5672")


@pytest.mark.parametrize("field", ["websocket_resume_rate_limit", "http_publish_rate_limit"])
def test_rate_limits_are_parsed_at_start_up(field: str) -> None:
    with pytest.raises(ValidationError, match="is not a rate limit"):
        IngressSettings(_env_file=None, **{field: "often"})
    IngressSettings(_env_file=None, **{field: "1/10 seconds"})
