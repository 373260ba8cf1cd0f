"""Reading relayed activity back: live frames from pub/sub, history from the Redis Streams.

Both edges (the WebSocket ingress and the SSE gateway) read the relay's output the same way,
so it is defined once here, next to the frame format it parses. One `ActivityHub` per process
holds the only Redis subscription and fans out to bounded per-client queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

import redis.asyncio as redis
from envelope.codec import RelayedEvent
from envelope.codes import ResetReason
from envelope.cursors import BoardCursor, older_epoch, stream_id_key
from envelope.topology import RedisKeys
from redis.exceptions import RedisError

from realtime_runtime.pubsub import channel_frames

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C", int, str)
# Events read from Redis per round trip, for a replay and for the hub's own catch-up: a replay
# holds one page at a time, so a stream's memory is bounded by it, not by the history.
PAGE = 200
# Boards whose last sequence and epoch the hub keeps for an activity-stream subscriber (every
# board) beyond those with subscribers of their own: past this, the first-seen are forgotten.
MAX_TRACKED_BOARDS = 10_000
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]
# A catch-up or gap-filling read that takes longer is treated as a lost connection (a
# TimeoutError is an OSError): the hub resubscribes and catches up again.
READ_TIMEOUT_SECONDS = 30.0


class ActivityStore(Protocol):
    """What an edge needs from Redis: the live frames and the retained history."""

    def feed(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Subscribe; once entered, every frame published from then on is yielded in order.

        The iterator raises `RedisError` or `OSError` when the connection is lost.
        """
        ...

    async def board_after(
        self, board_id: str, sequence: int, count: int = PAGE
    ) -> list[RelayedEvent]:
        """At most `count` of the board's retained events after `sequence`, in order."""
        ...

    async def activity_after(self, stream_id: str, count: int = PAGE) -> list[RelayedEvent]:
        """At most `count` retained activity entries after `stream_id`, in order."""
        ...

    async def board_head(self, board_id: str) -> tuple[int, int]:
        """(oldest retained, newest) sequence of the board; (0, 0) when it has no events."""
        ...

    async def board_epoch(self, board_id: str) -> str | None:
        """The board's current epoch; None once its state expired (or before it had one)."""
        ...

    async def activity_head(self) -> tuple[str, str]:
        """(oldest, newest) retained activity stream id; ("0-0", "0-0") when empty."""
        ...


class RedisActivityStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys

    def feed(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return channel_frames(self._client, self._keys.activity_channel, "activity")

    async def _ends(self, key: str) -> tuple[str, str] | None:
        first = cast(StreamRows, await self._client.xrange(key, count=1))
        last = cast(StreamRows, await self._client.xrevrange(key, count=1))
        if not first or not last:
            return None
        return first[0][0].decode(), last[0][0].decode()

    async def board_after(
        self, board_id: str, sequence: int, count: int = PAGE
    ) -> list[RelayedEvent]:
        key = self._keys.board_stream(board_id)
        rows = cast(StreamRows, await self._client.xrange(key, min=f"({sequence}-0", count=count))
        return [
            RelayedEvent(
                fields[b"a"].decode(),
                board_id,
                int(entry_id.split(b"-")[0]),
                fields[b"e"],
                fields.get(b"p", b"").decode(),  # none from a relay older than epochs
            )
            for entry_id, fields in rows
        ]

    async def activity_after(self, stream_id: str, count: int = PAGE) -> list[RelayedEvent]:
        key = self._keys.activity_stream
        rows = cast(StreamRows, await self._client.xrange(key, min=f"({stream_id}", count=count))
        return [
            RelayedEvent(
                entry_id.decode(),
                fields[b"b"].decode(),
                int(fields[b"s"]),
                fields[b"e"],
                fields.get(b"p", b"").decode(),
            )
            for entry_id, fields in rows
        ]

    async def board_head(self, board_id: str) -> tuple[int, int]:
        ends = await self._ends(self._keys.board_stream(board_id))
        if ends is None:
            return 0, 0
        return int(ends[0].split("-")[0]), int(ends[1].split("-")[0])

    async def activity_head(self) -> tuple[str, str]:
        return await self._ends(self._keys.activity_stream) or ("0-0", "0-0")

    async def board_epoch(self, board_id: str) -> str | None:
        epoch = cast(bytes | None, await self._client.get(self._keys.epoch(board_id)))
        return None if epoch is None else epoch.decode()


class StreamInterrupted(Exception):
    """A subscription cannot simply carry on; the subclass says why."""


class SlowConsumer(StreamInterrupted):
    """The client did not keep up: its bounded queue overflowed. It may resume."""


class HistoryLost(StreamInterrupted):
    """Redis lost its data (restarted without persistence): sequences start again.

    Raised in order, after the events queued before the loss; the client is told to reset.
    """


# Queued in band, so that the reset reaches the client after the events that preceded it.
_HISTORY_LOST = RelayedEvent("0-0", "", 0, b"")


class Subscription(Generic[T]):
    """One client's bounded queue of (event, rendered bytes).

    A list and at most one waiting future: an idle subscription holds no `asyncio.Queue`
    (with its two waiter deques) and no `asyncio.Event`, which matters at 10,000 streams.
    One consumer reads it: `next_batch`, or `wait` then `take_batch`.
    """

    __slots__ = (
        "_board",
        "_history_lost_queued",
        "_hub",
        "_items",
        "_waiter",
        "boards",
        "maxsize",
        "on_overflow",
        "overflowed",
    )

    def __init__(
        self,
        boards: frozenset[str] | None,
        maxsize: int,
        *,
        hub: ActivityHub[T] | None = None,
        board: str | None = None,
    ) -> None:
        self.boards = boards
        self.maxsize = maxsize
        self.overflowed = False
        # `with hub.subscribe_board(...)` registers it with the hub while the block runs (no
        # generator-based context manager per subscription: it held a frame per stream).
        self._hub = hub
        self._board = board
        # A list, not a deque: an empty deque allocates a 64-slot block, an empty list nothing,
        # and a reader takes everything queued at once.
        self._items: list[tuple[RelayedEvent, T]] = []
        self._history_lost_queued = False
        self._waiter: asyncio.Future[None] | None = None
        # Called once when the queue overflows: a writer stuck in a send is not waiting on
        # the subscription, so `wake` alone would not reach it.
        self.on_overflow: Callable[[], object] | None = None

    def __enter__(self) -> Subscription[T]:
        if self._hub is not None:
            self._hub._join(self, self._board)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._hub is not None:
            self._hub._leave(self, self._board)

    @property
    def queued(self) -> int:
        return len(self._items)

    def offer(self, event: RelayedEvent, rendered: T) -> None:
        if self.overflowed:
            return
        if len(self._items) >= self.maxsize:
            self.overflowed = True
            self._items = []  # free the memory at once; the reader only needs to know
            if self.on_overflow is not None:
                self.on_overflow()
        else:
            self._items.append((event, rendered))
        self.wake()

    def history_lost(self) -> None:
        self.offer(_HISTORY_LOST, cast(T, None))
        self._history_lost_queued = not self.overflowed

    def wake(self) -> None:
        """End a pending `wait` (also with nothing queued: the caller has other news)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is queued, the queue overflowed or `wake` is called."""
        if self._items or self.overflowed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def take_batch(self, limit: int) -> list[tuple[RelayedEvent, T]]:
        """What is queued now (at most `limit`), in order; empty if nothing is.

        Raises `SlowConsumer` once the queue overflowed, and `HistoryLost` in band: after the
        events queued before the loss, on the call that reaches it.
        """
        if self.overflowed:
            raise SlowConsumer
        items = self._items
        if not self._history_lost_queued:
            if not items:
                return []
            if len(items) <= limit:
                self._items = []
                return items
            batch, self._items = items[:limit], items[limit:]
            return batch
        if items[0][0] is _HISTORY_LOST:
            del items[0]
            self._history_lost_queued = any(item[0] is _HISTORY_LOST for item in items)
            raise HistoryLost
        end = next(i for i, item in enumerate(items) if item[0] is _HISTORY_LOST)
        end = min(end, limit)  # a loss queued behind is raised by the next call
        batch, self._items = items[:end], items[end:]
        return batch

    async def next(self) -> tuple[RelayedEvent, T]:
        return (await self.next_batch(1))[0]

    async def next_batch(self, limit: int) -> list[tuple[RelayedEvent, T]]:
        """The next item and whatever else is already queued (at most `limit`), in order.

        A writer that wakes once for several events writes them in one go, instead of
        paying a wake-up and a socket write per event. A history loss queued behind them
        is raised by the following call.
        """
        while True:
            batch = self.take_batch(limit)
            if batch:
                return batch
            await self.wait()


@dataclass(frozen=True, slots=True)
class Replay(Generic[C]):
    """What a resume owes the client, read page by page as the client takes it."""

    # The retained events after the cursor, up to `until`, one page per step: the next page
    # is read only when the caller asks for it, after it wrote the last one.
    pages: AsyncGenerator[list[RelayedEvent], None]
    # Why the client gets a reset first, if it does: events after the cursor are no longer
    # retained (`cursor_expired`), or the cursor is of a history the board no longer has
    # (`history_lost`: it expired and started again under a new epoch). `pages` is then
    # everything retained from the oldest on.
    reason: ResetReason | None
    oldest_cursor: str | None
    # The newest event when the replay began: the replay ends there and live events up to
    # it are duplicates (this is the seam between the two).
    until: C
    epoch: str = ""  # the board's current epoch ("" for the activity stream, or none known)

    @property
    def expired(self) -> bool:
        return self.reason is not None


class ActivityHub(Generic[T]):
    """The process's single subscriber: orders, de-duplicates and fans out relayed events.

    It keeps the last sequence seen and the epoch of each board it has subscribers for; a
    frame at or below that sequence is a duplicate, a frame past the next one reveals a gap,
    filled from the board's stream, and a frame of a newer epoch resets the board's clients.
    After a lost connection it resubscribes and catches up from the activity stream, so
    clients that stay connected miss nothing.
    """

    def __init__(
        self,
        store: ActivityStore,
        *,
        render_board: Callable[[RelayedEvent], T],
        render_activity: Callable[[RelayedEvent], T],
        retry_seconds: float = 0.5,
        page: int = PAGE,
    ) -> None:
        self._store = store
        self._page = page
        self._render_board = render_board
        self._render_activity = render_activity
        self._retry_seconds = retry_seconds
        self._boards: dict[str, set[Subscription[T]]] = {}
        self._activity: set[Subscription[T]] = set()
        # Per board, only while it has subscribers here (or, bounded, while an activity-stream
        # subscriber is here): the last sequence dispatched and the epoch it belongs to.
        self._last_sequence: dict[str, int] = {}
        self._epochs: dict[str, str] = {}
        self._last_stream_id: str | None = None
        self.connected = asyncio.Event()
        self.on_event: Callable[[RelayedEvent, int], None] = lambda event, receivers: None

    @property
    def board_ids(self) -> list[str]:
        return list(self._boards)

    def local_subscribers(self, board_id: str) -> int:
        return len(self._boards.get(board_id, ()))

    def board_subscriptions(self, board_id: str) -> list[Subscription[T]]:
        """The board's subscriptions in this process (presence frames are offered to them)."""
        return list(self._boards.get(board_id, ()))

    def subscribe_board(self, board_id: str, maxsize: int) -> Subscription[T]:
        """A context manager: the board's events reach the subscription inside the block."""
        return Subscription(frozenset({board_id}), maxsize, hub=self, board=board_id)

    def subscribe_activity(self, boards: frozenset[str] | None, maxsize: int) -> Subscription[T]:
        """As `subscribe_board`, for every board (`None`) or the boards given."""
        return Subscription(boards, maxsize, hub=self)

    def _join(self, subscription: Subscription[T], board_id: str | None) -> None:
        if board_id is None:
            self._activity.add(subscription)
        else:
            self._boards.setdefault(board_id, set()).add(subscription)

    def _leave(self, subscription: Subscription[T], board_id: str | None) -> None:
        if board_id is None:
            self._activity.discard(subscription)
            if not self._activity:  # what was kept for it only is forgotten
                for board in [b for b in self._last_sequence if b not in self._boards]:
                    self._forget(board)
            return
        listeners = self._boards.get(board_id)
        if listeners is not None:
            listeners.discard(subscription)
            if not listeners:
                del self._boards[board_id]
                if not self._activity:
                    self._forget(board_id)

    def _forget(self, board_id: str) -> None:
        self._last_sequence.pop(board_id, None)
        self._epochs.pop(board_id, None)

    @property
    def tracked_boards(self) -> int:
        """Boards this hub keeps state for (sequence or epoch): bounded, see `_leave`."""
        return len(self._last_sequence.keys() | self._epochs.keys())

    async def replay_board(self, board_id: str, cursor: BoardCursor | None) -> Replay[int]:
        """The retained events after `cursor`, in pages, with the reason for a reset if any.

        A cursor of another epoch than the board's current one is of a history that expired:
        `history_lost`, then the current epoch's events, never events under the old numbers.
        An invalid cursor (None), or one past the newest event (from a history Redis has
        since lost), gets a reset and all that is retained now.
        """
        epoch = await self._store.board_epoch(board_id)
        oldest, newest = await self._store.board_head(board_id)
        if epoch and board_id in self._boards:
            # The caller subscribed first: its live events must be checked against the
            # epoch it is replayed from, even before this hub has seen one of the board's.
            self._epochs.setdefault(board_id, epoch)
        oldest_cursor = str(oldest) if oldest else None
        reason: ResetReason | None = None
        after = 0
        if cursor is not None and cursor.epoch and epoch and cursor.epoch != epoch:
            reason = ResetReason.HISTORY_LOST
        elif cursor is None or cursor.sequence > newest:
            reason = ResetReason.CURSOR_EXPIRED
        else:
            after = cursor.sequence
            if oldest > after + 1:
                reason = ResetReason.CURSOR_EXPIRED
        pages = self._board_pages(board_id, after, newest, epoch)
        return Replay(pages, reason, oldest_cursor, newest, epoch or "")

    async def replay_activity(
        self, cursor: str | None, boards: frozenset[str] | None = None
    ) -> Replay[str]:
        """As `replay_board`, by activity stream id across boards (or across `boards` only:
        a credential with none reads nothing)."""
        oldest, newest = await self._store.activity_head()
        oldest_cursor = oldest if oldest != "0-0" else None
        if cursor is None or stream_id_key(cursor) > stream_id_key(newest):
            pages = self._activity_pages("0-0", newest, boards)
            return Replay(pages, ResetReason.CURSOR_EXPIRED, oldest_cursor, newest)
        # The cursor's own entry trimmed away: entries after it may have gone with it.
        position = stream_id_key(cursor)
        expired = position != (0, 0) and stream_id_key(oldest) > position
        pages = self._activity_pages(cursor, newest, boards)
        return Replay(pages, ResetReason.CURSOR_EXPIRED if expired else None, oldest_cursor, newest)

    async def _board_pages(
        self, board_id: str, after: int, until: int, epoch: str | None = None
    ) -> AsyncGenerator[list[RelayedEvent], None]:
        """The board's events in (after, until] of `epoch`, a page per step, each read when
        asked for. It stops at an event of another epoch: the board started again meanwhile,
        and the live subscription resets the client."""
        while after < until:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                page = await self._store.board_after(board_id, after, self._page)
            if not page:
                return
            after = page[-1].sequence
            if after > until:  # newer than the replay: the live subscription has those
                page = [event for event in page if event.sequence <= until]
            if epoch and any(event.epoch and event.epoch != epoch for event in page):
                page = [event for event in page if not event.epoch or event.epoch == epoch]
                after = until  # the rest is of the new epoch: not part of this replay
            if page:
                yield page
            del page  # not held while the next page is read

    async def _activity_pages(
        self, after: str, until: str, boards: frozenset[str] | None
    ) -> AsyncGenerator[list[RelayedEvent], None]:
        """As `_board_pages` for the activity stream, each page filtered to `boards`."""
        end = stream_id_key(until)
        while (boards is None or boards) and stream_id_key(after) < end:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                page = await self._store.activity_after(after, self._page)
            if not page:
                return
            after = page[-1].stream_id
            if boards is not None or stream_id_key(after) > end:
                page = [
                    event
                    for event in page
                    if (boards is None or event.board_id in boards)
                    and stream_id_key(event.stream_id) <= end
                ]
            if page:
                yield page
            del page

    async def run(self) -> None:
        """Subscribe, catch up after every reconnect, dispatch; until cancelled."""
        while True:
            try:
                async with self._store.feed() as frames:
                    # Bounded: a silently dead connection must not stall the hub for good.
                    async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                        await self._catch_up()
                    self.connected.set()
                    async for frame in frames:
                        try:
                            event = RelayedEvent.from_frame(frame)
                        except ValueError:
                            log.error("ignoring a malformed relay frame of %d bytes", len(frame))
                            continue
                        await self._accept(event)
            except (RedisError, OSError) as exc:
                if self.connected.is_set():
                    log.warning("activity subscription lost, resubscribing: %s", exc)
                self.connected.clear()
                await asyncio.sleep(self._retry_seconds)
            except Exception:  # a bug must not silence every stream of the process for good
                log.exception("activity hub failed; resubscribing")
                self.connected.clear()
                await asyncio.sleep(self._retry_seconds)

    async def _catch_up(self) -> None:
        _oldest, newest = await self._store.activity_head()
        if self._last_stream_id is None:
            self._last_stream_id = newest
            return
        if stream_id_key(newest) < stream_id_key(self._last_stream_id):
            # The stream went back in time: Redis restarted without its data.
            self._history_lost()
        after = self._last_stream_id
        while True:
            page = await self._store.activity_after(after, self._page)
            if not page:
                return
            for event in page:
                await self._accept(event)
            after = page[-1].stream_id

    async def _accept(self, event: RelayedEvent) -> None:
        """Dispatch `event` after any of its board's events that this process missed."""
        known = self._epochs.get(event.board_id)
        if event.epoch and known and event.epoch != known:
            if older_epoch(event.epoch, known):
                return  # of a history that was already replaced: never under old numbers
            self._board_restarted(event.board_id)
        last = self._last_sequence.get(event.board_id)
        if last is not None and event.sequence <= last:
            if self._last_stream_id is None or stream_id_key(event.stream_id) <= stream_id_key(
                self._last_stream_id
            ):
                return  # a duplicate: the catch-up and the live frames overlap
            # A sequence seen before on an entry never seen before: the board's history
            # started again, so Redis lost its data while we were connected elsewhere.
            self._history_lost()
            last = 0
        if last is not None and event.sequence > last + 1:
            # Frames arrive in order on one connection, so a gap means we reconnected or the
            # catch-up met a trimmed activity stream: the board's own stream has the rest.
            async for missing in self._board_pages(
                event.board_id, last, event.sequence - 1, event.epoch or None
            ):
                for missed in missing:
                    self._dispatch(missed)
            if self._last_sequence.get(event.board_id, 0) < event.sequence - 1:
                log.warning(
                    "events no longer retained were skipped",
                    extra={"board_id": event.board_id, "up_to": event.sequence - 1},
                )
        self._dispatch(event)

    def _board_restarted(self, board_id: str) -> None:
        """The board expired while idle and was written again: a new epoch, sequences from 1.

        Its subscribers are told to reset, in band (after the events queued before); the
        activity stream's ids go on, so its subscribers carry on.
        """
        log.info("a board started again under a new epoch", extra={"board_id": board_id})
        self._last_sequence[board_id] = 0  # its new events from 1 on, gaps filled
        for subscription in self._boards.get(board_id, ()):
            subscription.history_lost()

    def _history_lost(self) -> None:
        log.warning("Redis lost its data: sequences start again; telling every client to reset")
        # Every board starts again from sequence 1: those with subscribers fill from there.
        self._last_sequence = dict.fromkeys(self._boards, 0)
        self._epochs.clear()
        self._last_stream_id = "0-0"
        for listeners in self._boards.values():
            for subscription in listeners:
                subscription.history_lost()
        for subscription in self._activity:
            subscription.history_lost()

    def _dispatch(self, event: RelayedEvent) -> None:
        board_id = event.board_id
        if board_id in self._boards or self._activity:
            self._last_sequence[board_id] = event.sequence
            if event.epoch:
                self._epochs[board_id] = event.epoch
            if len(self._last_sequence) > MAX_TRACKED_BOARDS:
                self._forget_one_unsubscribed()
        if self._last_stream_id is None or stream_id_key(event.stream_id) > stream_id_key(
            self._last_stream_id
        ):
            self._last_stream_id = event.stream_id
        receivers = 0
        listeners = self._boards.get(event.board_id)
        if listeners:
            rendered = self._render_board(event)
            for subscription in listeners:
                subscription.offer(event, rendered)
            receivers += len(listeners)
        if self._activity:
            rendered_activity: T | None = None
            for subscription in self._activity:
                if subscription.boards is None or event.board_id in subscription.boards:
                    if rendered_activity is None:
                        rendered_activity = self._render_activity(event)
                    subscription.offer(event, rendered_activity)
                    receivers += 1
        self.on_event(event, receivers)

    def _forget_one_unsubscribed(self) -> None:
        # The first-seen board that has no subscriber of its own (an activity-stream
        # subscriber's only): it loses only the gap check of its next event.
        for board_id in self._last_sequence:
            if board_id not in self._boards:
                break
        else:
            return
        self._forget(board_id)
