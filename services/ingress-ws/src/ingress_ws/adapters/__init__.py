"""The one place the ingress picks its adapters: `ADVANCED_EVENT_TRANSPORT` says which set."""

from __future__ import annotations

import contextlib

from realtime_runtime.feed import RedisActivityStore
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.service import redis_client

from ingress_ws.adapters.memory import memory_adapters
from ingress_ws.adapters.rabbitmq import RabbitPublisher
from ingress_ws.adapters.redis import (
    RedisPresence,
    close_rate_limit_storage,
    redis_rate_limit_storage,
)
from ingress_ws.ports import Adapters
from ingress_ws.settings import IngressSettings


def open_adapters(
    settings: IngressSettings,
    stack: contextlib.AsyncExitStack,
    memory: MemoryTransport | None = None,
) -> Adapters:
    """The ports for `settings`, their clients closed by `stack`.

    In memory they share `memory`, the stand-ins of the other services in this process
    (a fresh set when none is given); otherwise RabbitMQ and Redis.
    """
    if settings.event_transport == "memory":
        adapters = memory_adapters(memory or MemoryTransport())
    else:
        client = redis_client(settings)
        stack.push_async_callback(client.aclose)
        rate_limits = redis_rate_limit_storage(settings)
        stack.push_async_callback(close_rate_limit_storage, rate_limits)
        adapters = Adapters(
            publisher=RabbitPublisher(settings.rabbitmq_urls, settings.topology),
            activity=RedisActivityStore(client, settings.redis_keys),
            presence=RedisPresence(client, settings.redis_keys),
            rate_limits=rate_limits,
            reports_brokers=True,
        )
    stack.push_async_callback(adapters.publisher.close)
    return adapters
