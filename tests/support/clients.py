"""Protocol clients for tests: a WebSocket board client and an SSE reader, built on the probe's
(`realtime_probe`), and raw stalled clients for the slow-consumer tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from realtime_probe.sse import SseEvent, SseParser
from realtime_probe.websocket import BoardSocket


@dataclass
class SseStream:
    """Reads an SSE response in the background into a queue of parsed events (the probe's
    parser, `realtime_probe.sse`: one reading of the stream for the tool and the tests)."""

    response: httpx.Response
    events: asyncio.Queue[SseEvent] = field(default_factory=asyncio.Queue)
    parser: SseParser = field(default_factory=SseParser)

    @property
    def comments(self) -> int:
        return self.parser.comments

    async def pump(self) -> None:
        async for event in self.parser.events(self.response.aiter_lines()):
            await self.events.put(event)

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


class BoardClient(BoardSocket):
    """A WebSocket on one board that sorts the server's frames by kind (the probe's reader,
    `realtime_probe.websocket`, with a queue per kind)."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.frames: dict[str, asyncio.Queue[dict[str, Any]]] = {
            kind: asyncio.Queue() for kind in ("ack", "event", "error", "reset", "presence")
        }
        super().__init__(connection)

    async def deliver(self, frame: dict[str, Any]) -> None:
        # Kinds beyond the four (`expiring`, `presence`, …) get a queue of their own.
        await self.frames.setdefault(frame["kind"], asyncio.Queue()).put(frame)

    async def send(  # type: ignore[override]
        self,
        type_: str = "note.created",
        payload: dict[str, Any] | None = None,
        id_: str | None = None,
    ) -> str:
        correlation_id = id_ or uuid.uuid4().hex
        await super().send({"type": type_, "payload": payload or {}, "id": correlation_id})
        return correlation_id

    async def next(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.setdefault(kind, asyncio.Queue()).get(), timeout)


@contextlib.asynccontextmanager
async def board(url: str, **kwargs: Any) -> AsyncIterator[BoardClient]:
    async with websockets.connect(url, **kwargs) as connection:
        client = BoardClient(connection)
        try:
            yield client
        finally:
            await client.close()


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
