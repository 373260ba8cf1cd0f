"""The wire models: what clients send, what the ingress publishes, what subscribers receive."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from envelope.codes import ErrorCode, ResetReason

SCHEMA_VERSION = "1"
"""The envelope's major version. Readers accept any `1` or `1.x`, refuse other majors."""

BOARD_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""For JSON Schema and pydantic (whose `$` is the end of the text). In Python, use `is_board_id`:
`re.match` with `$` also accepts a trailing newline."""
EVENT_TYPE_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

BoardId = Annotated[str, StringConstraints(pattern=BOARD_ID_PATTERN)]
EventType = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=EVENT_TYPE_PATTERN)
]
CorrelationId = Annotated[str, StringConstraints(pattern=CLIENT_ID_PATTERN)]
EPOCH_PATTERN = r"^[0-9]{1,20}$"
Epoch = Annotated[str, StringConstraints(pattern=EPOCH_PATTERN)]


_BOARD_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


def is_board_id(text: str) -> bool:
    """The one board-id rule every edge, the worker's models and the probe apply: 1 to 64 of
    `[A-Za-z0-9_.-]`, the whole text (no trailing newline, no Unicode digits or letters)."""
    return _BOARD_ID.fullmatch(text) is not None


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Wire(BaseModel):
    # Unknown fields are ignored so that older readers accept newer minor versions.
    model_config = ConfigDict(extra="ignore", frozen=True)


class BoardMessage(_Wire):
    """A client's frame on `WS /ws/boards/{board_id}`."""

    type: EventType
    payload: dict[str, Any]
    id: CorrelationId | None = None


class ResumeRequest(_Wire):
    """A client's request to replay the board's events after `after` (a sequence).

    `epoch` is the board's epoch the sequence belongs to (the events' `epoch`); without it the
    sequence is taken to belong to the board's current epoch.
    """

    kind: Literal["resume"]
    after: int = Field(ge=0)
    epoch: Epoch | None = None


class RefreshRequest(_Wire):
    """A client's request to replace its socket's credential without reconnecting.

    The new credential must be valid and grant the socket's board (else close 4401 / 4403);
    the server answers `RefreshedFrame`.
    """

    kind: Literal["refresh"]
    token: str = Field(min_length=1, max_length=8192)


class BoardEventEnvelope(_Wire):
    """What the ingress publishes to RabbitMQ for one accepted `BoardMessage`."""

    schema_version: str = SCHEMA_VERSION
    event_id: UUID
    correlation_id: CorrelationId
    board_id: BoardId
    type: EventType
    payload: dict[str, Any]
    sender: str
    # With its UTC offset: a naive time cannot be compared with the relay's clock.
    occurred_at: AwareDatetime
    trace_context: dict[str, str] = Field(default_factory=dict)
    # Who may deduplicate against whom: a digest of the sender's credential subject. The
    # worker's idempotency key carries it, so one writer cannot pre-claim another's `id`.
    # Never broadcast (`activity_body` leaves it out); empty from ingresses older than 1.1.
    idempotency_scope: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{0,64}$")] = ""

    @property
    def idempotency_key(self) -> str:
        """What the relay deduplicates on: the sender's scope and its `correlation_id`."""
        if self.idempotency_scope:
            return f"{self.idempotency_scope}:{self.correlation_id}"
        return self.correlation_id


class ActivityEvent(BoardEventEnvelope):
    """What every subscriber of the board receives, once, in `sequence` order.

    `sequence` counts within the board's `epoch`: a board whose state expired while idle starts
    again at 1 under a new epoch, so a cursor of an older epoch is never mistaken for a new one.
    """

    sequence: int = Field(ge=1)
    epoch: Epoch | None = None
    published_at: datetime


class AckFrame(_Wire):
    kind: Literal["ack"] = "ack"
    correlation_id: str
    event_id: UUID


class ErrorFrame(_Wire):
    kind: Literal["error"] = "error"
    code: ErrorCode
    message: str
    correlation_id: str | None = None


class EventFrame(ActivityEvent):
    """An `ActivityEvent` as a WebSocket frame. Built from the event's bytes, never re-encoded."""

    kind: Literal["event"] = "event"
    active_connections: int


class ResetFrame(_Wire):
    """Tells a resuming client that events before `oldest_sequence` are no longer retained."""

    kind: Literal["reset"] = "reset"
    board_id: str | None
    # `history_lost`: the board's history is gone (it expired and started again under a new
    # epoch, or Redis lost its data); drop the old cursor, the events that follow are the new.
    reason: ResetReason = ResetReason.CURSOR_EXPIRED
    oldest_cursor: str | None


class RefreshedFrame(_Wire):
    """The answer to a `RefreshRequest`: the socket now runs on the new credential."""

    kind: Literal["refreshed"] = "refreshed"
    expires_at: AwareDatetime | None  # None: the credential does not expire


class ExpiringFrame(_Wire):
    """Sent at least `ADVANCED_AUTH_REFRESH_WARNING_SECONDS` before the socket's credential
    expires: send a `refresh` frame before `expires_at`, or the socket closes with 4401."""

    kind: Literal["expiring"] = "expiring"
    expires_at: AwareDatetime


PresenceAction = Literal["join", "leave"]


class PresenceMember(_Wire):
    """One identity on a board: a JWT's `sub` (and `name` claim), or a shared-token connection."""

    id: str
    name: str | None = None


class PresenceFrame(_Wire):
    """An identity's first connection to a board joined, or its last one left (any replica).

    Not an event: it has no `sequence`, is not retained and never passes through RabbitMQ.
    `count` is the board's number of members after the change.
    """

    kind: Literal["presence"] = "presence"
    board_id: BoardId
    action: PresenceAction
    member: PresenceMember
    count: int = Field(ge=0)


class PresenceEntry(PresenceMember):
    connections: int = Field(ge=1)


class PresenceSnapshot(_Wire):
    """`GET /api/boards/{board_id}/presence`: the board's members across every replica."""

    board_id: BoardId
    count: int = Field(ge=0)
    members: list[PresenceEntry]
