"""Presence between processes, at run time: one process's subscription to the presence
channel and its fan-out to the local subscribers of each board (`envelope.presence` is the
channel's format)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import orjson
from envelope.topology import RedisKeys
from redis.exceptions import RedisError

from realtime_runtime.feed.store import RedisClient
from realtime_runtime.pubsub import channel_frames

if TYPE_CHECKING:  # the feed's queue holds `PresenceItem`s: it imports this module
    from realtime_runtime.feed import ActivityHub

log = logging.getLogger("realtime_runtime.presence")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PresenceItem:
    """A presence frame's place in a subscription's queue, in band with the board's events.

    Not an event: it has no sequence or stream id, so no cursor, replay seam or delivery count
    takes it for one. `member_id` lets the ingress not echo a join to the joiner.
    """

    board_id: str
    member_id: str


class PresenceChanges(Protocol):
    """The presence channel, as a process's one subscriber reads it."""

    def changes(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


class RedisPresenceChanges:
    """The presence channel on Redis pub/sub, read like the activity channel (liveness pings,
    a silent resubscription raised as a lost connection)."""

    def __init__(self, client: RedisClient, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys

    def changes(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return channel_frames(self._client, self._keys.presence_channel, "presence")


class PresenceFanout:
    """Hands each presence change to the local subscribers of its board (rendered once)."""

    def __init__(
        self,
        source: PresenceChanges,
        hub: ActivityHub[T],
        render: Callable[[bytes], T],
        *,
        retry_seconds: float = 0.5,
    ) -> None:
        self._source = source
        self._hub = hub
        self._render = render
        self._retry_seconds = retry_seconds

    async def run(self) -> None:
        """Subscribe and fan out, resubscribing after a lost connection; until cancelled."""
        while True:
            try:
                async with self._source.changes() as messages:
                    async for message in messages:
                        self.deliver(message)
            except (RedisError, OSError) as exc:
                log.warning("presence subscription lost, resubscribing: %s", exc)
                await asyncio.sleep(self._retry_seconds)
            except Exception:  # a bug must not end presence for the process's lifetime
                log.exception("presence fan-out failed; resubscribing")
                await asyncio.sleep(self._retry_seconds)

    def deliver(self, message: bytes) -> None:
        head, _, frame = message.partition(b"\n")
        board_id = head.decode(errors="replace")
        subscriptions = self._hub.board_subscriptions(board_id)
        if not subscriptions or not frame:
            return
        member = _member_id(frame)
        item, rendered = PresenceItem(board_id, member), self._render(frame)
        for subscription in subscriptions:
            subscription.offer(item, rendered)


def _member_id(frame: bytes) -> str:
    try:
        member = orjson.loads(frame).get("member") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return str(member.get("id", "")) if isinstance(member, dict) else ""
