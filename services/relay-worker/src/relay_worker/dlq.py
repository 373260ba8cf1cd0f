"""Operator commands for the dead-letter queue: list what is there, re-drive what is fixed."""

from __future__ import annotations

from typing import TextIO

import aio_pika
import orjson
from realtime_runtime.amqp import connect_nodes

from relay_worker.adapters.rabbitmq import (
    ATTEMPTS_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    dlq_messages,
)
from relay_worker.settings import WorkerSettings


async def list_dead_letters(settings: WorkerSettings, out: TextIO) -> int:
    """Print one JSON line per dead letter; every message stays in the DLQ."""
    connection = await connect_nodes(settings.rabbitmq_urls, "relay-worker dlq list")
    async with connection:
        async for _channel, message in dlq_messages(connection, settings.topology):
            headers = message.headers or {}
            line = {
                "id": message.message_id,
                "reason": headers.get(REASON_HEADER),
                "attempts": headers.get(ATTEMPTS_HEADER),
                "routing_key": headers.get(ROUTING_KEY_HEADER),
                "body": message.body.decode(errors="replace")[:500],
            }
            out.write(orjson.dumps(line).decode() + "\n")
    return 0


async def replay_dead_letters(settings: WorkerSettings, ids: set[str] | None, out: TextIO) -> int:
    """Publish the chosen dead letters back to the exchange with a fresh retry budget."""
    connection = await connect_nodes(settings.rabbitmq_urls, "relay-worker dlq replay")
    replayed = 0
    async with connection:
        async for channel, message in dlq_messages(connection, settings.topology):
            if ids is not None and message.message_id not in ids:
                continue
            headers = dict(message.headers or {})
            routing_key = str(headers.pop(ROUTING_KEY_HEADER, "") or "")
            for header in (REASON_HEADER, ATTEMPTS_HEADER, "x-death"):
                headers.pop(header, None)
            exchange = await channel.get_exchange(settings.rabbitmq_exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    message_id=message.message_id,
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=routing_key,
                mandatory=True,
            )
            await message.ack()
            replayed += 1
    out.write(f"replayed {replayed} dead letter(s)\n")
    return 0 if ids is None or replayed == len(ids) else 1
