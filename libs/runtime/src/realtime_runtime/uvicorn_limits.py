"""uvicorn's protocol classes with the limits uvicorn leaves open, and lighter per-connection state.

uvicorn has no public way to bound a request head that never completes (slowloris), a client
that stops reading, ping floods or silent sockets, nor to trade the Events, queue and deque it
allocates per connection (held for hours by idle WebSockets and SSE streams) for lighter ones.
So this module subclasses its protocols and relies on their private attributes and methods:
all of that is here and nowhere else. uvicorn is pinned below the next minor in the `http`
extra, and `libs/runtime/tests/test_uvicorn_limits.py` checks every private name used here on
the installed uvicorn, so an upgrade that breaks an assumption fails there first.

What is relied on, by protocol:
- httptools (`HttpToolsProtocol`): `flow._is_writable_event` (an Event), `pipeline` (a deque
  used with `appendleft`/`pop`), `cycle.message_event`, `cycle.response_complete`, and the
  parser callbacks `on_message_begin`, `on_headers_complete`, `on_message_complete`, plus
  `handle_websocket_upgrade`.
- sans-I/O websockets (`WebSocketsSansIOProtocol`): `queue`, `writable`, `close_timeout`,
  `conn`, `frames`, `curr_msg_data_type`, `close_sent`, `disconnected`, `handshake_complete`,
  `request`, `response`, and the dispatch of `handle_events` to `handle_connect`,
  `handle_text`, `handle_cont`, `handle_bytes`, `handle_ping`, `handle_pong`, `handle_close`
  (re-implemented here so that pings are counted before their pongs are written).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, cast

# The name these protocols have always logged under (they lived in `security` before).
log = logging.getLogger("realtime_runtime.security")

CLOSE_HANDSHAKE_SECONDS = 4.0


def hardened_http_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a deadline for each request's head and body.

    uvicorn has no such timeout: a client that opens a connection and sends a request slowly, or
    never finishes it, holds a connection (and a file descriptor) for ever. Past the deadline the
    client gets `408` when nothing was answered yet, and the connection is closed.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutHttpProtocol(HttpToolsProtocol):
        # Also: lighter stand-ins for the Events uvicorn makes per connection and per request
        # (an SSE stream holds both for hours).
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow._is_writable_event = cast(asyncio.Event, _Flag(True))
            self.pipeline = cast("deque[Any]", _Pipeline())  # nothing pipelined yet
            self._arm()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.cycle is not None:  # not waited on yet: the request's task has not run
                self.cycle.message_event = cast(asyncio.Event, _Flag())

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def handle_websocket_upgrade(self) -> None:
            self._disarm()
            super().handle_websocket_upgrade()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._request_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _expired(self) -> None:
            self._request_timer = None
            if self.transport.is_closing():
                return
            log.info("closing a connection whose request did not arrive in %ss", header_timeout)
            if self.cycle is None or self.cycle.response_complete:
                body = b"The request did not arrive in time."
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                )
            self.transport.close()

    return HeaderTimeoutHttpProtocol


class _Flag:
    """`asyncio.Event` as uvicorn's protocols use it (`is_set`, `set`, `clear`, `wait`),
    without the deque an Event allocates up front (≈ 0.7 KiB per connection, each)."""

    __slots__ = ("_value", "_waiter")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if not self._value:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            # Shielded: one waiter cancelled must not cancel the future the others wait on.
            await asyncio.shield(self._waiter)
        return True


class _Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests (`appendleft`, `pop`, truth) as a list: an empty
    deque allocates a 64-slot block (≈ 0.7 KiB per connection), an empty list nothing."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class _ReceiveQueue:
    """What uvicorn's WebSocket protocol uses of its receive queue (`put_nowait`, `get`,
    `empty`): a list and one waiter, where an `asyncio.Queue` holds three deques and an
    Event (≈ 3 KiB per idle socket). One reader: the app's `receive`."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


