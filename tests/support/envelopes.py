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


class RecordedDelivery:
    """A delivery for the relay that writes how it was settled (`ack <board>/<id>`, `retry
    ...`, `dead_letter ...`) into `settled`, in the order the relay settled it."""

    def __init__(self, board_id: str, correlation_id: str, settled: list[str]) -> None:
        self.body = envelope_body(board_id, correlation_id)
        self.attempts = 0
        self.name = f"{board_id}/{correlation_id}"
        self._settled = settled

    async def ack(self) -> None:
        self._settled.append(f"ack {self.name}")

    async def retry(self, reason: str) -> None:
        self._settled.append(f"retry {self.name}")

    async def dead_letter(self, reason: str) -> None:
        self._settled.append(f"dead_letter {self.name}")
