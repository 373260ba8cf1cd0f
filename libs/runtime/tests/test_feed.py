"""The activity hub on the memory transport: order, de-duplication, gap filling, catch-up
after a lost subscription, a reset when Redis lost its data, bounded client queues, replay."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from envelope import codec
from envelope.codec import RelayedEvent
from envelope.cursors import (
    BoardCursor,
    activity_cursor,
    parse_activity_cursor,
    parse_board_cursor,
    stream_id_key,
)
from envelope.topology import ACTIVITY_PARTS, activity_part_of
from realtime_runtime.feed import ActivityHub, HistoryLost, Replay, SlowConsumer, Subscription
from realtime_runtime.memory import MemoryLiveFeed, MemoryStore
from realtime_runtime.pubsub import Confirmed
from support.envelopes import board_event


def body(board_id: str, correlation_id: str) -> bytes:
    return codec.activity_body(board_event(board_id, correlation_id), datetime.now(UTC))


class FaultyStore(MemoryStore):
    """The memory store with the faults of a real pub/sub connection, on demand: frames that
    never arrive (`muted`), a session that breaks (`break_feed`), or a frame that arrives
    twice (`echo`, as from a promoted replica)."""

    def __init__(self, retention: int = 10_000) -> None:
        super().__init__(retention)
        self.muted = False
        self.echo = False
        self.subscriptions = 0
        self._sessions: list[BreakableFeed] = []

    def publish(self, channel: str, frame: bytes) -> int:
        if self.muted:
            return 0
        if self.echo:
            super().publish(channel, frame)
        return super().publish(channel, frame)

    def break_feed(self) -> None:
        for session in self._sessions:
            session.broken = True
            session.deliver(b"")  # wakes the reader

    @contextlib.asynccontextmanager
    async def live(self) -> AsyncIterator[MemoryLiveFeed]:
        self.subscriptions += 1
        session = BreakableFeed(self._channels)
        self._sessions.append(session)
        try:
            yield session
        finally:
            self._sessions.remove(session)
            session.close()

    def lose_everything(self) -> None:
        """What a Redis restart without persistence does."""
        self._seen.clear()
        self._sequences.clear()
        self._boards.clear()
        for part in self._activity:
            part.clear()


class BreakableFeed(MemoryLiveFeed):
    broken = False

    async def next(self) -> bytes | Confirmed:
        item = await super().next()
        if self.broken:
            raise ConnectionError("the subscription connection was reset")
        return item


@pytest.fixture
async def store() -> FaultyStore:
    return FaultyStore()


@pytest.fixture
async def hub(store: FaultyStore) -> AsyncIterator[ActivityHub[int]]:
    running: ActivityHub[int] = ActivityHub(
        store,
        render_board=lambda e: e.sequence,
        render_activity=lambda e: e.sequence,
        retry_seconds=0.01,
    )
    task = asyncio.create_task(running.run())
    await asyncio.wait_for(running.connected.wait(), 5)
    yield running
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def send(store: MemoryStore, board_id: str, count: int, prefix: str = "") -> None:
    for n in range(count):
        await store.relay(
            board_id, f"{prefix}{board_id}-{n}-{uuid.uuid4().hex[:6]}", body(board_id, "x"), 300
        )


async def take(subscription: Subscription[int], count: int) -> list[int]:
    got = []
    async with asyncio.timeout(5):
        while len(got) < count:
            event, rendered = await subscription.next()
            assert rendered == event.sequence
            got.append(event.sequence)
    return got


async def nothing_more(subscription: Subscription[int]) -> None:
    await asyncio.sleep(0.05)
    assert subscription.queued == 0, subscription.take_batch(subscription.queued)


async def test_events_reach_board_and_activity_subscribers_in_order(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with (
        hub.subscribe_board("a", 100) as board_a,
        hub.subscribe_activity(None, 100) as everything,
        hub.subscribe_activity(frozenset({"b"}), 100) as only_b,
    ):
        await send(store, "a", 3)
        await send(store, "b", 2)
        assert await take(board_a, 3) == [1, 2, 3]
        assert await take(everything, 5) == [1, 2, 3, 1, 2]
        assert await take(only_b, 2) == [1, 2]
        await nothing_more(board_a)


async def test_a_frame_seen_twice_is_delivered_once(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    store.echo = True
    async with hub.subscribe_board("a", 100) as subscription:
        await send(store, "a", 3)
        assert await take(subscription, 3) == [1, 2, 3]
        await nothing_more(subscription)


async def test_a_missed_frame_is_filled_from_the_board_stream(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with hub.subscribe_board("a", 100) as subscription:
        await send(store, "a", 2)
        assert await take(subscription, 2) == [1, 2]
        store.muted = True
        await send(store, "a", 3)  # 3, 4, 5 never arrive live
        store.muted = False
        await send(store, "a", 1)  # 6 arrives and reveals the gap
        assert await take(subscription, 4) == [3, 4, 5, 6]
        await nothing_more(subscription)


async def test_after_a_lost_subscription_the_hub_catches_up_without_gaps_or_repeats(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with hub.subscribe_board("a", 100) as board_a, hub.subscribe_board("b", 100) as board_b:
        await send(store, "a", 2)
        assert await take(board_a, 2) == [1, 2]
        # The connection drops, and while the hub is away, events are relayed.
        store.muted = True
        store.break_feed()
        await send(store, "a", 2)
        await send(store, "b", 2)
        store.muted = False
        async with asyncio.timeout(5):
            while store.subscriptions < 2:
                await asyncio.sleep(0.01)
        await send(store, "a", 1)
        assert await take(board_a, 3) == [3, 4, 5]
        # A board whose first events all came during the outage: caught up from the stream.
        assert await take(board_b, 2) == [1, 2]
        await nothing_more(board_a)
        await nothing_more(board_b)


async def test_when_redis_loses_its_data_subscribers_are_told_to_reset(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with hub.subscribe_board("a", 100) as subscription:
        await send(store, "a", 3)
        assert await take(subscription, 3) == [1, 2, 3]
        store.lose_everything()
        await asyncio.sleep(0.01)  # stream ids are milliseconds: the new ones are newer
        await send(store, "a", 2, prefix="again-")
        with pytest.raises(HistoryLost):
            await asyncio.wait_for(subscription.next(), 5)
        assert await take(subscription, 2) == [1, 2]  # the new history, from its start


async def test_a_slow_consumer_overflows_without_slowing_others_or_growing(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with hub.subscribe_board("a", 5) as slow, hub.subscribe_board("a", 100) as fast:
        overflows: list[bool] = []
        slow.on_overflow = lambda: overflows.append(True)
        await send(store, "a", 20)
        assert await take(fast, 20) == list(range(1, 21))
        assert slow.overflowed and overflows == [True]
        assert slow.queued <= 5
        with pytest.raises(SlowConsumer):
            await slow.next()


async def replayed(replay: Replay[int] | Replay[tuple[str, ...]]) -> list[RelayedEvent]:
    return [event async for page in replay.pages for event in page]


async def test_replay_of_a_board_after_a_cursor_and_its_reset_signals(store: FaultyStore) -> None:
    small = FaultyStore(retention=10)
    hub: ActivityHub[int] = ActivityHub(small, render_board=int, render_activity=int)
    await send(small, "a", 25)  # only 16..25 retained

    kept = await hub.replay_board("a", BoardCursor(20))
    assert [e.sequence for e in await replayed(kept)] == [21, 22, 23, 24, 25]
    assert not kept.expired and kept.until == 25

    expired = await hub.replay_board("a", BoardCursor(3))
    assert expired.expired and expired.oldest_cursor == "16"
    assert [e.sequence for e in await replayed(expired)] == list(range(16, 26))

    # A cursor past the newest event comes from a history that is gone: reset, everything.
    # So does an invalid one (None from `parse_board_cursor`).
    for lost in (BoardCursor(90), None):
        from_lost_history = await hub.replay_board("a", lost)
        assert from_lost_history.expired
        assert [e.sequence for e in await replayed(from_lost_history)] == list(range(16, 26))

    assert not (await hub.replay_board("a", BoardCursor(25))).expired
    assert await replayed(await hub.replay_board("a", BoardCursor(25))) == []


def vector(**entries: str) -> tuple[str, ...]:
    """An activity cursor: `p<N>=<id>` entries, every other part at 0-0."""
    ids = ["0-0"] * ACTIVITY_PARTS
    for name, stream_id in entries.items():
        ids[int(name[1:])] = stream_id
    return tuple(ids)


def boards_in_distinct_parts(count: int) -> list[str]:
    boards: dict[int, str] = {}
    n = 0
    while len(boards) < count:
        boards.setdefault(activity_part_of(f"board-{n}"), f"board-{n}")
        n += 1
    return list(boards.values())


async def test_replay_of_the_activity_stream_merges_the_parts_after_a_vector_cursor(
    store: FaultyStore,
) -> None:
    small = FaultyStore(retention=10)
    hub: ActivityHub[int] = ActivityHub(small, render_board=int, render_activity=int, page=4)
    a, b = boards_in_distinct_parts(2)
    pa, pb = activity_part_of(a), activity_part_of(b)
    for _ in range(3):  # interleaved: the merge must restore this order across parts
        await send(small, a, 1)
        await send(small, b, 1)
    relayed = [*await small.activity_after(pa, "0-0"), *await small.activity_after(pb, "0-0")]
    in_order = sorted(relayed, key=lambda e: [int(x) for x in e.stream_id.split("-")])

    everything = await hub.replay_activity(vector())
    events = await replayed(everything)
    assert not everything.expired and events == in_order
    assert everything.until[pa] == in_order[-2].stream_id
    assert everything.until[pb] == in_order[-1].stream_id

    # After a's first and b's second: the rest of each part, still in one order.
    first_a = next(e for e in in_order if e.board_id == a)
    second_b = [e for e in in_order if e.board_id == b][1]
    cursor = vector(**{f"p{pa}": first_a.stream_id, f"p{pb}": second_b.stream_id})
    rest = await replayed(await hub.replay_activity(cursor))
    assert [(e.board_id, e.sequence) for e in rest] == [
        (e.board_id, e.sequence)
        for e in in_order
        if (e.board_id == a and e.sequence > 1) or (e.board_id == b and e.sequence > 2)
    ]
    only_b = await replayed(await hub.replay_activity(vector(), frozenset({b})))
    assert [e.board_id for e in only_b] == [b, b, b]

    # Trimmed past a part's entry: a reset, then what is retained.
    await send(small, a, 12)  # a's part keeps its last 10
    expired = await hub.replay_activity(cursor)
    assert expired.expired
    assert len([e for e in await replayed(expired) if e.board_id == a]) == 10

    future = await hub.replay_activity(vector(**{f"p{pa}": "99999999999999-0"}))
    assert future.expired and len(await replayed(future)) == 13
    assert (await hub.replay_activity(None)).expired


def test_one_parse_per_cursor_kind_refuses_what_redis_would() -> None:
    assert parse_board_cursor("0") == BoardCursor(0)
    assert parse_board_cursor(42) == parse_board_cursor("42") == BoardCursor(42)
    assert parse_board_cursor(str(2**63 - 1)) == BoardCursor(2**63 - 1)
    for invalid in (str(2**63), 2**64, "9" * 20, "9" * 5000, "-1", -1, "", "1,5", "²", " 1"):
        assert parse_board_cursor(invalid) is None, invalid
    # With an epoch: `<sequence>.<epoch>` (SSE ids), or given apart (WebSocket).
    assert parse_board_cursor("7.1700000000000") == BoardCursor(7, "1700000000000")
    assert parse_board_cursor("7", "1700000000000") == BoardCursor(7, "1700000000000")
    assert parse_board_cursor(7, "1700000000000") == BoardCursor(7, "1700000000000")
    assert parse_board_cursor("7.1700000000000", "1700000000000") == BoardCursor(7, "1700000000000")
    for cursor, epoch in (("7.", None), ("7.x", None), ("7.1", "2"), ("7", ""), ("7", "9" * 21)):
        assert parse_board_cursor(cursor, epoch) is None, (cursor, epoch)
    assert parse_board_cursor(f"{2**63}.1") is None and parse_board_cursor("7.1.2") is None
    zero = ("0-0",) * ACTIVITY_PARTS
    assert parse_activity_cursor(",".join(["0"] * ACTIVITY_PARTS)) == zero
    top = f"{2**64 - 1}-{2**64 - 1}"
    ids = ("1700000000000-3", top, *["0-0"] * (ACTIVITY_PARTS - 2))
    assert parse_activity_cursor(activity_cursor(ids)) == ids
    assert activity_cursor(zero) == ",".join(["0"] * ACTIVITY_PARTS)
    # One id (a cursor from before the stream was split), too few or too many parts: None.
    for invalid in ("0", "1700000000000-3", ",".join(["0"] * 15), ",".join(["0"] * 17), ""):
        assert parse_activity_cursor(invalid) is None, invalid
    for bad in ("0-99999999999999999999", "99999999999999999999-0", "1-", "-1", "1-2-3", "a-1"):
        assert parse_activity_cursor(",".join([bad, *["0"] * 15])) is None, bad


async def test_a_cursor_of_an_expired_board_gets_a_reset_never_new_events_under_old_numbers(
    store: FaultyStore,
) -> None:
    hub: ActivityHub[int] = ActivityHub(store, render_board=int, render_activity=int)
    await send(store, "a", 5)
    old = (await store.board_after("a", 0))[0].epoch
    store.expire_board("a")  # idle past ADVANCED_BOARD_IDLE_TTL_SECONDS
    await send(store, "a", 3)
    new = (await store.board_after("a", 0))[0].epoch
    assert old and new and new != old

    for stale in (BoardCursor(1, old), BoardCursor(5, old), BoardCursor(9, old)):
        replay = await hub.replay_board("a", stale)
        assert replay.reason == "history_lost" and replay.epoch == new, stale
        events = await replayed(replay)
        assert [(e.sequence, e.epoch) for e in events] == [(1, new), (2, new), (3, new)]

    current = await hub.replay_board("a", BoardCursor(1, new))
    assert current.reason is None and [e.sequence for e in await replayed(current)] == [2, 3]
    # A cursor without an epoch (an older client) is trusted against the current epoch.
    plain = await hub.replay_board("a", BoardCursor(2))
    assert plain.reason is None and [e.sequence for e in await replayed(plain)] == [3]


async def test_a_board_that_starts_again_resets_its_subscribers_in_band(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with hub.subscribe_board("a", 100) as on_a, hub.subscribe_activity(None, 100) as on_all:
        await send(store, "a", 3)
        assert await take(on_a, 3) == [1, 2, 3]
        store.expire_board("a")
        await send(store, "a", 2)
        with pytest.raises(HistoryLost):  # after the events queued before, then the new
            await on_a.next()
        assert await take(on_a, 2) == [1, 2]
        # The activity stream's ids go on: its subscribers carry on without a reset.
        assert await take(on_all, 5) == [1, 2, 3, 1, 2]
        await nothing_more(on_a)


async def test_the_hub_forgets_boards_that_have_no_subscribers(
    hub: ActivityHub[int], store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(200):
        async with hub.subscribe_board(f"b{n}", 10) as subscription:
            await send(store, f"b{n}", 1)
            await take(subscription, 1)
            await hub.replay_board(f"b{n}", BoardCursor(0))
    await send(store, "nobody-listens", 3)
    assert hub.board_ids == [] and hub.tracked_boards == 0

    # While an activity-stream subscriber is here, the boards it sees are kept, bounded.
    monkeypatch.setattr("realtime_runtime.feed.hub.MAX_TRACKED_BOARDS", 20)
    async with (
        hub.subscribe_activity(None, 1000) as on_all,
        hub.subscribe_board("kept", 10) as kept,
    ):
        await send(store, "kept", 1)
        for n in range(50):
            await send(store, f"c{n}", 1)
        await take(on_all, 51)
        await take(kept, 1)
        assert 1 <= hub.tracked_boards <= 21
        await send(store, "kept", 1)
        assert await take(kept, 1) == [2]  # a board with a subscriber is never forgotten
    assert hub.tracked_boards == 0


async def test_the_hub_listens_to_the_channels_of_its_subscribers_only(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    keys = store.keys
    assert hub.channels == set()
    async with hub.subscribe_board("a", 100) as on_a:
        # Entered: the subscription is confirmed, so an event published now reaches it.
        assert hub.channels == {keys.board_events_channel("a")}
        await send(store, "a", 1)
        await send(store, "b", 1)  # nobody here listens to b: its frames do not come
        assert await take(on_a, 1) == [1]
        async with hub.subscribe_board("a", 100) as again:
            await send(store, "a", 1)
            assert await take(again, 1) == [2]
        assert await take(on_a, 1) == [2]
        assert hub.channels == {keys.board_events_channel("a")}  # a still has a subscriber
        async with hub.subscribe_activity(None, 100) as on_all:
            parts = {keys.activity_part_channel(p) for p in range(ACTIVITY_PARTS)}
            assert hub.channels == parts | {keys.board_events_channel("a")}
            await send(store, "b", 1)
            assert await take(on_all, 1) == [2]
        await asyncio.sleep(0)
        assert hub.channels == {keys.board_events_channel("a")}
        await nothing_more(on_a)
    await asyncio.sleep(0)
    assert hub.channels == set() and store._channels == {}


async def test_a_joiner_replays_then_goes_on_live_without_a_gap_or_a_repeat(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    await send(store, "a", 3)
    async with hub.subscribe_board("a", 100) as subscription:
        await send(store, "a", 2)  # after the confirmation: live, and in the replay too
        replay = await hub.replay_board("a", BoardCursor(1))
        replayed_now = [e.sequence for e in await replayed(replay)]
        assert replayed_now == [2, 3, 4, 5] and replay.until == 5
        await send(store, "a", 1)
        live = await take(subscription, 3)
        assert live == [4, 5, 6]  # the caller drops what is <= until: 6 follows 5
        await nothing_more(subscription)


async def test_a_sequence_that_goes_back_under_newer_entries_resets_the_board(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    async with hub.subscribe_board("a", 100) as on_a, hub.subscribe_board("b", 100) as on_b:
        await send(store, "a", 5)
        await send(store, "b", 1)
        assert await take(on_a, 5) == [1, 2, 3, 4, 5]
        store.lose_writes("a", keep=3)  # a failover lost a's 4 and 5
        await send(store, "a", 2)  # numbered 4 and 5 again, as other events
        with pytest.raises(HistoryLost):
            await asyncio.wait_for(on_a.next(), 5)
        assert await take(on_a, 2) == [4, 5]  # the new numbers, after the reset
        await send(store, "a", 1)
        assert await take(on_a, 1) == [6]
        assert await take(on_b, 1) == [1]  # other boards carry on
        await nothing_more(on_a)
        await nothing_more(on_b)
    # A replay whose cursor is past the newest (numbers the client holds from before the
    # loss) is a reset too.
    store.lose_writes("a", keep=2)
    assert (await hub.replay_board("a", BoardCursor(6))).expired


async def test_a_board_subscribed_before_its_first_event_is_caught_up_after_a_reconnect(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    await send(store, "quiet", 2)
    async with hub.subscribe_board("quiet", 100) as subscription:
        store.muted = True
        store.break_feed()
        await send(store, "quiet", 2)  # relayed while the hub is away
        store.muted = False
        async with asyncio.timeout(5):
            while store.subscriptions < 2 or not hub.connected.is_set():
                await asyncio.sleep(0.01)
        await send(store, "quiet", 1)
        assert await take(subscription, 3) == [3, 4, 5]
        await nothing_more(subscription)


async def test_activity_subscribers_are_caught_up_on_every_part_after_a_reconnect(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    boards = boards_in_distinct_parts(4)
    async with hub.subscribe_activity(None, 1000) as on_all:
        for board in boards:
            await send(store, board, 1)
        assert len(await take(on_all, 4)) == 4
        store.muted = True
        store.break_feed()
        for board in boards:
            await send(store, board, 2)
        store.muted = False
        got = []
        async with asyncio.timeout(5):
            while len(got) < 8:
                event, _ = await on_all.next()
                got.append((event.board_id, event.sequence))
        assert sorted(got) == sorted((b, s) for b in boards for s in (2, 3))
        await nothing_more(on_all)


def boards_in_one_part(count: int) -> list[str]:
    found: dict[int, list[str]] = {}
    for n in range(10_000):
        board = f"same-{n}"
        found.setdefault(activity_part_of(board), []).append(board)
        if len(found[activity_part_of(board)]) == count:
            return found[activity_part_of(board)]
    raise AssertionError("no part holds that many boards")


async def test_the_catch_up_gives_activity_subscribers_each_part_in_stream_order(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    """Two boards of one part, each with a subscriber here, written in turn during an outage:
    caught up board by board, the activity stream would get one board's events, then the
    other's older ones, out of its part's order, and an `/sse/activity` stream (which drops
    what is not after its position in the part) would lose them."""
    a, b = boards_in_one_part(2)
    async with (
        hub.subscribe_board(a, 100) as on_a,
        hub.subscribe_board(b, 100) as on_b,
        hub.subscribe_activity(None, 1000) as on_all,
    ):
        await send(store, a, 1)
        await send(store, b, 1)
        assert len(await take(on_all, 2)) == 2
        store.muted = True
        store.break_feed()
        for _ in range(3):
            await send(store, a, 1)
            await send(store, b, 1)
        store.muted = False
        ids = []
        async with asyncio.timeout(5):
            while len(ids) < 6:
                event, _ = await on_all.next()
                ids.append(stream_id_key(event.stream_id))
        assert ids == sorted(ids)
        assert await take(on_a, 4) == [1, 2, 3, 4] and await take(on_b, 4) == [1, 2, 3, 4]
        await nothing_more(on_all)
