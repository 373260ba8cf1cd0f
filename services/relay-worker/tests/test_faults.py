"""Faults of one message against faults of the infrastructure, on the in-memory adapters.

Whatever one delivery raises at any step (decode, validation, preparation, serialisation,
the Redis step, settling it), `handle_batch` raises nothing: a fault of the message ends in
the retry queue or the DLQ and the deliveries behind it go on; an infrastructure fault holds
that delivery and every one behind it, unsettled and in order, and they relay in order once
the fault is gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import orjson
import pytest
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError
from envelope.codec import RelayedEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic
from prometheus_client import CollectorRegistry
from realtime_runtime.memory import MemoryBroker, MemoryMessage, MemoryStore, RelayOutcome
from redis import exceptions as redis_errors
from relay_worker import relay as relay_module
from relay_worker.adapters.memory import ATTEMPTS, MemoryDelivery, consume_memory
from relay_worker.faults import ReplicationNotConfirmed, redis_fault
from relay_worker.relay import Relay, RelayMetrics
from relay_worker.settings import WorkerSettings
from support.envelopes import board_event

# -------------------------------------------------------------------- the classification

INFRASTRUCTURE = [
    redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    redis_errors.ReadOnlyError("You can't write against a read only replica."),
    redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."),
    redis_errors.ResponseError("BUSY Redis is busy running a script."),
    redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write."),
    redis_errors.ConnectionError("Connection closed by server."),
    redis_errors.TimeoutError("Timeout reading from socket"),
    redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
    redis_errors.NoScriptError("No matching script."),
    ReplicationNotConfirmed("WAIT: 0 of 1 replicas acknowledged the relay step"),
    # Redis Cluster: a slot served elsewhere, or by nobody during a failover.
    redis_errors.MovedError("3999 127.0.0.1:6381"),
    redis_errors.ResponseError("MOVED 3999 127.0.0.1:6381"),
    redis_errors.ResponseError("ASK 3999 127.0.0.1:6381"),
    redis_errors.ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
    redis_errors.ClusterDownError("The cluster is down"),
    redis_errors.SlotNotCoveredError('Slot "3999" is not covered by the cluster.'),
    ConnectionResetError("reset by peer"),
    TimeoutError(),
]
OF_THE_MESSAGE = [
    redis_errors.ResponseError("value is not an integer or out of range script: 1, on @x:3."),
    redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
    redis_errors.ResponseError("BUSYKEY Target key name already exists."),
    redis_errors.DataError("Invalid input of type: 'NoneType'."),
    RuntimeError("a bug that this message's content triggers"),
    ValueError("bad"),
    KeyError("k"),
]


@pytest.mark.parametrize("error", INFRASTRUCTURE, ids=repr)
def test_redis_refusing_or_losing_the_write_is_an_infrastructure_fault(error: Exception) -> None:
    assert redis_fault(error)


@pytest.mark.parametrize("error", OF_THE_MESSAGE, ids=repr)
def test_other_failures_belong_to_the_message(error: Exception) -> None:
    assert not redis_fault(error)


# ---------------------------------------------------------------------- the machinery

MAX_RETRIES = 3


def relay_for(store: MemoryStore) -> Relay:
    settings_ = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        event_transport="memory",
        rabbitmq_max_retries=MAX_RETRIES,
        rabbitmq_retry_delay_ms=10,
    )
    return Relay(store, settings_, RelayMetrics(CollectorRegistry()))


def body(board: str, correlation_id: str, **fields: Any) -> bytes:
    data = {**board_event(board, correlation_id).model_dump(mode="json"), **fields}
    return json.dumps(data).encode()  # the stdlib writes what orjson cannot (300 levels)


def nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for _ in range(depth - 1):
        payload = {"n": payload}
    return payload


class FaultyStore(MemoryStore):
    """The memory store, whose relay step raises `faults[correlation_id]` while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[str, Exception] = {}

    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome:
        fault = self.faults.get(correlation_id)
        if fault is not None:
            raise fault
        return await super().relay(board_id, correlation_id, body, ttl_seconds)


