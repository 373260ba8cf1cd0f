"""Presence and the shared rate limits on a private Redis Cluster, held to what they do on one
Redis: two `RedisPresence`s (two ingress replicas, each with its own client) on boards spread
over every master give the same joins, leaves, snapshots and reaps in cluster mode as in
standalone mode, the rate-limit storage counts one window across two clients, and a beat
after a master's kill -9 and failover (a promoted replica has no scripts) writes everything.

The cluster is the test suite's own (`support.redis_cluster`, six nodes on free ports), one per
module; the standalone runs use unique names on the shared Redis and delete them after. The
presence channel is heard on a plain connection to one node: a cluster hands a classic PUBLISH
to every node, so any node's subscribers hear every board's changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from envelope.models import PresenceEntry, PresenceFrame, PresenceMember
from envelope.topology import RedisKeys
from ingress_ws.adapters.redis import (
    SET_MEMBER,
    RedisPresence,
    close_rate_limit_storage,
    redis_rate_limit_storage,
)
from ingress_ws.presence import REDIS_FAULTS
from ingress_ws.settings import IngressSettings
from limits import parse
from limits.aio.storage import RedisClusterStorage
from limits.aio.strategies import MovingWindowRateLimiter
from realtime_runtime.service import RedisClient, redis_client
from support.brokers import Brokers
from support.redis_cluster import LocalRedisCluster, redis_cluster

ALICE = PresenceMember(id="alice", name="Alice ✓")
BOB = PresenceMember(id="bob:1", name=None)
# Enough boards (each its own hash tag) that every master of the cluster holds some.
BOARDS = [f"board-{n}" for n in range(24)]

Change = tuple[str, str, str, int]  # board, action, member id, count


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with redis_cluster(Path(tmp_path_factory.mktemp("presence-cluster"))) as started:
        yield started


@dataclass
class Replicas:
    """Two ingress replicas' presence stores on one Redis (or one cluster)."""

    one: RedisPresence
    two: RedisPresence
    keys: RedisKeys
    clients: tuple[RedisClient, RedisClient]
    listen_url: str  # a node to hear the presence channel on

    async def changes_during(
        self, steps: Callable[[], Awaitable[object]], want: int
    ) -> list[Change]:
        """The changes `steps()` published, in the order heard; exactly `want` of them."""
        listener = aioredis.from_url(self.listen_url)
        pubsub = listener.pubsub()
        heard: list[Change] = []
        try:
            await pubsub.subscribe(self.keys.presence_channel)
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            await steps()
            async with asyncio.timeout(10):
                while len(heard) < want:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        heard.append(parsed(message["data"]))
            extra = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)
            assert extra is None, f"an extra presence change was published: {extra}"
        finally:
            await pubsub.aclose()
            await listener.aclose()
        return heard


def parsed(message: bytes) -> Change:
    board, _, frame = message.partition(b"\n")
    change = PresenceFrame.model_validate_json(frame)
    assert change.board_id == board.decode()
    return change.board_id, change.action, change.member.id, change.count


def per_board(heard: list[Change]) -> dict[str, list[Change]]:
    boards: dict[str, list[Change]] = {}
    for change in heard:
        boards.setdefault(change[0], []).append(change)
    return boards


def settings_for(mode: str, url: str, prefix: str) -> IngressSettings:
    return IngressSettings(
        _env_file=None,
        redis_mode=mode,
        redis_url=url,
        redis_key_prefix=prefix,
        activity_channel=f"{prefix}activity",
    )


