"""The relay step on real Redis when a board's keys are not what the step expects.

Redis does not roll a script back when a command fails half-way: each case here must end in
one whole step or in nothing written, and never in a sequence number used twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
import pytest
import redis.asyncio as redis
from envelope import codec
from envelope.models import ActivityEvent
from envelope.topology import RedisKeys, activity_part_of
from redis.exceptions import ResponseError
from relay_worker.adapters.redis import RedisRelayStore
from support.brokers import Brokers
from support.envelopes import board_event

pytestmark = [pytest.mark.brokers]


@pytest.fixture
async def client(brokers: Brokers) -> AsyncIterator[redis.Redis]:
    connection = redis.from_url(brokers.redis_url)
    yield connection
    await connection.aclose()


@pytest.fixture
async def keys(client: redis.Redis) -> AsyncIterator[RedisKeys]:
    names = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=f"t:{uuid.uuid4()}")
    yield names
    stale = [key async for key in client.scan_iter(match=f"{names.prefix}*")]
    if stale:
        await client.delete(*stale)


def body(correlation_id: str) -> bytes:
    return codec.activity_body(board_event("b", correlation_id), datetime.now(UTC))


async def written(client: redis.Redis, keys: RedisKeys) -> tuple[object, ...]:
    """The board's sequence, its stream's and the activity stream's lengths, the markers."""
    markers = [key async for key in client.scan_iter(match=keys.idempotency("b", "*"))]
    activity = keys.activity_stream(activity_part_of("b"))
    return (
        await client.get(keys.sequence("b")),
        await client.xlen(keys.board_stream("b")),
        await client.xlen(activity) if await client.type(activity) == b"stream" else None,
        len(markers),
    )


async def test_a_lost_sequence_counter_numbers_on_after_the_stream(
    client: redis.Redis, keys: RedisKeys
) -> None:
    store = RedisRelayStore(client, keys, 100)
    for n in range(3):
        await store.relay("b", f"c{n}", body(f"c{n}"), 60)
    await client.delete(keys.sequence("b"))  # evicted, or lost in a partial restore

    outcome = await store.relay("b", "c3", body("c3"), 60)
    assert outcome.delivered and outcome.sequence == 4 and outcome.sequence_recovered
    assert await written(client, keys) == (b"4", 4, 4, 4)  # one whole step, nothing twice
    again = await store.relay("b", "c4", body("c4"), 60)
    assert again.sequence == 5 and not again.sequence_recovered
    sequences = [
        int(entry_id.split(b"-")[0]) for entry_id, _ in await client.xrange(keys.board_stream("b"))
    ]
    assert sequences == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("broken", ["sequence", "activity"])
async def test_a_step_that_cannot_succeed_writes_nothing(
    client: redis.Redis, keys: RedisKeys, broken: str
) -> None:
    store = RedisRelayStore(client, keys, 100)
    await store.relay("b", "c0", body("c0"), 60)
    if broken == "sequence":
        await client.set(keys.sequence("b"), "not a number")
    else:
        activity = keys.activity_stream(activity_part_of("b"))
        await client.delete(activity)
        await client.set(activity, "a string where the stream was")
    before = await written(client, keys)
    with pytest.raises(ResponseError):
        await store.relay("b", "c1", body("c1"), 60)
    assert await written(client, keys) == before


async def test_every_event_names_its_board_epoch(client: redis.Redis, keys: RedisKeys) -> None:
    store = RedisRelayStore(client, keys, 100)
    first = await store.relay("b", "c0", body("c0"), 60)
    second = await store.relay("b", "c1", body("c1"), 60)
    assert first.epoch and first.epoch == second.epoch
    ((_, fields),) = await client.xrange(keys.board_stream("b"), count=1)
    event = ActivityEvent.model_validate_json(fields[b"e"])
    assert (event.sequence, event.epoch) == (1, first.epoch)
    assert fields[b"p"].decode() == first.epoch
    assert orjson.loads(fields[b"e"]).keys() >= {"sequence", "epoch", "correlation_id"}
    assert "idempotency_scope" not in orjson.loads(fields[b"e"])


async def test_an_idle_board_expires_and_starts_a_new_epoch(
    client: redis.Redis, keys: RedisKeys
) -> None:
    store = RedisRelayStore(client, keys, 100, idle_ttl_seconds=1)
    first = await store.relay("b", "c0", body("c0"), 60)
    await store.relay("b", "c1", body("c1"), 60)
    for key in (keys.sequence("b"), keys.epoch("b"), keys.board_stream("b")):
        assert 0 < await client.pttl(key) <= 1000, key
    async with asyncio.timeout(10):
        while await client.exists(keys.board_stream("b"), keys.sequence("b"), keys.epoch("b")):
            await asyncio.sleep(0.1)

    again = await store.relay("b", "c2", body("c2"), 60)
    assert again.sequence == 1 and int(again.epoch) > int(first.epoch)


async def test_boards_without_an_idle_ttl_keep_their_keys(
    client: redis.Redis, keys: RedisKeys
) -> None:
    store = RedisRelayStore(client, keys, 100, idle_ttl_seconds=0)
    await store.relay("b", "c0", body("c0"), 60)
    for key in (keys.sequence("b"), keys.epoch("b"), keys.board_stream("b")):
        assert await client.pttl(key) == -1, key
