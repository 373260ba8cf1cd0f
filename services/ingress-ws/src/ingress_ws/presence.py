"""Counts each board's WebSocket connections across every ingress replica."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from redis.exceptions import RedisError

from ingress_ws.publisher import PresenceStore

log = structlog.get_logger("ingress_ws")


class BoardPresence:
    """Local counts are exact; totals across replicas are refreshed every `refresh` seconds
    and on every local join or leave, so `active_connections` is at most that stale."""

    def __init__(self, store: PresenceStore, instance: str, *, refresh: float = 1.0) -> None:
        self._store = store
        self._instance = instance
        self._refresh = refresh
        self._ttl = max(10 * refresh, 5.0)
        self.local: dict[str, int] = {}
        self._totals: dict[str, int] = {}

    @property
    def connections(self) -> int:
        return sum(self.local.values())

    def total(self, board_id: str) -> int:
        return max(self._totals.get(board_id, 0), self.local.get(board_id, 0))

    async def join(self, board_id: str) -> None:
        self.local[board_id] = self.local.get(board_id, 0) + 1
        await self._sync(board_id)

    async def leave(self, board_id: str) -> None:
        remaining = self.local.get(board_id, 0) - 1
        if remaining > 0:
            self.local[board_id] = remaining
        else:
            self.local.pop(board_id, None)
            self._totals.pop(board_id, None)
        await self._sync(board_id)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            for board_id in list(self.local):
                await self._sync(board_id)

    async def clear(self) -> None:
        for board_id in list(self.local):
            self.local.pop(board_id)
            await self._sync(board_id)

    async def _sync(self, board_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._store.set_presence(
                board_id, self._instance, self.local.get(board_id, 0), self._ttl
            )
            if board_id in self.local:
                total = await self._store.presence_total(board_id)
                # Checked again after the read: the board's last socket may have left during
                # it, and a total kept for a board with none here would never be dropped.
                if board_id in self.local:
                    self._totals[board_id] = total
