"""The relay step on a private Redis Cluster (three masters, a replica each), with and without
`ADVANCED_REDIS_MIN_REPLICAS`: every part of the key layout, batches over several slots, WAIT,
a lost replica, and a master's failover with the re-run of a step that may or may not have
reached its replica.

One cluster per module; the destructive tests come last and restart what they kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import httpx
import orjson
import pytest
import redis.asyncio as redis
from envelope import codec
from envelope.topology import ACTIVITY_PARTS, RedisKeys, activity_part_of
from prometheus_client import CollectorRegistry
from realtime_runtime.memory import RelayOutcome
from realtime_runtime.service import redis_client
from redis.asyncio.cluster import RedisCluster
from relay_worker.adapters.redis import PartitionLeases, RedisRelayStore
from relay_worker.app import build_worker
from relay_worker.dlq import list_dead_letters
from relay_worker.faults import ReplicationNotConfirmed, redis_fault
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WORKER_REDIS_TIMEOUT_SECONDS, WorkerSettings
from support.brokers import Brokers, Names
from support.envelopes import RecordedDelivery, board_event, envelope_body
from support.redis_cluster import LocalRedisCluster, redis_cluster

pytestmark = [pytest.mark.timeout(90)]

WAIT_MS = 200  # short: a WAIT that cannot be answered holds a test this long per attempt


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with redis_cluster(Path(tmp_path_factory.mktemp("relay-cluster"))) as started:
        yield started


def settings_for(cluster: LocalRedisCluster, **extra: object) -> WorkerSettings:
    return WorkerSettings(
        environment="development",
        redis_mode="cluster",
        redis_url=cluster.seed_urls(),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def client(cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    # As the worker builds it (BrokerTransport): redis_client in cluster mode, 5 s timeouts.
    built = redis_client(
        settings_for(cluster),
        socket_timeout=WORKER_REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=WORKER_REDIS_TIMEOUT_SECONDS,
    )
    assert isinstance(built, RedisCluster)
    await built.initialize()  # the slot map, which the sharded subscriber reads as it is
    try:
        yield built
    finally:
        await built.aclose()


@pytest.fixture
def keys() -> RedisKeys:
    return RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=f"t:{uuid.uuid4()}")


@contextlib.asynccontextmanager
async def store_on(
    client: RedisCluster, keys: RedisKeys, min_replicas: int = 0
) -> AsyncIterator[RedisRelayStore]:
    store = RedisRelayStore(
        client, keys, 100, min_replicas=min_replicas, replicas_timeout_ms=WAIT_MS
    )
    try:
        yield store
    finally:
        await store.aclose()


def board_in_part(part: int, prefix: str = "") -> str:
    tag = prefix or uuid.uuid4().hex[:6]
    return next(b for n in itertools.count() if activity_part_of(b := f"{tag}-{n}") == part)


def board_on(cluster: LocalRedisCluster, keys: RedisKeys, master_port: int) -> str:
    """A board whose keys the master on this port serves."""
    return next(
        board
        for part in range(ACTIVITY_PARTS)
        if cluster.master_of(keys.sequence(board := board_in_part(part))).port == master_port
    )


def body(board_id: str, correlation_id: str) -> bytes:
    return codec.activity_body(board_event(board_id, correlation_id), datetime.now(UTC))


async def sequences(client: RedisCluster, keys: RedisKeys, board_id: str) -> list[tuple[int, str]]:
    """(sequence, correlation id) of every event in the board's stream."""
    rows = await client.xrange(keys.board_stream(board_id))
    return [
        (int(entry_id.split(b"-")[0]), orjson.loads(fields[b"e"])["correlation_id"])
        for entry_id, fields in rows
    ]


def relay_for(store: RedisRelayStore) -> Relay:
    return Relay(
        store, WorkerSettings(environment="development"), RelayMetrics(CollectorRegistry())
    )


# ----------------------------------------------------------------------------- the step


