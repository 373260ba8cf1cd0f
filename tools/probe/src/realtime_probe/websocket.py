"""The one board WebSocket reader of the repository: the probe's socket, and the base of the
tests' `BoardClient` (`tests/support/clients.py`)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection


@dataclass(frozen=True)
class Closed:
    """The end of a feed: the WebSocket's close code, or the SSE stream's end (no code)."""

    code: int | None
    reason: str


class BoardSocket:
    """A WebSocket on one board. A background task reads every JSON object frame into
    `received`, then a `Closed`; a subclass sorts them otherwise by overriding `deliver`."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.received: asyncio.Queue[dict[str, Any] | Closed] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                try:
                    frame = orjson.loads(raw)
                except ValueError:
                    continue  # not the contract's JSON: nothing a reader could use
                if isinstance(frame, dict):
                    await self.deliver(frame)
        except websockets.ConnectionClosed:
            pass
        await self.deliver_close(
            Closed(self.connection.close_code, self.connection.close_reason or "")
        )

    async def deliver(self, frame: dict[str, Any]) -> None:
        await self.received.put(frame)

    async def deliver_close(self, closed: Closed) -> None:
        await self.received.put(closed)

    async def send(self, frame: dict[str, Any]) -> None:
        """One frame as JSON text; raises `websockets.ConnectionClosed` on a closed socket."""
        await self.connection.send(orjson.dumps(frame).decode())

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.connection.close()
