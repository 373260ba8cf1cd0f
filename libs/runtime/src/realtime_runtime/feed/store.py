"""The edges' read side of Redis: the live frames on pub/sub and the retained history in the
Redis Streams (`ActivityStore`, the port; `RedisActivityStore`, its adapter)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, cast

import redis.asyncio as redis
from envelope.codec import RelayedEvent
from envelope.topology import RedisKeys

from realtime_runtime.pubsub import channel_frames

# Events read from Redis per round trip, for a replay and for the hub's own catch-up: a replay
# holds one page at a time, so a stream's memory is bounded by it, not by the history.
PAGE = 200
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