async def test_the_step_runs_for_boards_of_every_part_on_every_master(
    cluster: LocalRedisCluster, client: RedisCluster, keys: RedisKeys
) -> None:
    boards = [board_in_part(part) for part in range(ACTIVITY_PARTS)]
    masters = {cluster.master_of(keys.sequence(board)).port for board in boards}
    assert masters == {m.port for m in cluster.masters()}  # the 16 tags reach all three
    async with store_on(client, keys) as store:
        for board in boards:
            first = await store.relay(board, "c1", body(board, "c1"), 60)
            second = await store.relay(board, "c2", body(board, "c2"), 60)
            again = await store.relay(board, "c1", body(board, "c1"), 60)
            assert (first.sequence, second.sequence) == (1, 2)
            assert first.delivered and second.delivered and not again.delivered
            assert first.epoch == second.epoch
        for board in boards:
            assert await sequences(client, keys, board) == [(1, "c1"), (2, "c2")]
            part = keys.activity_stream(activity_part_of(board))
            rows = await client.xrange(part)
            assert [(f[b"b"].decode(), int(f[b"s"])) for _, f in rows] == [(board, 1), (board, 2)]


async def test_a_step_publishes_on_the_boards_and_the_parts_sharded_channels(
    client: RedisCluster, keys: RedisKeys
) -> None:
    board = board_in_part(5)
    pubsub = client.pubsub()
    try:
        await pubsub.ssubscribe(keys.board_events_channel(board), keys.activity_part_channel(5))
        for _ in range(2):
            assert await next_sharded(pubsub, "ssubscribe")
        async with store_on(client, keys) as store:
            outcome = await store.relay(board, "c1", body(board, "c1"), 60)
        assert outcome.receivers == 2  # the board's subscriber and the part's, summed
        frames = [await next_sharded(pubsub, "smessage") for _ in range(2)]
        assert {f["channel"] for f in frames} == {
            keys.board_events_channel(board).encode(),
            keys.activity_part_channel(5).encode(),
        }
        head = f"{outcome.stream_id} {board} 1 {outcome.epoch}\n".encode()
        assert all(f["data"].startswith(head) for f in frames)
    finally:
        await pubsub.aclose()


async def next_sharded(pubsub: object, kind: str, timeout: float = 5) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_sharded_message(timeout=0.2)  # type: ignore[attr-defined]
        if message is not None and message["type"] == kind:
            return dict(message)
    raise AssertionError(f"no {kind} within {timeout}s")


async def test_a_batch_over_several_slots_keeps_each_boards_order(
    cluster: LocalRedisCluster, client: RedisCluster, keys: RedisKeys
) -> None:
    boards = [board_in_part(part) for part in (0, 3, 7, 12)]
    assert len({client.keyslot(keys.sequence(b)) for b in boards}) == 4
    settled: list[str] = []
    # Interleaved over four slots (and the three masters), with a redelivery in the middle.
    order = [(b, f"c{n}") for n in range(3) for b in boards]
    order.insert(6, (boards[1], "c0"))
    deliveries = [RecordedDelivery(b, c, settled) for b, c in order]
    async with store_on(client, keys) as store:
        outcomes = await relay_for(store).handle_batch(deliveries)
    assert outcomes.count("duplicate") == 1 and outcomes[6] == "duplicate"
    assert outcomes.count("delivered") == len(order) - 1
    assert settled == [f"ack {d.name}" for d in deliveries]  # each once, in queue order
    for board in boards:
        assert await sequences(client, keys, board) == [(1, "c0"), (2, "c1"), (3, "c2")]


async def test_leases_work_on_a_cluster(client: RedisCluster, keys: RedisKeys) -> None:
    first = PartitionLeases(client, keys, "w1", 4, 5000)
    second = PartitionLeases(client, keys, "w2", 4, 5000)
    wanted, _ = await first.plan(set())
    assert wanted == {0, 1, 2, 3}  # alone: every partition
    await second.plan(set())  # heartbeats; finds every lease taken
    kept, give_up = await first.plan(wanted)
    assert kept == set() and len(give_up) == 2  # two workers: two partitions each
    for partition in give_up:
        await first.release(partition)
    taken, _ = await second.plan(set())
    assert taken == give_up
    await first.leave(wanted - give_up)
    await second.leave(taken)
    assert await client.zcard(keys.workers) == 0


# ----------------------------------------------------------------------------- WAIT


async def test_min_replicas_one_is_confirmed_on_every_master(
    cluster: LocalRedisCluster, client: RedisCluster, keys: RedisKeys
) -> None:
    boards = [board_on(cluster, keys, m.port) for m in cluster.masters()]
    async with store_on(client, keys, min_replicas=1) as store:
        results = await store.relay_many([(b, "c1", body(b, "c1")) for b in boards], 60)
        assert [r.sequence for r in results if isinstance(r, RelayOutcome)] == [1, 1, 1]
    # Each master has one replica: two cannot be confirmed, and nothing counts as done.
    async with store_on(client, keys, min_replicas=2) as store:
        started = time.monotonic()
        results = await store.relay_many([(b, "c2", body(b, "c2")) for b in boards], 60)
        assert all(isinstance(r, ReplicationNotConfirmed) for r in results), results
        assert all(redis_fault(r) for r in results if isinstance(r, BaseException))
        assert time.monotonic() - started < 3 * WAIT_MS / 1000 + 1  # the masters in parallel


