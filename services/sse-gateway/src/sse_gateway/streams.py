"""The two event streams: one board by sequence, or every board by activity stream id."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from contextlib import AbstractAsyncContextManager

import orjson
from envelope.codec import RelayedEvent
from envelope.cursors import (
    activity_cursor,
    board_cursor,
    parse_activity_cursor,
    parse_board_cursor,
    stream_id_key,
)
from envelope.topology import activity_part_of
from prometheus_client import CollectorRegistry, Counter, Gauge
from realtime_runtime.feed import ActivityHub, Queued, Replay, Subscription
from realtime_runtime.observability import DeliveryTracker
from realtime_runtime.presence import PresenceItem
from realtime_runtime.service import delivery_latency_histogram, feed_frames_counter
from sse_starlette import ServerSentEvent

# Events written to a stream in one chunk when several are waiting: a client that fell a
# little behind catches up with a few large writes instead of many small ones.
WRITE_BATCH = 256


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "advanced_sse_connections", "Open SSE streams.", ["route"], registry=registry
        )
        self.sent = Counter(
            "advanced_sse_events_sent",
            "Events written to SSE streams.",
            ["route"],
            registry=registry,
        )
        self.replayed = Counter(
            "advanced_sse_replayed_events",
            "Events sent from the streams on resume.",
            registry=registry,
        )
        self.resets = Counter(
            "advanced_sse_resets", "Resumes whose cursor was no longer retained.", registry=registry
        )
        self.slow = Counter(
            "advanced_sse_slow_consumers",
            "Streams cut because the client fell behind.",
            registry=registry,
        )
        self.latency = delivery_latency_histogram(registry)
        self.feed_frames = feed_frames_counter(registry)
        # One span per event fanned out here; latency observed at each stream write.
        self.delivery = DeliveryTracker("sse", self.latency.labels("sse").observe)


_FIELD_BREAKERS = str.maketrans({"\r": "\\r", "\n": "\\n", "\0": "\\u0000"})


def field_safe(text: str) -> str:
    """One SSE field's value with no raw CR, LF or NUL, so it can never start a new field.

    Event JSON from orjson never holds them (it escapes control characters); this holds even
    for bytes that reached Redis some other way. Inside a JSON string the escapes are exact.
    """
    if "\r" in text or "\n" in text or "\0" in text:
        return text.translate(_FIELD_BREAKERS)
    return text


def _activity(event: RelayedEvent, event_id: str | None) -> bytes:
    """An `activity` frame (sse-starlette's encoder), encoded once per process for all streams."""
    return ServerSentEvent(
        field_safe(event.event.decode(errors="replace")), id=event_id, event="activity"
    ).encode()


def board_frame(event: RelayedEvent) -> bytes:
    return _activity(event, field_safe(board_cursor(event)))


def activity_frame(event: RelayedEvent) -> bytes:
    """An `/sse/activity` frame without its `id:`: each stream's id is its own cursor (the
    vector of the parts' last ids), put in front of the frame encoded once per process."""
    return _activity(event, None)


def with_activity_id(cursor: list[str], frame: bytes) -> bytes:
    return b"id: " + activity_cursor(cursor).encode() + b"\r\n" + frame


def presence_frame(frame: bytes) -> bytes:
    """`event: presence` with the ingress's presence frame as data, once per process."""
    return ServerSentEvent(field_safe(frame.decode(errors="replace")), event="presence").encode()


def _event(data: Mapping[str, object], kind: str) -> bytes:
    return ServerSentEvent(orjson.dumps(data).decode(), event=kind).encode()


def _reset(replay: Replay[int] | Replay[tuple[str, ...]], board_id: str | None) -> bytes:
    data = {"reason": replay.reason, "board_id": board_id, "oldest_cursor": replay.oldest_cursor}
    return _event(data, "reset")


def history_lost_frame(board_id: str | None) -> bytes:
    # Redis lost its data: sequences (and activity ids) start again; drop the old cursor.
    return _event({"reason": "history_lost", "board_id": board_id, "oldest_cursor": None}, "reset")


def slow_consumer_frame() -> bytes:
    data = {"reason": "slow_consumer", "detail": "the stream fell behind; reconnect to resume"}
    return _event(data, "close")


def expired_frame() -> bytes:
    """EventSource reconnects on its own; with the expired credential it then gets 401."""
    return _event({"reason": "token_expired", "detail": "authenticate again"}, "close")


# A comment line: EventSource ignores it, proxies see the connection is alive.
HEARTBEAT = ServerSentEvent(comment="ping").encode()


class BoardFeed:
    """One board by sequence: what was missed after the cursor, then the live events past it."""

    route = "board"

    def __init__(
        self,
        hub: ActivityHub[bytes],
        metrics: GatewayMetrics,
        board_id: str,
        cursor: str | None,
        queue: int,
    ) -> None:
        self.board_id: str | None = board_id
        self._board_id = board_id
        self._hub = hub
        self._metrics = metrics
        self._cursor = cursor
        self._queue = queue
        self._last = 0

    def subscribe(self) -> AbstractAsyncContextManager[Subscription[bytes]]:
        return self._hub.subscribe_board(self._board_id, self._queue)

    async def replay(self) -> AsyncGenerator[bytes, None]:
        if self._cursor is None:
            return
        replay = await self._hub.replay_board(self._board_id, parse_board_cursor(self._cursor))
        # Live events up to where the replay ends are in it: the seam.
        self._last = replay.until
        if replay.expired:
            self._metrics.resets.inc()
            yield _reset(replay, self._board_id)
        async with contextlib.aclosing(replay.pages) as pages:
            async for page in pages:
                self._metrics.replayed.inc(len(page))
                yield b"".join(board_frame(event) for event in page)

    def fresh(self, batch: list[tuple[Queued, bytes]]) -> list[tuple[Queued, bytes]]:
        last = newest = self._last
        fresh: list[tuple[Queued, bytes]] = []
        for item in batch:
            event = item[0]
            if isinstance(event, PresenceItem):
                fresh.append(item)  # never replayed, so never a duplicate; moves no position
            elif event.sequence > last or not last:
                fresh.append(item)
                newest = max(newest, event.sequence)
        self._last = newest
        return fresh

    def frames(self, fresh: list[tuple[Queued, bytes]]) -> bytes:
        return joined(fresh)

    def history_lost(self) -> bytes:
        self._last = 0
        return history_lost_frame(self._board_id)


class ActivityFeed:
    """Every board (or the credential's boards) by activity stream id, with the same resume.

    Its cursor is the vector of the parts' last ids (`envelope.cursors.parse_activity_cursor`):
    each stream keeps its own and sends it as the `id:` of every event.
    """

    route = "activity"
    board_id: str | None = None

    def __init__(
        self,
        hub: ActivityHub[bytes],
        metrics: GatewayMetrics,
        boards: frozenset[str] | None,
        cursor: str | None,
        queue: int,
    ) -> None:
        self._hub = hub
        self._metrics = metrics
        self._boards = boards
        self._cursor = cursor
        self._queue = queue
        # The last id sent of each part: live events at or before it were already sent.
        self._position: list[str] = []

    def subscribe(self) -> AbstractAsyncContextManager[Subscription[bytes]]:
        return self._hub.subscribe_activity(self._boards, self._queue)

    async def replay(self) -> AsyncGenerator[bytes, None]:
        if self._cursor is None:
            # Live from now on: the position is where every part is now.
            self._position = list(await self._hub.activity_newest())
            return
        cursor = parse_activity_cursor(self._cursor)
        replay = await self._hub.replay_activity(cursor, self._boards)
        if cursor is not None and not replay.expired:
            self._position = list(cursor)
        else:
            self._position = ["0-0"] * len(replay.until)
        if replay.expired:
            self._metrics.resets.inc()
            yield _reset(replay, None)
        async with contextlib.aclosing(replay.pages) as pages:
            async for page in pages:
                self._metrics.replayed.inc(len(page))
                yield b"".join(self._identified(event, activity_frame(event)) for event in page)
        # Every part is read up to where the replay ends, whatever it held for this stream.
        self._position = [
            max(mine, newest, key=stream_id_key)
            for mine, newest in zip(self._position, replay.until, strict=True)
        ]

    def _identified(self, event: RelayedEvent, frame: bytes) -> bytes:
        self._position[activity_part_of(event.board_id)] = event.stream_id
        return with_activity_id(self._position, frame)

    def fresh(self, batch: list[tuple[Queued, bytes]]) -> list[tuple[Queued, bytes]]:
        position = self._position
        fresh: list[tuple[Queued, bytes]] = []
        for event, frame in batch:
            if isinstance(event, PresenceItem):
                continue  # presence reaches board streams only
            part = activity_part_of(event.board_id)
            if position and stream_id_key(event.stream_id) <= stream_id_key(position[part]):
                continue  # in the replay already
            fresh.append((event, self._identified(event, frame) if position else frame))
        return fresh

    def frames(self, fresh: list[tuple[Queued, bytes]]) -> bytes:
        return joined(fresh)

    def history_lost(self) -> bytes:
        # The lost parts' ids start again from Redis's clock, after the old ones: the
        # position stays, and a resume from it reads the new history.
        return history_lost_frame(None)


def joined(batch: list[tuple[Queued, bytes]]) -> bytes:
    """Frames already encoded once per process, written to this stream in one chunk."""
    return batch[0][1] if len(batch) == 1 else b"".join(frame for _event, frame in batch)
