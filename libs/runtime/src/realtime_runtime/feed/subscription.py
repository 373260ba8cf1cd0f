"""One client's bounded queue of relayed events (and presence frames), and the ways a
subscription is interrupted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeAlias, TypeVar, cast

from envelope.codec import RelayedEvent

from realtime_runtime.presence import PresenceItem

if TYPE_CHECKING:
    from realtime_runtime.feed.hub import ActivityHub

T = TypeVar("T")

# What a subscription queues: a board's event, or a presence frame on one of its boards.
# Readers tell them apart with one `isinstance`; only events carry a sequence or a cursor.
Queued: TypeAlias = RelayedEvent | PresenceItem


class StreamInterrupted(Exception):
    """A subscription cannot simply carry on; the subclass says why."""


class SlowConsumer(StreamInterrupted):
    """The client did not keep up: its bounded queue overflowed. It may resume."""


class FeedUnavailable(StreamInterrupted):
    """The subscription was not confirmed in time (Redis unreachable): no live event could be
    promised, so the client is told to come back rather than left waiting."""


class HistoryLost(StreamInterrupted):
    """Redis lost its data (restarted without persistence): sequences start again.

    Raised in order, after the events queued before the loss; the client is told to reset.
    """


# Queued in band, so that the reset reaches the client after the events that preceded it.
_HISTORY_LOST = RelayedEvent("0-0", "", 0, b"")


class Subscription(Generic[T]):
    """One client's bounded queue of (event or presence item, rendered bytes).

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
        # `async with hub.subscribe_board(...)` registers it with the hub while the block runs (no
        # generator-based context manager per subscription: it held a frame per stream).
        self._hub = hub
        self._board = board
        # A list, not a deque: an empty deque allocates a 64-slot block, an empty list nothing,
        # and a reader takes everything queued at once.
        self._items: list[tuple[Queued, T]] = []
        self._history_lost_queued = False
        self._waiter: asyncio.Future[None] | None = None
        # Called once when the queue overflows: a writer stuck in a send is not waiting on
        # the subscription, so `wake` alone would not reach it.
        self.on_overflow: Callable[[], object] | None = None

    async def __aenter__(self) -> Subscription[T]:
        if self._hub is not None:
            await self._hub._join(self, self._board)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._hub is not None:
            self._hub._leave(self, self._board)

    @property
    def queued(self) -> int:
        return len(self._items)

    def offer(self, event: Queued, rendered: T) -> None:
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

    def take_batch(self, limit: int) -> list[tuple[Queued, T]]:
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

    async def next(self) -> tuple[Queued, T]:
        return (await self.next_batch(1))[0]

    async def next_batch(self, limit: int) -> list[tuple[Queued, T]]:
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