async def test_a_lost_replica_holds_its_masters_steps_until_it_returns(
    cluster: LocalRedisCluster, client: RedisCluster, keys: RedisKeys
) -> None:
    default = client.get_default_node().port
    # The board's master is not the client's default node: a WAIT sent there would find
    # that node's replica and confirm a write it does not hold.
    lost = next(m for m in cluster.masters() if m.port != default)
    other = next(m for m in cluster.masters() if m.port != lost.port)
    board, elsewhere = board_on(cluster, keys, lost.port), board_on(cluster, keys, other.port)
    settled: list[str] = []
    deliveries = [
        RecordedDelivery(elsewhere, "c1", settled),
        RecordedDelivery(board, "c1", settled),
        RecordedDelivery(elsewhere, "c2", settled),
    ]
    replica = cluster.kill_replica(keys.sequence(board))
    try:
        async with store_on(client, keys, min_replicas=1) as store:
            relay = relay_for(store)
            assert await relay.handle_batch(deliveries) == ["delivered", "held", "held"]
            assert settled == [f"ack {deliveries[0].name}"]
            results = await store.relay_many([(board, "c1", body(board, "c1"))], 60)
            assert isinstance(results[0], ReplicationNotConfirmed)
            cluster.restart(replica)
            # The held two again. Both ran the first time (the other master confirmed the
            # second; it was held only for being behind the first): both are duplicates now,
            # the first confirmed by its own WAIT now that the replica is back.
            assert await settle_held(relay, deliveries[1:]) == ["duplicate", "duplicate"]
    finally:
        if not replica.running():
            cluster.restart(replica)
    assert settled == [f"ack {d.name}" for d in deliveries]
    assert await sequences(client, keys, board) == [(1, "c1")]
    assert await sequences(client, keys, elsewhere) == [(1, "c1"), (2, "c2")]


