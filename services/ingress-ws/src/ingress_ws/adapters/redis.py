"""Board presence in Redis: each ingress instance writes its own count with an expiry."""

from __future__ import annotations

import time
from typing import cast

import redis.asyncio as redis
from envelope.topology import RedisKeys


class RedisPresence:
    """`active_connections` across replicas: one hash per board, a field per instance.

    A field holds `count:expires_at_ms`; instances refresh theirs, and a crashed instance's
    field stops counting once it expires.
    """

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys

    async def set_presence(self, board_id: str, instance: str, count: int, ttl: float) -> None:
        key = self._keys.presence(board_id)
        if count:
            expires = int((time.time() + ttl) * 1000)
            await self._client.hset(key, instance, f"{count}:{expires}")
        else:
            await self._client.hdel(key, instance)

    async def presence_total(self, board_id: str) -> int:
        now = int(time.time() * 1000)
        total = 0
        fields = cast(dict[bytes, bytes], await self._client.hgetall(self._keys.presence(board_id)))
        for value in fields.values():
            count, _, expires = value.decode().partition(":")
            if int(expires) > now:
                total += int(count)
        return total
