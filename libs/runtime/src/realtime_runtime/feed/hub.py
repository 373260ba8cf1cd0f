"""The process's single subscriber to the relay's output, fanning out to bounded queues."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from envelope.codec import RelayedEvent
from envelope.codes import ResetReason
from envelope.cursors import BoardCursor, older_epoch, stream_id_key
from redis.exceptions import RedisError

from realtime_runtime.feed.replay import Replay, activity_pages, board_pages
from realtime_runtime.feed.store import PAGE, READ_TIMEOUT_SECONDS, ActivityStore
from realtime_runtime.feed.subscription import Subscription

# The name the hub has always logged under (before `feed` was a package).
log = logging.getLogger("realtime_runtime.feed")

T = TypeVar("T")
# Boards whose last sequence and epoch the hub keeps for an activity-stream subscriber (every
# board) beyond those with subscribers of their own: past this, the first-seen are forgotten.
MAX_TRACKED_BOARDS = 10_000


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
        pages = board_pages(self._store, board_id, after, newest, epoch, self._page)
        return Replay(pages, reason, oldest_cursor, newest, epoch or "")

    async def replay_activity(
        self, cursor: str | None, boards: frozenset[str] | None = None
    ) -> Replay[str]:
        """As `replay_board`, by activity stream id across boards (or across `boards` only:
        a credential with none reads nothing)."""
        oldest, newest = await self._store.activity_head()
        oldest_cursor = oldest if oldest != "0-0" else None
        if cursor is None or stream_id_key(cursor) > stream_id_key(newest):
            pages = activity_pages(self._store, "0-0", newest, boards, self._page)
            return Replay(pages, ResetReason.CURSOR_EXPIRED, oldest_cursor, newest)
        # The cursor's own entry trimmed away: entries after it may have gone with it.
        position = stream_id_key(cursor)
        expired = position != (0, 0) and stream_id_key(oldest) > position
        pages = activity_pages(self._store, cursor, newest, boards, self._page)
        return Replay(pages, ResetReason.CURSOR_EXPIRED if expired else None, oldest_cursor, newest)

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
            gap = board_pages(
                self._store,
                event.board_id,
                last,
                event.sequence - 1,
                event.epoch or None,
                self._page,
            )
            async for missing in gap:
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
