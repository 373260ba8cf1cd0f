"""Runs one ordered consumer per leased partition and rebalances as workers come and go."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractRobustConnection
from envelope.topology import Topology
from prometheus_client import CollectorRegistry, Gauge
from redis.exceptions import RedisError

from relay_worker.adapters.rabbitmq import AmqpDelivery, partition_messages
from relay_worker.adapters.redis import PartitionLeases
from relay_worker.relay import Relay

log = structlog.get_logger("relay_worker")


@dataclass
class _Partition:
    task: asyncio.Task[None]
    busy: asyncio.Lock


class PartitionedConsumer:
    """Each partition is consumed by one task on its own channel, one message at a time.

    Sequential handling per partition is what keeps a board's events in the order the ingress
    published them; throughput comes from partitions running side by side, on this worker and
    on the others.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        relay: Relay,
        leases: PartitionLeases,
        topology: Topology,
        *,
        prefetch: int,
        lease_ms: int,
        registry: CollectorRegistry,
    ) -> None:
        self._connection = connection
        self._relay = relay
        self._leases = leases
        self._topology = topology
        self._prefetch = prefetch
        self._interval = lease_ms / 3000
        self._owned: dict[int, _Partition] = {}
        self._depth = Gauge(
            "advanced_worker_queue_depth",
            "Messages waiting in each RabbitMQ queue of the topology.",
            ["queue"],
            registry=registry,
        )
        self._partitions_gauge = Gauge(
            "advanced_worker_partitions_owned",
            "Partitions this worker consumes now.",
            registry=registry,
        )

    @property
    def owned(self) -> set[int]:
        return set(self._owned)

    async def run(self) -> None:
        while True:
            try:
                start, stop = await self._leases.plan(self.owned)
            except (RedisError, OSError) as exc:
                log.warning(
                    "partition leases unavailable; keeping current partitions", error=str(exc)
                )
            else:
                for partition in stop:
                    await self._stop(partition, release=True)
                for partition in start:
                    busy = asyncio.Lock()
                    task = asyncio.create_task(self._consume(partition, busy))
                    self._owned[partition] = _Partition(task, busy)
                    log.info("consuming partition", partition=partition)
                self._partitions_gauge.set(len(self._owned))
            with contextlib.suppress(Exception):
                await self._measure_depth()
            await asyncio.sleep(self._interval)

    async def drain(self) -> None:
        """Finish the message in hand on every partition, hand the rest back, release leases."""
        for partition in list(self._owned):
            await self._stop(partition, release=True)
        with contextlib.suppress(RedisError, OSError):
            await self._leases.leave(set())

    async def _consume(self, partition: int, busy: asyncio.Lock) -> None:
        name = self._topology.partition_queue(partition)
        async with partition_messages(self._connection, name, self._prefetch) as (channel, queue):
            async with queue.iterator() as messages:
                async for message in messages:
                    async with busy:
                        await self._relay.handle(
                            AmqpDelivery(message, channel, self._topology, name)
                        )

    async def _stop(self, partition: int, *, release: bool) -> None:
        state = self._owned.pop(partition)
        async with state.busy:  # never cut a message between its Redis step and its ack
            state.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await state.task
        if release:
            with contextlib.suppress(RedisError, OSError):
                await self._leases.release(partition)
        log.info("released partition", partition=partition)

    async def _measure_depth(self) -> None:
        channel = await self._connection.channel()
        try:
            names = [self._topology.partition_queue(p) for p in range(self._topology.partitions)]
            names += [self._topology.retry_queue, self._topology.dlq_queue]
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                self._depth.labels(name).set(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()
