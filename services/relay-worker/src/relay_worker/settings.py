"""The worker's settings (the relay and the `dlq` commands): the brokers, the retry ladder,
and how long Redis keeps what the relay writes. No auth part beyond the token refusal and no
HTTP edge part: the worker serves only its operations routes."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from realtime_runtime.settings import RabbitMQSettings, RedisSettings, ServiceSettings


class WorkerSettings(ServiceSettings, RedisSettings, RabbitMQSettings):
    worker_port: int = 8006
    rabbitmq_prefetch: int = Field(default=64, ge=1)
    # The retry ladder: a message that fails waits RETRY_DELAY_MS in the retry queue, up to
    # MAX_RETRIES times, then goes to the DLQ.
    rabbitmq_max_retries: int = Field(default=5, ge=0)
    rabbitmq_retry_delay_ms: int = Field(default=5000, ge=1)
    partition_lease_ms: int = Field(default=6000, ge=1000)
    # How long the relay remembers an event id it has applied, so a redelivery is a duplicate.
    redis_idempotency_ttl_seconds: int = Field(default=300, ge=1)
    replay_retention: int = Field(default=10_000, ge=1)
    # Beside the count: events older than this may be trimmed from the retained streams (the
    # relay trims on each write; an idle board's stream expires this long after its last
    # event). 0, the default: by count only, and ADVANCED_BOARD_IDLE_TTL_SECONDS bounds an
    # idle board's history instead.
    replay_retention_seconds: int = Field(default=0, ge=0)
    # A board written to by nobody for this long loses its Redis state (sequence, epoch, stream;
    # ≈5 KB and up per board); written again, it starts a new epoch. 0: kept for ever.
    board_idle_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    # A publish of the worker's own (a dead letter) not confirmed by then counts as refused:
    # the partition pauses and publishes it again (aio-pika would wait for ever).
    rabbitmq_confirm_timeout_seconds: float = Field(default=15.0, gt=0)
    # Test-only fault hook: exit abruptly after the Redis step of the N-th message, before
    # its RabbitMQ ack, to prove that the redelivery is recognised as a duplicate.
    worker_fault_exit_after_relay: int = 0

    @model_validator(mode="after")
    def _idempotency_outlives_the_retry_ladder(self) -> Self:
        # A message can come back as late as the whole ladder after its relay step; a marker
        # expired by then would let the relay apply it twice (docs/delivery.md).
        ladder_seconds = (self.rabbitmq_max_retries + 1) * self.rabbitmq_retry_delay_ms / 1000
        if self.redis_idempotency_ttl_seconds <= ladder_seconds:
            raise ValueError(
                "ADVANCED_REDIS_IDEMPOTENCY_TTL_SECONDS must outlive the retry ladder "
                f"({ladder_seconds:.0f}s = (MAX_RETRIES + 1) x RETRY_DELAY_MS); raise it."
            )
        return self
