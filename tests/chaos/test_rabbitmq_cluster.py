"""The loss of a RabbitMQ node: quorum queues on a private three-node cluster.

One cluster per module (tests/support/rabbitmq_cluster.py), booted once. Each flow test sends
10,000 events over 8 boards from two ingress replicas on different nodes, through two workers,
and takes down the node leading the partition queues while they flow: with kill -9, then with
a graceful stop; the node is restarted while events still flow. Every subscriber that stayed
connected (WebSocket on the other ingress, SSE per board and /sse/activity, each sender's own
echo) must see every acked event of its boards exactly once, in sequence order and in the
order it was sent. The DLQ test takes a poison message and a retried one through the retry
queue while its leader is killed: one dead letter, one delivery.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from chaos.harness import (
    Ledger,
    Sender,
    listen,
    metric,
    relay_worker_cli,
    report,
    scrape,
    sse_board_url,
    sse_subscriber,
    start_all,
    stop_tasks,
    wait_for,
    ws_url,
)
from envelope.topology import RedisKeys
from realtime_runtime.amqp import connect_nodes
from support.processes import Service, Suite
from support.rabbitmq_cluster import ClusterNode, RabbitCluster

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

TOTAL = 10_000
BOARDS = [f"node-{n}" for n in range(8)]
RATE_PER_BOARD = 40.0  # 320 events/s in all: about 31 s of traffic
FAULT_AT, RESTART_AT = 0.3, 0.65  # fractions of the events sent
QUORUM = {
    "ADVANCED_RABBITMQ_QUEUE_TYPE": "quorum",
    "ADVANCED_WEBSOCKET_RATE_LIMIT": "1000/second",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    started = RabbitCluster(Path(tmp_path_factory.mktemp("rabbitmq-cluster"))).start()
    try:
        yield started
    finally:
        started.close()


async def rabbitmq_node(service: Service) -> str | None:
    """The node a process says (/readyz) it is on; None while it is not ready."""
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            response = await http.get(f"{service.url}/readyz")
        except httpx.HTTPError:
            return None
        node = response.json().get("rabbitmq_node") if response.status_code == 200 else None
        return str(node) if node else None


def partition_queues(suite: Suite) -> list[str]:
    env = suite.env
    return [f"{env['ADVANCED_RABBITMQ_QUEUE']}.{p}" for p in range(4)]


def leading_node(cluster: RabbitCluster, queues: list[str]) -> ClusterNode:
    leaders = cluster.leaders(queues)
    assert len(leaders) == len(queues), leaders
    return cluster.node(collections.Counter(leaders.values()).most_common(1)[0][0])


async def leaders_moved_off(
    cluster: RabbitCluster, node: ClusterNode, queues: list[str]
) -> set[str]:
    """Wait for every queue to elect a leader on another node; the nodes leading them now."""

    async def elected() -> bool:
        leaders = await asyncio.to_thread(cluster.leaders, queues)
        return len(leaders) == len(queues) and node.name not in leaders.values()

    await wait_for(elected, 60, f"new leaders off {node.name}", every=1.0)
    return set((await asyncio.to_thread(cluster.leaders, queues)).values())


async def start_on_cluster(
    suite: Suite, cluster: RabbitCluster, workers: int, ingresses: int
) -> tuple[list[Service], list[Service], Service]:
    """The first worker declares every queue through node 1, so node 1 leads them all
    (client-local leader placement). Worker n and ingress n are given the node list starting
    at node n + 1: the two replicas of each are on different nodes."""
    first = suite.start("worker", wait=False, ADVANCED_RABBITMQ_URL=cluster.urls(0), **QUORUM)
    await start_all([first])
    more = [
        suite.start("worker", wait=False, ADVANCED_RABBITMQ_URL=cluster.urls(n), **QUORUM)
        for n in range(1, workers)
    ]
    edges = [
        suite.start("ingress", wait=False, ADVANCED_RABBITMQ_URL=cluster.urls(n), **QUORUM)
        for n in range(ingresses)
    ]
    gateway = suite.start("gateway", wait=False, **QUORUM)
    await start_all([*more, *edges, gateway])
    return [first, *more], edges, gateway


async def flow_through_a_node_fault(
    suite: Suite,
    cluster: RabbitCluster,
    title: str,
    take_down: Callable[[ClusterNode], None],
) -> None:
    workers, ingresses, gateway = await start_on_cluster(suite, cluster, 2, 2)
    victim = leading_node(cluster, partition_queues(suite))
    processes = [*workers, *ingresses]
    nodes_before = [await rabbitmq_node(p) for p in processes]

    ledger = Ledger()
    # Each board's WebSocket listener on the replica its sender is not on.
    listeners = listen(ledger, [ingresses[1], ingresses[0]], gateway, BOARDS)
    senders = [Sender(ledger, ws_url(ingresses[i % 2], b), b) for i, b in enumerate(BOARDS)]
    events: list[str] = []
    for sender in senders:
        await sender.__aenter__()
    try:
        await asyncio.sleep(1.0)  # every subscription registered before the first event
        started = time.monotonic()
        sending = [
            asyncio.create_task(s.send_many(TOTAL // len(BOARDS), rate=RATE_PER_BOARD))
            for s in senders
        ]

        async def at(fraction: float) -> str:
            while len(ledger.sent) < TOTAL * fraction:
                await asyncio.sleep(0.05)
            return f"{len(ledger.sent)} sent, {time.monotonic() - started:.1f}s"

        async def moved() -> bool:
            nodes = [await rabbitmq_node(p) for p in processes]
            return all(n is not None and n != victim.address for n in nodes)

        async def watch() -> str:
            await wait_for(moved, 60, "every process ready on another node")
            return f"every process ready on another node at {time.monotonic() - started:.1f}s"

        events.append(f"{victim.name} down at {await at(FAULT_AT)}")
        await asyncio.to_thread(take_down, victim)
        events.append(f"down (stop returned) at {time.monotonic() - started:.1f}s")
        # Watched beside the traffic and the restart: neither waits for the other.
        watching = asyncio.create_task(watch())
        events.append(f"restarted at {await at(RESTART_AT)}")
        await asyncio.to_thread(cluster.restart, victim)
        events.append(f"restart done at {time.monotonic() - started:.1f}s")
        events.append(await watching)
        nodes_after = [await rabbitmq_node(p) for p in processes]
        new_leaders = await leaders_moved_off(cluster, victim, partition_queues(suite))
        await asyncio.gather(*sending)
        for sender in senders:
            await sender.wait_acked(90)
        sent_for = time.monotonic() - started
        await ledger.wait_complete(120)
        drained_for = time.monotonic() - started
    finally:
        failed = await stop_tasks(listeners)
        for sender in senders:
            await sender.__aexit__(None, None, None)

    duplicates = sum(
        metric(scrape(w), "advanced_worker_events_total", outcome="duplicate") for w in workers
    )
    verdicts = ledger.verdicts()
    report(
        title,
        ledger,
        verdicts,
        rabbitmq="3.10.8, three nodes, quorum queues",
        events="; ".join(events),
        partition_leaders_after=sorted(new_leaders),
        nodes_before=nodes_before,
        nodes_after=nodes_after,
        seconds_to_send=round(sent_for, 1),
        seconds_to_deliver_all=round(drained_for, 1),
        redeliveries_skipped_as_duplicates=duplicates,
    )
    assert not failed, failed
    assert victim.name not in new_leaders
    assert victim.address in nodes_before
    assert len(ledger.acked) == TOTAL and not ledger.refused, ledger.refused[:3]
    assert len(verdicts) == 3 * len(BOARDS) + 1
    for verdict in verdicts:
        assert verdict.clean, verdict.line()
        assert verdict.seen == verdict.expected


@pytest.mark.timeout(300)
async def test_kill_9_of_the_leading_node_loses_and_duplicates_nothing(
    suite: Suite, cluster: RabbitCluster
) -> None:
    await flow_through_a_node_fault(
        suite,
        cluster,
        "kill -9 of the node leading the partition queues, then its restart, 10,000 events",
        lambda node: print(f"killed beam pid {cluster.kill9(node)}"),
    )


@pytest.mark.timeout(300)
async def test_graceful_stop_of_the_leading_node_loses_and_duplicates_nothing(
    suite: Suite, cluster: RabbitCluster
) -> None:
    await flow_through_a_node_fault(
        suite,
        cluster,
        "graceful stop of the node leading the partition queues, then its restart, 10,000 events",
        cluster.stop,
    )


async def queue_depth(urls: str, queue: str) -> int:
    connection = await connect_nodes(urls.split(","), "chaos test depth")
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


@pytest.mark.timeout(240)
async def test_dead_letter_and_retry_across_a_leader_change(
    suite: Suite, cluster: RabbitCluster
) -> None:
    settings = {"ADVANCED_RABBITMQ_MAX_RETRIES": "2", "ADVANCED_RABBITMQ_RETRY_DELAY_MS": "4000"}
    suite.env.update(settings)
    (worker,), (ingress,), gateway = await start_on_cluster(suite, cluster, 1, 1)
    env = suite.env
    retry_queue, dlq = env["ADVANCED_RABBITMQ_RETRY_QUEUE"], env["ADVANCED_RABBITMQ_DLQ_QUEUE"]
    victim = leading_node(cluster, [retry_queue, dlq, *partition_queues(suite)])
    poison, retried = "dlq-poison", "dlq-retried"
    # A board whose sequence key holds garbage: every relay step of it fails in Redis.
    store = redis.Redis.from_url(env["ADVANCED_REDIS_URL"])
    prefix = env["ADVANCED_REDIS_KEY_PREFIX"]
    for board in (poison, retried):
        await store.set(RedisKeys(prefix, "").sequence(board), "not-a-number")

    ledger = Ledger()
    listeners = [
        asyncio.create_task(
            sse_subscriber(ledger, f"sse:{b}", sse_board_url(gateway, b), frozenset({b}))
        )
        for b in (poison, retried)
    ]
    urls = cluster.urls(cluster.nodes.index(victim))  # the DLQ tool tries the dead node first
    try:
        await asyncio.sleep(1.0)
        async with (
            Sender(ledger, ws_url(ingress, poison), poison) as poisoned,
            Sender(ledger, ws_url(ingress, retried), retried) as retrying,
        ):
            await poisoned.send(1)
            await retrying.send(1)
            await poisoned.wait_acked(30)
            await retrying.wait_acked(30)

            async def both_waiting() -> bool:
                return await queue_depth(cluster.urls(1), retry_queue) == 2

            await wait_for(both_waiting, 30, "both messages in the retry queue")
            await asyncio.to_thread(cluster.kill9, victim)
            await store.delete(RedisKeys(prefix, "").sequence(retried))  # its next attempt succeeds
            (new_leader,) = await leaders_moved_off(cluster, victim, [retry_queue])

            async def parked() -> bool:
                return await queue_depth(cluster.urls(1), dlq) >= 1

            await wait_for(parked, 90, "the poison message in the DLQ")

            async def delivered() -> bool:
                return ledger.count_for(f"sse:{retried}") >= 1

            await wait_for(delivered, 60, "the retried event on its board")
            await asyncio.sleep(2 * 4.0)  # a second copy of either would have come by now
            code, listing = await relay_worker_cli({**env, "ADVANCED_RABBITMQ_URL": urls}, "list")
            dlq_depth = await queue_depth(cluster.urls(1), dlq)
    finally:
        failed = await stop_tasks(listeners)
        await store.aclose()
        await asyncio.to_thread(cluster.restart, victim)

    retried_count = metric(scrape(worker), "advanced_worker_events_total", outcome="retried")
    # The poison was acked by the ingress and parked in the DLQ on purpose: its board expects
    # nothing until it is replayed.
    parked = ledger.acked.pop(f"{poison}-1")
    verdicts = ledger.verdicts()
    report(
        "poison and retried messages on quorum queues across a kill -9 of their leader",
        ledger,
        verdicts,
        killed=victim.name,
        retry_queue_leader_after=new_leader,
        dlq_depth=dlq_depth,
        retried_total=retried_count,
        dlq_listed_through=urls.split(",")[0].rpartition("@")[2],
    )
    assert not failed, failed
    assert new_leader != victim.name
    assert code == 0, listing
    letters = [line for line in listing.splitlines() if line.startswith("{")]
    assert dlq_depth == 1 and len(letters) == 1 and poison in letters[0], listing
    assert '"attempts":3' in letters[0], letters[0]
    assert [(s.correlation_id, s.sequence) for s in ledger.seen[f"sse:{retried}"]] == [
        (f"{retried}-1", 1)
    ]
    assert parked == poison and ledger.seen[f"sse:{poison}"] == []
    for verdict in verdicts:
        assert verdict.clean and verdict.seen == verdict.expected, verdict.line()
