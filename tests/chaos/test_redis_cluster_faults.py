"""The loss of a Redis Cluster node: section 9's promise on a private six-node cluster.

One cluster per module (tests/support/redis_cluster.py: three masters, one replica each), the
shared RabbitMQ with the test's unique names, and the whole suite in cluster mode with
`ADVANCED_REDIS_MIN_REPLICAS=1`: two workers, two ingress replicas, one gateway. Each test
sends 10,000 events over 32 boards, two in each of the 16 hash-tagged parts, so every part
and every master carries traffic, and kills one node while they flow:

- the master serving the most boards: its replica takes over, and with no replica left the
  promoted master cannot hold a relay step on a second node, so its boards pause (the worker
  settles nothing it could lose) until the old master is restarted and rejoins as its replica;
- a replica of that master: the master still takes writes, but `WAIT 1` times out, so the
  same boards pause until the replica is restarted and in sync again.

Every subscriber that stayed connected (WebSocket on the other ingress, SSE per board and
/sse/activity, each sender's own echo) must see every acked event of its boards exactly once,
in sequence order and in the order it was sent. The figures, with how long the boards of the
faulted master went without a delivery, are printed and kept in test-artifacts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from chaos.harness import (
    Ledger,
    Sender,
    listen,
    metric,
    report,
    scrape,
    start_all,
    stop_tasks,
    ws_url,
)
from envelope.topology import ACTIVITY_PARTS, RedisKeys, activity_part_of
from support.processes import Service, Suite
from support.redis_cluster import LocalRedisCluster, RedisNode, redis_cluster

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

TOTAL = 10_000
BOARDS_PER_PART = 2
RATE_PER_BOARD = 10.0  # 320 events/s in all: about 31 s of traffic
FAULT_AT, RESTART_AT = 0.3, 0.6  # fractions of the events sent
CLUSTER_MODE = {
    "ADVANCED_REDIS_MODE": "cluster",
    "ADVANCED_REDIS_MIN_REPLICAS": "1",
    "ADVANCED_WEBSOCKET_RATE_LIMIT": "1000/second",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with redis_cluster(Path(tmp_path_factory.mktemp("redis-cluster"))) as started:
        yield started


def boards_over_every_part(per_part: int = BOARDS_PER_PART) -> list[str]:
    """`per_part` board ids in each of the 16 parts, in part order."""
    found: dict[int, list[str]] = collections.defaultdict(list)
    n = 0
    while any(len(found[part]) < per_part for part in range(ACTIVITY_PARTS)):
        board = f"rc-{n}"
        if len(found[activity_part_of(board)]) < per_part:
            found[activity_part_of(board)].append(board)
        n += 1
    return [board for part in range(ACTIVITY_PARTS) for board in found[part]]


BOARDS = boards_over_every_part()


def keys_of(suite: Suite) -> RedisKeys:
    return RedisKeys(
        prefix=suite.env["ADVANCED_REDIS_KEY_PREFIX"],
        activity_channel=suite.env["ADVANCED_ACTIVITY_CHANNEL"],
    )


def boards_by_master(cluster: LocalRedisCluster, keys: RedisKeys) -> dict[int, list[str]]:
    """Master port -> the boards whose keys it serves now."""
    placed: dict[int, list[str]] = collections.defaultdict(list)
    for board in BOARDS:
        placed[cluster.master_of(keys.board_stream(board)).port].append(board)
    return dict(placed)


def counts_per_board(total: int, boards: list[str]) -> list[int]:
    """`total` split over the boards, the first ones taking the remainder."""
    share, extra = divmod(total, len(boards))
    return [share + (1 if i < extra else 0) for i in range(len(boards))]


async def start_in_cluster_mode(
    suite: Suite, cluster: LocalRedisCluster
) -> tuple[list[Service], list[Service], Service]:
    settings = {**CLUSTER_MODE, "ADVANCED_REDIS_URL": cluster.seed_urls()}
    suite.env.update(settings)
    workers = [suite.start("worker", wait=False) for _ in range(2)]
    await start_all(workers)
    edges = [suite.start("ingress", wait=False) for _ in range(2)]
    gateway = suite.start("gateway", wait=False)
    await start_all([*edges, gateway])
    return workers, edges, gateway


@dataclass
class DeliveryClock:
    """Samples how many events of some boards /sse/activity has delivered, to tell how long
    they went without one (the pause while their master has no replica to confirm)."""

    ledger: Ledger
    boards: frozenset[str]
    samples: list[tuple[float, int]] = field(default_factory=list)

    def delivered(self) -> int:
        seen = self.ledger.seen.get("sse:activity", [])
        return sum(1 for s in seen if s.board_id in self.boards)

    async def run(self, every: float = 0.25) -> None:
        while True:
            self.samples.append((time.monotonic(), self.delivered()))
            await asyncio.sleep(every)

    def longest_gap(self, since: float, until: float) -> float:
        """The longest stretch between `since` and `until` with no new delivery."""
        window = [(t, n) for t, n in self.samples if since <= t <= until]
        longest, stalled_from, last = 0.0, None, None
        for t, n in window:
            if last is not None and n == last:
                stalled_from = stalled_from if stalled_from is not None else t
                longest = max(longest, t - stalled_from)
            else:
                stalled_from = t
            last = n
        return round(longest, 1)

    def delivered_between(self, since: float, until: float) -> int:
        inside = [n for t, n in self.samples if since <= t <= until]
        return inside[-1] - inside[0] if inside else 0


@dataclass
class PausedPartitions:
    """Samples `advanced_worker_partitions_paused` summed over the workers: the pause that
    ADVANCED_REDIS_MIN_REPLICAS=1 makes while a master has no replica to confirm a step."""

    workers: list[Service]
    samples: list[tuple[float, float]] = field(default_factory=list)

    def paused(self) -> float:
        return sum(
            metric(scrape(worker), "advanced_worker_partitions_paused") for worker in self.workers
        )

    async def run(self, every: float = 0.5) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                self.samples.append((time.monotonic(), await asyncio.to_thread(self.paused)))
            await asyncio.sleep(every)

    def most_between(self, since: float, until: float) -> float:
        return max((n for t, n in self.samples if since <= t <= until), default=0.0)


def progress(ledger: Ledger) -> str:
    seen = sum(len(v) for v in ledger.seen.values())
    return (
        f"sent={len(ledger.sent)} acked={len(ledger.acked)} unavailable={ledger.unavailable} "
        f"refused={len(ledger.refused)} seen={seen} closed={len(ledger.closed)}"
    )


def worker_counters(workers: list[Service]) -> dict[str, float]:
    """The workers' `advanced_worker_*_total` counters, summed, by sample name."""
    summed: collections.Counter[str] = collections.Counter()
    for worker in workers:
        for sample, value in scrape(worker).items():
            if sample.startswith("advanced_worker_") and "_total" in sample:
                summed[sample.removeprefix("advanced_worker_")] += value
    return dict(sorted(summed.items()))


