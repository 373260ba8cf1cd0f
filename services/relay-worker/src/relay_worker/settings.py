from __future__ import annotations

from pydantic import Field
from realtime_runtime.settings import SuiteSettings


class WorkerSettings(SuiteSettings):
    worker_port: int = 8006
    rabbitmq_prefetch: int = Field(default=64, ge=1)
    partition_lease_ms: int = Field(default=6000, ge=1000)
    # A board written to by nobody for this long loses its Redis state (sequence, epoch, stream;
    # ≈5 KB and up per board); written again, it starts a new epoch. 0: kept for ever.
    board_idle_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    # A publish of the worker's own (a dead letter) not confirmed by then counts as refused:
    # the partition pauses and publishes it again (aio-pika would wait for ever).
    rabbitmq_confirm_timeout_seconds: float = Field(default=15.0, gt=0)
    # Test-only fault hook: exit abruptly after the Redis step of the N-th message, before
    # its RabbitMQ ack, to prove that the redelivery is recognised as a duplicate.
    worker_fault_exit_after_relay: int = 0
