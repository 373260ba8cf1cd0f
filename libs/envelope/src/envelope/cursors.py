"""Cursors, as clients hold them: where a board or the activity stream resumes.

The one reading of each cursor format, used by every edge (WebSocket, SSE, the HTTP history)
and by the probe. A cursor that is not valid reads as None: the client is then reset, never
refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from envelope.codec import RelayedEvent
from envelope.topology import ACTIVITY_PARTS

# Redis keeps a board's sequence with INCR (signed 64 bits) and a stream id as two unsigned
# 64-bit numbers: a cursor past either is no cursor Redis could have given.
MAX_SEQUENCE = 2**63 - 1
MAX_STREAM_ID_PART = 2**64 - 1
MAX_EPOCH = 10**20 - 1  # an epoch is 1-20 digits (`envelope.models.EPOCH_PATTERN`)


def stream_id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _number(text: str, most: int) -> int | None:
    # ASCII digits only ("²".isdigit() is true and int("²") raises), and never a 5000-digit
    # int: 20 digits hold every 64-bit number.
    if not (0 < len(text) <= 20 and text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if number <= most else None


@dataclass(frozen=True, slots=True)
class BoardCursor:
    """Where a board client resumes: after `sequence` of the board's `epoch`.

    Without an epoch (a client older than epochs) the sequence is trusted against the board's
    current epoch.
    """

    sequence: int
    epoch: str | None = None


def parse_board_cursor(cursor: str | int | None, epoch: str | None = None) -> BoardCursor | None:
    """The one reading of a board cursor: `<sequence>` or `<sequence>.<epoch>` (SSE `id:`,
    `Last-Event-ID`, `?last_event_id=`, WebSocket `?after=`, a resume frame's `after`), with
    the epoch given apart (`?epoch=`, the frame's `epoch`) or not at all. None when it is no
    valid cursor: the client resumes with a reset from the oldest retained event."""
    if isinstance(cursor, int):
        cursor = str(cursor)
    if cursor is None:
        return None
    text, dot, embedded = cursor.partition(".")
    if dot:
        if epoch is not None and epoch != embedded:
            return None
        epoch = embedded
    if epoch is not None and _number(epoch, MAX_EPOCH) is None:
        return None
    sequence = _number(text, MAX_SEQUENCE)
    return None if sequence is None else BoardCursor(sequence, epoch)


def board_cursor(event: RelayedEvent) -> str:
    """The cursor of a board event, as SSE sends it in `id:`: `<sequence>.<epoch>`."""
    return f"{event.sequence}.{event.epoch}" if event.epoch else str(event.sequence)


def older_epoch(epoch: str, than: str) -> bool:
    # Epochs are decimal ms without leading zeros: shorter is older, then by digits.
    return (len(epoch), epoch) < (len(than), than)


def parse_stream_id(text: str) -> str | None:
    """A stream id (`<ms>` or `<ms>-<seq>`) in the form Redis takes; None when Redis would
    refuse it."""
    ms, dash, seq = text.partition("-")
    high = _number(ms, MAX_STREAM_ID_PART)
    low = _number(seq, MAX_STREAM_ID_PART) if dash else 0
    if high is None or low is None:
        return None
    return f"{high}-{low}"


ActivityCursor = tuple[str, ...]
"""Where an `/sse/activity` client resumes: the last stream id of each part of the activity
stream (`topology.ACTIVITY_PARTS` of them), in part order."""


def parse_activity_cursor(cursor: str | None) -> ActivityCursor | None:
    """The one reading of an `/sse/activity` cursor: one stream id per part of the activity
    stream, in part order, comma-separated (`<ms>-<seq>,<ms>-<seq>,...`; `0` is `0-0`). None
    when it is no such vector, e.g. a single stream id from before the stream was split: the
    client is then reset, not refused."""
    if cursor is None:
        return None
    entries = cursor.split(",")
    if len(entries) != ACTIVITY_PARTS:
        return None
    parsed = tuple(parse_stream_id(entry) for entry in entries)
    if any(entry is None for entry in parsed):
        return None
    return cast(ActivityCursor, parsed)


def activity_cursor(stream_ids: Sequence[str]) -> str:
    """The SSE `id:` of the activity stream: `parse_activity_cursor`'s format, `0` for `0-0`."""
    return ",".join("0" if stream_id == "0-0" else stream_id for stream_id in stream_ids)
