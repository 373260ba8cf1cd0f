"""Stopping the ingress while its first RabbitMQ connect is under way."""

from __future__ import annotations

import asyncio

import pytest
from envelope.topology import Topology
from ingress_ws.adapters.rabbitmq import RabbitPublisher
from support.brokers import Brokers, Names

pytestmark = pytest.mark.brokers


def reconnect_loops() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if "connection_factory" in repr(task.get_coro()) and not task.done()
    ]


async def test_close_stops_a_connect_in_progress(brokers: Brokers, names: Names) -> None:
    # aio-pika's robust connection keeps reconnecting after its connect() is cancelled unless
    # the connection itself is closed: a service stopped at that moment (its port was taken)
    # never exited.
    env = names.env()
    topology = Topology(
        exchange=env["ADVANCED_RABBITMQ_EXCHANGE"],
        queue=env["ADVANCED_RABBITMQ_QUEUE"],
        retry_queue=env["ADVANCED_RABBITMQ_RETRY_QUEUE"],
        dlq_queue=env["ADVANCED_RABBITMQ_DLQ_QUEUE"],
        partitions=4,
    )
    publisher = RabbitPublisher([brokers.rabbitmq_url], topology)
    connecting = asyncio.create_task(publisher.connect())
    await asyncio.sleep(0)  # the connect has started its reconnect loop
    connecting.cancel()
    async with asyncio.timeout(10):
        await publisher.close()
        while reconnect_loops():
            await asyncio.sleep(0.01)
    assert connecting.cancelled()
