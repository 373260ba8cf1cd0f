"""The gateway's adapters, chosen once from `ADVANCED_EVENT_TRANSPORT`: Redis, or the
in-process stand-ins of one-process development and the unit tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from realtime_runtime.feed import ActivityStore, RedisActivityStore
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.presence import PresenceChanges, RedisPresenceChanges
from realtime_runtime.service import redis_client

from sse_gateway.settings import GatewaySettings


@dataclass(frozen=True)
class GatewayTransport:
    """What the streams read: the relayed events and the presence changes."""

    store: ActivityStore
    presence: PresenceChanges
    feed_flag: str  # the readiness flag that says the event feed is connected


@contextlib.asynccontextmanager
async def open_transport(
    settings: GatewaySettings, memory: MemoryTransport | None = None
) -> AsyncIterator[GatewayTransport]:
    """The transport the settings name; its client closes when the context ends."""
    if settings.event_transport == "memory":
        transport = memory or MemoryTransport()
        # No Redis to speak of: the flag names the feed itself.
        yield GatewayTransport(transport.store, transport.presence, "event_feed_connected")
        return
    client = redis_client(settings)
    try:
        yield GatewayTransport(
            RedisActivityStore(client, settings.redis_keys),
            RedisPresenceChanges(client, settings.redis_keys),
            "redis_connected",
        )
    finally:
        await client.aclose()
