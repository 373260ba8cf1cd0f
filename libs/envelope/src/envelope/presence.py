"""Presence on the wire between processes: the channel's messages and the frame's bytes.

Presence never passes through RabbitMQ and has no sequence: a change is published on
`RedisKeys.presence_channel` by the same atomic Redis step that makes it, as
`<board id>\n<presence frame JSON>`, so every process sees a board's changes in the order
they happened. Whatever a process misses while its subscription is down is not replayed:
`GET /api/boards/{board_id}/presence` is the state, the frames are its changes.
"""

from __future__ import annotations

import orjson

from envelope.models import PresenceMember


def presence_message(board_id: str, frame: bytes) -> bytes:
    """What the presence channel carries: the board (for routing unread), then the frame."""
    return board_id.encode() + b"\n" + frame


def member_json(member: PresenceMember) -> bytes:
    """A member as stored and sent: `{"id": …, "name": …}`, encoded once when it joins."""
    return orjson.dumps({"id": member.id, "name": member.name})


def presence_frame(board_id: str, action: str, member: bytes, count: int) -> bytes:
    """The frame's bytes; the Redis step writes the same layout (`PresenceFrame`)."""
    board = orjson.dumps(board_id)
    return b'{"kind":"presence","board_id":%b,"action":"%b","member":%b,"count":%d}' % (
        board,
        action.encode(),
        member,
        count,
    )
