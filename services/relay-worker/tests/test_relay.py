"""The relay step's rules on the in-memory adapters: exactly once, in order, retries, DLQ.

The broker side is the embedded `MemoryBroker` with the worker's memory consumer (the same
retry and dead-letter rules as RabbitMQ's topology); the store is `MemoryStore`, which keeps
the Lua step's semantics (idempotency key, gapless sequence, streams, publish).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import orjson
import pytest
from envelope import codec
from envelope.codec import RelayedEvent
from envelope.models import BoardEventEnvelope
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from realtime_runtime.memory import MemoryBroker, MemoryMessage, MemoryStore, RelayOutcome
from redis.exceptions import ResponseError
from relay_worker.adapters.memory import ATTEMPTS, MemoryDelivery, consume_memory
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings
from support.envelopes import board_event

MAX_RETRIES = 3


def settings(**overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "_env_file": None,
        "event_transport": "memory",
        "rabbitmq_max_retries": MAX_RETRIES,
        "rabbitmq_retry_delay_ms": 10,
        **overrides,
    }
    return WorkerSettings(**values)  # type: ignore[arg-type]


def envelope(board_id: str, correlation_id: str, **fields: object) -> bytes:
    data = {**board_event(board_id, correlation_id).model_dump(mode="json"), **fields}
    return orjson.dumps(data)


def script_error() -> Exception:
    """A relay step that fails because of what the message's keys hold: the message's fault."""
    return ResponseError("value is not an integer or out of range script: 1, on @user_script:3.")


class FlakyStore(MemoryStore):
    """A store whose relay step fails `failures` times first, with `error()`."""

    def __init__(self, failures: int, error: Callable[[], Exception] = script_error) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.calls = 0

    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise self.error()
        return await super().relay(board_id, correlation_id, body, ttl_seconds)


class Feed:
    """Everything the store published, as the edges' subscription sees it."""

    def __init__(self) -> None:
        self.events: list[RelayedEvent] = []

    def of(self, board_id: str) -> list[RelayedEvent]:
        return [e for e in self.events if e.board_id == board_id]


@pytest.fixture
async def feed(store: MemoryStore) -> AsyncIterator[Feed]:
    recorded = Feed()
    ready = asyncio.Event()

    async def listen() -> None:
        async with store.feed() as frames:
            ready.set()
            async for frame in frames:
                recorded.events.append(RelayedEvent.from_frame(frame))

    task = asyncio.create_task(listen())
    await ready.wait()
    yield recorded
    task.cancel()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def relay_for(store: MemoryStore, **overrides: object) -> Relay:
    return Relay(store, settings(**overrides), RelayMetrics(CollectorRegistry()))


async def settle(feed: Feed, count: int) -> None:
    async with asyncio.timeout(5):
        while len(feed.events) < count:
            await asyncio.sleep(0.01)


async def test_each_event_is_relayed_once_with_a_gapless_sequence_per_board(
    store: MemoryStore, feed: Feed
) -> None:
    relay = relay_for(store)
    broker = MemoryBroker()
    outcomes = []
    for n in range(6):
        board = "a" if n % 2 == 0 else "b"
        delivery = MemoryDelivery(MemoryMessage(envelope(board, f"id-{n}")), broker, 0.01)
        outcomes.append(await relay.handle(delivery))
    await settle(feed, 6)

    assert outcomes == ["delivered"] * 6
    assert [e.sequence for e in feed.of("a")] == [1, 2, 3]
    assert [e.sequence for e in feed.of("b")] == [1, 2, 3]
    # The sequence written into the event itself is the one the frame carries.
    assert [orjson.loads(e.event)["sequence"] for e in feed.of("a")] == [1, 2, 3]
    assert [orjson.loads(e.event)["correlation_id"] for e in feed.of("a")] == [
        "id-0",
        "id-2",
        "id-4",
    ]


async def test_a_redelivery_after_a_crash_before_the_ack_is_a_duplicate(
    store: MemoryStore, feed: Feed
) -> None:
    body = envelope("board", "once")
    # The first worker ran the relay step and died before acking: the broker redelivers.
    first = await store.relay(
        "board",
        "once",
        codec.activity_body(BoardEventEnvelope.model_validate_json(body), datetime.now(UTC)),
        300,
    )
    assert first.delivered
    relay = relay_for(store)
    outcome = await relay.handle(MemoryDelivery(MemoryMessage(body), MemoryBroker(), 0.01))
    await asyncio.sleep(0.05)

    assert outcome == "duplicate"
    assert [e.sequence for e in feed.of("board")] == [1]


