"""Time-based retention (`ADVANCED_REPLAY_RETENTION_SECONDS`) beside the count, checked against
the in-memory transport and real Redis: events older than the limit leave both streams, an
idle board's history goes as a whole, sequences go on, and a resume or history read from a
trimmed cursor gets a reset."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis
from envelope import codec
from envelope.cursors import BoardCursor
from envelope.topology import ACTIVITY_PARTS, RedisKeys
from realtime_runtime.feed import ActivityHub, ActivityStore, RedisActivityStore
from realtime_runtime.memory import MemoryStore
from relay_worker.adapters.redis import RedisRelayStore
from relay_worker.relay import RelayStore
from support.brokers import Brokers
from support.envelopes import board_event

KEEP_SECONDS = 1
# Past the limit with room for a loaded machine's clock reads (Redis TIME and this process).
PAST_THE_LIMIT = KEEP_SECONDS + 0.6


@dataclass
class Backend:
    relay: RelayStore
    feed: ActivityStore
    # Every retained activity entry as (board, sequence): the feed's reads of the 16 parts
    # are the edges' business; what the relay trimmed is read here part by part.
    activity: Callable[[], Awaitable[list[tuple[str, int]]]]


StoresFor = Callable[[float], Backend]


@pytest.fixture(params=["memory", "redis"])
async def stores_for(request: pytest.FixtureRequest) -> AsyncIterator[StoresFor]:
    """Builds a relay store and a feed over one backend, with the retention given."""
    if request.param == "memory":

        def memory(seconds: float) -> Backend:
            store = MemoryStore(retention=100, retention_seconds=seconds)

            async def activity() -> list[tuple[str, int]]:
                parts = await store.parts_after(dict.fromkeys(range(ACTIVITY_PARTS), "0-0"))
                return [(e.board_id, e.sequence) for p in sorted(parts) for e in parts[p]]

            return Backend(store, store, activity)

        yield memory
        return
    brokers: Brokers = request.getfixturevalue("brokers")
    client = redis.from_url(brokers.redis_url)
    prefixes: list[str] = []

    def real(seconds: float) -> Backend:
        keys = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=uuid.uuid4().hex)
        prefixes.append(keys.prefix)

        async def activity() -> list[tuple[str, int]]:
            entries = []
            for part in range(ACTIVITY_PARTS):
                rows = await client.xrange(keys.activity_stream(part))
                entries += [(f[b"b"].decode(), int(f[b"s"])) for _, f in rows]
            return entries

        return Backend(
            RedisRelayStore(client, keys, 100, retention_seconds=seconds),
            RedisActivityStore(client, keys),
            activity,
        )

    try:
        yield real
    finally:
        for prefix in prefixes:
            stale = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if stale:
                await client.delete(*stale)
        await client.aclose()


async def relay(store: RelayStore, board_id: str, count: int) -> list[int]:
    sequences = []
    for _ in range(count):
        envelope = board_event(board_id, uuid.uuid4().hex)
        body = codec.activity_body(envelope, datetime.now(UTC))
        outcome = await store.relay(board_id, envelope.correlation_id, body, 60)
        sequences.append(outcome.sequence)
    return sequences


async def test_events_older_than_the_limit_leave_both_streams(stores_for: StoresFor) -> None:
    backend = stores_for(KEEP_SECONDS)
    relay_store, feed = backend.relay, backend.feed
    assert await relay(relay_store, "busy", 3) == [1, 2, 3]
    assert await relay(relay_store, "idle", 2) == [1, 2]
    await asyncio.sleep(PAST_THE_LIMIT)
    assert await relay(relay_store, "busy", 1) == [4]  # the sequence goes on

    assert [e.sequence for e in await feed.board_after("busy", 0)] == [4]
    assert await feed.board_head("busy") == (4, 4)
    assert await backend.activity() == [("busy", 4)]
    # Nobody wrote to the idle board since: its whole history is past the limit.
    assert await feed.board_after("idle", 0) == []
    assert await feed.board_head("idle") == (0, 0)
    assert await relay(relay_store, "idle", 1) == [3]  # still its sequence, not a new start

    hub: ActivityHub[str] = ActivityHub(feed, render_board=str, render_activity=str)
    replay = await hub.replay_board("busy", BoardCursor(1))
    assert replay.reason == "cursor_expired" and replay.oldest_cursor == "4"
    assert [[e.sequence for e in page] async for page in replay.pages] == [[4]]


async def test_without_a_time_limit_only_the_count_trims(stores_for: StoresFor) -> None:
    backend = stores_for(0)
    relay_store, feed = backend.relay, backend.feed
    await relay(relay_store, "board", 3)
    await asyncio.sleep(PAST_THE_LIMIT)
    await relay(relay_store, "board", 1)
    assert [e.sequence for e in await feed.board_after("board", 0)] == [1, 2, 3, 4]
    assert len(await backend.activity()) == 4


async def test_a_long_idle_board_is_trimmed_a_hundred_entries_a_step(
    stores_for: StoresFor,
) -> None:
    backend = stores_for(KEEP_SECONDS)
    relay_store, feed = backend.relay, backend.feed
    # The time limit must not cut what is within it: only entries past it go.
    await relay(relay_store, "board", 150)
    await asyncio.sleep(PAST_THE_LIMIT)
    fresh = await relay(relay_store, "board", 2)
    assert fresh == [151, 152]
    remaining = [e.sequence for e in await feed.board_after("board", 0, count=500)]
    # Redis trims at most 100 old entries a step: two steps take the 150 past the limit.
    assert remaining == [151, 152]