def hardened_websocket_protocol(
    *,
    write_stall_seconds: float,
    idle_seconds: float,
    max_pings: int,
    ping_window_seconds: float = 10.0,
) -> type[asyncio.Protocol]:
    """uvicorn's sans-I/O websockets protocol with bounds uvicorn does not set.

    - A client that stops reading: once the write buffer stays over its high-water mark for
      `write_stall_seconds`, the connection is aborted (a plain close would wait for the buffer
      to drain, which never happens). Pongs are not queued while the buffer is full.
    - More than `max_pings` pings within `ping_window_seconds`: close 1008.
    - Nothing at all received (no frame, no pong) for `idle_seconds`: close 1001. With the
      server's pings answered this never fires; it bounds sockets whose peer vanished when
      pings are turned off.
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.frames import Frame, Opcode
    from websockets.http11 import Request

    class HardenedWebSocketProtocol(WebSocketsSansIOProtocol):
        _stall_timer: asyncio.TimerHandle | None = None
        _idle_timer: asyncio.TimerHandle | None = None
        _ping_times: list[float]
        _last_received = 0.0
        _handshake_held = True

        def connection_made(self, transport: Any) -> None:
            # Lighter stand-ins, before anything is queued or waited on.
            self.queue = cast("asyncio.Queue[Any]", _ReceiveQueue())
            self.writable = cast(asyncio.Event, _Flag(True))
            super().connection_made(transport)
            # uvicorn waits 10 s for the peer's answer to our close frame; a client that does
            # not answer is not worth holding a socket for that long.
            self.close_timeout = CLOSE_HANDSHAKE_SECONDS
            self._ping_times = []
            self._last_received = self.loop.time()
            self._idle_timer = self.loop.call_later(idle_seconds, self._check_idle)

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._stall_timer, self._idle_timer):
                if timer is not None:
                    timer.cancel()
            self._stall_timer = self._idle_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._last_received = self.loop.time()
            super().data_received(data)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(write_stall_seconds, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        def handle_events(self) -> None:
            # websockets queues a pong for every ping of a read at once, so the pings are
            # counted here, before any of those pongs is written.
            events = self.conn.events_received()
            now = self.loop.time()
            self._ping_times = [t for t in self._ping_times if now - t < ping_window_seconds]
            self._ping_times += [
                now for e in events if isinstance(e, Frame) and e.opcode == Opcode.PING
            ]
            if len(self._ping_times) > max_pings:
                self.conn.data_to_send()  # the queued pongs are dropped
                self._fail(1008, "too many pings")
                return
            for event in events:
                if isinstance(event, Request):
                    self.handle_connect(event)
                elif isinstance(event, Frame):
                    self._dispatch(event)

        def _dispatch(self, event: Frame) -> None:
            opcode = event.opcode
            if opcode is Opcode.TEXT:
                self.handle_text(event)
            elif opcode is Opcode.CONT:
                self.handle_cont(event)
            elif opcode is Opcode.BINARY:
                self.handle_bytes(event)
            elif opcode is Opcode.PING:
                self.handle_ping()
            elif opcode is Opcode.PONG:
                self.handle_pong(event)
            elif opcode is Opcode.CLOSE:
                self.handle_close(event)

        def send_receive_event_to_app(self) -> None:
            # uvicorn logs invalid UTF-8 at error level with a traceback: a client's bad input
            # is not a server error, and one log line per hostile connection is a log flood.
            if self.curr_msg_data_type == "text" and not self.close_sent:
                try:
                    b"".join(self.frames).decode()
                except UnicodeDecodeError:
                    self.frames = []
                    self._fail(1007, "invalid UTF-8")
                    return
            super().send_receive_event_to_app()

        async def send(self, message: Any) -> None:
            await super().send(message)
            if self.handshake_complete and self._handshake_held:
                # uvicorn keeps the handshake's request and response (their headers) for the
                # connection's whole life, unused once it is accepted: ~5 KiB per socket.
                self._handshake_held = False
                del self.request, self.response

        def handle_ping(self) -> None:
            output = self.conn.data_to_send()
            if self.writable.is_set():  # a client that does not read gets no more pongs queued
                self.transport.write(b"".join(output))

        def _fail(self, code: int, reason: str) -> None:
            if self.close_sent or self.transport.is_closing():
                return
            self.conn.fail(code, reason)
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            # The app's next send raises ClientDisconnected (a WebSocketDisconnect in Starlette)
            # instead of a RuntimeError about sending after the close.
            self.close_sent = self.disconnected = True
            self.transport.close()

        def _stalled(self) -> None:
            self._stall_timer = None
            log.info("aborting a WebSocket whose client stopped reading")
            self.transport.abort()

        def _check_idle(self) -> None:
            silent = self.loop.time() - self._last_received
            if silent >= idle_seconds:
                self._idle_timer = None
                if self.handshake_complete:
                    self._fail(1001, "idle timeout")
                else:
                    self.transport.abort()
                return
            self._idle_timer = self.loop.call_later(
                max(idle_seconds - silent, 0.05), self._check_idle
            )

    return HardenedWebSocketProtocol
