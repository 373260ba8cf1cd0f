"""The worker's in-memory adapter: consumes the embedded broker with the same retry rules."""

from __future__ import annotations

import asyncio

from realtime_runtime.memory import MemoryBroker, MemoryMessage

from relay_worker.relay import Relay

ATTEMPTS = "x-advanced-attempts"


class MemoryDelivery:
    def __init__(self, message: MemoryMessage, broker: MemoryBroker, retry_delay: float) -> None:
        self.body = message.body
        self.attempts = int(message.headers.get(ATTEMPTS, 0))
        self._message = message
        self._broker = broker
        self._retry_delay = retry_delay

    async def ack(self) -> None:
        return None

    async def retry(self, reason: str) -> None:
        headers = {**self._message.headers, ATTEMPTS: self.attempts + 1}
        loop = asyncio.get_running_loop()
        loop.call_later(
            self._retry_delay, self._broker.queue.put_nowait, MemoryMessage(self.body, headers)
        )

    async def dead_letter(self, reason: str) -> None:
        headers = {
            **self._message.headers,
            "x-advanced-failure-reason": reason,
            ATTEMPTS: self.attempts + 1,
        }
        self._broker.dead_letters.append(MemoryMessage(self.body, headers))


async def consume_memory(broker: MemoryBroker, relay: Relay, retry_delay: float) -> None:
    while True:
        message = await broker.queue.get()
        delivery = MemoryDelivery(message, broker, retry_delay)
        delay = 0.01
        # Held by an infrastructure fault: the same message again, after a back-off, before
        # any message behind it (the RabbitMQ consumer pauses its partition likewise).
        while await relay.handle(delivery) == "held":
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
