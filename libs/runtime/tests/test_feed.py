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
from envelope.cursors import BoardCursor, parse_activity_cursor, parse_board_cursor
from realtime_runtime.feed import ActivityHub, HistoryLost, Replay, SlowConsumer, Subscription
from realtime_runtime.memory import MemoryStore, RelayOutcome
from support.envelopes import board_event


def body(board_id: str, correlation_id: str) -> bytes:
    return codec.activity_body(board_event(board_id, correlation_id), datetime.now(UTC))


class FaultyStore(MemoryStore):
    """The memory store with the faults of a real pub/sub connection, on demand: frames that
    never arrive (`muted`), a subscription that breaks (`break_feed`), or a frame that
    arrives twice (`echo`)."""

    def __init__(self, retention: int = 10_000) -> None:
        super().__init__(retention)
        self.muted = False
        self.echo = False
        self.subscriptions = 0
        self._broken = asyncio.Event()

    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome:
        subscribers = self._subscribers
        if self.muted:
            self._subscribers = set()
        try:
            outcome = await super().relay(board_id, correlation_id, body, ttl_seconds)
        finally:
            self._subscribers = subscribers
        if self.echo and not self.muted:
            frame = RelayedEvent(outcome.stream_id, board_id, outcome.sequence, b"{}").to_frame()
            for queue in subscribers:
                queue.put_nowait(frame)
        return outcome

    def break_feed(self) -> None:
        self._broken.set()

    @contextlib.asynccontextmanager
    async def feed(self) -> AsyncIterator[AsyncIterator[bytes]]:
        self.subscriptions += 1
        async with super().feed() as frames:
            yield self._until_broken(frames)

    async def _until_broken(self, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        while True:
            next_frame = asyncio.ensure_future(anext(frames))
            broken = asyncio.ensure_future(self._broken.wait())
            done, _ = await asyncio.wait({next_frame, broken}, return_when=asyncio.FIRST_COMPLETED)
            if broken in done:
                next_frame.cancel()
                self._broken.clear()
                raise ConnectionError("the subscription connection was reset")
            broken.cancel()
            yield next_frame.result()

    def lose_everything(self) -> None:
        """What a Redis restart without persistence does."""
        self._seen.clear()
        self._sequences.clear()
        self._boards.clear()
        self._activity.clear()


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
    with (
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
    with hub.subscribe_board("a", 100) as subscription:
        await send(store, "a", 3)
        assert await take(subscription, 3) == [1, 2, 3]
        await nothing_more(subscription)


async def test_a_missed_frame_is_filled_from_the_board_stream(
    hub: ActivityHub[int], store: FaultyStore
) -> None:
    with hub.subscribe_board("a", 100) as subscription:
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
    with hub.subscribe_board("a", 100) as board_a, hub.subscribe_board("b", 100) as board_b:
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
    with hub.subscribe_board("a", 100) as subscription:
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
    with hub.subscribe_board("a", 5) as slow, hub.subscribe_board("a", 100) as fast:
        overflows: list[bool] = []
        slow.on_overflow = lambda: overflows.append(True)
        await send(store, "a", 20)
        assert await take(fast, 20) == list(range(1, 21))
        assert slow.overflowed and overflows == [True]
        assert slow.queued <= 5
        with pytest.raises(SlowConsumer):
            await slow.next()


async def replayed(replay: Replay[int] | Replay[str]) -> list[RelayedEvent]:
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


async def test_replay_of_the_activity_stream_after_a_cursor(store: FaultyStore) -> None:
    small = FaultyStore(retention=10)
    hub: ActivityHub[int] = ActivityHub(small, render_board=int, render_activity=int)
    await send(small, "a", 5)
    first_five = await small.activity_after("0-0")
    await send(small, "b", 10)

    expired = await hub.replay_activity(first_five[1].stream_id)
    assert expired.expired and len(await replayed(expired)) == 10

    oldest, newest = await small.activity_head()
    kept = await hub.replay_activity(oldest)
    events = await replayed(kept)
    assert not kept.expired and len(events) == 9 and events[-1].stream_id == newest

    future = await hub.replay_activity("99999999999999-0")
    assert future.expired and len(await replayed(future)) == 10


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
    assert parse_activity_cursor("0") == "0-0"
    assert parse_activity_cursor("1700000000000-3") == "1700000000000-3"
    top = f"{2**64 - 1}-{2**64 - 1}"
    assert parse_activity_cursor(top) == top
    for invalid in ("0-99999999999999999999", "99999999999999999999-0", str(2**64), "1-", "-1"):
        assert parse_activity_cursor(invalid) is None, invalid
    for invalid in ("1-2-3", "1-²", "a-1", ""):
        assert parse_activity_cursor(invalid) is None, invalid


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
    with hub.subscribe_board("a", 100) as on_a, hub.subscribe_activity(None, 100) as on_all:
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
        with hub.subscribe_board(f"b{n}", 10) as subscription:
            await send(store, f"b{n}", 1)
            await take(subscription, 1)
            await hub.replay_board(f"b{n}", BoardCursor(0))
    await send(store, "nobody-listens", 3)
    assert hub.board_ids == [] and hub.tracked_boards == 0

    # While an activity-stream subscriber is here, the boards it sees are kept, bounded.
    monkeypatch.setattr("realtime_runtime.feed.hub.MAX_TRACKED_BOARDS", 20)
    with hub.subscribe_activity(None, 1000) as on_all, hub.subscribe_board("kept", 10) as kept:
        await send(store, "kept", 1)
        for n in range(50):
            await send(store, f"c{n}", 1)
        await take(on_all, 51)
        await take(kept, 1)
        assert 1 <= hub.tracked_boards <= 21
        await send(store, "kept", 1)
        assert await take(kept, 1) == [2]  # a board with a subscriber is never forgotten
    assert hub.tracked_boards == 0
