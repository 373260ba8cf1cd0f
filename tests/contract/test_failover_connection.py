"""The node-list connection (realtime_runtime.amqp) on the real RabbitMQ, reached through two TCP
proxies that stand for two nodes: when the node in use goes away the connection moves to the
other, the worker's partition consumer is restored there, the deliveries of the dead channel
are never settled on the new one (their tags belong to the old channel) and come again; a
consumer the broker cancels (basic.cancel) is consumed again once its queue is back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
from realtime_runtime.amqp import FailoverConnection, connect_nodes
from relay_worker.adapters.rabbitmq import PartitionInbox, partition_messages
from support.brokers import Brokers
from support.proxy import TcpProxy

pytestmark = [pytest.mark.brokers]


@pytest.fixture
async def queue_name(brokers: Brokers) -> AsyncIterator[str]:
    name = f"t.failover.{uuid.uuid4().hex[:12]}"
    connection = await aio_pika.connect(brokers.rabbitmq_url)
    async with connection:
        await (await connection.channel()).declare_queue(name, durable=True)
    yield name
    connection = await aio_pika.connect(brokers.rabbitmq_url)
    async with connection:
        await (await connection.channel()).queue_delete(name)


async def publish(brokers: Brokers, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(brokers.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


async def next_message(inbox: PartitionInbox) -> aio_pika.abc.AbstractIncomingMessage:
    async with asyncio.timeout(30):
        batch = await inbox.next_batch(1)
    assert batch is not None
    return batch[0]


async def test_the_connection_moves_to_the_next_node_and_restores_the_consumer(
    brokers: Brokers, queue_name: str
) -> None:
    target = urlsplit(brokers.rabbitmq_url)
    nodes = [
        await TcpProxy(target.hostname or "127.0.0.1", target.port or 5672).start()
        for _ in range(2)
    ]
    credentials = brokers.rabbitmq_url.partition("//")[2].partition("@")[0]
    urls = [f"amqp://{credentials}@127.0.0.1:{node.port}/" for node in nodes]
    connection = await connect_nodes(urls, "failover contract test")
    try:
        assert isinstance(connection, FailoverConnection)
        assert connection.node == f"127.0.0.1:{nodes[0].port}"
        async with partition_messages(connection, queue_name, prefetch=8) as (channel, queue):
            inbox = PartitionInbox(channel)
            await queue.consume(inbox.deliver)
            await publish(brokers, queue_name, b"first")
            first = await next_message(inbox)
            assert first.body == b"first"
            old_channel = first.channel

            await nodes[0].stop()  # the node dies: connections reset, nothing accepted

            second = await next_message(inbox)  # redelivered, on the channel of the next node
            assert connection.node == f"127.0.0.1:{nodes[1].port}"
            assert second.body == b"first" and second.redelivered
            assert old_channel.is_closed and second.channel is not old_channel
            # The worker never acks a delivery of a closed channel (consumer._channel_lost).
            await second.ack()
            await publish(brokers, queue_name, b"after")
            assert (await next_message(inbox)).body == b"after"
            inbox.close()
    finally:
        await connection.close()
        for node in nodes:
            await node.stop()


@pytest.mark.timeout(60)
async def test_a_consumer_cancelled_by_the_broker_consumes_again(
    brokers: Brokers, queue_name: str
) -> None:
    connection = await connect_nodes([brokers.rabbitmq_url], "cancel contract test")
    try:
        async with partition_messages(connection, queue_name, prefetch=8) as (channel, queue):
            inbox = PartitionInbox(channel)
            await queue.consume(inbox.deliver)
            # Deleting the queue makes RabbitMQ send basic.cancel to its consumer; declared
            # again (as the worker's topology does), the consumer is restored on its channel.
            admin = await aio_pika.connect(brokers.rabbitmq_url)
            async with admin:
                setup = await admin.channel()
                await setup.queue_delete(queue_name)
                await asyncio.sleep(0.5)
                await setup.declare_queue(queue_name, durable=True)
            await publish(brokers, queue_name, b"after the cancel")
            message = await next_message(inbox)
            assert message.body == b"after the cancel"
            await message.ack()
            inbox.close()
    finally:
        await connection.close()
