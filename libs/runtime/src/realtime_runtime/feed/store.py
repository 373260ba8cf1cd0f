"""The edges' read side of Redis: the live frames on pub/sub and the retained history in the
Redis Streams (`ActivityStore`, the port; `RedisActivityStore`, its adapter)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias, cast

import redis.asyncio as redis
from envelope.codec import RelayedEvent
from envelope.topology import ACTIVITY_PARTS, RedisKeys
from redis.asyncio.cluster import RedisCluster

from realtime_runtime.pubsub import LiveFeed, live_feed

# Events read from Redis per round trip, for a replay and for the hub's own catch-up: a replay
# holds one page at a time, so a stream's memory is bounded by it, not by the history.
PAGE = 200
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]
# A catch-up or gap-filling read that takes longer is treated as a lost connection (a
# TimeoutError is an OSError): the hub resubscribes and catches up again.
READ_TIMEOUT_SECONDS = 30.0

RedisClient: TypeAlias = redis.Redis | RedisCluster
"""A standalone client or a cluster one (`ADVANCED_REDIS_MODE`): both run the commands, scripts
and non-transactional pipelines the suite sends; pub/sub and transactions differ and are
chosen where they are used (the live feed picks SUBSCRIBE or SSUBSCRIBE by the kind).
`realtime_runtime.service` re-exports it with `redis_client`."""


class ActivityStore(Protocol):
    """What an edge needs from Redis: the live frames and the retained history.

    A board's events are in its own stream (by sequence) and in its part of the activity
    stream (`topology.activity_part_of`, `ACTIVITY_PARTS` parts, by stream id).
    """

    @property
    def keys(self) -> RedisKeys:
        """The names of the channels the live feed subscribes to."""
        ...

    def live(self) -> contextlib.AbstractAsyncContextManager[LiveFeed]:
        """A pub/sub session subscribed to nothing yet (see `LiveFeed`)."""
        ...

    async def board_after(
        self, board_id: str, sequence: int, count: int = PAGE
    ) -> list[RelayedEvent]:
        """At most `count` of the board's retained events after `sequence`, in order."""
        ...

    async def boards_after(
        self, after: Mapping[str, int], count: int = PAGE
    ) -> dict[str, list[RelayedEvent]]:
        """`board_after` for many boards in one round trip (per Redis node)."""
        ...

    async def activity_after(
        self, part: int, stream_id: str, count: int = PAGE
    ) -> list[RelayedEvent]:
        """At most `count` entries of one part of the activity stream after `stream_id`."""
        ...

    async def parts_after(
        self, after: Mapping[int, str], count: int = PAGE
    ) -> dict[int, list[RelayedEvent]]:
        """`activity_after` for many parts in one round trip (per Redis node)."""
        ...

    async def board_head(self, board_id: str) -> tuple[int, int]:
        """(oldest retained, newest) sequence of the board; (0, 0) when it has no events."""
        ...

    async def board_epoch(self, board_id: str) -> str | None:
        """The board's current epoch; None once its state expired (or before it had one)."""
        ...

    async def activity_heads(self) -> list[tuple[str, str]]:
        """(oldest, newest) retained stream id of each part, in part order; ("0-0", "0-0")
        for an empty part."""
        ...


def board_events(board_id: str, rows: StreamRows) -> list[RelayedEvent]:
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


def activity_events(rows: StreamRows) -> list[RelayedEvent]:
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


class RedisActivityStore:
    """`ActivityStore` on `redis.Redis` or `RedisCluster`. Every read touches one key, and
    the batched ones are non-transactional pipelines, which a cluster client splits by node."""

    def __init__(self, client: RedisClient, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys

    @property
    def keys(self) -> RedisKeys:
        return self._keys

    def live(self) -> contextlib.AbstractAsyncContextManager[LiveFeed]:
        return live_feed(self._client, "activity")

    async def _pipelined(
        self, queue: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
    ) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for command, args, kwargs in queue:
                getattr(pipe, command)(*args, **kwargs)
            return list(await pipe.execute())

    async def board_after(
        self, board_id: str, sequence: int, count: int = PAGE
    ) -> list[RelayedEvent]:
        key = self._keys.board_stream(board_id)
        rows = cast(StreamRows, await self._client.xrange(key, min=f"({sequence}-0", count=count))
        return board_events(board_id, rows)

    async def boards_after(
        self, after: Mapping[str, int], count: int = PAGE
    ) -> dict[str, list[RelayedEvent]]:
        boards = list(after)
        replies = await self._pipelined(
            [
                ("xrange", (self._keys.board_stream(b),), {"min": f"({after[b]}-0", "count": count})
                for b in boards
            ]
        )
        return {b: board_events(b, rows) for b, rows in zip(boards, replies, strict=True)}

    async def activity_after(
        self, part: int, stream_id: str, count: int = PAGE
    ) -> list[RelayedEvent]:
        key = self._keys.activity_stream(part)
        rows = cast(StreamRows, await self._client.xrange(key, min=f"({stream_id}", count=count))
        return activity_events(rows)

    async def parts_after(
        self, after: Mapping[int, str], count: int = PAGE
    ) -> dict[int, list[RelayedEvent]]:
        parts = list(after)
        replies = await self._pipelined(
            [
                (
                    "xrange",
                    (self._keys.activity_stream(p),),
                    {"min": f"({after[p]}", "count": count},
                )
                for p in parts
            ]
        )
        return {p: activity_events(rows) for p, rows in zip(parts, replies, strict=True)}

    async def board_head(self, board_id: str) -> tuple[int, int]:
        key = self._keys.board_stream(board_id)
        first, last = await self._pipelined(
            [("xrange", (key,), {"count": 1}), ("xrevrange", (key,), {"count": 1})]
        )
        if not first or not last:
            return 0, 0
        return int(first[0][0].split(b"-")[0]), int(last[0][0].split(b"-")[0])

    async def activity_heads(self) -> list[tuple[str, str]]:
        queue: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        for part in range(ACTIVITY_PARTS):
            key = self._keys.activity_stream(part)
            queue += [("xrange", (key,), {"count": 1}), ("xrevrange", (key,), {"count": 1})]
        replies = await self._pipelined(queue)
        heads: list[tuple[str, str]] = []
        for first, last in zip(replies[::2], replies[1::2], strict=True):
            if not first or not last:
                heads.append(("0-0", "0-0"))
            else:
                heads.append((first[0][0].decode(), last[0][0].decode()))
        return heads

    async def board_epoch(self, board_id: str) -> str | None:
        epoch = cast(bytes | None, await self._client.get(self._keys.epoch(board_id)))
        return None if epoch is None else epoch.decode()
