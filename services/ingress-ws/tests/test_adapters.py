"""`open_adapters`, the one place the transport is chosen: each setting gets its whole set."""

from __future__ import annotations

import contextlib

from ingress_ws.adapters import open_adapters
from ingress_ws.adapters.memory import MemoryPublisher
from ingress_ws.adapters.rabbitmq import RabbitPublisher
from ingress_ws.adapters.redis import RedisPresence
from ingress_ws.settings import IngressSettings
from limits.aio.storage import MemoryStorage, RedisStorage
from realtime_runtime.feed import RedisActivityStore
from realtime_runtime.memory import MemoryTransport


async def test_memory_wires_every_port_to_the_shared_stand_ins() -> None:
    transport = MemoryTransport()
    async with contextlib.AsyncExitStack() as stack:
        settings = IngressSettings(_env_file=None, event_transport="memory")
        adapters = open_adapters(settings, stack, transport)
    assert isinstance(adapters.publisher, MemoryPublisher)
    assert adapters.activity is transport.store and adapters.presence is transport.presence
    assert isinstance(adapters.rate_limits, MemoryStorage)
    assert not adapters.reports_brokers


async def test_rabbitmq_wires_rabbitmq_and_redis_without_connecting() -> None:
    async with contextlib.AsyncExitStack() as stack:
        settings = IngressSettings(_env_file=None, event_transport="rabbitmq")
        adapters = open_adapters(settings, stack, MemoryTransport())  # ignored: not memory
    assert isinstance(adapters.publisher, RabbitPublisher)
    assert isinstance(adapters.activity, RedisActivityStore)
    assert isinstance(adapters.presence, RedisPresence)
    assert isinstance(adapters.rate_limits, RedisStorage)
    assert adapters.reports_brokers
