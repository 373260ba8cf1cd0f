"""The worker's batched relay: one Redis pipeline per prefetch batch, same guarantees as one by one.

Per-board sequence in queue order, a correlation id relayed once, each step atomic, and every
delivery settled exactly once, in order; a pipeline Redis cannot take settles nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as redis
from envelope.topology import RedisKeys
from prometheus_client import CollectorRegistry
from realtime_runtime.feed import ActivityStore, RedisActivityStore
from realtime_runtime.memory import MemoryStore
from relay_worker.adapters.redis import RedisRelayStore
from relay_worker.relay import Relay, RelayMetrics, RelayStore
from relay_worker.settings import WorkerSettings
from support.brokers import Brokers
from support.envelopes import envelope_body

pytestmark = [pytest.mark.brokers]


class RecordedDelivery:
    """A delivery that writes down how it was settled, in the order it happened."""

    def __init__(self, body: bytes, settled: list[tuple[str, str]], name: str) -> None:
        self.body = body
        self.attempts = 0
        self._settled = settled
        self._name = name

    async def ack(self) -> None:
        self._settled.append(("ack", self._name))

    async def retry(self, reason: str) -> None:
        self._settled.append(("retry", self._name))

    async def dead_letter(self, reason: str) -> None:
        self._settled.append(("dead_letter", self._name))


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RelayStore, ActivityStore]]:
    if request.param == "memory":
        memory = MemoryStore(retention=100)
        yield memory, memory
        return
    brokers: Brokers = request.getfixturevalue("brokers")
    keys = RedisKeys(prefix=f"t:{uuid.uuid4().hex[:12]}:", activity_channel=f"t:{uuid.uuid4().hex}")
    client = redis.from_url(brokers.redis_url)
    try:
        yield RedisRelayStore(client, keys, 100), RedisActivityStore(client, keys)
    finally:
        stale = [key async for key in client.scan_iter(match=f"{keys.prefix}*")]
        if stale:
            await client.delete(*stale)
        await client.aclose()


def relay_for(store: RelayStore) -> Relay:
    settings = WorkerSettings(environment="development")
    return Relay(store, settings, RelayMetrics(CollectorRegistry()))


async def test_a_batch_keeps_queue_order_and_relays_each_id_once(
    stores: tuple[RelayStore, ActivityStore],
) -> None:
    store, history = stores
    settled: list[tuple[str, str]] = []
    names = ["a1", "b1", "a2", "a1-again", "b2", "a3"]
    ids = {"a1": "x1", "b1": "y1", "a2": "x2", "a1-again": "x1", "b2": "y2", "a3": "x3"}
    deliveries = [
        RecordedDelivery(envelope_body(name[0], ids[name]), settled, name) for name in names
    ]

    outcomes = await relay_for(store).handle_batch(deliveries)

    assert outcomes == [
        "delivered",
        "delivered",
        "delivered",
        "duplicate",
        "delivered",
        "delivered",
    ]
    assert settled == [("ack", name) for name in names]  # each once, in the queue's order
    history_a = await history.board_after("a", 0)
    history_b = await history.board_after("b", 0)
    assert [(e.sequence, orjson.loads(e.event)["correlation_id"]) for e in history_a] == [
        (1, "x1"),
        (2, "x2"),
        (3, "x3"),
    ]
    assert [e.sequence for e in history_b] == [1, 2]


async def test_a_malformed_body_in_a_batch_is_dead_lettered_in_its_place(
    stores: tuple[RelayStore, ActivityStore],
) -> None:
    store, _history = stores
    settled: list[tuple[str, str]] = []
    deliveries = [
        RecordedDelivery(envelope_body("m", "ok-1"), settled, "first"),
        RecordedDelivery(b"not json", settled, "broken"),
        RecordedDelivery(envelope_body("m", "ok-2"), settled, "last"),
    ]

    outcomes = await relay_for(store).handle_batch(deliveries)

    assert outcomes == ["delivered", "dead_lettered", "delivered"]
    assert settled == [("ack", "first"), ("dead_letter", "broken"), ("ack", "last")]


async def test_a_pipeline_that_fails_as_a_whole_settles_nothing(brokers: Brokers) -> None:
    # Nothing listens on port 1: the pipeline cannot even connect.
    client = redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    store = RedisRelayStore(client, RedisKeys(prefix="t:down:", activity_channel="t:down"), 10)
    settled: list[tuple[str, str]] = []
    deliveries = [
        RecordedDelivery(envelope_body("d", f"id-{n}"), settled, f"d{n}") for n in range(3)
    ]
    try:
        # An infrastructure fault: every delivery is held (unsettled, in order), none retried.
        assert await relay_for(store).handle_batch(deliveries) == ["held"] * 3
        assert await relay_for(store).handle(deliveries[0]) == "held"
        assert settled == []
    finally:
        await client.aclose()
