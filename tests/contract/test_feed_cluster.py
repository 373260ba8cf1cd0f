"""The edges' hub on a private Redis Cluster: sharded subscriptions per master, every frame
once, and a kill -9 of a master mid-stream that loses nothing and repeats nothing.

Frames are written by a script of the relay step's shape (XADD to the board's stream and its
part of the activity stream, SPUBLISH on the board's channel and the part's), in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from envelope.codec import RelayedEvent
from envelope.topology import ACTIVITY_PARTS, RedisKeys, activity_part_of
from realtime_runtime.feed import ActivityHub, RedisActivityStore, Subscription
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError
from support.redis_cluster import LocalRedisCluster, redis_cluster

pytestmark = [pytest.mark.chaos]

# The relay step's writes and publishes, without its checks: one slot (the part's tag).
WRITE = """
local seq = redis.call('INCR', KEYS[1])
local body = '{"sequence":' .. seq .. ',"epoch":"1","n":' .. ARGV[2] .. '}'
local gid = redis.call('XADD', KEYS[3], '*', 'b', ARGV[1], 's', seq, 'p', '1', 'e', body)
redis.call('XADD', KEYS[2], seq .. '-0', 'a', gid, 'p', '1', 'e', body)
local frame = gid .. ' ' .. ARGV[1] .. ' ' .. seq .. ' 1\\n' .. body
return redis.call('SPUBLISH', ARGV[3], frame) + redis.call('SPUBLISH', ARGV[4], frame)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with redis_cluster(Path(tmp_path_factory.mktemp("feed-cluster"))) as started:
        yield started


@pytest.fixture
async def client(cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    nodes = [ClusterNode("127.0.0.1", node.port) for node in cluster.nodes]
    rc = RedisCluster(startup_nodes=nodes, socket_timeout=2, socket_connect_timeout=1)
    await rc.initialize()
    try:
        yield rc
    finally:
        await rc.aclose()


def one_board_per_part() -> list[str]:
    boards: dict[int, str] = {}
    n = 0
    while len(boards) < ACTIVITY_PARTS:
        boards.setdefault(activity_part_of(f"cb-{n}"), f"cb-{n}")
        n += 1
    return [boards[p] for p in range(ACTIVITY_PARTS)]


class Writer:
    def __init__(self, client: RedisCluster, keys: RedisKeys) -> None:
        self._keys = keys
        self._script = client.register_script(WRITE)
        self.written = 0

    async def write(self, board_id: str) -> None:
        """One event, retried through a failover (a lost reply may write it twice: the
        board's sequence then counts both, and both must be delivered)."""
        keys = self._keys
        part = activity_part_of(board_id)
        for _attempt in range(200):
            try:
                await self._script(
                    keys=[
                        keys.sequence(board_id),
                        keys.board_stream(board_id),
                        keys.activity_stream(part),
                    ],
                    args=[
                        board_id,
                        self.written,
                        keys.board_events_channel(board_id),
                        keys.activity_part_channel(part),
                    ],
                )
                self.written += 1
                return
            except (RedisError, OSError):
                await asyncio.sleep(0.1)
        raise AssertionError("the cluster did not take a write for 20 s")


async def drain(subscription: Subscription[bytes], until: int) -> list[RelayedEvent]:
    got: list[RelayedEvent] = []
    async with asyncio.timeout(30):
        while len(got) < until:
            for event, _rendered in await subscription.next_batch(1000):
                assert isinstance(event, RelayedEvent)
                got.append(event)
    await asyncio.sleep(0.3)
    assert subscription.queued == 0, "more than expected"
    return got


async def test_every_frame_once_across_masters_and_through_a_master_killed_mid_stream(
    cluster: LocalRedisCluster, client: RedisCluster
) -> None:
    keys = RedisKeys(
        prefix=f"fc:{uuid.uuid4().hex[:8]}:", activity_channel=f"fc:{uuid.uuid4().hex[:8]}"
    )
    hub: ActivityHub[bytes] = ActivityHub(
        RedisActivityStore(client, keys),
        render_board=lambda e: e.event,
        render_activity=lambda e: e.event,
        retry_seconds=0.2,
    )
    frames = 0

    def counted() -> None:
        nonlocal frames
        frames += 1

    hub.on_frame = counted
    boards = one_board_per_part()
    masters = {cluster.master_of(keys.board_events_channel(b)).port for b in boards}
    assert len(masters) == 3  # the boards' channels are spread over every master
    writer = Writer(client, keys)
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        async with contextlib.AsyncExitStack() as stack:
            on_board = {
                b: await stack.enter_async_context(hub.subscribe_board(b, 10_000)) for b in boards
            }
            everything = await stack.enter_async_context(hub.subscribe_activity(None, 10_000))
            for _ in range(3):
                for board in boards:
                    await writer.write(board)
            await asyncio.sleep(0.3)  # replicated before the kill (MIN_REPLICAS=0 here)

            victim = cluster.kill_master(keys.board_events_channel(boards[0]))
            for _ in range(2):  # while the replica is not promoted yet: retried
                for board in boards:
                    await writer.write(board)
            await asyncio.to_thread(cluster.wait_for_failover, victim)
            async with asyncio.timeout(30):
                await hub.connected.wait()
            for _ in range(2):
                for board in boards:
                    await writer.write(board)

            written = {b: int(await client.get(keys.sequence(b)) or 0) for b in boards}
            assert all(n >= 7 for n in written.values()), written
            for board, subscription in on_board.items():
                got = await drain(subscription, written[board])
                assert [e.sequence for e in got] == list(range(1, written[board] + 1)), board
            seen = await drain(everything, sum(written.values()))
            assert sorted((e.board_id, e.sequence) for e in seen) == sorted(
                (b, s) for b, n in written.items() for s in range(1, n + 1)
            )
            # The old master back, as a replica of the promoted one: still once each.
            await asyncio.to_thread(cluster.restart, victim)
            for board in boards:
                await writer.write(board)
            for board, subscription in on_board.items():
                [event] = await drain(subscription, 1)
                assert event.sequence == written[board] + 1
            assert len(await drain(everything, len(boards))) == len(boards)
        # Each frame came twice (the board's channel and the part's), plus the catch-up reads
        # are not frames: what this process drew from pub/sub is bounded by that.
        assert frames <= 2 * (sum(written.values()) + len(boards))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