class PipelinedFaultyStore(FaultyStore):
    """The same, with `relay_many` as `RedisRelayStore` offers it: one result or exception per
    step; a lost connection fails the whole pipeline; a lasting refusal (OOM, READONLY) fails
    every step from the first refused one on, as Redis does."""

    async def relay_many(
        self, steps: list[tuple[str, str, bytes]], ttl_seconds: int
    ) -> list[RelayOutcome | BaseException]:
        results: list[RelayOutcome | BaseException] = []
        for board_id, correlation_id, body in steps:
            fault = self.faults.get(correlation_id)
            if isinstance(fault, (redis_errors.ConnectionError, OSError)):
                raise fault
            if results and isinstance(results[-1], BaseException) and redis_fault(results[-1]):
                results.append(results[-1])
                continue
            try:
                results.append(await self.relay(board_id, correlation_id, body, ttl_seconds))
            except Exception as exc:
                results.append(exc)
        return results


class Recorded:
    """A delivery that writes down how it was settled; settling raises `refuse` if set."""

    def __init__(self, name: str, body: bytes, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.body = body
        self.attempts = 0
        self.refuse: Exception | None = None
        self._log = log

    def _settle(self, how: str) -> None:
        if self.refuse is not None:
            raise self.refuse
        self._log.append((how, self.name))

    async def ack(self) -> None:
        self._settle("ack")

    async def retry(self, reason: str) -> None:
        self._settle("retry")

    async def dead_letter(self, reason: str) -> None:
        self._settle("dead_letter")


# Each delivery of a generated batch is good or carries one fault, at one step.
BAD_BODIES: dict[str, Callable[[str], bytes]] = {
    "not_json": lambda cid: b"{" + cid.encode(),
    "not_an_object": lambda cid: b"[1]",
    "unknown_major": lambda cid: body("p", cid, schema_version="2"),
    "invalid_board": lambda cid: body("p", cid, board_id="x\n"),
    "naive_occurred_at": lambda cid: body("p", cid, occurred_at="2026-01-01T00:00:00"),
    "too_deep_to_serialise": lambda cid: body("p", cid, payload=nested(300)),
    "preparation_raises": lambda cid: body("prep-fails", cid),
}
KINDS = ["good", "store_message_fault", "store_infra_fault", "settle_refused", *BAD_BODIES]


def failing_activity_body(envelope: Any, *args: Any) -> bytes:
    if envelope.board_id == "prep-fails":
        raise RuntimeError("an unexpected failure while preparing this event")
    return original_activity_body(envelope, *args)


original_activity_body = relay_module.activity_body


@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=8),
    infra=st.sampled_from(INFRASTRUCTURE),
    message_fault=st.sampled_from(OF_THE_MESSAGE),
    pipelined=st.booleans(),
    refusal=st.sampled_from(
        [
            DeliveryError(None, Basic.Nack(delivery_tag=1)),  # the DLQ refused the publish
            ChannelInvalidStateError("closed"),
            TimeoutError(),  # no confirm in time
        ]
    ),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_fault_of_any_step_escapes_and_each_ends_where_it_belongs(
    kinds: list[str],
    infra: Exception,
    message_fault: Exception,
    pipelined: bool,
    refusal: Exception,
) -> None:
    with patch.object(relay_module, "activity_body", failing_activity_body):
        asyncio.run(_scenario(kinds, infra, message_fault, refusal, pipelined))


async def _scenario(
    kinds: list[str],
    infra: Exception,
    message_fault: Exception,
    refusal: Exception,
    pipelined: bool,
) -> None:
    store = PipelinedFaultyStore() if pipelined else FaultyStore()
    relay = relay_for(store)
    log: list[tuple[str, str]] = []
    deliveries = []
    for n, kind in enumerate(kinds):
        cid = f"m{n}"
        make = BAD_BODIES.get(kind)
        delivery = Recorded(cid, make(cid) if make else body("board", cid), log)
        if kind == "store_message_fault":
            store.faults[cid] = message_fault
        elif kind == "store_infra_fault":
            store.faults[cid] = infra
        elif kind == "settle_refused":
            delivery.refuse = refusal
        deliveries.append(delivery)

    outcomes = await relay.handle_batch(deliveries)  # never raises

    assert len(outcomes) == len(kinds)
    infra_at = [n for n, k in enumerate(kinds) if k in ("store_infra_fault", "settle_refused")]
    held = [n for n, o in enumerate(outcomes) if o == "held"]
    if not infra_at:
        assert not held
    else:
        # Held from the first infrastructure fault (or the start of its run of acks) on.
        assert held and held == list(range(held[0], len(kinds))) and held[0] <= infra_at[0]
    expected = {
        "good": "delivered",
        "store_message_fault": "retried",
        **dict.fromkeys(BAD_BODIES, "dead_lettered"),
    }
    settled_by_name = {name: how for how, name in log}
    for n, (kind, outcome) in enumerate(zip(kinds, outcomes, strict=True)):
        if outcome == "held":
            continue
        assert outcome == expected[kind], (n, kind)
        how = {"delivered": "ack", "retried": "retry", "dead_lettered": "dead_letter"}[outcome]
        assert settled_by_name[f"m{n}"] == how
    # Settled in queue order, each once, and none of the held was retried or dead-lettered.
    names = [name for _how, name in log]
    assert names == sorted(set(names), key=lambda name: int(name[1:]))
    assert all(how == "ack" for how, name in log if outcomes[int(name[1:])] == "held")

    # The fault clears: the held deliveries, handed over again, are settled in order and the
    # good events reach the board in queue order, each once.
    store.faults = {cid: fault for cid, fault in store.faults.items() if fault is message_fault}
    for delivery in deliveries:
        delivery.refuse = None
    if held:
        again = await relay.handle_batch(deliveries[held[0] :])
        assert "held" not in again
    relayable = ("good", "settle_refused", "store_infra_fault")
    good = [f"m{n}" for n, kind in enumerate(kinds) if kind in relayable]
    board = await store.board_after("board", 0)
    assert [orjson.loads(e.event)["correlation_id"] for e in board] == good
    assert [e.sequence for e in board] == list(range(1, len(good) + 1))


