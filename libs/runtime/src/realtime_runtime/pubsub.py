"""Redis pub/sub channels as the edges read them: the activity channel and the presence one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

# After this long without a frame, the feed pings the subscription connection and expects
# the reply within as long again: a connection dropped without a reset cannot go unnoticed.
LIVENESS_SECONDS = 5.0
LIVENESS_PING = "advanced-feed-liveness"


@contextlib.asynccontextmanager
async def channel_frames(
    client: redis.Redis, channel: str, what: str
) -> AsyncIterator[AsyncIterator[bytes]]:
    """A pub/sub channel's messages, once the subscription is confirmed."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        # Wait for the confirmation: only then is every later publish sure to reach us,
        # and the catch-up read that follows cannot leave a window behind it.
        confirmation = await pubsub.get_message(timeout=5.0)
        if confirmation is None or confirmation["type"] != "subscribe":
            raise RedisError(f"the {what} channel subscription was not confirmed")
        yield channel_messages(pubsub, what)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


async def channel_messages(pubsub: PubSub, what: str) -> AsyncIterator[bytes]:
    # redis-py reconnects a pub/sub connection by itself and subscribes again, silently:
    # frames published in between would be lost. A second subscribe confirmation is how
    # that shows, and it is raised as a lost connection so the hub catches up.
    loop = asyncio.get_running_loop()
    heard_at = loop.time()
    pinged_at: float | None = None
    while True:
        message = await pubsub.get_message(timeout=1.0)
        now = loop.time()
        if message is None:
            if pinged_at is not None and now - pinged_at > LIVENESS_SECONDS:
                raise RedisTimeoutError(f"the {what} subscription stopped answering pings")
            if pinged_at is None and now - heard_at > LIVENESS_SECONDS:
                await pubsub.ping(LIVENESS_PING)
                pinged_at = now
            continue
        heard_at, pinged_at = now, None
        kind = message["type"]
        if kind == "message":
            yield message["data"]
        elif kind == "subscribe":
            raise RedisConnectionError(f"the {what} subscription was re-established")
