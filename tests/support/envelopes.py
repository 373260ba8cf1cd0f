"""Board events as the ingress publishes them, for the tests of the worker and of the feeds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from envelope import codec
from envelope.models import BoardEventEnvelope


def board_event(board_id: str, correlation_id: str) -> BoardEventEnvelope:
    return BoardEventEnvelope(
        event_id=uuid.uuid4(),
        correlation_id=correlation_id,
        board_id=board_id,
        type="note.created",
        payload={"n": correlation_id},
        sender="s",
        occurred_at=datetime.now(UTC),
    )


def envelope_body(board_id: str, correlation_id: str) -> bytes:
    """The AMQP body of one event."""
    return codec.dumps(board_event(board_id, correlation_id))
