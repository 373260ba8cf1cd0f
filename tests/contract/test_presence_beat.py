"""A presence beat on real Redis is one round trip however many members the replica holds,
and survives a Redis that lost its scripts.

Round trips are counted on the client's own connections (a `Connection` subclass that counts
what it sends to a real server), so nothing of redis-py is mocked. The lost-scripts case
flushes the scripts of a private `redis-server`, never those of the shared one.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from envelope.models import PresenceMember
from envelope.topology import RedisKeys
from ingress_ws.adapters.redis import RedisPresence
from support.brokers import Brokers
from support.processes import free_port


class CountingConnection(aioredis.Connection):
    """A real connection that counts its writes: each is one request to the server."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)


def counted_client(url: str) -> aioredis.Redis:
    pool = aioredis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    return aioredis.Redis.from_pool(pool)  # owns the pool: `aclose` closes its connections


def many_members(boards: int, per_board: int) -> dict[str, list[tuple[PresenceMember, int]]]:
    return {
        f"b{b}": [(PresenceMember(id=f"m{m}", name=None), 1 + m % 3) for m in range(per_board)]
        for b in range(boards)
    }


@pytest.fixture
async def shared(brokers: Brokers) -> AsyncIterator[tuple[aioredis.Redis, RedisKeys]]:
    keys = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=f"t:{uuid.uuid4().hex}")
    client = counted_client(brokers.redis_url)
    try:
        yield client, keys
    finally:
        stale = [key async for key in client.scan_iter(match=f"{keys.prefix}*")]
        if stale:
            await client.delete(*stale)
        await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.05)
        probe.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


async def test_a_beat_of_many_members_is_one_round_trip(
    shared: tuple[aioredis.Redis, RedisKeys],
) -> None:
    client, keys = shared
    presence = RedisPresence(client, keys)
    members = many_members(boards=5, per_board=20)
    await presence.beat("one", members, 30)  # loads the script if this Redis lacks it
    CountingConnection.sends = 0
    await presence.beat("one", members, 30)
    assert CountingConnection.sends == 1
    assert len(await presence.members("b4")) == 20
    assert sum(e.connections for e in await presence.members("b0")) == sum(
        c for _m, c in members["b0"]
    )


async def test_a_beat_after_redis_lost_its_scripts_loads_them_and_writes_everything(
    private_redis: str,
) -> None:
    client = counted_client(private_redis)
    try:
        keys = RedisKeys(prefix="t:", activity_channel="t:activity")
        presence = RedisPresence(client, keys)
        await client.script_flush()
        CountingConnection.sends = 0
        await presence.beat("one", many_members(boards=2, per_board=3), 30)
        assert CountingConnection.sends == 3  # refused for want of the script, load, again
        assert {e.id for e in await presence.members("b1")} == {"m0", "m1", "m2"}
        assert await client.smembers(keys.presence_instance_boards("one")) == {b"b0", b"b1"}
    finally:
        await client.aclose()
