"""The worker's settings (the relay and the `dlq` commands): the brokers, the retry ladder,
and how long Redis keeps what the relay writes. No auth part beyond the token refusal and no
HTTP edge part: the worker serves only its operations routes."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from realtime_runtime.settings import RabbitMQSettings, RedisSettings, ServiceSettings

# The worker's own Redis timeouts (socket and connect), kept from before the shared ones
# existed: the fault tests' timing (a dropped connection held, then retried) is built on them.
WORKER_REDIS_TIMEOUT_SECONDS = 5.0


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
    # Contract section 9: a relay step counts as done (and its message is acked) only once this
    # many Redis replicas hold it, checked with WAIT on the connection that wrote it. Fewer
    # within REDIS_MIN_REPLICAS_TIMEOUT_MS, and the partition pauses with its messages held
    # (never retried or dead-lettered for it) until a later attempt's WAIT is answered. 0: no
    # WAIT. The timeout bounds how long a batch waits for slow replicas; it stays below the
    # worker's 5 s socket timeout, which would otherwise cut the WAIT as a lost connection.
    redis_min_replicas: int = Field(default=0, ge=0)
    redis_min_replicas_timeout_ms: int = Field(default=1000, ge=1)
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

    @model_validator(mode="after")
    def _wait_ends_before_the_socket_timeout(self) -> Self:
        if self.redis_min_replicas_timeout_ms >= WORKER_REDIS_TIMEOUT_SECONDS * 1000:
            raise ValueError(
                "ADVANCED_REDIS_MIN_REPLICAS_TIMEOUT_MS must stay below the worker's Redis "
                f"socket timeout ({WORKER_REDIS_TIMEOUT_SECONDS * 1000:.0f} ms); lower it."
            )
        return self
