"""The edges' Redis client (`realtime_runtime.service.redis_client`) on the real Redis: it sets its own
timeouts, so a Redis that stops answering fails a command in bounded time, and the pub/sub
feed stays quiet on an idle channel for longer than that timeout."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit

import pytest
from realtime_runtime.feed import RedisActivityStore
from realtime_runtime.pubsub import Confirmed
from realtime_runtime.service import redis_client
from realtime_runtime.settings import RedisSettings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from support.brokers import Brokers
from support.proxy import TcpProxy

pytestmark = [pytest.mark.e2e]


def settings_for(url: str, prefix: str = "t:") -> RedisSettings:
    return RedisSettings(
        _env_file=None,
        redis_url=url,
        redis_key_prefix=prefix,
        activity_channel=f"{prefix}activity",
        redis_socket_timeout_seconds=0.5,
        redis_connect_timeout_seconds=0.5,
    )


async def test_a_command_to_a_redis_that_stopped_answering_fails_in_bounded_time(
    brokers: Brokers,
) -> None:
    target = urlsplit(brokers.redis_url)
    proxy = await TcpProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    url = brokers.redis_url.replace(target.netloc.rsplit("@", 1)[-1], f"127.0.0.1:{proxy.port}")
    client = redis_client(settings_for(url))
    try:
        assert await client.ping()
        proxy.blackhole()  # the link stays open and nothing comes back: a silently dead peer
        started = time.monotonic()
        with pytest.raises((RedisTimeoutError, RedisConnectionError)):
            await asyncio.wait_for(client.get("t:any"), 10)  # redis-py's default waits for ever
        assert time.monotonic() - started < 3
    finally:
        proxy.cut()
        await proxy.stop()
        await client.aclose()


async def test_the_feed_stays_subscribed_on_an_idle_channel_past_the_socket_timeout(
    brokers: Brokers,
) -> None:
    settings = settings_for(brokers.redis_url, prefix=f"t:{uuid.uuid4().hex[:12]}:")
    client = redis_client(settings)
    try:
        store = RedisActivityStore(client, settings.redis_keys)
        channel = settings.redis_keys.board_events_channel("b")
        async with store.live() as live:
            await live.subscribe([channel])
            assert await asyncio.wait_for(live.next(), 5) == Confirmed(channel)
            await asyncio.sleep(1.5)  # idle for three socket timeouts: the point of the test
            await client.publish(channel, b"0-1 b 1\n{}")
            frame = await asyncio.wait_for(live.next(), 5)
        assert frame == b"0-1 b 1\n{}"
    finally:
        await client.aclose()
