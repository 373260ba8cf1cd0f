from __future__ import annotations

from envelope.settings import SuiteSettings
from pydantic import Field


class WorkerSettings(SuiteSettings):
    worker_port: int = 8006
    rabbitmq_prefetch: int = Field(default=64, ge=1)
    partition_lease_ms: int = Field(default=6000, ge=1000)
    # A board written to by nobody for this long loses its Redis state (sequence, epoch, stream;
    # ≈5 KB and up per board); written again, it starts a new epoch. 0: kept for ever.
    board_idle_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    # Test-only fault hook: exit abruptly after the Redis step of the N-th message, before
    # its RabbitMQ ack, to prove that the redelivery is recognised as a duplicate.
    worker_fault_exit_after_relay: int = 0
