"""The ports the partitioned consumer runs on: the broker's partitions and the leases.

Each has a RabbitMQ (or Redis) adapter and an in-memory one in `relay_worker.adapters`, so the
memory transport runs the same `PartitionedConsumer`, batching and acks included.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from relay_worker.relay import Delivery


class PartitionDelivery(Delivery, Protocol):
    @property
    def channel_lost(self) -> bool:
        """The channel that delivered it is gone: settling it is no longer possible, and the
        broker hands it back (with every later one) in order."""
        ...


class PartitionSource(Protocol):
    """One partition's queue as its consumer sees it, deliveries taken in order."""

    async def next_batch(self, limit: int) -> Sequence[PartitionDelivery] | None:
        """The next delivery and whatever else is already waiting, up to `limit`; None once
        the source is closed for good."""
        ...

    async def ack_in_order(self, deliveries: Sequence[PartitionDelivery]) -> None:
        """Ack a run of deliveries whose earlier ones are all settled."""
        ...

    def left_unsettled(self, deliveries: Sequence[PartitionDelivery]) -> None:
        """These were neither acked nor rejected: the broker redelivers them."""
        ...


class PartitionBroker(Protocol):
    def partition(
        self, partition: int, prefetch: int
    ) -> AbstractAsyncContextManager[PartitionSource]:
        """A partition's deliveries, at most `prefetch` unsettled; leaving the context hands
        every unsettled one back to the queue, in order."""
        ...

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each queue of the topology (partitions, retry, DLQ)."""
        ...


class Leases(Protocol):
    """Which partitions this worker may consume (`PartitionLeases` in Redis)."""

    async def plan(self, owned: set[int]) -> tuple[set[int], set[int]]:
        """Renew what is owned; return the partitions to start and those to stop."""
        ...

    async def release(self, partition: int) -> None: ...

    async def leave(self, owned: set[int]) -> None: ...
