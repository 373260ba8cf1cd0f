"""What a resume owes a client: the retained events after its cursor, read a page at a time."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Generic, TypeVar

from envelope.codec import RelayedEvent
from envelope.codes import ResetReason
from envelope.cursors import ActivityCursor, stream_id_key
from envelope.topology import ACTIVITY_PARTS, activity_part_of

from realtime_runtime.feed.store import PAGE, READ_TIMEOUT_SECONDS, ActivityStore

C = TypeVar("C", int, ActivityCursor)


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


async def board_pages(
    store: ActivityStore,
    board_id: str,
    after: int,
    until: int,
    epoch: str | None = None,
    page_size: int = PAGE,
) -> AsyncGenerator[list[RelayedEvent], None]:
    """The board's events in (after, until] of `epoch`, a page per step, each read when
    asked for. It stops at an event of another epoch: the board started again meanwhile,
    and the live subscription resets the client."""
    while after < until:
        async with asyncio.timeout(READ_TIMEOUT_SECONDS):
            page = await store.board_after(board_id, after, page_size)
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


async def activity_pages(
    store: ActivityStore,
    after: ActivityCursor,
    until: ActivityCursor,
    boards: frozenset[str] | None,
    page_size: int = PAGE,
) -> AsyncGenerator[list[RelayedEvent], None]:
    """As `board_pages` across the parts of the activity stream: each part after its entry of
    `after` up to its entry of `until`, merged in stream id order (ties by part), each page
    filtered to `boards` (and only the parts holding them read)."""
    if boards is None:
        parts: list[int] = list(range(ACTIVITY_PARTS))
    else:
        parts = sorted({activity_part_of(board) for board in boards})
    position = {p: after[p] for p in parts if stream_id_key(after[p]) < stream_id_key(until[p])}
    ends = {p: stream_id_key(until[p]) for p in position}
    buffered: dict[int, deque[RelayedEvent]] = {p: deque() for p in position}
    while position or any(buffered.values()):
        empty = {p: position[p] for p in position if not buffered[p]}
        if empty:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                read = await store.parts_after(empty, page_size)
            for part, events in read.items():
                if len(events) < page_size or stream_id_key(events[-1].stream_id) >= ends[part]:
                    del position[part]  # this part is read up to the replay's end
                else:
                    position[part] = events[-1].stream_id
                end = ends[part]
                buffered[part].extend(e for e in events if stream_id_key(e.stream_id) <= end)
        merged: list[RelayedEvent] = []
        while len(merged) < page_size:
            heads = [p for p in buffered if buffered[p] or p in position]
            if not heads or any(not buffered[p] for p in heads):
                break  # a part must be read before the next event is known
            first = min(heads, key=lambda p: (stream_id_key(buffered[p][0].stream_id), p))
            merged.append(buffered[first].popleft())
        if boards is not None:
            merged = [event for event in merged if event.board_id in boards]
        if merged:
            yield merged
        del merged
