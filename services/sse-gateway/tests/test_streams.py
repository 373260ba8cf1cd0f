"""A presence item in a board stream's queue is never taken for an event: it passes the
replay seam untouched and moves no position."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from envelope import codec
from envelope.codec import RelayedEvent
from envelope.models import BoardEventEnvelope
from prometheus_client import CollectorRegistry
from realtime_runtime.feed import ActivityHub, Queued
from realtime_runtime.memory import MemoryStore
from realtime_runtime.presence import PresenceItem
from sse_gateway.streams import BoardFeed, GatewayMetrics


async def relayed(store: MemoryStore, board_id: str, count: int) -> None:
    for _ in range(count):
        envelope = BoardEventEnvelope(
            event_id=uuid.uuid4(),
            correlation_id=uuid.uuid4().hex,
            board_id=board_id,
            type="note.created",
            payload={},
            sender="s",
            occurred_at=datetime.now(UTC),
        )
        body = codec.activity_body(envelope, datetime.now(UTC))
        await store.relay(board_id, envelope.correlation_id, body, 60)


def live(sequence: int) -> tuple[Queued, bytes]:
    return RelayedEvent(f"{sequence}-0", "demo", sequence, b""), f"event {sequence}".encode()


PRESENCE: tuple[Queued, bytes] = (PresenceItem("demo", "alice"), b"presence")


async def test_presence_passes_the_replay_seam_and_moves_no_position() -> None:
    store = MemoryStore(retention=50)
    await relayed(store, "demo", 5)
    hub: ActivityHub[bytes] = ActivityHub(store, render_board=bytes, render_activity=bytes)
    feed = BoardFeed(hub, GatewayMetrics(CollectorRegistry()), "demo", "2", 10)
    assert len([chunk async for chunk in feed.replay()]) == 1  # events 3 to 5: the seam is 5

    assert feed.fresh([PRESENCE, live(4), live(6)]) == [PRESENCE, live(6)]
    # A batch of presence alone leaves the position at 6: a late duplicate is still dropped.
    assert feed.fresh([PRESENCE]) == [PRESENCE]
    assert feed.fresh([live(5), live(7)]) == [live(7)]
