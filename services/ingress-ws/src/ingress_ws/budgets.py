"""Message budgets: how much a socket, a client or a credential may send, and how many bytes
the process may hold unconfirmed. slowapi covers the HTTP routes' per-address limit only."""

from __future__ import annotations

import math
import time

import structlog
from aiolimiter import AsyncLimiter
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from prometheus_client import Gauge

log: structlog.stdlib.BoundLogger = structlog.get_logger("ingress_ws")


class MessageBudget:
    """The WebSocket message limits (slowapi covers HTTP routes only).

    A connection's budget is a leaky bucket in this process (aiolimiter: up to the limit in a
    burst, refilled at the limit's rate): the socket lives here, and a Redis round trip per
    frame would cost the ingress more than the frame's own publish. The optional per-client
    budget spans sockets and replicas, so it is a `limits` moving window in `storage` (Redis
    with the RabbitMQ transport); if Redis stops answering, that count falls back to this
    process's memory rather than letting every frame through or refusing them all.
    """

    def __init__(
        self,
        storage: Storage,
        per_connection: RateLimitItem,
        per_client: RateLimitItem | None = None,
    ) -> None:
        self._shared = MovingWindowRateLimiter(storage)
        self._fallback = MovingWindowRateLimiter(MemoryStorage())
        self._per_connection = per_connection
        self._per_client = per_client
        self._storage_failing = False

    def connection_budget(self) -> AsyncLimiter:
        return AsyncLimiter(self._per_connection.amount, self._per_connection.get_expiry())

    async def allow(self, connection: AsyncLimiter, client: str) -> bool:
        if not connection.has_capacity():
            return False
        await connection.acquire()  # returns at once: there is capacity
        if self._per_client is None:
            return True
        try:
            allowed = await self._shared.hit(self._per_client, "ws-client", client)
        except StorageError as exc:
            if not self._storage_failing:
                log.warning("rate-limit storage unreachable; counting in memory", error=str(exc))
            self._storage_failing = True
            return await self._fallback.hit(self._per_client, "ws-client", client)
        self._storage_failing = False
        return allowed


class UnconfirmedBytes:
    """The bytes of envelopes published and not yet confirmed by RabbitMQ, for the whole
    process: while the broker stops confirming, every socket's window
    (`sessions.MAX_IN_FLIGHT`) would otherwise fill, and the cap of sockets multiplies it past
    the pod's memory."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.held = 0
        self._gauge = gauge

    def reserve(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self._gauge.set(self.held)
        return True

    def release(self, size: int) -> None:
        self.held -= size
        self._gauge.set(self.held)


class PublishRate:
    """Events published over HTTP per credential key, across replicas (a `limits` moving
    window in Redis with the RabbitMQ transport). If Redis stops answering, the count falls
    back to this process's memory rather than letting everything through or refusing all."""

    def __init__(self, storage: Storage, limit: RateLimitItem) -> None:
        self._shared = MovingWindowRateLimiter(storage)
        self._fallback = MovingWindowRateLimiter(MemoryStorage())
        self._limit = limit
        self._storage_failing = False

    async def take(self, key: str, wanted: int) -> tuple[int, int]:
        """How many of `wanted` events may go now, and the seconds until more may."""
        try:
            taken = await self._take(self._shared, key, wanted)
        except StorageError as exc:
            if not self._storage_failing:  # once per outage, not once per request
                log.warning("rate-limit storage unreachable; counting in memory", error=str(exc))
            self._storage_failing = True
            return await self._take(self._fallback, key, wanted)
        self._storage_failing = False
        return taken

    async def _take(
        self, limiter: MovingWindowRateLimiter, key: str, wanted: int
    ) -> tuple[int, int]:
        stats = await limiter.get_window_stats(self._limit, "http-publish", key)
        granted = min(wanted, max(stats.remaining, 0))
        if granted and not await limiter.hit(self._limit, "http-publish", key, cost=granted):
            granted = 0  # another request took the rest meanwhile
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return granted, retry_after