@pytest.mark.brokers
async def test_the_worker_and_its_dlq_commands_run_in_cluster_mode(
    cluster: LocalRedisCluster, client: RedisCluster, brokers: Brokers, names: Names
) -> None:
    env = {k.removeprefix("ADVANCED_").lower(): v for k, v in names.env().items()}
    settings = settings_for(cluster, rabbitmq_url=brokers.rabbitmq_url, redis_min_replicas=1, **env)
    keys, topology = settings.redis_keys, settings.topology
    boards = [board_in_part(part) for part in (1, 6, 11)]
    app = build_worker(settings)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w")
        async with http, asyncio.timeout(30):
            while not (await http.get("/readyz")).json().get("rabbitmq_connected"):
                await asyncio.sleep(0.1)  # the topology is declared once it is connected
            connection = await aio_pika.connect(brokers.rabbitmq_url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(topology.exchange, ensure=False)
                for n, board in itertools.product(range(3), boards):
                    await exchange.publish(
                        aio_pika.Message(envelope_body(board, f"c{n}")),
                        routing_key=topology.routing_key(board),
                        mandatory=True,
                    )
            while [len(await sequences(client, keys, b)) for b in boards] != [3, 3, 3]:
                await asyncio.sleep(0.1)
            ready = (await http.get("/readyz")).json()
        await app.state.drain()
    assert ready["status"] == "ready" and ready["redis_connected"] is True, ready
    for board in boards:
        assert await sequences(client, keys, board) == [(1, "c0"), (2, "c1"), (3, "c2")]
    # The DLQ commands speak to RabbitMQ only: a cluster-mode configuration is all they need.
    out = io.StringIO()
    assert await list_dead_letters(settings, out) == 0
    assert out.getvalue() == ""


# ------------------------------------------------------------------------- failover


@pytest.mark.parametrize("marker", ["survived", "lost"])
async def test_the_rerun_after_a_failover_is_exactly_once(
    cluster: LocalRedisCluster, client: RedisCluster, keys: RedisKeys, marker: str
) -> None:
    board = board_in_part(9)
    step = (board, "c2", body(board, "c2"))
    async with store_on(client, keys, min_replicas=1) as store:
        for correlation in ("c1", "c2"):
            (result,) = await store.relay_many([(board, correlation, body(board, correlation))], 60)
            assert isinstance(result, RelayOutcome) and result.delivered, result
        # The worker dies before it acks c2; then the board's master dies too.
        killed = cluster.kill_master(keys.sequence(board))
        promoted = cluster.wait_for_failover(killed)
        try:
            with promoted.client() as node:
                assert node.exists(keys.idempotency(board, "c2")) == 1  # WAIT confirmed it
            if marker == "lost":
                # As if c2 had reached the old master only: its whole step is missing on the
                # promoted one (marker, events, counter), as replication would leave it.
                await undo_last_step(promoted.url, keys, board, "c2")
            # Until the old master is back as its replica, the promoted one has none: the
            # re-run is held (unconfirmed), whatever it finds.
            held = await rerun_until(store, step, ReplicationNotConfirmed, 20)
            assert isinstance(held, ReplicationNotConfirmed)
            cluster.restart(killed)
            (rerun,) = await relayed_once_confirmed(store, step)
        finally:
            if not killed.running():
                cluster.restart(killed)
        # Acked now as a duplicate either way: a surviving marker made the held re-runs
        # duplicates; without it, the first held re-run relayed c2 again on the promoted master
        # (under the same number, the counter having gone back with it), unconfirmed until now.
        assert isinstance(rerun, RelayOutcome), rerun
        assert (rerun.delivered, rerun.sequence) == (False, 2)
        (after,) = await store.relay_many([(board, "c3", body(board, "c3"))], 60)
        assert isinstance(after, RelayOutcome) and after.sequence == 3
    assert await sequences(client, keys, board) == [(1, "c1"), (2, "c2"), (3, "c3")]
    part = await client.xrange(keys.activity_stream(activity_part_of(board)))
    assert [int(f[b"s"]) for _, f in part] == [1, 2, 3]


# A replica just back (synced, its link up) gets the replication stream only after its first
# ack to the master, up to a second later: a WAIT meanwhile still counts it out. The worker's
# paused partition tries again after its back-off; these do the same, for a few seconds.
RESUME_SECONDS = 5


async def settle_held(relay: Relay, deliveries: list[RecordedDelivery]) -> list[str]:
    """Relay again, as `PartitionedConsumer` does, from the first held delivery on."""
    outcomes: list[str] = []
    deadline = time.monotonic() + RESUME_SECONDS
    while deliveries:
        batch = await relay.handle_batch(deliveries)
        settled = batch.index("held") if "held" in batch else len(batch)
        outcomes += batch[:settled]
        deliveries = deliveries[settled:]
        assert not deliveries or time.monotonic() < deadline, "still held"
        await asyncio.sleep(0.1 if deliveries else 0)
    return outcomes


async def relayed_once_confirmed(
    store: RedisRelayStore, step: tuple[str, str, bytes]
) -> list[RelayOutcome | BaseException]:
    deadline = time.monotonic() + RESUME_SECONDS
    while True:
        results = await store.relay_many([step], 60)
        if not isinstance(results[0], ReplicationNotConfirmed) or time.monotonic() > deadline:
            return results
        await asyncio.sleep(0.1)


async def rerun_until(
    store: RedisRelayStore, step: tuple[str, str, bytes], kind: type, seconds: float
) -> object:
    """Re-run the step (as a held partition does) until it fails with `kind`: the attempts
    before meet the dead master or a slot map that does not know the promoted one yet."""
    deadline = time.monotonic() + seconds
    while True:
        (result,) = await store.relay_many([step], 60)
        assert isinstance(result, BaseException) and redis_fault(result), result
        if isinstance(result, kind) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def undo_last_step(url: str, keys: RedisKeys, board: str, correlation: str) -> None:
    stream = keys.board_stream(board)
    async with redis.from_url(url) as node:
        *kept, (entry_id, fields) = await node.xrange(stream)
        assert orjson.loads(fields[b"e"])["correlation_id"] == correlation
        # Rebuilt rather than XDEL'd: a stream remembers its top id, which a replica that
        # never had the entry would not.
        async with node.pipeline(transaction=True) as tx:
            tx.delete(stream)
            for kept_id, kept_fields in kept:
                tx.xadd(stream, kept_fields, id=kept_id)
            tx.xdel(keys.activity_stream(activity_part_of(board)), fields[b"a"])
            tx.set(keys.sequence(board), int(entry_id.split(b"-")[0]) - 1)
            tx.delete(keys.idempotency(board, correlation))
            assert (await tx.execute())[-1] == 1
