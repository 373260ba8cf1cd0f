"""The two event streams: one board by sequence, or every board by activity stream id."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import orjson
import structlog
from envelope.codec import RelayedEvent
from envelope.feed import ActivityHub, HistoryLost, Replay, SlowConsumer, stream_id_key
from envelope.observability import DeliveryTracker
from envelope.service import delivery_latency_histogram
from prometheus_client import CollectorRegistry, Counter, Gauge
from sse_starlette import ServerSentEvent

log = structlog.get_logger("sse_gateway")
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


def board_frame(event: RelayedEvent) -> bytes:
    return ServerSentEvent(
        field_safe(event.event.decode(errors="replace")),
        id=str(event.sequence),
        event="activity",
    ).encode()


def live_board_frame(metrics: GatewayMetrics) -> Callable[[RelayedEvent], bytes]:
    """Each live event is framed once per process (sse-starlette's encoder) for all streams."""
    return board_frame


def activity_frame(event: RelayedEvent) -> bytes:
    return ServerSentEvent(
        field_safe(event.event.decode(errors="replace")),
        id=field_safe(event.stream_id),
        event="activity",
    ).encode()


def _reset(replay: Replay, board_id: str | None) -> ServerSentEvent:
    data = {"reason": "cursor_expired", "board_id": board_id, "oldest_cursor": replay.oldest_cursor}
    return ServerSentEvent(orjson.dumps(data).decode(), event="reset")


def _history_lost(board_id: str | None) -> ServerSentEvent:
    # Redis lost its data: sequences (and activity ids) start again; drop the old cursor.
    data = {"reason": "history_lost", "board_id": board_id, "oldest_cursor": None}
    return ServerSentEvent(orjson.dumps(data).decode(), event="reset")


def _resume_point(replay: Replay, after: int) -> int:
    if replay.events:
        return replay.events[-1].sequence
    return 0 if replay.expired else after


def _slow_consumer() -> ServerSentEvent:
    data = {"reason": "slow_consumer", "detail": "the stream fell behind; reconnect to resume"}
    return ServerSentEvent(orjson.dumps(data).decode(), event="close")


class _Writes:
    """While the stream is suspended at a `yield`, sse-starlette is writing to the client; a
    stream closed during a write that lasted the whole send timeout was cut for stalling."""

    def __init__(self, send_timeout: float | None) -> None:
        self.send_timeout = send_timeout
        self.since: float | None = None

    def stalled(self) -> bool:
        if self.since is None or self.send_timeout is None:
            return False
        return time.monotonic() - self.since >= 0.9 * self.send_timeout


async def board_stream(
    hub: ActivityHub[bytes],
    metrics: GatewayMetrics,
    board_id: str,
    cursor: str | None,
    queue: int,
    send_timeout: float | None = None,
) -> AsyncIterator[bytes | ServerSentEvent]:
    sent = metrics.sent.labels("board")
    writes = _Writes(send_timeout)
    with hub.subscribe_board(board_id, queue) as subscription:
        last = 0
        if cursor is not None:
            valid = _is_sequence(cursor)
            after = int(cursor) if valid else 0
            replay = await hub.replay_board(board_id, after)
            if replay.expired or not valid:
                metrics.resets.inc()
                yield _reset(replay, board_id)
            for event in replay.events:
                yield board_frame(event)
            metrics.replayed.inc(len(replay.events))
            last = _resume_point(replay, after)
        try:
            while True:
                try:
                    batch = await subscription.next_batch(WRITE_BATCH)
                except HistoryLost:
                    metrics.resets.inc()
                    last = 0
                    yield _history_lost(board_id)
                    continue
                fresh = [(e, f) for e, f in batch if e.sequence > last]
                if not fresh:
                    continue
                last = fresh[-1][0].sequence
                sent.inc(len(fresh))
                writes.since = time.monotonic()
                yield _joined(fresh)
                writes.since = None
                # Resumed once sse-starlette has written the frames and wants the next ones.
                for event, _frame in fresh:
                    metrics.delivery.written(event)
        except SlowConsumer:
            yield _slow_consumer()
        finally:
            _count_if_cut(subscription.overflowed or writes.stalled(), metrics, board_id)


async def activity_stream(
    hub: ActivityHub[bytes],
    metrics: GatewayMetrics,
    boards: frozenset[str] | None,
    cursor: str | None,
    queue: int,
    send_timeout: float | None = None,
) -> AsyncIterator[bytes | ServerSentEvent]:
    sent = metrics.sent.labels("activity")
    writes = _Writes(send_timeout)
    with hub.subscribe_activity(boards, queue) as subscription:
        seam: tuple[int, int] | None = None
        if cursor is not None:
            valid = _is_stream_id(cursor)
            replay = await hub.replay_activity(cursor if valid else "0-0")
            if replay.expired or not valid:
                metrics.resets.inc()
                yield _reset(replay, None)
            for event in replay.events:
                if boards is None or event.board_id in boards:
                    yield activity_frame(event)
            metrics.replayed.inc(len(replay.events))
            seam = stream_id_key(
                replay.events[-1].stream_id
                if replay.events
                else cursor
                if valid and not replay.expired
                else "0-0"
            )
        try:
            while True:
                try:
                    batch = await subscription.next_batch(WRITE_BATCH)
                except HistoryLost:
                    metrics.resets.inc()
                    seam = None
                    yield _history_lost(None)
                    continue
                if seam is not None:
                    after = seam
                    batch = [(e, f) for e, f in batch if stream_id_key(e.stream_id) > after]
                    if not batch:
                        continue  # already sent by the replay
                    seam = None
                sent.inc(len(batch))
                writes.since = time.monotonic()
                yield _joined(batch)
                writes.since = None
                for event, _frame in batch:
                    metrics.delivery.written(event)
        except SlowConsumer:
            yield _slow_consumer()
        finally:
            _count_if_cut(subscription.overflowed or writes.stalled(), metrics, None)


def _joined(batch: list[tuple[RelayedEvent, bytes]]) -> bytes:
    """Frames already encoded once per process, written to this stream in one chunk."""
    return batch[0][1] if len(batch) == 1 else b"".join(frame for _event, frame in batch)


def _count_if_cut(fell_behind: bool, metrics: GatewayMetrics, board_id: str | None) -> None:
    """Count a stream that ended because its client fell behind: its queue overflowed (it
    got a `close` event if it still read), or it stopped reading and a write outlasted
    ADVANCED_SSE_SEND_TIMEOUT_SECONDS."""
    if fell_behind:
        metrics.slow.inc()
        log.warning("cut a slow SSE consumer", board_id=board_id)


def _digits(text: str, most: int) -> bool:
    # ASCII only: "²".isdigit() is true and int("²") raises; and no 5000-digit ints.
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _is_sequence(cursor: str) -> bool:
    return _digits(cursor, 19)


def _is_stream_id(cursor: str) -> bool:
    ms, dash, seq = cursor.partition("-")
    return _digits(ms, 20) and (not dash or _digits(seq, 20))
