"""The process's subscriber to the relay's output, fanning out to bounded queues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from envelope.codec import RelayedEvent
from envelope.codes import ResetReason
from envelope.cursors import ActivityCursor, BoardCursor, older_epoch, stream_id_key
from envelope.topology import ACTIVITY_PARTS, activity_part_of
from redis.exceptions import RedisError

from realtime_runtime.feed.replay import Replay, activity_pages, board_pages
from realtime_runtime.feed.store import PAGE, READ_TIMEOUT_SECONDS, ActivityStore
from realtime_runtime.feed.subscription import FeedUnavailable, Subscription
from realtime_runtime.pubsub import Confirmed, LiveFeed

# The name the hub has always logged under (before `feed` was a package).
log = logging.getLogger("realtime_runtime.feed")

T = TypeVar("T")
# Boards whose last sequence and epoch the hub keeps for an activity-stream subscriber (every
# board) beyond those with subscribers of their own: past this, the first-seen are forgotten.
MAX_TRACKED_BOARDS = 10_000
# How long a joiner waits for its board's subscription to be confirmed (Redis unreachable:
# the hub is reconnecting) before it is told the feed is unavailable (`FeedUnavailable`).
JOIN_TIMEOUT_SECONDS = 10.0
_ZERO = "0-0"


class ActivityHub(Generic[T]):
    """The process's subscriber: orders, de-duplicates and fans out relayed events.

    It listens only to what its clients need: a board's channel while the board has a
    subscriber here, the parts of the activity stream while an activity subscriber is here. A
    joiner's subscription is confirmed before it reads its replay, and it receives exactly the
    frames after the confirmation (the seam is the confirmation's place among the frames).

    Per board it keeps the last (sequence, activity stream id) dispatched and the epoch: a
    frame at or below that sequence and id is a duplicate (the catch-up and the live frames
    overlap; a promoted replica repeats a frame), one past the next sequence reveals a gap,
    filled from the board's stream, one of a newer epoch resets the board's clients, and one
    at or below the sequence under a newer id means Redis lost writes (a failover): the
    board's clients are reset rather than sent numbers they already hold. After a lost
    connection it subscribes again and catches every board (and part) up from its streams,
    so clients that stay connected miss nothing and get nothing twice.
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
        self._keys = store.keys
        self._page = page
        self._render_board = render_board
        self._render_activity = render_activity
        self._retry_seconds = retry_seconds
        self._boards: dict[str, set[Subscription[T]]] = {}
        self._activity: set[Subscription[T]] = set()
        # Joiners whose channel is not confirmed yet, per board (None: the activity parts).
        self._waiting: dict[str | None, list[tuple[Subscription[T], asyncio.Future[None]]]] = {}
        # Per board, only while it has subscribers here (or, bounded, while an activity-stream
        # subscriber is here): the last (sequence, stream id) dispatched and the epoch.
        self._last: dict[str, tuple[int, str]] = {}
        self._epochs: dict[str, str] = {}
        # A subscribed board nothing was dispatched for yet: its newest sequence when it was
        # subscribed (or replayed), where a catch-up after a reconnect starts.
        self._floor: dict[str, int] = {}
        # Per part of the activity stream: the newest stream id dispatched.
        self._parts: list[str | None] = [None] * ACTIVITY_PARTS
        self._part_channels = {
            self._keys.activity_part_channel(p): p for p in range(ACTIVITY_PARTS)
        }
        self._board_of: dict[str, str] = {}  # board channel -> board, while asked or subscribed
        self._live: LiveFeed | None = None
        self._asked: set[str] = set()  # channels asked for on this session, not yet confirmed
        self._subscribed: set[str] = set()  # channels confirmed on this session
        self._commands: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.on_event: Callable[[RelayedEvent, int], None] = lambda event, receivers: None
        # Every frame read from Redis, before de-duplication (the traffic this process draws).
        self.on_frame: Callable[[], None] = lambda: None

    @property
    def board_ids(self) -> list[str]:
        return list(self._boards)

    def local_subscribers(self, board_id: str) -> int:
        return len(self._boards.get(board_id, ()))

    def board_subscriptions(self, board_id: str) -> list[Subscription[T]]:
        """The board's subscriptions in this process (presence frames are offered to them)."""
        return list(self._boards.get(board_id, ()))

    @property
    def channels(self) -> set[str]:
        """The channels confirmed on the current session."""
        return set(self._subscribed)

    def subscribe_board(self, board_id: str, maxsize: int) -> Subscription[T]:
        """An async context manager: once entered, the board's channel is confirmed and every
        event published after that reaches the subscription, until the block ends."""
        return Subscription(frozenset({board_id}), maxsize, hub=self, board=board_id)

    def subscribe_activity(self, boards: frozenset[str] | None, maxsize: int) -> Subscription[T]:
        """As `subscribe_board`, for every board (`None`) or the boards given."""
        return Subscription(boards, maxsize, hub=self)

    # Joining and leaving -------------------------------------------------------------------

    def _channels_of(self, board_id: str | None) -> list[str]:
        if board_id is None:
            return list(self._part_channels)
        channel = self._keys.board_events_channel(board_id)
        self._board_of[channel] = board_id
        return [channel]

    async def _join(self, subscription: Subscription[T], board_id: str | None) -> None:
        channels = self._channels_of(board_id)
        if self._subscribed.issuperset(channels):
            self._register(subscription, board_id)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(board_id, []).append((subscription, future))
        self._ask([c for c in channels if c not in self._subscribed])
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_SECONDS):
                await future
        except TimeoutError:
            self._abandon(subscription, board_id, future)
            raise FeedUnavailable("Redis did not confirm the subscription in time") from None
        except BaseException:
            self._abandon(subscription, board_id, future)
            raise
        if board_id is None:
            if len(self._activity) == 1:
                # The first activity subscriber here: where each part is now is where a
                # catch-up after a reconnect starts (not where some board's event left it).
                with contextlib.suppress(RedisError, OSError):
                    heads = await self._store.activity_heads()
                    for part, (_oldest, now) in enumerate(heads):
                        known = self._parts[part]
                        if known is None or stream_id_key(now) > stream_id_key(known):
                            self._parts[part] = now
        elif board_id not in self._last and board_id not in self._floor:
            # Nothing dispatched for it yet: where a catch-up after a reconnect would start.
            with contextlib.suppress(RedisError, OSError):
                head = (await self._store.board_head(board_id))[1]
                if board_id not in self._last:
                    self._floor.setdefault(board_id, head)

    def _abandon(
        self, subscription: Subscription[T], board_id: str | None, future: asyncio.Future[None]
    ) -> None:
        waiting = self._waiting.get(board_id, [])
        if (subscription, future) in waiting:
            waiting.remove((subscription, future))
            if not waiting:
                del self._waiting[board_id]
                self._release(board_id)
        else:  # confirmed meanwhile: registered, so it leaves as any subscriber does
            self._leave(subscription, board_id)

    def _register(self, subscription: Subscription[T], board_id: str | None) -> None:
        if board_id is None:
            self._activity.add(subscription)
        else:
            self._boards.setdefault(board_id, set()).add(subscription)

    def _leave(self, subscription: Subscription[T], board_id: str | None) -> None:
        if board_id is None:
            self._activity.discard(subscription)
            if not self._activity:  # what was kept for it only is forgotten
                for board in [b for b in self._last if b not in self._boards]:
                    self._forget(board)
                self._release(None)
            return
        listeners = self._boards.get(board_id)
        if listeners is not None:
            listeners.discard(subscription)
            if not listeners:
                del self._boards[board_id]
                if not self._activity:
                    self._forget(board_id)
                self._floor.pop(board_id, None)
                self._release(board_id)

    def _release(self, board_id: str | None) -> None:
        """Unsubscribe what nobody here listens to or waits for any more."""
        if board_id in self._waiting:
            return
        if board_id is None:
            if self._activity:
                return
        elif board_id in self._boards:
            return
        channels = [c for c in self._channels_of(board_id) if c in self._subscribed]
        self._subscribed.difference_update(channels)
        if board_id is not None:
            channel = self._keys.board_events_channel(board_id)
            if channel not in self._asked:  # else its confirmation comes, and releases it
                self._board_of.pop(channel, None)
        if channels and self._live is not None:
            self._command(self._live.unsubscribe(channels))

    def _ask(self, channels: list[str]) -> None:
        fresh = [c for c in channels if c not in self._asked]
        if fresh and self._live is not None:
            self._asked.update(fresh)
            self._command(self._live.subscribe(fresh))

    def _command(self, command: Coroutine[Any, Any, None]) -> None:
        # Sent from a task of its own: a leave happens in `__aexit__`, also under
        # cancellation, and must not be cut half-way through a write. A failed send is the
        # session's end, which its reader reports.
        task = asyncio.create_task(command)
        self._commands.add(task)
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self._commands.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a subscription command failed: %s", task.exception())

    def _confirmed(self, channel: str) -> None:
        """In band: frames read after this were published after the subscription."""
        self._asked.discard(channel)
        self._subscribed.add(channel)
        part = self._part_channels.get(channel)
        if part is not None:
            if not self._subscribed.issuperset(self._part_channels):
                return
            board_id: str | None = None
        else:
            board = self._board_of.get(channel)
            if board is None:
                return
            board_id = board
        waiting = self._waiting.pop(board_id, [])
        for subscription, future in waiting:
            if not future.done():
                self._register(subscription, board_id)
                future.set_result(None)
        if not waiting:
            self._release(board_id)  # every joiner gave up before it was confirmed

    def _forget(self, board_id: str) -> None:
        self._last.pop(board_id, None)
        self._epochs.pop(board_id, None)

    @property
    def tracked_boards(self) -> int:
        """Boards this hub keeps state for (sequence or epoch): bounded, see `_leave`."""
        return len(self._last.keys() | self._epochs.keys())

    # Replays ---------------------------------------------------------------------------------

    async def replay_board(self, board_id: str, cursor: BoardCursor | None) -> Replay[int]:
        """The retained events after `cursor`, in pages, with the reason for a reset if any.

        A cursor of another epoch than the board's current one is of a history that expired:
        `history_lost`, then the current epoch's events, never events under the old numbers.
        An invalid cursor (None), or one past the newest event (from a history Redis has
        since lost), gets a reset and all that is retained now.
        """
        epoch = await self._store.board_epoch(board_id)
        oldest, newest = await self._store.board_head(board_id)
        if board_id in self._boards:
            # The caller subscribed first: its live events must be checked against the
            # epoch it is replayed from, even before this hub has seen one of the board's.
            if epoch:
                self._epochs.setdefault(board_id, epoch)
            if board_id not in self._last:
                self._floor[board_id] = min(self._floor.get(board_id, newest), newest)
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
        pages = board_pages(self._store, board_id, after, newest, epoch, self._page)
        return Replay(pages, reason, oldest_cursor, newest, epoch or "")

    async def replay_activity(
        self, cursor: ActivityCursor | None, boards: frozenset[str] | None = None
    ) -> Replay[ActivityCursor]:
        """As `replay_board`, across boards (or across `boards` only: a credential with none
        reads nothing): every part after its entry of the cursor, merged in stream id order
        (ties by part). `until` is the newest id of every part when the replay began.

        No cursor, or one past a part's newest entry (a history Redis lost), replays every
        part from its oldest with `cursor_expired`; so does a cursor whose entry of a part was
        trimmed away (entries after it may have gone with it).
        """
        heads = await self._store.activity_heads()
        newest = tuple(head[1] for head in heads)
        oldest_ids = [head[0] for head in heads if head[0] != _ZERO]
        oldest_cursor = min(oldest_ids, key=stream_id_key) if oldest_ids else None
        parts = _parts_of(boards)
        if cursor is None or any(
            stream_id_key(cursor[p]) > stream_id_key(newest[p]) for p in parts
        ):
            start: ActivityCursor = (_ZERO,) * ACTIVITY_PARTS
            pages = activity_pages(self._store, start, newest, boards, self._page)
            return Replay(pages, ResetReason.CURSOR_EXPIRED, oldest_cursor, newest)
        expired = any(
            stream_id_key(cursor[p]) != (0, 0)
            and heads[p][0] != _ZERO
            and stream_id_key(heads[p][0]) > stream_id_key(cursor[p])
            for p in parts
        )
        pages = activity_pages(self._store, cursor, newest, boards, self._page)
        return Replay(pages, ResetReason.CURSOR_EXPIRED if expired else None, oldest_cursor, newest)

    async def activity_newest(self) -> ActivityCursor:
        """Where every part of the activity stream is now: a live-only activity subscriber's
        position (its first event's `id:` carries it)."""
        return tuple(newest for _oldest, newest in await self._store.activity_heads())

    # The session -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, catch up after every reconnect, dispatch; until cancelled."""
        while True:
            try:
                async with self._store.live() as live:
                    await self._open(live)
                    self.connected.set()
                    while True:
                        await self._take(await live.next())
            except (RedisError, OSError) as exc:
                if self.connected.is_set():
                    log.warning("activity subscription lost, resubscribing: %s", exc)
                self._closed()
                await asyncio.sleep(self._retry_seconds)
            except asyncio.CancelledError:
                self._closed()
                raise
            except Exception:  # a bug must not silence every stream of the process for good
                log.exception("activity hub failed; resubscribing")
                self._closed()
                await asyncio.sleep(self._retry_seconds)

    def _closed(self) -> None:
        self.connected.clear()
        self._live = None
        self._asked.clear()
        self._subscribed.clear()
        for task in list(self._commands):
            task.cancel()

    async def _open(self, live: LiveFeed) -> None:
        """Subscribe everything the clients here need, wait for the confirmations, catch up
        from the streams, then let the frames read meanwhile through (duplicates dropped)."""
        self._live = live
        wanted = [b for b in (self._boards.keys() | self._waiting.keys()) if b is not None]
        channels = [c for b in wanted for c in self._channels_of(b)]
        if self._activity or None in self._waiting:
            channels += list(self._part_channels)
        read: list[bytes | Confirmed] = []
        # Bounded: a silently dead connection must not stall the hub for good.
        async with asyncio.timeout(READ_TIMEOUT_SECONDS):
            if channels:
                self._asked.update(channels)
                await live.subscribe(channels)
                pending = set(channels)
                while pending:
                    item = await live.next()
                    if isinstance(item, Confirmed):
                        pending.discard(item.channel)
                    read.append(item)
            await self._catch_up()
        for item in read:
            await self._take(item)

    async def _take(self, item: bytes | Confirmed) -> None:
        if isinstance(item, Confirmed):
            self._confirmed(item.channel)
            return
        self.on_frame()
        try:
            event = RelayedEvent.from_frame(item)
        except ValueError:
            log.error("ignoring a malformed relay frame of %d bytes", len(item))
            return
        await self._accept(event)

    async def _catch_up(self) -> None:
        """Every part after its last id (for activity subscribers), then every subscribed board
        from its stream after its last sequence: a few pipelined reads, not one per board.

        The parts first: read part by part, events reach the activity subscribers in their
        part's order (a board-by-board catch-up would hand them one board's events, then
        another's older ones, which an `/sse/activity` stream drops as already past). The
        boards' catch-up then finds only what a part no longer retains.
        """
        if self._activity:
            await self._catch_up_parts()
        points = {b: self._resume_point(b) for b in self._boards}
        after = {b: s for b, s in points.items() if s is not None}
        while after:
            pages = await self._store.boards_after(after, self._page)
            after = {}
            for board_id, events in pages.items():
                for event in events:
                    await self._accept(event)
                if len(events) >= self._page:
                    after[board_id] = events[-1].sequence

    async def _catch_up_parts(self) -> None:
        heads = await self._store.activity_heads()
        parts: dict[int, str] = {}
        for part, (_oldest, newest) in enumerate(heads):
            known = self._parts[part]
            if known is None:
                self._parts[part] = newest
            elif stream_id_key(newest) < stream_id_key(known):
                self._part_history_lost(part)  # Redis restarted without this part's data
            elif newest != known:
                parts[part] = known
        while parts:
            read = await self._store.parts_after(parts, self._page)
            parts = {}
            for part, events in read.items():
                for event in events:
                    await self._accept(event)
                if len(events) >= self._page:
                    parts[part] = events[-1].stream_id

    def _resume_point(self, board_id: str) -> int | None:
        last = self._last.get(board_id)
        return last[0] if last is not None else self._floor.get(board_id)

    # Ordering and dispatch -------------------------------------------------------------------

    async def _accept(self, event: RelayedEvent) -> None:
        """Dispatch `event` after any of its board's events that this process missed."""
        board_id = event.board_id
        known = self._epochs.get(board_id)
        if event.epoch and known and event.epoch != known:
            if older_epoch(event.epoch, known):
                return  # of a history that was already replaced: never under old numbers
            self._board_restarted(board_id)
        last = self._last.get(board_id)
        sequence = last[0] if last is not None else None
        if last is not None and event.sequence <= last[0]:
            if stream_id_key(event.stream_id) <= stream_id_key(last[1]):
                return  # a duplicate: the catch-up and the live frames overlap, or a replay
            # A sequence already dispatched on an entry newer than the one it had: Redis lost
            # writes (a failover before the replica had them) and numbered new events again.
            self._sequence_went_back(board_id)
            sequence = None
        elif sequence is None:
            sequence = self._floor.get(board_id) if board_id in self._boards else None
        if sequence is not None and event.sequence > sequence + 1:
            # Frames arrive in order on one connection, so a gap means we reconnected or the
            # catch-up met a trimmed activity stream: the board's own stream has the rest.
            gap = board_pages(
                self._store, board_id, sequence, event.sequence - 1, event.epoch or None, self._page
            )
            async for missing in gap:
                for missed in missing:
                    self._dispatch(missed)
            last = self._last.get(board_id)
            if (last[0] if last else sequence) < event.sequence - 1:
                log.warning(
                    "events no longer retained were skipped",
                    extra={"board_id": board_id, "up_to": event.sequence - 1},
                )
        self._dispatch(event)

    def _board_restarted(self, board_id: str) -> None:
        """The board expired while idle and was written again: a new epoch, sequences from 1.

        Its subscribers are told to reset, in band (after the events queued before); the
        activity stream's ids go on, so its subscribers carry on.
        """
        log.info("a board started again under a new epoch", extra={"board_id": board_id})
        last = self._last.get(board_id)
        self._last[board_id] = (0, last[1] if last else _ZERO)  # new events from 1, gaps filled
        self._floor.pop(board_id, None)
        for subscription in self._boards.get(board_id, ()):
            subscription.history_lost()

    def _sequence_went_back(self, board_id: str) -> None:
        log.warning(
            "a board's sequence went back: Redis lost writes; resetting its clients",
            extra={"board_id": board_id},
        )
        self._last.pop(board_id, None)
        self._floor.pop(board_id, None)
        for subscription in self._boards.get(board_id, ()):
            subscription.history_lost()

    def _part_history_lost(self, part: int) -> None:
        log.warning(
            "Redis lost a part of the activity stream: its ids start again; resetting clients",
            extra={"part": part},
        )
        self._parts[part] = _ZERO
        for board_id in [b for b in self._last if activity_part_of(b) == part]:
            self._last[board_id] = (0, _ZERO)
            self._epochs.pop(board_id, None)
            for subscription in self._boards.get(board_id, ()):
                subscription.history_lost()
        for subscription in self._activity:
            subscription.history_lost()

    def _dispatch(self, event: RelayedEvent) -> None:
        board_id = event.board_id
        if board_id in self._boards or self._activity:
            self._last[board_id] = (event.sequence, event.stream_id)
            if event.epoch:
                self._epochs[board_id] = event.epoch
            if len(self._last) > MAX_TRACKED_BOARDS:
                self._forget_one_unsubscribed()
        part = activity_part_of(board_id)
        known = self._parts[part]
        if known is None or stream_id_key(event.stream_id) > stream_id_key(known):
            self._parts[part] = event.stream_id
        receivers = 0
        listeners = self._boards.get(board_id)
        if listeners:
            rendered = self._render_board(event)
            for subscription in listeners:
                subscription.offer(event, rendered)
            receivers += len(listeners)
        if self._activity:
            rendered_activity: T | None = None
            for subscription in self._activity:
                if subscription.boards is None or board_id in subscription.boards:
                    if rendered_activity is None:
                        rendered_activity = self._render_activity(event)
                    subscription.offer(event, rendered_activity)
                    receivers += 1
        self.on_event(event, receivers)

    def _forget_one_unsubscribed(self) -> None:
        # The first-seen board that has no subscriber of its own (an activity-stream
        # subscriber's only): it loses only the gap check of its next event.
        for board_id in self._last:
            if board_id not in self._boards:
                break
        else:
            return
        self._forget(board_id)


def _parts_of(boards: frozenset[str] | None) -> range | list[int]:
    """The parts a replay reads: all, or those holding `boards`."""
    if boards is None:
        return range(ACTIVITY_PARTS)
    return sorted({activity_part_of(b) for b in boards})
