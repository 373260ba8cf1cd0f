"""Faults of one message against faults of the infrastructure, on a real worker process.

- Poison that parses but cannot be relayed (an `occurred_at` without a UTC offset, a payload
  nested deeper than can be serialised again), published straight to a partition queue: DLQ
  at once with the reason, and the event behind it is relayed.
- Redis refusing writes while it answers PING (out of memory under `noeviction`; a READONLY
  replica): nothing is retried or dead-lettered, nothing is relayed, the partition pauses
  (`/readyz` 503, a metric), its leases lapse and its messages go back to RabbitMQ; once
  Redis takes writes again every acked event is relayed once, in order, and the DLQ is empty.
- A DLQ publish that RabbitMQ refuses (the DLQ queue is gone: the publish routes nowhere) or
  never confirms (the worker's link blackholed): the partition does not move past the
  message, retries the DLQ publish, and goes on once the DLQ takes it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import httpx
import orjson
import pytest
import redis.asyncio as redis
from chaos.harness import PrivateRedis, metric, scrape, start_all, wait_for
from envelope.topology import RedisKeys, Topology
from support.brokers import Brokers
from support.envelopes import board_event, envelope_body
from support.processes import Service, Suite
from support.proxy import TcpProxy

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

BOARD = "fault-board"
COUNT = 20
WORKER = {"ADVANCED_RABBITMQ_MAX_RETRIES": "2"}  # the ladder: 3 attempts, 0.3 s apart


def topology_of(suite: Suite) -> Topology:
    env = suite.env
    return Topology(
        exchange=env["ADVANCED_RABBITMQ_EXCHANGE"],
        queue=env["ADVANCED_RABBITMQ_QUEUE"],
        retry_queue=env["ADVANCED_RABBITMQ_RETRY_QUEUE"],
        dlq_queue=env["ADVANCED_RABBITMQ_DLQ_QUEUE"],
        partitions=int(env["ADVANCED_RABBITMQ_PARTITIONS"]),
    )


@contextlib.asynccontextmanager
async def amqp(brokers: Brokers) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(brokers.rabbitmq_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True, on_return_raises=True)


async def publish_to_partition(
    brokers: Brokers, topology: Topology, board: str, bodies: list[bytes]
) -> None:
    """Straight to the board's partition queue, each confirmed: what an `ack` means."""
    async with amqp(brokers) as channel:
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=topology.partition_queue(topology.partition_of(board)),
                mandatory=True,
            )


async def depth(brokers: Brokers, queue: str) -> int:
    async with amqp(brokers) as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def dead_letters(brokers: Brokers, topology: Topology) -> list[tuple[bytes, dict[str, Any]]]:
    """Every message in the DLQ (left there: the channel closes without acking them)."""
    found = []
    async with amqp(brokers) as channel:
        queue = await channel.declare_queue(topology.dlq_queue, passive=True)
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            found.append((message.body, dict(message.headers or {})))
    return found


async def relayed(client: redis.Redis, prefix: str, board: str) -> list[tuple[int, str]]:
    """(sequence, correlation id) of the board's stream in Redis, in stream order."""
    entries = await client.xrange(RedisKeys(prefix, "").board_stream(board))
    events = [orjson.loads(fields[b"e"]) for _id, fields in entries]
    return [(event["sequence"], event["correlation_id"]) for event in events]


async def readyz(worker: Service) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(f"{worker.url}/readyz")
        return answer.status_code, answer.json()


def nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for _ in range(depth - 1):
        payload = {"n": payload}
    return payload


def crafted(correlation_id: str, **fields: Any) -> bytes:
    data = {**board_event(BOARD, correlation_id).model_dump(mode="json"), **fields}
    return json.dumps(data).encode()  # the stdlib writes what orjson cannot (300 levels)


@pytest.mark.timeout(60)
async def test_poison_that_parses_is_dead_lettered_at_once_and_the_partition_goes_on(
    suite: Suite, brokers: Brokers
) -> None:
    worker = suite.start("worker", **WORKER)
    topology = topology_of(suite)
    client = redis.from_url(brokers.redis_url)
    try:
        await publish_to_partition(
            brokers,
            topology,
            BOARD,
            [
                crafted("naive-time", occurred_at="2026-01-01T12:00:00"),
                crafted("too-deep", payload=nested(300)),
                envelope_body(BOARD, "behind"),
            ],
        )
        prefix = suite.env["ADVANCED_REDIS_KEY_PREFIX"]

        async def behind_relayed() -> bool:
            return await relayed(client, prefix, BOARD) == [(1, "behind")]

        await wait_for(behind_relayed, 30, "the event behind the poison")
        letters = await dead_letters(brokers, topology)
    finally:
        await client.aclose()
    reasons = {orjson.loads(body)["correlation_id"]: h for body, h in letters}
    assert set(reasons) == {"naive-time", "too-deep"}
    assert "timezone" in reasons["naive-time"]["x-advanced-failure-reason"]
    assert "serialised again" in reasons["too-deep"]["x-advanced-failure-reason"]
    assert all(h["x-advanced-attempts"] == 1 for h in reasons.values())  # at once, no ladder
    samples = scrape(worker)
    assert metric(samples, "advanced_worker_partition_restarts_total") == 0
    assert metric(samples, "advanced_worker_events_total", outcome="retried") == 0


