"""The SSE response: one writer (the request's own task) and one disconnect watcher per stream.

sse-starlette's `EventSourceResponse` runs four tasks per stream in an anyio task group (writer,
pinger, disconnect and shutdown listeners) and an anyio cancel scope around every send; at 10,000
idle streams and at fan-out that is most of the gateway's memory and CPU per delivery. Here:

- the request task writes: it waits on the subscription, which the hub, the disconnect watcher,
  the drain and the stream's timer wake;
- one timer per stream, re-armed lazily, fires the heartbeat (every `heartbeat` seconds, written
  at the stream's next pause between events), the credential's expiry and the send-stall cut
  (a write still blocked after `send_timeout` seconds), so a write costs a float store instead
  of a cancel scope;
- the wire format stays sse-starlette's (`ServerSentEvent.encode`); frames are rendered once per
  process and the same bytes are written to every stream;
- body chunks skip the added middleware (`ServerSendPassthrough`): it only needs the response
  start and the end, not a coroutine call per layer per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import structlog
from realtime_runtime.feed import FeedUnavailable, HistoryLost, Queued, SlowConsumer, Subscription
from realtime_runtime.presence import PresenceItem
from realtime_runtime.security import ASGIApp, Message, Receive, Scope, Send
from starlette.responses import Response

from sse_gateway.streams import (
    HEARTBEAT,
    WRITE_BATCH,
    GatewayMetrics,
    expired_frame,
    slow_consumer_frame,
)

log = structlog.get_logger("sse_gateway")

STREAM_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
]
_SERVER_SEND = "sse_gateway.server_send"
# The answer when Redis did not confirm the stream's subscription, as `admit` gives when the
# feed is down: come back in a second.
_RETRY_SOON = [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]
Ending = Literal["disconnected", "shutdown", "expired"]


class Feed(Protocol):
    """What a stream reads: a subscription, the replay before it, the filter after it."""

    route: str
    board_id: str | None

    def subscribe(self) -> AbstractAsyncContextManager[Subscription[bytes]]: ...

    def replay(self) -> AsyncGenerator[bytes, None]:
        """The chunks owed on resume (a reset, then a page of retained events per chunk), once
        subscribed; each is read only after the last was written."""
        ...

    def fresh(self, batch: list[tuple[Queued, bytes]]) -> list[tuple[Queued, bytes]]: ...

    def frames(self, fresh: list[tuple[Queued, bytes]]) -> bytes:
        """What `fresh` returned, as one chunk for this stream."""
        ...

    def history_lost(self) -> bytes:
        """The reset frame; the stream starts again from the new history."""
        ...


class _ServerSend:
    __slots__ = ("receive", "send", "started")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class ServerSendPassthrough:
    """Outermost added middleware: gives SSE responses the `send` it got for body chunks.

    The middleware inside (metrics, CORS, security headers, rate limits, the Host allowlist)
    sees each stream's start and its end; only the event and heartbeat chunks in between skip
    it. Starlette's error middleware (and the tracing one, when tracing is on) stays outside
    every added middleware, so chunks still pass through its `send`. A stream whose start did
    not get through (a middleware holding it back) keeps the middleware's `send` for everything.
    """

    def __init__(self, app: ASGIApp, prefix: str = "/sse/") -> None:
        self.app = app
        self.prefix = prefix

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: it returns the app's, so it holds no frame of its own per stream.
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return self.app(scope, receive, send)
        server = _ServerSend(receive, send)
        scope[_SERVER_SEND] = server
        return self.app(scope, receive, server)


def pass_server_send(app: Any) -> None:
    """Add `ServerSendPassthrough` outside every middleware added so far.

    Call it last: `add_middleware` puts the newest outermost, so the security headers (added
    by `add_operations`) and the rest are inside it. (Starlette's own error middleware stays
    outside: body chunks pass through its one `send` wrapper, not through the stack.)
    """
    app.add_middleware(ServerSendPassthrough)


class EventStreamResponse(Response):
    """An endless `text/event-stream` of one feed, until the client leaves or the stream ends.

    It ends by itself on a slow consumer (a `close` event), an expired credential (a `close`
    event), `end("shutdown")` (the drain) and a write blocked for `send_timeout` seconds or
    `cut()` (the connection is closed).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        feed: Feed,
        metrics: GatewayMetrics,
        *,
        heartbeat: float,
        send_timeout: float,
        expires_at: float | None,
        registry: set[EventStreamResponse],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(STREAM_HEADERS)  # a list per response: CORS edits it in place
        self._feed = feed
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._send_timeout = send_timeout
        self._expires_at = expires_at  # wall clock (a JWT's `exp`)
        self._registry = registry
        self._subscription: Subscription[bytes] | None = None
        self._ending: Ending | None = None
        self._heartbeat_due = False
        self._stalled = False
        self._cut = False
        self._last_beat = 0.0
        self._writing_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Future[Message]

    def end(self, reason: Ending) -> None:
        """Stop after the current write: `shutdown` ends the response cleanly."""
        if self._ending is None:
            self._ending = reason
        if self._subscription is not None:
            self._subscription.wake()

    def cut(self) -> None:
        """Stop now, even in the middle of a write: the connection closes with the body
        unfinished (a drain out of time)."""
        self._cut = True
        if self._task is not None:
            self._task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        if scope["method"] == "HEAD":  # headers only: an endless body would never complete
            await send(start)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        self._task = task = asyncio.current_task()
        assert task is not None
        # Subscribed (confirmed by Redis) before the headers go: a client that saw the
        # response start misses no event published after that.
        try:
            async with self._feed.subscribe() as subscription:
                await self._stream(scope, receive, send, start, subscription, loop, task)
        except FeedUnavailable:  # raised by the subscription's entry only: nothing sent yet
            await send({"type": "http.response.start", "status": 503, "headers": _RETRY_SOON})
            body = b"The event feed is not connected; retry shortly."
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        start: Message,
        subscription: Subscription[bytes],
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
    ) -> None:
        await send(start)
        server: _ServerSend | None = scope.get(_SERVER_SEND)
        write = send
        if server is not None and server.started:
            write, receive = server.send, server.receive
        gauge = self._metrics.connections.labels(self._feed.route)
        gauge.inc()
        self._registry.add(self)
        self._watch_disconnect(receive)
        try:
            self._subscription = subscription
            self._last_beat = loop.time()
            self._arm(loop)
            try:
                await self._replay(write, loop)
                await self._pump(write, subscription, loop)
            finally:
                _count_if_cut(subscription.overflowed or self._stalled, self._metrics, self._feed)
                self._subscription = None
            if self._ending != "disconnected":
                self._watcher.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if (self._stalled or self._cut) and task.uncancel() == 0:
                # Cut by our own timer or the drain: return without completing the response,
                # so the server closes the connection (after what is buffered, if the client
                # reads).
                return
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._watcher.cancel()
            gauge.dec()
            self._registry.discard(self)

    async def _replay(self, write: Send, loop: asyncio.AbstractEventLoop) -> None:
        """A page at a time: the next is read from Redis only once the client took this one,
        so a stalled client holds one page, not the history. In a call of its own, so that
        the spent generator is not kept for the rest of the stream's life."""
        async with contextlib.aclosing(self._feed.replay()) as chunks:
            async for chunk in chunks:
                await self._write(write, chunk, loop)

    async def _pump(
        self, write: Send, subscription: Subscription[bytes], loop: asyncio.AbstractEventLoop
    ) -> None:
        feed, metrics = self._feed, self._metrics
        sent = metrics.sent.labels(feed.route)
        written = metrics.delivery.written
        while self._ending is None:
            try:
                batch = subscription.take_batch(WRITE_BATCH)
            except HistoryLost:
                metrics.resets.inc()
                await self._write(write, feed.history_lost(), loop)
                continue
            except SlowConsumer:
                await self._write(write, slow_consumer_frame(), loop)
                return
            if batch:
                fresh = feed.fresh(batch)
                if fresh:
                    sent.inc(len(fresh))
                    await self._write(write, feed.frames(fresh), loop)
                    for event, _frame in fresh:
                        if not isinstance(event, PresenceItem):  # only events have a latency
                            written(event)
            elif self._heartbeat_due:
                self._heartbeat_due = False
                await self._write(write, HEARTBEAT, loop)
            else:
                await subscription.wait()
        if self._ending == "expired":
            await self._write(write, expired_frame(), loop)

    async def _write(self, write: Send, chunk: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self._writing_since = loop.time()
        await write({"type": "http.response.body", "body": chunk, "more_body": True})
        self._writing_since = None

    def _watch_disconnect(self, receive: Receive) -> asyncio.Future[Message]:
        """The server's `receive` as a task of its own, watched by a callback (no frame of
        ours per stream): a GET has no body to read, so what comes is the disconnect."""

        def received(reading: asyncio.Future[Message]) -> None:
            if reading.cancelled():
                return
            if reading.exception() is not None or reading.result()["type"] == "http.disconnect":
                self.end("disconnected")
            else:
                self._watcher = self._watch_disconnect(receive)

        reading: asyncio.Future[Message] = asyncio.ensure_future(receive())
        reading.add_done_callback(received)
        self._watcher = reading
        return reading

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """The next check: heartbeat due, a write's deadline, or the credential's expiry.

        Writes only store when they started; the timer re-arms itself when it fires.
        """
        now = loop.time()
        due = self._last_beat + self._heartbeat
        if self._writing_since is not None:
            stall = self._writing_since + self._send_timeout
            at = stall if due <= now else min(due, stall)
        else:
            # A write that starts later is checked within `send_timeout` of its start.
            at = min(due, now + self._send_timeout)
        if self._expires_at is not None:
            at = min(at, now + self._expires_at - time.time())
        self._timer = loop.call_at(at, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._subscription is None or self._ending is not None:
            return
        now = loop.time()
        if self._expires_at is not None and time.time() >= self._expires_at:
            self.end("expired")
            return
        writing_since = self._writing_since
        if writing_since is not None and now - writing_since >= self._send_timeout:
            self._stalled = True
            if self._task is not None:
                self._task.cancel()
            return
        if writing_since is None and now >= self._last_beat + self._heartbeat:
            self._heartbeat_due = True
            self._last_beat = now
            self._subscription.wake()
        self._arm(loop)


def _count_if_cut(fell_behind: bool, metrics: GatewayMetrics, feed: Feed) -> None:
    """Count a stream that ended because its client fell behind: its queue overflowed (it
    got a `close` event if it still read), or it stopped reading and a write outlasted
    ADVANCED_SSE_SEND_TIMEOUT_SECONDS."""
    if fell_behind:
        metrics.slow.inc()
        log.warning("cut a slow SSE consumer", board_id=feed.board_id)
