"""Which failures belong to the infrastructure and which to the message: decided here only.

An infrastructure fault (Redis refusing writes or unreachable, RabbitMQ not confirming the
worker's own publish) says nothing about the message: it would fail the same way for every
message behind it, so the partition pauses with the message still held, in order. Any other
failure belongs to the message and takes the retry ladder, then the DLQ.
"""

from __future__ import annotations

import re
from typing import Literal

from redis import exceptions as redis_errors

Source = Literal["redis", "rabbitmq"]
"""Where an infrastructure fault came from: a refused relay step, or a refused settlement
(RabbitMQ did not take an ack, a reject or a dead letter: any exception of those is one)."""


class ReplicationNotConfirmed(redis_errors.RedisError):
    """`WAIT` came back with fewer replicas than required: the write may be lost on a failover,
    so the relay step must not count as done (the partition pauses and tries again)."""


# redis-py maps these replies to classes of their own.
_REDIS_CLASSES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # also LOADING (BusyLoadingError), max clients, auth lost
    redis_errors.TimeoutError,
    redis_errors.OutOfMemoryError,  # OOM under noeviction
    redis_errors.ReadOnlyError,  # READONLY: a replica after a failover
    redis_errors.NoScriptError,  # script cache lost: the step changed nothing
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,  # also MASTERDOWN
    # Redis Cluster: the slot is served elsewhere now (MOVED, ASK; also a replica's answer to
    # a write), by nobody for the moment, or redirected past redis-py's limit.
    redis_errors.AskError,
    redis_errors.SlotNotCoveredError,
    redis_errors.ClusterError,
    ReplicationNotConfirmed,
    OSError,  # sockets (builtin ConnectionError and TimeoutError are OSErrors)
)
# Replies redis-py leaves as a plain ResponseError, recognised by their error code. Redis 7
# keeps the code first even when the command failed inside a script.
_REDIS_CODES = re.compile(
    r"^(MISCONF|BUSY|NOREPLICAS|MASTERDOWN|CLUSTERDOWN|LOADING|OOM|MOVED|ASK|TRYAGAIN)\b"
)


def redis_fault(error: BaseException) -> bool:
    """True when Redis could not take a write for reasons of its own, not of the message."""
    if isinstance(error, _REDIS_CLASSES):
        return True
    return isinstance(error, redis_errors.ResponseError) and bool(
        _REDIS_CODES.match(str(error).lstrip())
    )