# ------------------------------------------------------------------ Redis refusing writes


FILLERS = 32


class OutOfMemory:
    """`noeviction` with a `maxmemory` the data already exceeds: PING answers, writes fail."""

    def __init__(self, directory: Path) -> None:
        self.redis = PrivateRedis(directory).start()
        self.url = self.redis.url

    async def refuse_writes(self) -> None:
        async with redis.from_url(self.url) as client:
            for n in range(FILLERS):  # 2 MiB of data, then a limit below what is used
                await client.set(f"filler:{n}", b"x" * (64 * 1024))
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(used - 1024 * 1024))
            with pytest.raises(redis.OutOfMemoryError):
                await client.set("probe", b"1")
            assert await client.ping()

    async def take_writes(self) -> None:
        async with redis.from_url(self.url) as client:
            await client.delete(*[f"filler:{n}" for n in range(FILLERS)])  # DEL works under OOM
            await client.set("probe", b"1")

    def stop(self) -> None:
        self.redis.stop()


class DemotedToReplica:
    """The worker's Redis becomes a replica of another (a failover seen from the old primary):
    READONLY for every write; promoted back with `REPLICAOF NO ONE`."""

    def __init__(self, directory: Path) -> None:
        self.redis = PrivateRedis(directory / "worker").start()
        self.primary = PrivateRedis(directory / "primary").start()
        self.url = self.redis.url

    async def refuse_writes(self) -> None:
        async with redis.from_url(self.url) as client:
            await client.replicaof("127.0.0.1", self.primary.port)
            with pytest.raises(redis.ReadOnlyError):
                await client.set("probe", b"1")
            assert await client.ping()

    async def take_writes(self) -> None:
        async with redis.from_url(self.url) as client:
            await client.replicaof("NO", "ONE")
            await client.set("probe", b"1")

    def stop(self) -> None:
        self.redis.stop()
        self.primary.stop()