async def flow_through_a_node_fault(
    suite: Suite,
    cluster: LocalRedisCluster,
    title: str,
    take_down: Callable[[RedisNode], RedisNode],
    after_kill: Callable[[RedisNode], RedisNode | None],
) -> None:
    """`take_down(master)` kills a node and returns it; `after_kill(killed)` waits for what
    the cluster does about it (a failover) and returns the node that serves the faulted
    boards now, if it changed."""
    await asyncio.to_thread(cluster.wait_until_ok)
    keys = keys_of(suite)
    placement = boards_by_master(cluster, keys)
    assert len(placement) == 3, f"boards on {len(placement)} masters only: {placement}"
    assert {activity_part_of(b) for b in BOARDS} == set(range(ACTIVITY_PARTS))
    master_port, faulted_boards = max(placement.items(), key=lambda item: len(item[1]))
    master = next(n for n in cluster.nodes if n.port == master_port)

    workers, ingresses, gateway = await start_in_cluster_mode(suite, cluster)
    ledger = Ledger()
    # Each board's WebSocket listener on the replica its sender is not on.
    listeners = listen(ledger, [ingresses[1], ingresses[0]], gateway, BOARDS)
    clock = DeliveryClock(ledger, frozenset(faulted_boards))
    clocking = asyncio.create_task(clock.run())
    pauses = PausedPartitions(workers)
    sampling = asyncio.create_task(pauses.run())
    senders = [Sender(ledger, ws_url(ingresses[i % 2], b), b) for i, b in enumerate(BOARDS)]
    events: list[str] = []
    for sender in senders:
        await sender.__aenter__()
    killed: RedisNode | None = None
    try:
        await asyncio.sleep(1.0)  # every subscription registered before the first event
        started = time.monotonic()
        sending = [
            asyncio.create_task(s.send_many(count, rate=RATE_PER_BOARD))
            for s, count in zip(senders, counts_per_board(TOTAL, BOARDS), strict=True)
        ]

        def now() -> float:
            return round(time.monotonic() - started, 1)

        def note(event: str) -> None:
            # As it happens: a run that stalls shows how far it got.
            print(f"{now():>6}s {event} ({progress(ledger)})", flush=True)
            events.append(event)

        async def at(fraction: float, within: float = 120) -> str:
            deadline = time.monotonic() + within
            while len(ledger.sent) < TOTAL * fraction:
                assert time.monotonic() < deadline, f"{fraction:.0%} not sent: {progress(ledger)}"
                await asyncio.sleep(0.05)
            return f"{len(ledger.sent)} sent, {now()}s"

        note(f"{master.address} ({len(faulted_boards)} boards) fault at {await at(FAULT_AT)}")
        killed = victim = await asyncio.to_thread(take_down, master)
        killed_at = time.monotonic()
        note(f"killed {victim.address} at {now()}s")
        serving = await asyncio.to_thread(after_kill, victim)
        settled_at = time.monotonic()
        if serving is not None:
            note(f"{serving.address} took over at {now()}s")
        note(f"restart of {victim.address} at {await at(RESTART_AT)}")
        restart_at = time.monotonic()
        await asyncio.to_thread(cluster.restart, victim)
        note(f"{victim.address} back and in sync at {now()}s")
        restarted_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*sending), 120)
        for sender in senders:
            await sender.wait_acked(90)
        sent_for = time.monotonic() - started
        note("all sent and acked")
        await ledger.wait_complete(120)
        drained_for = time.monotonic() - started
        note("delivery complete" if ledger.complete() else "delivery incomplete after 120 s")
    finally:
        failed = await stop_tasks([*listeners, clocking, sampling])
        print(f"stopped: {progress(ledger)}; closed: {dict(list(ledger.closed.items())[:8])}")
        for sender in senders:
            await sender.__aexit__(None, None, None)
        if killed is not None and not killed.running():
            await asyncio.to_thread(cluster.restart, killed)

    replicas_after = cluster.replicas_of(cluster.master_of(keys.board_stream(faulted_boards[0])))
    verdicts = ledger.verdicts()
    counters = worker_counters(workers)
    report(
        title,
        ledger,
        verdicts,
        redis="7.0 Cluster, three masters with one replica each, ADVANCED_REDIS_MIN_REPLICAS=1",
        boards=f"{len(BOARDS)} over {ACTIVITY_PARTS} parts; per master: "
        + ", ".join(f"{port}={len(b)}" for port, b in sorted(placement.items())),
        events="; ".join(events),
        faulted_boards_delivered_between_kill_and_restart=clock.delivered_between(
            killed_at, restart_at
        ),
        partitions_paused_at_most_before_restart=pauses.most_between(settled_at, restarted_at),
        partitions_paused_at_the_end=pauses.samples[-1][1] if pauses.samples else None,
        faulted_boards_longest_gap_seconds=clock.longest_gap(killed_at, restarted_at + 5),
        seconds_from_kill_to_cluster_settled=round(settled_at - killed_at, 1),
        seconds_to_send=round(sent_for, 1),
        seconds_to_deliver_all=round(drained_for, 1),
        replicas_of_the_faulted_boards_master_after=[n.address for n in replicas_after],
        redeliveries_skipped_as_duplicates=counters.get('events_total{outcome="duplicate"}', 0),
        worker_counters=counters,
    )
    assert not failed, failed
    # Without a replica to confirm them, the steps to that master wait: partitions pause.
    assert pauses.most_between(settled_at, restarted_at) >= 1, pauses.samples
    # The restarted node serves the faulted boards' master as its replica again.
    assert victim.address in {n.address for n in replicas_after}, replicas_after
    assert len(ledger.acked) == TOTAL and not ledger.refused, ledger.refused[:3]
    assert len(verdicts) == 3 * len(BOARDS) + 1
    for verdict in verdicts:
        assert verdict.clean, verdict.line()
        assert verdict.seen == verdict.expected


