"""Minimal protocol clients for tests: a WebSocket board client and an SSE reader."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets


@dataclass
class SseEvent:
    event: str = "message"
    id: str | None = None
    data: str = ""

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class SseStream:
    """Reads an SSE response in the background into a queue of parsed events."""

    response: httpx.Response
    events: asyncio.Queue[SseEvent] = field(default_factory=asyncio.Queue)
    comments: int = 0

    async def pump(self) -> None:
        current = SseEvent()
        has_field = False
        async for line in self.response.aiter_lines():
            if line == "":
                if has_field:
                    await self.events.put(current)
                current, has_field = SseEvent(), False
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            has_field = True
            if name == "event":
                current.event = value
            elif name == "id":
                current.id = value
            elif name == "data":
                current.data = value if not current.data else current.data + "\n" + value

    async def next(self, timeout: float = 10.0, kind: str = "activity") -> SseEvent:
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event.event == kind:
                return event


@contextlib.asynccontextmanager
async def sse(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[SseStream]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        async with client.stream("GET", url, headers=headers or {}) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            stream = SseStream(response)
            task = asyncio.create_task(stream.pump())
            try:
                yield stream
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await task


class BoardClient:
    """A WebSocket on one board that sorts the server's frames by kind."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection
        self.frames: dict[str, asyncio.Queue[dict[str, Any]]] = {
            kind: asyncio.Queue() for kind in ("ack", "event", "error", "reset", "presence")
        }
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.connection:
                frame = orjson.loads(raw)
                # Kinds beyond the four (`expiring`, `presence`, …) get a queue of their own.
                await self.frames.setdefault(frame["kind"], asyncio.Queue()).put(frame)

    async def send(
        self,
        type_: str = "note.created",
        payload: dict[str, Any] | None = None,
        id_: str | None = None,
    ) -> str:
        correlation_id = id_ or uuid.uuid4().hex
        await self.connection.send(
            orjson.dumps({"type": type_, "payload": payload or {}, "id": correlation_id}).decode()
        )
        return correlation_id

    async def next(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.setdefault(kind, asyncio.Queue()).get(), timeout)

    async def close(self) -> None:
        await self.connection.close()
        self._task.cancel()


@contextlib.asynccontextmanager
async def board(url: str, **kwargs: Any) -> AsyncIterator[BoardClient]:
    async with websockets.connect(url, **kwargs) as connection:
        client = BoardClient(connection)
        try:
            yield client
        finally:
            client._task.cancel()


async def stalled_sse(
    port: int, board: str, token: str, last_event_id: str | None = None
) -> socket.socket:
    """An SSE client that reads the response head and then nothing: its receive buffer is
    tiny, so the server's writes back up at once. With `last_event_id` it resumes first."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    resume = "" if last_event_id is None else f"Last-Event-ID: {last_event_id}\r\n"
    request = f"GET /sse/boards/{board}?token={token} HTTP/1.1\r\nHost: x\r\n{resume}\r\n"
    await loop.sock_sendall(sock, request.encode())
    head = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


async def stalled_websocket(port: int, path: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then reads nothing (a tiny receive
    buffer, as `stalled_sse`): the server's writes back up at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
