"""`ADVANCED_REDIS_MIN_REPLICAS` on a standalone Redis: a private primary with one replica.

The relay's WAIT goes on the connection of its writes (the same pipeline): confirmed, the batch
is acked; with the replica stopped, it is held (never retried, never dead-lettered), and acked
once a later attempt's WAIT is answered.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from chaos.harness import PrivateRedis
from envelope.topology import RedisKeys
from prometheus_client import CollectorRegistry
from relay_worker.adapters.redis import RedisRelayStore
from relay_worker.faults import ReplicationNotConfirmed
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings
from support.envelopes import RecordedDelivery, envelope_body

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[PrivateRedis, PrivateRedis]]:
    primary = PrivateRedis(tmp_path / "primary").start()
    replica = PrivateRedis(tmp_path / "replica").start()
    try:
        yield primary, replica
    finally:
        # kill -9: a primary stopped politely waits up to 10 s for a lagging replica.
        replica.kill()
        primary.kill()


async def follow(replica: PrivateRedis, primary: PrivateRedis) -> None:
    """Make `replica` follow `primary`; back once a write of the primary's is confirmed by
    WAIT (a replica just synced gets the stream only after its first ack, up to 1 s later)."""
    async with redis.from_url(primary.url) as on_primary:
        await on_primary.config_set("repl-diskless-sync-delay", 0)  # sync now, not in 5 s
        async with redis.from_url(replica.url) as on_replica:
            await on_replica.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 15
        confirmed = 0
        while confirmed < 3:  # one lucky answer right after the sync is not a steady link
            async with on_primary.pipeline(transaction=False) as pipe:
                pipe.set("probe", "1")
                pipe.execute_command("WAIT", 1, 300)
                confirmed = confirmed + 1 if (await pipe.execute())[1] == 1 else 0
            assert time.monotonic() < deadline, "the replica did not sync"


@pytest.fixture
async def client(servers: tuple[PrivateRedis, PrivateRedis]) -> AsyncIterator[redis.Redis]:
    primary, replica = servers
    await follow(replica, primary)
    connection = redis.from_url(primary.url)
    yield connection
    await connection.aclose()


async def test_a_batch_is_acked_after_wait_and_held_while_the_replica_is_down(
    servers: tuple[PrivateRedis, PrivateRedis], client: redis.Redis
) -> None:
    primary, replica = servers
    keys = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel="t:wait")
    store = RedisRelayStore(client, keys, 100, min_replicas=1, replicas_timeout_ms=300)
    relay = Relay(
        store, WorkerSettings(environment="development"), RelayMetrics(CollectorRegistry())
    )
    settled: list[str] = []
    first = [RecordedDelivery("w", f"a{n}", settled) for n in range(3)]
    assert await relay.handle_batch(first) == ["delivered"] * 3
    assert settled == ["ack w/a0", "ack w/a1", "ack w/a2"]
    async with redis.from_url(replica.url) as on_replica:
        assert await on_replica.get(keys.sequence("w")) == b"3"  # WAIT said so: it holds them

    replica.kill()
    second = [RecordedDelivery("w", f"b{n}", settled) for n in range(2)]
    assert await relay.handle_batch(second) == ["held", "held"]
    assert await relay.handle(second[0]) == "held"  # one by one: the same WAIT
    with pytest.raises(ReplicationNotConfirmed, match="0 replica"):
        await store.relay("w", "b0", envelope_body("w", "b0"), 60)
    assert settled == ["ack w/a0", "ack w/a1", "ack w/a2"]  # nothing retried or dead-lettered

    replica.start()
    await follow(replica, primary)
    # The held steps ran on the primary: duplicates now, acked once their WAIT is answered.
    assert await relay.handle_batch(second) == ["duplicate", "duplicate"]
    assert settled[3:] == ["ack w/b0", "ack w/b1"]
    sequence = [int(i.split(b"-")[0]) for i, _ in await client.xrange(keys.board_stream("w"))]
    assert sequence == [1, 2, 3, 4, 5]
