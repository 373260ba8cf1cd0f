"""The worker's in-memory adapters: the embedded broker's partitions, with the same retry and
dead-letter rules as RabbitMQ's topology, and leases for a worker that is alone."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from envelope.topology import Topology
from prometheus_client import CollectorRegistry
from realtime_runtime.memory import MemoryBroker, MemoryMessage

from relay_worker.consumer import PartitionedConsumer
from relay_worker.ports import PartitionDelivery
from relay_worker.relay import Relay

ATTEMPTS = "x-advanced-attempts"
REASON = "x-advanced-failure-reason"

# The memory transport's pause back-off (first, longest): a paused partition tries again
# sooner than on RabbitMQ, where every attempt costs the brokers a round trip.
MEMORY_PAUSE = (0.01, 1.0)


class MemorySource:
    """One partition's queue as a consumer holds it: what it took and has not settled yet."""

    def __init__(self, broker: MemoryBroker, partition: int, retry_delay: float) -> None:
        self.broker = broker
        self.partition = partition
        self.retry_delay = retry_delay
        self.closed = False
        self._unsettled: dict[int, MemoryMessage] = {}  # by id, in delivery order

    async def next_batch(self, limit: int) -> list[MemoryDelivery]:
        queue = self.broker.partition(self.partition)
        batch = [await queue.get()]
        while len(batch) < limit and not queue.empty():
            batch.append(queue.get_nowait())
        for message in batch:
            self._unsettled[id(message)] = message
        return [MemoryDelivery(m, self.broker, self.retry_delay, source=self) for m in batch]

    def settled(self, message: MemoryMessage) -> None:
        self._unsettled.pop(id(message), None)

    async def ack_in_order(self, deliveries: Sequence[PartitionDelivery]) -> None:
        for delivery in deliveries:
            await delivery.ack()

    def left_unsettled(self, deliveries: Sequence[PartitionDelivery]) -> None:
        return None  # handed back when the source closes

    def close(self) -> None:
        """As a closed channel does: every unsettled message back to its queue, in order."""
        self.closed = True
        self.broker.give_back(self.partition, list(self._unsettled.values()))
        self._unsettled.clear()


class MemoryDelivery:
    def __init__(
        self,
        message: MemoryMessage,
        broker: MemoryBroker,
        retry_delay: float,
        *,
        source: MemorySource | None = None,
    ) -> None:
        self.body = message.body
        self.attempts = int(message.headers.get(ATTEMPTS, 0))
        self._message = message
        self._broker = broker
        self._retry_delay = retry_delay
        self._source = source

    @property
    def channel_lost(self) -> bool:
        return self._source is not None and self._source.closed

    @property
    def _partition(self) -> int:
        return 0 if self._source is None else self._source.partition

    def _settled(self) -> None:
        if self._source is not None:
            self._source.settled(self._message)

    async def ack(self) -> None:
        self._settled()

    async def retry(self, reason: str) -> None:
        headers = {**self._message.headers, ATTEMPTS: self.attempts + 1}
        self._broker.retry_later(
            MemoryMessage(self.body, headers), self._partition, self._retry_delay
        )
        self._settled()

    async def dead_letter(self, reason: str) -> None:
        headers = {**self._message.headers, REASON: reason, ATTEMPTS: self.attempts + 1}
        self._broker.dead_letters.append(MemoryMessage(self.body, headers))
        self._settled()


class MemoryPartitions:
    """The embedded broker's partition queues of the topology (`PartitionBroker`)."""

    def __init__(self, broker: MemoryBroker, topology: Topology, retry_delay: float) -> None:
        self._broker = broker
        self._topology = topology
        self._retry_delay = retry_delay

    @contextlib.asynccontextmanager
    async def partition(self, partition: int, prefetch: int) -> AsyncIterator[MemorySource]:
        source = MemorySource(self._broker, partition, self._retry_delay)
        try:
            yield source
        finally:
            source.close()

    async def queue_depths(self) -> dict[str, int]:
        broker, topology = self._broker, self._topology
        depths = {
            topology.partition_queue(p): broker.partition(p).qsize()
            for p in range(topology.partitions)
        }
        depths[topology.retry_queue] = len(broker.retrying)
        depths[topology.dlq_queue] = len(broker.dead_letters)
        return depths


class MemoryLeases:
    """Leases for the only worker of the process: every partition is its own."""

    def __init__(self, partitions: int) -> None:
        self._partitions = partitions

    async def plan(self, owned: set[int]) -> tuple[set[int], set[int]]:
        return set(range(self._partitions)) - owned, set()

    async def release(self, partition: int) -> None:
        return None

    async def leave(self, owned: set[int]) -> None:
        return None


async def consume_memory(
    broker: MemoryBroker, relay: Relay, retry_delay: float, partitions: int = 1
) -> None:
    """Consume the embedded broker with the `PartitionedConsumer`, as the worker's memory
    transport does (for tests: a consumer and its metrics of their own)."""
    topology = Topology("memory", "memory.partition", "memory.retry", "memory.dlq", partitions)
    consumer = PartitionedConsumer(
        MemoryPartitions(broker, topology, retry_delay),
        relay,
        MemoryLeases(partitions),
        prefetch=64,
        lease_ms=6000,
        registry=CollectorRegistry(),
        pause=MEMORY_PAUSE,
    )
    try:
        await consumer.run()
    finally:
        await consumer.drain()