@pytest.fixture(params=[OutOfMemory, DemotedToReplica], ids=["oom-noeviction", "readonly"])
def refusing_redis(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[OutOfMemory | DemotedToReplica]:
    fault = request.param(tmp_path)
    try:
        yield fault
    finally:
        fault.stop()


@pytest.mark.timeout(60)
async def test_redis_refusing_writes_pauses_the_partition_and_dead_letters_nothing(
    suite: Suite, brokers: Brokers, refusing_redis: OutOfMemory | DemotedToReplica
) -> None:
    worker = suite.start("worker", ADVANCED_REDIS_URL=refusing_redis.url, **WORKER)
    topology = topology_of(suite)
    partition_queue = topology.partition_queue(topology.partition_of(BOARD))
    prefix = suite.env["ADVANCED_REDIS_KEY_PREFIX"]
    ids = [f"e{n}" for n in range(COUNT)]

    await refusing_redis.refuse_writes()
    await publish_to_partition(brokers, topology, BOARD, [envelope_body(BOARD, i) for i in ids])

    async def paused() -> bool:
        return metric(scrape(worker), "advanced_worker_partitions_paused") >= 1

    await wait_for(paused, 20, "the partition to pause")
    status, flags = await readyz(worker)
    assert status == 503 and flags["relay_flowing"] is False, flags
    assert flags["redis_connected"] is True  # PING answers: it is not a write

    # The lease renewal writes too: the worker lets its leases lapse and hands the held
    # messages back to RabbitMQ, in order, unsettled. That takes a lease period (3 s),
    # longer than the whole retry ladder (3 attempts 0.3 s apart).
    async def handed_back() -> bool:
        owned = metric(scrape(worker), "advanced_worker_partitions_owned")
        return owned == 0 and await depth(brokers, partition_queue) == COUNT

    await wait_for(handed_back, 20, "the held messages back in their queue")
    assert await depth(brokers, topology.dlq_queue) == 0
    assert await depth(brokers, topology.retry_queue) == 0
    samples = scrape(worker)
    assert metric(samples, "advanced_worker_infrastructure_faults_total", source="redis") >= 1
    assert metric(samples, "advanced_worker_events_total", outcome="retried") == 0
    assert metric(samples, "advanced_worker_events_total", outcome="dead_lettered") == 0

    await refusing_redis.take_writes()
    client = redis.from_url(refusing_redis.url)
    try:

        async def all_relayed() -> bool:
            return len(await relayed(client, prefix, BOARD)) >= COUNT

        await wait_for(all_relayed, 30, "every held event relayed")
        history = await relayed(client, prefix, BOARD)
    finally:
        await client.aclose()
    assert history == list(enumerate(ids, start=1))  # each once, in order, gapless

    async def ready_again() -> bool:
        return (await readyz(worker))[0] == 200

    await wait_for(ready_again, 20, "/readyz 200 once writes succeed")
    assert await depth(brokers, topology.dlq_queue) == 0
    samples = scrape(worker)
    assert metric(samples, "advanced_worker_partitions_paused") == 0
    assert metric(samples, "advanced_worker_events_total", outcome="dead_lettered") == 0


# --------------------------------------------------------------- a refused DLQ publish


@pytest.mark.timeout(60)
async def test_a_refused_dlq_publish_holds_the_partition_until_the_dlq_takes_it(
    suite: Suite, brokers: Brokers
) -> None:
    worker = suite.start("worker", **WORKER)
    topology = topology_of(suite)
    prefix = suite.env["ADVANCED_REDIS_KEY_PREFIX"]
    async with amqp(brokers) as channel:
        await channel.queue_delete(topology.dlq_queue)  # a dead letter now routes nowhere
    await publish_to_partition(
        brokers, topology, BOARD, [b"{not json", envelope_body(BOARD, "behind")]
    )
    client = redis.from_url(brokers.redis_url)
    try:

        async def dlq_publish_retried() -> bool:
            samples = scrape(worker)
            faults = metric(
                samples, "advanced_worker_infrastructure_faults_total", source="rabbitmq"
            )
            return faults >= 2 and metric(samples, "advanced_worker_partitions_paused") == 1

        await wait_for(dlq_publish_retried, 20, "the refused DLQ publish to be retried")
        # The partition has not moved past the message it could not settle.
        assert await relayed(client, prefix, BOARD) == []
        status, flags = await readyz(worker)
        assert status == 503 and flags["relay_flowing"] is False, flags

        async with amqp(brokers) as channel:
            await channel.declare_queue(topology.dlq_queue, durable=True)

        async def behind_relayed() -> bool:
            return await relayed(client, prefix, BOARD) == [(1, "behind")]

        await wait_for(behind_relayed, 20, "the event behind the dead letter")
    finally:
        await client.aclose()
    letters = await dead_letters(brokers, topology)
    assert [body for body, _headers in letters] == [b"{not json"]
    assert "not JSON" in letters[0][1]["x-advanced-failure-reason"]
    assert metric(scrape(worker), "advanced_worker_partitions_paused") == 0


@pytest.mark.timeout(60)
async def test_a_dlq_publish_rabbitmq_never_confirms_holds_the_partition(
    suite: Suite, brokers: Brokers
) -> None:
    """The worker's link to RabbitMQ goes silent under a dead letter: no confirm within the
    timeout is a refusal; the partition does not move past the message; once the link is cut
    RabbitMQ redelivers it in order and it reaches the DLQ once."""
    target = urlsplit(brokers.rabbitmq_url)
    proxy = await TcpProxy(target.hostname or "127.0.0.1", target.port or 5672).start()
    through_proxy = target._replace(
        netloc=f"{target.netloc.rpartition('@')[0]}@127.0.0.1:{proxy.port}"
    )
    worker = suite.start(
        "worker",
        ADVANCED_RABBITMQ_URL=through_proxy.geturl(),
        ADVANCED_RABBITMQ_CONFIRM_TIMEOUT_SECONDS="1",
        wait=False,
        **WORKER,
    )
    await start_all([worker])  # in a thread: the proxy runs on this loop
    topology = topology_of(suite)
    prefix = suite.env["ADVANCED_REDIS_KEY_PREFIX"]
    client = redis.from_url(brokers.redis_url)
    try:
        # First refused (the DLQ is gone), so that the dead letter is in hand when the
        # link goes silent.
        async with amqp(brokers) as channel:
            await channel.queue_delete(topology.dlq_queue)
        await publish_to_partition(
            brokers, topology, BOARD, [b"{not json", envelope_body(BOARD, "behind")]
        )

        def faults() -> float:
            return metric(
                scrape(worker), "advanced_worker_infrastructure_faults_total", source="rabbitmq"
            )

        async def refused() -> bool:
            return faults() >= 1

        await wait_for(refused, 20, "the first refused DLQ publish")
        proxy.blackhole()
        refused_before = faults()
        async with amqp(brokers) as channel:
            await channel.declare_queue(topology.dlq_queue, durable=True)

        async def unconfirmed_twice() -> bool:
            return faults() >= refused_before + 2

        await wait_for(unconfirmed_twice, 20, "two DLQ publishes left unconfirmed")
        assert await relayed(client, prefix, BOARD) == []
        assert await depth(brokers, topology.dlq_queue) == 0

        proxy.cut()  # the silent link is reset: the robust connection reconnects

        async def behind_relayed() -> bool:
            return await relayed(client, prefix, BOARD) == [(1, "behind")]

        await wait_for(behind_relayed, 30, "the event behind the dead letter")
    finally:
        await client.aclose()
        await proxy.stop()
    letters = await dead_letters(brokers, topology)
    assert [body for body, _headers in letters] == [b"{not json"]
