"""The suite's versioned wire contract. See `models` for the frames and events."""

from envelope.codec import (
    InvalidFrame,
    MalformedEnvelope,
    RelayedEvent,
    UnsupportedSchemaVersion,
    activity_body,
    decode_client_frame,
    decode_envelope,
    dumps,
    event_frame,
    with_sequence,
)
from envelope.models import (
    BOARD_ID_PATTERN,
    SCHEMA_VERSION,
    AckFrame,
    ActivityEvent,
    BoardEventEnvelope,
    BoardMessage,
    ErrorFrame,
    EventFrame,
    PresenceFrame,
    PresenceMember,
    PresenceSnapshot,
    ResetFrame,
    ResumeRequest,
    is_board_id,
)
from envelope.settings import SuiteSettings
from envelope.topology import RedisKeys, Topology

__version__ = "1.1.0"

__all__ = [
    "BOARD_ID_PATTERN",
    "SCHEMA_VERSION",
    "AckFrame",
    "ActivityEvent",
    "BoardEventEnvelope",
    "BoardMessage",
    "ErrorFrame",
    "EventFrame",
    "InvalidFrame",
    "MalformedEnvelope",
    "PresenceFrame",
    "PresenceMember",
    "PresenceSnapshot",
    "RedisKeys",
    "RelayedEvent",
    "ResetFrame",
    "ResumeRequest",
    "SuiteSettings",
    "Topology",
    "UnsupportedSchemaVersion",
    "activity_body",
    "decode_client_frame",
    "decode_envelope",
    "dumps",
    "event_frame",
    "is_board_id",
    "with_sequence",
]
