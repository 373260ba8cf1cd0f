"""Runs one ordered consumer per leased partition and rebalances as workers come and go."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from relay_worker.ports import Leases, PartitionBroker, PartitionDelivery, PartitionSource
from relay_worker.relay import Relay

log = structlog.get_logger("relay_worker")

# Back-off of a paused partition between attempts (seconds).
PAUSE = (0.1, 2.0)  # first, longest


@dataclass
class _Partition:
    task: asyncio.Task[None]
    busy: asyncio.Lock
    restarts: int = 0


class PartitionedConsumer:
    """Each partition is consumed by one task on its own channel, one message at a time.

    Sequential handling per partition is what keeps a board's events in the order the ingress
    published them; throughput comes from partitions running side by side, on this worker and
    on the others. A partition task that dies (its channel closed under it, say) is restarted
    while the lease is held; a worker that cannot renew its leases for a whole lease period
    stops consuming, since another worker may own those partitions by now.

    `pause` is the back-off of a paused partition (first, longest), in seconds.
    """

    def __init__(
        self,
        broker: PartitionBroker,
        relay: Relay,
        leases: Leases,
        *,
        prefetch: int,
        lease_ms: int,
        registry: CollectorRegistry,
        store_writable: Callable[[], Awaitable[bool]] | None = None,
        pause: tuple[float, float] = PAUSE,
    ) -> None:
        self._broker = broker
        self._relay = relay
        self._leases = leases
        self._pause_first, self._pause_longest = pause
        self._prefetch = prefetch
        self._lease_seconds = lease_ms / 1000
        self._interval = lease_ms / 3000
        self._store_writable = store_writable
        self._paused: set[int] = set()
        self._leases_failing = False
        self._owned: dict[int, _Partition] = {}
        self._depth = Gauge(
            "advanced_worker_queue_depth",
            "Messages waiting in each RabbitMQ queue of the topology (partitions, retry, DLQ).",
            ["queue"],
            registry=registry,
        )
        self._partitions_gauge = Gauge(
            "advanced_worker_partitions_owned",
            "Partitions this worker consumes now.",
            registry=registry,
        )
        self._paused_gauge = Gauge(
            "advanced_worker_partitions_paused",
            "Partitions paused by an infrastructure fault, their messages held until a write "
            "to Redis succeeds and RabbitMQ takes the settlements again.",
            registry=registry,
        )
        self._unsettled = Counter(
            "advanced_worker_unsettled",
            "Messages whose ack or reject failed because their channel was lost "
            "(RabbitMQ redelivers them).",
            registry=registry,
        )
        self._restarts = Counter(
            "advanced_worker_partition_restarts",
            "Partition consumers restarted after they stopped unexpectedly.",
            registry=registry,
        )

    @property
    def owned(self) -> set[int]:
        return set(self._owned)

    @property
    def paused(self) -> set[int]:
        """Partitions waiting for the infrastructure, with their messages held."""
        return set(self._paused)

    @property
    def flowing(self) -> bool:
        """False while a partition is paused or the leases cannot be renewed (Redis refusing
        writes stops the lease renewal too: the partitions are then handed back)."""
        return not self._paused and not self._leases_failing

    async def run(self) -> None:
        renewed_at = time.monotonic()
        while True:
            try:
                start, stop = await self._leases.plan(self.owned)
            except (RedisError, OSError) as exc:
                self._leases_failing = True
                if self._owned and time.monotonic() - renewed_at > self._lease_seconds:
                    # Our leases have expired in Redis: another worker may hold them now.
                    log.warning(
                        "partition leases lapsed while Redis was unreachable; stopping",
                        partitions=sorted(self._owned),
                        error=str(exc),
                    )
                    for partition in list(self._owned):
                        await self._stop(partition, release=False)
                else:
                    log.warning("partition leases unavailable; retrying", error=str(exc))
            else:
                renewed_at = time.monotonic()
                self._leases_failing = False
                for partition in stop:
                    await self._stop(partition, release=True)
                for partition in start:
                    self._start(partition)
            self._restart_failed()
            self._partitions_gauge.set(len(self._owned))
            await asyncio.sleep(self._interval)

    async def measure(self, every: float = 10.0) -> None:
        """Queue depths for the metrics, in a loop of its own: never delays lease renewal.

        Every 10 s, on one channel kept open: each reading costs RabbitMQ a passive
        declaration per queue, a cost paid whatever the traffic.
        """
        while True:
            with contextlib.suppress(Exception):
                # Bounded: while RabbitMQ reconnects, opening a channel waits for it.
                await asyncio.wait_for(self._measure_depth(), 2 * every)
            await asyncio.sleep(every)

    async def drain(self) -> None:
        """Finish the message in hand on every partition, hand the rest back, release leases."""
        for partition in list(self._owned):
            await self._stop(partition, release=True)
        with contextlib.suppress(RedisError, OSError):
            await self._leases.leave(set())

    def abandon(self) -> None:
        """Cancel every partition still consuming (a drain out of time): their channels
        close, and the broker redelivers what they held."""
        for partition in list(self._owned):
            self._owned.pop(partition).task.cancel()

    def _start(self, partition: int, restarts: int = 0) -> None:
        busy = asyncio.Lock()
        task = asyncio.create_task(self._consume(partition, busy))
        self._owned[partition] = _Partition(task, busy, restarts)
        log.info("consuming partition", partition=partition, restarts=restarts)

    def _restart_failed(self) -> None:
        for partition, state in list(self._owned.items()):
            if not state.task.done():
                continue
            error = None if state.task.cancelled() else state.task.exception()
            log.warning(
                "partition consumer stopped; restarting it",
                partition=partition,
                error=repr(error) if error else "the queue iterator ended",
            )
            self._restarts.inc()
            self._start(partition, state.restarts + 1)

    async def _consume(self, partition: int, busy: asyncio.Lock) -> None:
        # What the broker has already pushed (up to the prefetch) is relayed as one batch:
        # one Redis pipeline instead of a round trip per message. Leaving the source (on the
        # way out) hands every unsettled message back to the queue, in order.
        async with self._broker.partition(partition, self._prefetch) as source:
            while (batch := await source.next_batch(self._prefetch)) is not None:
                await self._relay_batch(partition, list(batch), busy, source)

    async def _relay_batch(
        self,
        partition: int,
        deliveries: list[PartitionDelivery],
        busy: asyncio.Lock,
        source: PartitionSource,
    ) -> None:
        """Relay a batch; on an infrastructure fault, pause with the rest held, then go on.

        The partition never moves past a message it has not settled: the held messages stay
        unacked on the channel, in order, while the partition waits for a real write to
        succeed, and are relayed again (what Redis did take comes back as a duplicate). A
        partition stopped meanwhile (its lease lost or given up) closes its channel, which
        hands the held messages back to RabbitMQ, in order, settled by nobody.
        """
        pending = deliveries
        delay = self._pause_first
        try:
            while True:
                if any(delivery.channel_lost for delivery in pending):
                    # Their channel is gone: RabbitMQ redelivers them, in order, on the next,
                    # with every earlier message handed back with it. Relaying them now
                    # would put them ahead of those.
                    source.left_unsettled(pending)
                    self._unsettled_batch(partition, len(pending))
                    return
                async with busy:
                    outcomes = await self._relay.handle_batch(
                        pending, acknowledge=source.ack_in_order
                    )
                if "held" not in outcomes:
                    return
                pending = pending[outcomes.index("held") :]
                self._pause(partition, len(pending))
                await asyncio.sleep(delay)
                await self._wait_until_writable()
                delay = min(delay * 2, self._pause_longest)
        finally:
            self._resume(partition)

    def _pause(self, partition: int, held: int) -> None:
        if partition not in self._paused:
            log.warning(
                "partition paused by an infrastructure fault", partition=partition, held=held
            )
            self._paused.add(partition)
            self._paused_gauge.set(len(self._paused))

    def _resume(self, partition: int) -> None:
        if partition in self._paused:
            log.info("partition resumed", partition=partition)
            self._paused.discard(partition)
            self._paused_gauge.set(len(self._paused))

    def _unsettled_batch(self, partition: int, count: int) -> None:
        # Also messages buffered before a reconnect: their channel is gone.
        self._unsettled.inc(count)
        log.info(
            "could not settle messages; RabbitMQ will redeliver them",
            partition=partition,
            count=count,
        )

    async def _wait_until_writable(self) -> None:
        """Return once a real write to Redis succeeds (a PING says nothing about writes)."""
        if self._store_writable is None:
            return
        delay = self._pause_first
        while not await self._store_writable():
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._pause_longest)

    async def _stop(self, partition: int, *, release: bool) -> None:
        state = self._owned.pop(partition)
        try:
            async with state.busy:  # never cut a message between its Redis step and its ack
                state.task.cancel()
        finally:
            state.task.cancel()  # also when this stop is cancelled itself (a drain out of time)
        try:
            await state.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this stop was cancelled, not (only) the partition's task
        except Exception as exc:  # the partition's own failure: it is stopped either way
            log.info("partition consumer had failed", partition=partition, error=repr(exc))
        if release:
            with contextlib.suppress(RedisError, OSError):
                await self._leases.release(partition)
        log.info("released partition", partition=partition)

    async def _measure_depth(self) -> None:
        for name, depth in (await self._broker.queue_depths()).items():
            self._depth.labels(name).set(depth)
