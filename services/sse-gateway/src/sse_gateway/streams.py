"""The two event streams: one board by sequence, or every board by activity stream id."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import orjson
from envelope.codec import RelayedEvent, seconds_since_occurred
from envelope.feed import ActivityHub, Replay, SlowConsumer, stream_id_key
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sse_starlette import ServerSentEvent


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
        self.latency = Histogram(
            "advanced_delivery_latency_seconds",
            "From the ingress receiving an event to its write on a subscriber's socket.",
            ["transport"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )


def board_frame(event: RelayedEvent) -> bytes:
    return ServerSentEvent(event.event.decode(), id=str(event.sequence), event="activity").encode()


def live_board_frame(metrics: GatewayMetrics) -> Callable[[RelayedEvent], bytes]:
    """Each live event is framed once per process (sse-starlette's encoder) for all streams."""

    def render(event: RelayedEvent) -> bytes:
        metrics.latency.labels("sse").observe(seconds_since_occurred(event.event))
        return board_frame(event)

    return render


def activity_frame(event: RelayedEvent) -> bytes:
    return ServerSentEvent(event.event.decode(), id=event.stream_id, event="activity").encode()


def _reset(replay: Replay, board_id: str | None) -> ServerSentEvent:
    data = {"reason": "cursor_expired", "board_id": board_id, "oldest_cursor": replay.oldest_cursor}
    return ServerSentEvent(orjson.dumps(data).decode(), event="reset")


def _slow_consumer() -> ServerSentEvent:
    data = {"reason": "slow_consumer", "detail": "the stream fell behind; reconnect to resume"}
    return ServerSentEvent(orjson.dumps(data).decode(), event="close")


async def board_stream(
    hub: ActivityHub[bytes], metrics: GatewayMetrics, board_id: str, cursor: str | None, queue: int
) -> AsyncIterator[bytes | ServerSentEvent]:
    sent = metrics.sent.labels("board")
    with hub.subscribe_board(board_id, queue) as subscription:
        last = 0
        if cursor is not None:
            after = int(cursor) if cursor.isdigit() else 0
            replay = await hub.replay_board(board_id, after)
            if replay.expired or not cursor.isdigit():
                metrics.resets.inc()
                yield _reset(replay, board_id)
            for event in replay.events:
                yield board_frame(event)
            metrics.replayed.inc(len(replay.events))
            last = replay.events[-1].sequence if replay.events else after
        try:
            while True:
                event, frame = await subscription.next()
                if event.sequence <= last:
                    continue
                last = event.sequence
                sent.inc()
                yield frame
        except SlowConsumer:
            metrics.slow.inc()
            yield _slow_consumer()


async def activity_stream(
    hub: ActivityHub[bytes],
    metrics: GatewayMetrics,
    boards: frozenset[str] | None,
    cursor: str | None,
    queue: int,
) -> AsyncIterator[bytes | ServerSentEvent]:
    sent = metrics.sent.labels("activity")
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
                replay.events[-1].stream_id if replay.events else cursor if valid else "0-0"
            )
        try:
            while True:
                event, frame = await subscription.next()
                if seam is not None:
                    if stream_id_key(event.stream_id) <= seam:
                        continue  # already sent by the replay
                    seam = None
                sent.inc()
                yield frame
        except SlowConsumer:
            metrics.slow.inc()
            yield _slow_consumer()


def _is_stream_id(cursor: str) -> bool:
    ms, dash, seq = cursor.partition("-")
    return ms.isdigit() and (not dash or seq.isdigit())
