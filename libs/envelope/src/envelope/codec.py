"""JSON codec and schema-version rules. Every event is encoded once and its bytes reused."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from envelope.models import (
    CLIENT_ID_PATTERN,
    SCHEMA_VERSION,
    BoardEventEnvelope,
    BoardMessage,
    RefreshRequest,
    ResumeRequest,
)

_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
MAX_PAYLOAD_DEPTH = 253
"""Levels of nesting a payload may have, its own object included: orjson writes 254, and the
envelope carries the payload one level down."""


class MalformedEnvelope(ValueError):
    """A RabbitMQ body that is not a valid envelope: it goes to the DLQ at once."""


class UnsupportedSchemaVersion(MalformedEnvelope):
    """An envelope whose major version this reader does not know."""


class InvalidFrame(ValueError):
    """A client frame refused with an `error` frame; `code` is the contract's error code."""

    def __init__(self, code: str, message: str, correlation_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.correlation_id = correlation_id


def dumps(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


def is_supported_version(version: str) -> bool:
    return version.split(".", 1)[0] == SCHEMA_VERSION


def client_id_of(raw: str | bytes | None) -> str | None:
    """The frame's `id` when it is a valid client id, else None: for errors about a frame that
    is refused before it is validated (rate limits), never echoing arbitrary text back."""
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str) and _CLIENT_ID.fullmatch(found) else None


ClientFrame = BoardMessage | ResumeRequest | RefreshRequest


def decode_client_frame(raw: str | bytes, max_payload_bytes: int) -> ClientFrame:
    """Parse one client text frame, raising `InvalidFrame` with the contract's code."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidFrame("invalid_message", "The frame is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidFrame("invalid_message", "A frame must be a JSON object.")
    client_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        if data.get("kind") == "resume":
            return ResumeRequest.model_validate(data)
        if data.get("kind") == "refresh":
            return RefreshRequest.model_validate(data)
        message = BoardMessage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "frame"
        raise InvalidFrame(
            "invalid_message", f"Field '{where}': {first['msg']}.", client_id
        ) from None
    try:
        # Serialised one level down, as the envelope and the event carry it: orjson reads 1024
        # levels of nesting but writes only 254, and a payload that fits alone but not inside
        # the envelope would be accepted here and then fail to publish.
        wrapped = orjson.dumps({"payload": message.payload})
    except orjson.JSONEncodeError:
        raise InvalidFrame(
            "invalid_message",
            f"The payload is nested too deeply ({MAX_PAYLOAD_DEPTH} levels at most).",
            client_id,
        ) from None
    if len(wrapped) - len(b'{"payload":}') > max_payload_bytes:
        raise InvalidFrame(
            "payload_too_large",
            f"The payload is larger than {max_payload_bytes} bytes once serialised.",
            client_id,
        )
    return message


def decode_envelope(body: bytes) -> BoardEventEnvelope:
    """Parse a RabbitMQ body; unknown majors and malformed bodies raise `MalformedEnvelope`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEnvelope(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedEnvelope("body is not a JSON object")
    version = str(data.get("schema_version", ""))
    if not is_supported_version(version):
        raise UnsupportedSchemaVersion(
            f"schema_version {version!r} is not supported (this reader knows {SCHEMA_VERSION}.x)"
        )
    try:
        return BoardEventEnvelope.model_validate(data)
    except ValidationError as exc:
        raise MalformedEnvelope(f"invalid envelope: {exc.errors()[0]['msg']}") from None


def activity_body(
    envelope: BoardEventEnvelope,
    published_at: datetime,
    trace_context: dict[str, str] | None = None,
) -> bytes:
    """The `ActivityEvent` JSON without its `sequence`, which the relay step prepends.

    The relay step assigns the board's next sequence atomically in Redis and writes
    `{"sequence":N,"epoch":"E",` + `activity_body(...)[1:]`; see `with_sequence`.
    `trace_context`, when given, replaces the envelope's (the relay passes its own span on to
    the edges). The sender's `idempotency_scope` is not broadcast.
    """
    fields: dict[str, Any] = envelope.model_dump(mode="json", exclude={"idempotency_scope"})
    if trace_context is not None:
        fields["trace_context"] = trace_context
    fields["published_at"] = published_at.isoformat().replace("+00:00", "Z")
    return orjson.dumps(fields)


def with_sequence(body: bytes, sequence: int, epoch: str) -> bytes:
    """Prepend the sequence and epoch to an `activity_body`: the bytes the relay step writes."""
    return b'{"sequence":%d,"epoch":"%s",' % (sequence, epoch.encode()) + body[1:]


def event_frame(event: bytes, active_connections: int) -> bytes:
    """A WebSocket `event` frame from the event's bytes, without decoding them again."""
    return b'{"kind":"event","active_connections":%d,' % active_connections + event[1:]


def seconds_since_occurred(event: bytes) -> float:
    """Delivery latency of an `ActivityEvent`'s bytes, for the latency histograms."""
    occurred = orjson.loads(event).get("occurred_at")
    if not isinstance(occurred, str):
        return 0.0
    return max(0.0, time.time() - datetime.fromisoformat(occurred).timestamp())


@dataclass(frozen=True, slots=True)
class RelayedEvent:
    """One event as the relay publishes it on the activity channel.

    The frame is `<activity stream id> <board id> <sequence> <epoch>\\n<ActivityEvent JSON>`, so
    that readers route it without decoding the JSON. A frame from a relay older than 1.1 has no
    epoch: it reads as "".
    """

    stream_id: str
    board_id: str
    sequence: int
    event: bytes
    epoch: str = ""

    def to_frame(self) -> bytes:
        head = f"{self.stream_id} {self.board_id} {self.sequence} {self.epoch}\n".encode()
        return head + self.event

    @classmethod
    def from_frame(cls, frame: bytes) -> RelayedEvent:
        head, _, event = frame.partition(b"\n")
        stream_id, board_id, sequence, *epoch = head.decode().split(" ")
        if len(epoch) > 1:
            raise ValueError("a relay frame's head has at most four fields")
        return cls(stream_id, board_id, int(sequence), event, epoch[0] if epoch else "")
