"""ADVANCED_RABBITMQ_QUEUE_TYPE and the node list of ADVANCED_RABBITMQ_URL, on the test broker.

A queue of the other type stops the worker and the ingress at start-up with a message naming
the queue and the migration; quorum queues (one member on a single node) carry events end to
end; a process given a dead node first connects to the next and says so in /readyz.
"""

from __future__ import annotations

import asyncio

import aio_pika
import httpx
import pytest
from chaos.harness import Ledger, Sender, sse_board_url, sse_subscriber, stop_tasks, ws_url
from support.brokers import Brokers, Names
from support.processes import Suite, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]


@pytest.mark.timeout(150)
async def test_a_queue_of_the_other_type_stops_worker_and_ingress(
    suite: Suite, brokers: Brokers, names: Names
) -> None:
    queue = f"{names.env()['ADVANCED_RABBITMQ_QUEUE']}.0"
    connection = await aio_pika.connect(brokers.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        # What an earlier deployment with the default (classic) declared.
        await channel.declare_queue(
            queue,
            durable=True,
            arguments={
                "x-single-active-consumer": True,
                "x-dead-letter-exchange": f"{names.env()['ADVANCED_RABBITMQ_EXCHANGE']}.retry",
            },
        )
    for kind in ("worker", "ingress"):
        service = suite.start(kind, wait=False, ADVANCED_RABBITMQ_QUEUE_TYPE="quorum")
        assert service.process is not None
        code = await asyncio.to_thread(service.process.wait, 60)
        output = service.tail(60)
        assert code == 1, output
        assert f"RabbitMQ queue '{queue}' exists with another queue type" in output, output
        assert "ADVANCED_RABBITMQ_QUEUE_TYPE=quorum" in output
        assert "docs/operations.md" in output


@pytest.mark.timeout(150)
async def test_quorum_queues_through_a_node_list_whose_first_node_is_dead(
    suite: Suite, brokers: Brokers
) -> None:
    dead = f"amqp://guest:never-logged@127.0.0.1:{free_port()}/"
    env = {
        "ADVANCED_RABBITMQ_QUEUE_TYPE": "quorum",
        "ADVANCED_RABBITMQ_URL": f"{dead},{brokers.rabbitmq_url}",
    }
    worker = suite.start("worker", **env)
    ingress = suite.start("ingress", **env)
    gateway = suite.start("gateway")
    live = brokers.rabbitmq_url.rpartition("@")[2].strip("/")
    async with httpx.AsyncClient(timeout=10) as http:
        for service in (worker, ingress):
            ready = (await http.get(f"{service.url}/readyz")).json()
            assert ready["rabbitmq_node"] == live, ready

    board = "quorum-board"
    ledger = Ledger()
    listener = asyncio.create_task(
        sse_subscriber(ledger, "sse", sse_board_url(gateway, board), frozenset({board}))
    )
    try:
        await asyncio.sleep(1.0)
        async with Sender(ledger, ws_url(ingress, board), board) as sender:
            await sender.send_many(20, rate=50)
            await sender.wait_acked(30)
            await ledger.wait_complete(30)
    finally:
        failed = await stop_tasks([listener])
    assert not failed, failed
    (verdict, *_) = [v for v in ledger.verdicts() if v.subscriber == "sse"]
    assert verdict.clean and verdict.seen == 20, verdict.line()
    for service in (worker, ingress):
        assert "never-logged" not in (service.tail(400)), service.kind