async def test_a_resent_correlation_id_is_delivered_once(store: MemoryStore, feed: Feed) -> None:
    relay = relay_for(store)
    broker = MemoryBroker()
    outcomes = [
        await relay.handle(MemoryDelivery(MemoryMessage(envelope("b", cid)), broker, 0.01))
        for cid in ("same", "same", "other")
    ]
    await settle(feed, 2)
    assert outcomes == ["delivered", "duplicate", "delivered"]
    assert [(orjson.loads(e.event)["correlation_id"], e.sequence) for e in feed.events] == [
        ("same", 1),
        ("other", 2),
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (envelope("b", "future", schema_version="2.0"), "schema_version '2.0' is not supported"),
        (envelope("b", "bad", type="Not A Type!"), "invalid envelope"),
    ],
)
async def test_malformed_and_unknown_versions_go_to_the_dlq_at_once(
    store: MemoryStore, body: bytes, reason: str
) -> None:
    broker = MemoryBroker()
    outcome = await relay_for(store).handle(MemoryDelivery(MemoryMessage(body), broker, 0.01))
    assert outcome == "dead_lettered"
    [letter] = broker.dead_letters
    assert reason in str(letter.headers["x-advanced-failure-reason"])
    assert letter.headers[ATTEMPTS] == 1
    assert letter.body == body


async def test_a_failing_store_is_retried_then_dead_lettered_with_the_attempt_count() -> None:
    store = FlakyStore(failures=100)
    broker = MemoryBroker()
    relay = relay_for(store)
    task = asyncio.create_task(consume_memory(broker, relay, 0.01))
    try:
        await broker.publish(envelope("b", "poison"))
        async with asyncio.timeout(5):
            while not broker.dead_letters:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    [letter] = broker.dead_letters
    assert store.calls == MAX_RETRIES + 1
    assert letter.headers[ATTEMPTS] == MAX_RETRIES + 1
    assert "ResponseError: value is not an integer" in str(
        letter.headers["x-advanced-failure-reason"]
    )


async def test_a_store_that_recovers_within_the_ladder_delivers_once() -> None:
    store = FlakyStore(failures=MAX_RETRIES)  # fails on every attempt but the last
    recorded = Feed()
    broker = MemoryBroker()
    relay = relay_for(store)

    async def listen() -> None:
        async with store.feed() as frames:
            async for frame in frames:
                recorded.events.append(RelayedEvent.from_frame(frame))

    listening = asyncio.create_task(listen())
    task = asyncio.create_task(consume_memory(broker, relay, 0.01))
    try:
        await asyncio.sleep(0)
        await broker.publish(envelope("b", "late"))
        await settle(recorded, 1)
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        listening.cancel()
    assert not broker.dead_letters
    assert [e.sequence for e in recorded.events] == [1]
    assert store.calls == MAX_RETRIES + 1


async def test_a_poison_message_does_not_hold_up_the_messages_behind_it() -> None:
    class PoisonedBoard(MemoryStore):
        async def relay(
            self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
        ) -> RelayOutcome:
            if board_id == "poisoned":
                raise RuntimeError("this board's sequence key is corrupt")
            return await super().relay(board_id, correlation_id, body, ttl_seconds)

    store = PoisonedBoard()
    recorded = Feed()
    broker = MemoryBroker()

    async def listen() -> None:
        async with store.feed() as frames:
            async for frame in frames:
                recorded.events.append(RelayedEvent.from_frame(frame))

    listening = asyncio.create_task(listen())
    task = asyncio.create_task(consume_memory(broker, relay_for(store), 0.05))
    try:
        await asyncio.sleep(0)
        await broker.publish(envelope("poisoned", "p"))
        for n in range(5):
            await broker.publish(envelope("healthy", f"h{n}"))
        await settle(recorded, 5)
        delivered_before_parked = not broker.dead_letters
        async with asyncio.timeout(5):
            while not broker.dead_letters:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        listening.cancel()
    assert delivered_before_parked
    assert [e.sequence for e in recorded.of("healthy")] == [1, 2, 3, 4, 5]
    assert broker.dead_letters[0].headers[ATTEMPTS] == MAX_RETRIES + 1


def test_the_idempotency_ttl_must_outlive_the_retry_ladder() -> None:
    with pytest.raises(ValidationError, match="must outlive the retry ladder"):
        settings(
            rabbitmq_max_retries=5,
            rabbitmq_retry_delay_ms=60_000,
            redis_idempotency_ttl_seconds=300,
        )
    assert settings(
        rabbitmq_max_retries=5, rabbitmq_retry_delay_ms=10_000, redis_idempotency_ttl_seconds=300
    )


async def test_an_id_is_deduplicated_per_sender_never_across_senders(
    store: MemoryStore, feed: Feed
) -> None:
    """Another writer of the board who guesses a client's `id` cannot make its event vanish."""
    relay = relay_for(store)
    broker = MemoryBroker()
    sends = [("a" * 32, "claimed"), ("b" * 32, "claimed"), ("a" * 32, "claimed")]
    outcomes = [
        await relay.handle(
            MemoryDelivery(
                MemoryMessage(envelope("board", cid, idempotency_scope=scope)), broker, 0.01
            )
        )
        for scope, cid in sends
    ]
    await settle(feed, 2)
    assert outcomes == ["delivered", "delivered", "duplicate"]
    assert [e.sequence for e in feed.of("board")] == [1, 2]