# ------------------------------------------------------------------ named regressions


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"occurred_at": "2026-01-01T00:00:00"}, "timezone"),
        ({"payload": nested(300)}, "cannot be serialised again"),
    ],
    ids=["occurred_at without a UTC offset", "payload nested deeper than orjson writes"],
)
async def test_an_envelope_that_parses_but_cannot_be_relayed_is_dead_lettered_at_once(
    fields: dict[str, Any], reason: str
) -> None:
    store = MemoryStore()
    broker = MemoryBroker()
    relay = relay_for(store)
    poison = MemoryDelivery(MemoryMessage(body("b", "poison", **fields)), broker, 0.01)
    behind = MemoryDelivery(MemoryMessage(body("b", "behind")), broker, 0.01)

    assert await relay.handle_batch([poison, behind]) == ["dead_lettered", "delivered"]
    [letter] = broker.dead_letters
    assert reason in str(letter.headers["x-advanced-failure-reason"])
    assert letter.headers[ATTEMPTS] == 1
    assert [e.sequence for e in await store.board_after("b", 0)] == [1]


async def test_redis_refusing_writes_holds_the_events_in_order_and_dead_letters_none() -> None:
    """Redis out of memory for longer than the whole retry ladder: nothing is retried or
    dead-lettered, and once it takes writes every event is relayed once, in order."""

    class OutOfMemory(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.refusing = True
            self.refused: dict[str, int] = {}

        async def relay(
            self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
        ) -> RelayOutcome:
            if self.refusing:
                self.refused[correlation_id] = self.refused.get(correlation_id, 0) + 1
                raise redis_errors.OutOfMemoryError("command not allowed when used memory")
            return await super().relay(board_id, correlation_id, body, ttl_seconds)

    store = OutOfMemory()
    broker = MemoryBroker()
    relayed: list[RelayedEvent] = []
    listening = asyncio.Event()

    async def listen() -> None:
        async with store.feed() as frames:
            listening.set()
            async for frame in frames:
                relayed.append(RelayedEvent.from_frame(frame))

    listener = asyncio.create_task(listen())
    consumer = asyncio.create_task(consume_memory(broker, relay_for(store), 0.01))
    try:
        await listening.wait()
        for n in range(20):
            await broker.publish(body("oom", f"e{n}"))
        async with asyncio.timeout(5):
            # Past where the retry ladder would have dead-lettered it.
            while store.refused.get("e0", 0) <= MAX_RETRIES + 1:
                await asyncio.sleep(0.01)
        assert not relayed and not broker.dead_letters
        assert set(store.refused) == {"e0"}  # the events behind it wait, untouched
        store.refusing = False
        async with asyncio.timeout(5):
            while len(relayed) < 20:
                await asyncio.sleep(0.01)
    finally:
        consumer.cancel()
        listener.cancel()
    assert not broker.dead_letters
    assert [json.loads(e.event)["correlation_id"] for e in relayed] == [f"e{n}" for n in range(20)]
    assert [e.sequence for e in relayed] == list(range(1, 21))