def kill9(cluster: LocalRedisCluster) -> Callable[[RedisNode], RedisNode]:
    def kill(master: RedisNode) -> RedisNode:
        cluster.kill9(master)
        return master

    return kill


def promoted(cluster: LocalRedisCluster) -> Callable[[RedisNode], RedisNode]:
    def wait(killed: RedisNode) -> RedisNode:
        serving = cluster.wait_for_failover(killed)
        assert serving is not killed
        # With one replica per master none migrates to the orphaned one: the promoted master
        # stays without a replica (its boards paused) until the old master comes back.
        assert cluster.replicas_of(serving) == [], cluster.replicas_of(serving)
        return serving

    return wait


@pytest.mark.timeout(240)
async def test_kill_9_of_a_master_loses_and_duplicates_nothing(
    suite: Suite, cluster: LocalRedisCluster
) -> None:
    await flow_through_a_node_fault(
        suite,
        cluster,
        "kill -9 of the Redis master of the busiest slots, failover, its restart, 10,000 events",
        kill9(cluster),
        promoted(cluster),
    )


@pytest.mark.timeout(240)
async def test_kill_9_of_a_replica_loses_and_duplicates_nothing(
    suite: Suite, cluster: LocalRedisCluster
) -> None:
    def kill_its_replica(master: RedisNode) -> RedisNode:
        replica = cluster.replicas_of(master)[0]
        cluster.kill9(replica)
        return replica

    await flow_through_a_node_fault(
        suite,
        cluster,
        "kill -9 of a Redis replica of the busiest master, then its restart, 10,000 events",
        kill_its_replica,
        lambda killed: None,
    )
