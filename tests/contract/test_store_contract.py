"""One set of behaviours, checked against the in-memory transport and against real Redis.

The relay step (the worker's), the activity feed (both edges') and presence (the ingress's)
must behave the same on both, so that tests on the memory transport mean something.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from envelope import codec
from envelope.cursors import BoardCursor
from envelope.models import PresenceEntry, PresenceFrame, PresenceMember
from envelope.topology import ACTIVITY_PARTS, RedisKeys, activity_part_of
from ingress_ws.adapters.redis import RedisPresence
from ingress_ws.presence import PresenceStore
from realtime_runtime.feed import ActivityHub, ActivityStore, HistoryLost, RedisActivityStore
from realtime_runtime.memory import MemoryPresence, MemoryStore
from realtime_runtime.pubsub import Confirmed
from relay_worker.adapters.redis import RedisRelayStore
from relay_worker.relay import RelayStore
from support.brokers import Brokers
from support.envelopes import board_event
from support.stores import ReadCounter

RETENTION = 50


@dataclass
class Stores:
    relay: RelayStore
    feed: ActivityStore
    presence: PresenceStore
    # What a failover before the replica had the last writes leaves: the board's sequence
    # and stream back to `keep` (the epoch stays).
    lose_writes: Callable[[str, int], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        store = MemoryStore(retention=RETENTION)

        async def forget_in_memory(board_id: str, keep: int) -> None:
            store.lose_writes(board_id, keep)

        yield Stores(store, store, MemoryPresence(), forget_in_memory)
        return
    brokers: Brokers = request.getfixturevalue("brokers")
    keys = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=f"t:{uuid.uuid4().hex}")
    client = redis.from_url(brokers.redis_url)

    async def forget_in_redis(board_id: str, keep: int) -> None:
        # A stream never takes an id below its last one, even deleted: it is written anew.
        stream = keys.board_stream(board_id)
        kept = await client.xrange(stream, max=f"{keep}-0")
        await client.delete(stream)
        for entry_id, fields in kept:
            await client.xadd(stream, fields, id=entry_id)
        await client.set(keys.sequence(board_id), keep)

    try:
        yield Stores(
            RedisRelayStore(client, keys, RETENTION),
            RedisActivityStore(client, keys),
            RedisPresence(client, keys),
            forget_in_redis,
        )
    finally:
        stale = [key async for key in client.scan_iter(match=f"{keys.prefix}*")]
        if stale:
            await client.delete(*stale)
        await client.aclose()


def body(board_id: str, correlation_id: str) -> bytes:
    """An activity body, as the worker writes it to Redis."""
    return codec.activity_body(board_event(board_id, correlation_id), datetime.now(UTC))


def decoded(event: bytes) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(event)
    return result


async def test_relay_assigns_a_gapless_sequence_per_board(stores: Stores) -> None:
    outcomes = [await stores.relay.relay("a", f"c{n}", body("a", f"c{n}"), 60) for n in range(3)]
    other = await stores.relay.relay("b", "c0", body("b", "c0"), 60)
    assert [o.sequence for o in outcomes] == [1, 2, 3] and all(o.delivered for o in outcomes)
    assert other.sequence == 1 and other.delivered


async def test_relay_is_idempotent_per_board_and_correlation_id(stores: Stores) -> None:
    first = await stores.relay.relay("a", "same", body("a", "same"), 60)
    again = await stores.relay.relay("a", "same", body("a", "same"), 60)
    assert first.delivered and not again.delivered and again.sequence == first.sequence
    events = await stores.feed.board_after("a", 0)
    assert [decoded(e.event)["correlation_id"] for e in events] == ["same"]


# Two boards in two parts of the activity stream.
A, B = "a", "b"
PA, PB = activity_part_of(A), activity_part_of(B)
assert PA != PB


async def test_history_reads_after_a_cursor(stores: Stores) -> None:
    for n in range(5):
        await stores.relay.relay(A if n % 2 == 0 else B, f"c{n}", body("x", f"c{n}"), 60)
    board_a = await stores.feed.board_after(A, 1)
    assert [e.sequence for e in board_a] == [2, 3]
    assert all(decoded(e.event)["sequence"] == e.sequence for e in board_a)
    part_a = await stores.feed.activity_after(PA, "0-0")
    part_b = await stores.feed.activity_after(PB, "0-0")
    assert [(e.board_id, e.sequence) for e in part_a] == [(A, 1), (A, 2), (A, 3)]
    assert [(e.board_id, e.sequence) for e in part_b] == [(B, 1), (B, 2)]
    assert await stores.feed.activity_after(PA, part_a[0].stream_id) == part_a[1:]
    assert await stores.feed.parts_after({PA: part_a[1].stream_id, PB: "0-0"}) == {
        PA: part_a[2:],
        PB: part_b,
    }
    assert await stores.feed.boards_after({A: 1, B: 0, "nothing": 0}) == {
        A: board_a,
        B: await stores.feed.board_after(B, 0),
        "nothing": [],
    }
    assert board_a[0].stream_id == part_a[1].stream_id  # both cursors name the same event
    assert await stores.feed.board_head(A) == (1, 3)
    assert await stores.feed.board_head("nothing") == (0, 0)
    heads = await stores.feed.activity_heads()
    assert len(heads) == ACTIVITY_PARTS
    assert heads[PA] == (part_a[0].stream_id, part_a[-1].stream_id)
    assert heads[PB] == (part_b[0].stream_id, part_b[-1].stream_id)
    assert all(head == ("0-0", "0-0") for p, head in enumerate(heads) if p not in (PA, PB))


async def test_retention_trims_old_events(stores: Stores) -> None:
    for n in range(RETENTION * 4):
        await stores.relay.relay("a", f"c{n}", body("a", f"c{n}"), 60)
    oldest, newest = await stores.feed.board_head("a")
    retained = await stores.feed.board_after("a", 0)
    # Redis trims approximately (MAXLEN ~, whole macro-nodes): at least RETENTION stay.
    assert newest == RETENTION * 4
    assert RETENTION <= len(retained) < RETENTION * 4
    assert [e.sequence for e in retained] == list(range(oldest, newest + 1))
    replay_from_start = await ActivityHub(
        stores.feed, render_board=bytes, render_activity=bytes
    ).replay_board("a", BoardCursor(0))
    assert replay_from_start.expired and replay_from_start.oldest_cursor == str(oldest)


async def test_the_live_feed_confirms_in_band_and_yields_its_channels_frames_only(
    stores: Stores,
) -> None:
    keys = stores.feed.keys
    async with stores.feed.live() as live:
        await live.subscribe([keys.board_events_channel(A)])
        assert await asyncio.wait_for(live.next(), 5) == Confirmed(keys.board_events_channel(A))
        await stores.relay.relay(B, "other", body(B, "other"), 60)  # not subscribed here
        outcome = await stores.relay.relay(A, "live", body(A, "live"), 60)
        frame = await asyncio.wait_for(live.next(), 5)
        assert isinstance(frame, bytes)
        relayed = codec.RelayedEvent.from_frame(frame)
        assert (relayed.board_id, relayed.sequence, relayed.stream_id) == (A, 1, outcome.stream_id)
        assert decoded(relayed.event)["correlation_id"] == "live"
        assert outcome.receivers == 1

        # The part's channel carries every board of the part; the sum is the receivers.
        await live.subscribe([keys.activity_part_channel(PA)])
        assert await asyncio.wait_for(live.next(), 5) == Confirmed(keys.activity_part_channel(PA))
        both = await stores.relay.relay(A, "both", body(A, "both"), 60)
        frames = [await asyncio.wait_for(live.next(), 5) for _ in range(2)]
        assert frames[0] == frames[1] and both.receivers == 2
        await live.unsubscribe([keys.board_events_channel(A), keys.activity_part_channel(PA)])
        await stores.relay.relay(A, "gone", body(A, "gone"), 60)
        await asyncio.sleep(0.1)
        await live.subscribe([keys.board_events_channel(B)])
        # Nothing of A's came after the unsubscribe: the next item is B's confirmation.
        assert await asyncio.wait_for(live.next(), 5) == Confirmed(keys.board_events_channel(B))


ALICE = PresenceMember(id="alice", name="Alice ✓")
BOB = PresenceMember(id="bob:1", name=None)


async def presence_changes(
    store: PresenceStore, steps: Any, want: int, timeout: float = 5.0
) -> list[PresenceFrame]:
    """Runs `steps()` while listening; the board-prefixed frames it published, parsed."""
    heard: list[PresenceFrame] = []
    async with store.changes() as changes:
        await steps()
        async with asyncio.timeout(timeout):
            async for message in changes:
                board, _, frame = message.partition(b"\n")
                parsed = PresenceFrame.model_validate_json(frame)
                assert parsed.board_id == board.decode()
                heard.append(parsed)
                if len(heard) == want:
                    break
        await asyncio.sleep(0.1)  # nothing more may come
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                async for _ in changes:
                    raise AssertionError("an extra presence change was published")
    return heard


async def test_presence_joins_once_and_leaves_once_over_instances(stores: Stores) -> None:
    presence = stores.presence
    for instance in ("one", "two"):
        await presence.heartbeat(instance, ["a"], 30)

    async def steps() -> None:
        await presence.set_member("a", "one", ALICE, 2)
        await presence.set_member("a", "two", ALICE, 1)
        await presence.set_member("a", "two", BOB, 1)
        await presence.set_member("a", "one", ALICE, 0)
        await presence.set_member("a", "two", ALICE, 0)

    heard = await presence_changes(presence, steps, 3)
    assert [(f.action, f.member, f.count) for f in heard] == [
        ("join", ALICE, 1),
        ("join", BOB, 2),
        ("leave", ALICE, 1),
    ]
    assert await presence.members("a") == [PresenceEntry(id="bob:1", name=None, connections=1)]


async def test_a_dead_instance_is_not_counted_and_is_reaped_once(stores: Stores) -> None:
    presence = stores.presence
    await presence.heartbeat("live", ["a"], 30)
    await presence.heartbeat("dying", ["a", "b"], 0.3)
    await presence.set_member("a", "live", ALICE, 1)
    await presence.set_member("a", "dying", ALICE, 2)
    await presence.set_member("a", "dying", BOB, 1)
    await presence.set_member("b", "dying", BOB, 3)
    assert {m.id: m.connections for m in await presence.members("a")} == {"alice": 3, "bob:1": 1}
    await asyncio.sleep(0.4)
    # Expired: no longer counted, even before any instance reaped it.
    assert await presence.members("a") == [PresenceEntry(id="alice", name="Alice ✓", connections=1)]

    async def reap_twice() -> None:
        await asyncio.gather(presence.reap(), presence.reap())

    heard = await presence_changes(presence, reap_twice, 2)
    assert sorted((f.board_id, f.action, f.member.id, f.count) for f in heard) == [
        ("a", "leave", "bob:1", 1),
        ("b", "leave", "bob:1", 0),
    ]
    assert await presence.members("b") == []


async def test_a_forgotten_instance_leaves_at_once(stores: Stores) -> None:
    presence = stores.presence
    await presence.heartbeat("one", ["a"], 30)
    await presence.set_member("a", "one", ALICE, 1)

    async def forget() -> None:
        await presence.forget("one")

    heard = await presence_changes(presence, forget, 1)
    assert [(f.action, f.member.id, f.count) for f in heard] == [("leave", "alice", 0)]
    assert await presence.members("a") == []


async def test_a_beat_lists_the_boards_and_writes_every_member_as_set_member_does(
    stores: Stores,
) -> None:
    presence = stores.presence
    members = {"a": [(ALICE, 2), (BOB, 1)], "b": [(BOB, 3)]}

    async def beat() -> None:
        await presence.beat("one", members, 30)

    heard = await presence_changes(presence, beat, 3)
    assert sorted((f.board_id, f.action, f.member.id, f.count) for f in heard) == [
        ("a", "join", "alice", 1),
        ("a", "join", "bob:1", 2),
        ("b", "join", "bob:1", 1),
    ]
    assert await presence.members("b") == [PresenceEntry(id="bob:1", name=None, connections=3)]

    async def beat_again_then_alice_leaves() -> None:
        await presence.beat("one", members, 30)  # absolute counts: no change, nothing heard
        await presence.set_member("a", "one", ALICE, 0)

    heard = await presence_changes(presence, beat_again_then_alice_leaves, 1)
    assert [(f.action, f.member.id) for f in heard] == [("leave", "alice")]

    await presence.beat("dying", {"c": [(ALICE, 1)], "d": [(ALICE, 1)]}, 0.3)
    await asyncio.sleep(0.4)
    heard = await presence_changes(presence, presence.reap, 2)  # the boards the beat listed
    assert sorted((f.board_id, f.action) for f in heard) == [("c", "leave"), ("d", "leave")]


async def test_the_hub_delivers_each_event_once_in_order(stores: Stores) -> None:
    hub: ActivityHub[bytes] = ActivityHub(
        stores.feed, render_board=lambda e: e.event, render_activity=lambda e: e.event
    )
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.connected.wait(), 5)
        async with (
            hub.subscribe_board("a", 100) as on_a,
            hub.subscribe_activity(None, 100) as on_all,
        ):
            for n in range(10):
                await stores.relay.relay("a" if n < 6 else "b", f"c{n}", body("a", f"c{n}"), 60)
            board_seen = [(await asyncio.wait_for(on_a.next(), 5))[0].sequence for _ in range(6)]
            all_seen = [(await asyncio.wait_for(on_all.next(), 5))[0] for _ in range(10)]
        assert board_seen == [1, 2, 3, 4, 5, 6]
        assert [(e.board_id, e.sequence) for e in all_seen] == [("a", n) for n in range(1, 7)] + [
            ("b", n) for n in range(1, 5)
        ]
        replay = await hub.replay_board("a", BoardCursor(4))
        replayed = [event async for page in replay.pages for event in page]
        assert [e.sequence for e in replayed] == [5, 6] and not replay.expired
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_replay_reads_the_next_page_only_when_the_last_was_taken(stores: Stores) -> None:
    for n in range(40):
        await stores.relay.relay("a" if n % 4 else "b", f"c{n}", body("a", f"c{n}"), 60)
    counter = ReadCounter(stores.feed)
    hub: ActivityHub[bytes] = ActivityHub(
        counter,  # type: ignore[arg-type]
        render_board=bytes,
        render_activity=bytes,
        page=10,
    )
    board = await hub.replay_board("a", BoardCursor(0))
    first = await anext(board.pages)
    # A client that takes this page and stops reading pins one page, not the history.
    assert [e.sequence for e in first] == list(range(1, 11)) and counter.rows == 10
    rest = [event async for page in board.pages for event in page]
    assert [e.sequence for e in rest] == list(range(11, 31)) and board.until == 30

    counter.rows = 0
    start = ("0-0",) * ACTIVITY_PARTS
    only_b = await hub.replay_activity(start, frozenset({"b"}))
    assert [(e.board_id, e.sequence) for page in [p async for p in only_b.pages] for e in page] == [
        ("b", n) for n in range(1, 11)
    ]
    assert counter.rows == 10  # only b's part of the activity stream is read
    counter.rows = 0
    nothing = await hub.replay_activity(start, frozenset())
    assert [page async for page in nothing.pages] == [] and counter.rows == 0


async def test_a_board_whose_sequence_goes_back_is_reset_not_renumbered(stores: Stores) -> None:
    hub: ActivityHub[bytes] = ActivityHub(
        stores.feed, render_board=lambda e: e.event, render_activity=lambda e: e.event
    )
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.connected.wait(), 5)
        async with hub.subscribe_board(A, 100) as on_a:
            for n in range(5):
                await stores.relay.relay(A, f"c{n}", body(A, f"c{n}"), 60)
            seen = [(await asyncio.wait_for(on_a.next(), 5))[0].sequence for _ in range(5)]
            assert seen == [1, 2, 3, 4, 5]
            await stores.lose_writes(A, 3)  # 4 and 5 are gone: the next two are 4 and 5 again
            for n in range(5, 8):
                await stores.relay.relay(A, f"c{n}", body(A, f"c{n}"), 60)
            with pytest.raises(HistoryLost):
                await asyncio.wait_for(on_a.next(), 5)
            again = [await asyncio.wait_for(on_a.next(), 5) for _ in range(3)]
            assert [event.sequence for event, _ in again] == [4, 5, 6]
            assert [decoded(e.event)["correlation_id"] for e, _ in again] == ["c5", "c6", "c7"]
            await asyncio.sleep(0.05)
            assert on_a.queued == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