@pytest.fixture(params=["standalone", "cluster"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    prefix = f"t:{uuid.uuid4().hex[:12]}:"
    if request.param == "cluster":
        running: LocalRedisCluster = request.getfixturevalue("cluster")
        settings = settings_for("cluster", running.seed_urls(), prefix)
        listen_url = running.nodes[-1].url
    else:
        brokers: Brokers = request.getfixturevalue("brokers")
        settings = settings_for("standalone", brokers.redis_url, prefix)
        listen_url = brokers.redis_url
    clients = (redis_client(settings), redis_client(settings))
    keys = settings.redis_keys
    try:
        yield Replicas(
            RedisPresence(clients[0], keys),
            RedisPresence(clients[1], keys),
            keys,
            clients,
            listen_url,
        )
    finally:
        if request.param == "standalone":  # the cluster is ours and goes with the module
            stale = [key async for key in clients[0].scan_iter(match=f"{prefix}*")]
            if stale:
                await clients[0].delete(*stale)
        for client in clients:
            await client.aclose()


def test_the_boards_spread_over_every_master(cluster: LocalRedisCluster) -> None:
    keys = RedisKeys(prefix="t:", activity_channel="t:activity")
    masters = {cluster.master_of(keys.presence(board)).port for board in BOARDS}
    assert len(masters) == 3
    registry = {keys.presence_instances, keys.presence_instance_boards("one")}
    assert len({cluster.master_of(key).port for key in registry}) == 1  # one slot, one beat


async def test_members_join_once_and_leave_once_across_two_replicas(replicas: Replicas) -> None:
    one, two = replicas.one, replicas.two
    await one.heartbeat("one", BOARDS, 30)
    await two.heartbeat("two", BOARDS, 30)

    async def steps() -> None:
        for board in BOARDS:
            await one.set_member(board, "one", ALICE, 2)
            await two.set_member(board, "two", ALICE, 1)
            await two.set_member(board, "two", BOB, 1)
            await one.set_member(board, "one", ALICE, 0)
            await two.set_member(board, "two", ALICE, 0)

    heard = await replicas.changes_during(steps, 3 * len(BOARDS))
    assert per_board(heard) == {
        board: [
            (board, "join", "alice", 1),
            (board, "join", "bob:1", 2),
            (board, "leave", "alice", 1),
        ]
        for board in BOARDS
    }
    for store in (one, two):
        for board in BOARDS:
            assert await store.members(board) == [
                PresenceEntry(id="bob:1", name=None, connections=1)
            ]


async def test_beats_of_two_replicas_write_every_member_once(replicas: Replicas) -> None:
    one, two = replicas.one, replicas.two
    ones = {board: [(ALICE, 2), (BOB, 1)] for board in BOARDS}
    twos = {board: [(ALICE, 1)] for board in BOARDS[:8]}

    async def beats() -> None:
        await asyncio.gather(one.beat("one", ones, 30), two.beat("two", twos, 30))

    heard = await replicas.changes_during(beats, 2 * len(BOARDS))
    assert sorted((board, action, member) for board, action, member, _ in heard) == sorted(
        (board, "join", member) for board in BOARDS for member in ("alice", "bob:1")
    )
    assert {e.id: e.connections for e in await two.members(BOARDS[0])} == {"alice": 3, "bob:1": 1}
    assert {e.id: e.connections for e in await one.members(BOARDS[-1])} == {"alice": 2, "bob:1": 1}
    client = replicas.clients[0]
    assert await client.smembers(replicas.keys.presence_instance_boards("two")) == {
        board.encode() for board in BOARDS[:8]
    }

    async def beat_again() -> None:  # absolute counts: nothing changes, nothing is heard
        await asyncio.gather(one.beat("one", ones, 30), two.beat("two", twos, 30))
        await one.set_member(BOARDS[-1], "one", BOB, 0)

    heard = await replicas.changes_during(beat_again, 1)
    assert heard == [(BOARDS[-1], "leave", "bob:1", 1)]


async def test_a_dead_replica_is_reaped_once_board_by_board(replicas: Replicas) -> None:
    one, two = replicas.one, replicas.two
    await one.beat("live", {board: [(ALICE, 1)] for board in BOARDS}, 30)
    await two.beat("dying", {board: [(ALICE, 1), (BOB, 2)] for board in BOARDS}, 0.3)
    assert {e.id for e in await one.members(BOARDS[3])} == {"alice", "bob:1"}
    await asyncio.sleep(0.4)
    # Expired: no longer counted, even before a reap.
    alice_alone = [PresenceEntry(id="alice", name="Alice ✓", connections=1)]
    assert await one.members(BOARDS[3]) == alice_alone

    async def both_reap() -> None:
        await asyncio.gather(one.reap(), two.reap())

    heard = await replicas.changes_during(both_reap, len(BOARDS))
    assert sorted(heard) == sorted((board, "leave", "bob:1", 1) for board in BOARDS)
    for board in BOARDS:
        assert await two.members(board) == alice_alone
    client = replicas.clients[1]
    assert not await client.exists(replicas.keys.presence_instance_boards("dying"))
    assert await client.zscore(replicas.keys.presence_instances, "dying") is None


async def test_a_forgotten_replica_leaves_at_once(replicas: Replicas) -> None:
    await replicas.one.beat("one", {board: [(ALICE, 1)] for board in BOARDS[:6]}, 30)

    async def forget() -> None:
        await replicas.one.forget("one")

    heard = await replicas.changes_during(forget, 6)
    assert sorted(heard) == sorted((board, "leave", "alice", 0) for board in BOARDS[:6])
    assert await replicas.two.members(BOARDS[0]) == []


async def test_a_beat_on_masters_without_the_scripts_loads_them(
    cluster: LocalRedisCluster,
) -> None:
    """A promoted replica has no script cache: the beat's EVALSHAs and the reap's scripts
    must load them again rather than fail."""
    settings = settings_for("cluster", cluster.seed_urls(), f"t:{uuid.uuid4().hex[:12]}:")
    client = redis_client(settings)
    try:
        presence = RedisPresence(client, settings.redis_keys)
        for master in cluster.masters():
            with master.client() as node:
                node.script_flush()
        await presence.beat("one", {board: [(ALICE, 1)] for board in BOARDS}, 30)
        assert all([await presence.members(board) for board in BOARDS])
        for master in cluster.masters():
            with master.client() as node:
                node.script_flush()
        await presence.forget("one")  # the claim and the reap steps, on empty caches
        assert not any([await presence.members(board) for board in BOARDS])
    finally:
        await client.aclose()


async def test_the_rate_limits_count_one_window_across_two_clients(
    cluster: LocalRedisCluster,
) -> None:
    prefix = f"t:{uuid.uuid4().hex[:12]}:"
    settings = settings_for("cluster", cluster.seed_urls(), prefix)
    storages = [redis_rate_limit_storage(settings), redis_rate_limit_storage(settings)]
    assert all(isinstance(storage, RedisClusterStorage) for storage in storages)
    first, second = (MovingWindowRateLimiter(storage) for storage in storages)
    limit = parse("5/minute")
    try:
        assert all([await first.hit(limit, "http-publish", "k") for _ in range(3)])
        assert all([await second.hit(limit, "http-publish", "k") for _ in range(2)])
        assert not await first.hit(limit, "http-publish", "k")
        assert not await second.hit(limit, "http-publish", "k")
        assert (await second.get_window_stats(limit, "http-publish", "k")).remaining == 0
        assert await second.hit(limit, "http-publish", "another key")
        held = {key for master in cluster.masters() for key in keys_on(master.url, prefix)}
        assert held and all(key.startswith(f"{prefix}limits:") for key in held)
    finally:
        for storage in storages:
            await close_rate_limit_storage(storage)


def keys_on(url: str, prefix: str) -> list[str]:
    with redis.Redis.from_url(url, decode_responses=True) as node:
        return list(node.scan_iter(match=f"{prefix}*"))


async def test_the_store_s_own_subscription_hears_every_board_on_a_fresh_cluster_client(
    cluster: LocalRedisCluster,
) -> None:
    """What the ingress and the gateway do at start-up: subscribe to the presence channel on
    a client that has not sent anything yet, then hear the changes of boards on every master."""
    settings = settings_for("cluster", cluster.seed_urls(), f"t:{uuid.uuid4().hex[:12]}:")
    client = redis_client(settings)
    try:
        presence = RedisPresence(client, settings.redis_keys)
        async with presence.changes() as changes:
            for board in BOARDS:
                await presence.set_member(board, "one", ALICE, 1)
            heard: list[Change] = []
            async with asyncio.timeout(10):
                async for message in changes:
                    heard.append(parsed(message))
                    if len(heard) == len(BOARDS):
                        break
        assert sorted(heard) == sorted((board, "join", "alice", 1) for board in BOARDS)
    finally:
        await client.aclose()


async def test_a_beat_after_a_master_failed_over_writes_every_member(
    cluster: LocalRedisCluster,
) -> None:
    """kill -9 of the master of some boards: once its replica took over (without the
    scripts, which Redis 7 does not replicate), the next beat writes every member again and
    the reap still runs. Last in the module: it restarts the killed node."""
    settings = settings_for("cluster", cluster.seed_urls(), f"t:{uuid.uuid4().hex[:12]}:")
    keys = settings.redis_keys
    client = redis_client(settings)
    members = {board: [(ALICE, 1), (BOB, 2)] for board in BOARDS}
    try:
        presence = RedisPresence(client, keys)
        await presence.beat("one", members, 30)
        killed = cluster.kill_master(keys.presence(BOARDS[0]))
        promoted = cluster.wait_for_failover(killed)
        with promoted.client() as node:
            assert node.script_exists(hashlib.sha1(SET_MEMBER.encode()).hexdigest()) == [False]
        async with asyncio.timeout(30):
            while True:  # as the writer does: a beat that fails is tried again
                try:
                    await presence.beat("one", members, 30)
                    break
                except REDIS_FAULTS:
                    await asyncio.sleep(0.2)
        for board in BOARDS:
            assert {e.id: e.connections for e in await presence.members(board)} == {
                "alice": 1,
                "bob:1": 2,
            }
        await presence.forget("one")
        assert not any([await presence.members(board) for board in BOARDS])
    finally:
        await client.aclose()
    cluster.restart(killed)
