"""One board WebSocket: frames in (validated, limited, published, acked); events out, in order."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import structlog
from aiolimiter import AsyncLimiter
from envelope import codec
from envelope.codec import InvalidFrame
from envelope.codes import CloseCode, ErrorCode, ResetReason
from envelope.cursors import parse_board_cursor
from envelope.models import (
    AckFrame,
    BoardMessage,
    ErrorFrame,
    RefreshRequest,
    ResetFrame,
    ResumeRequest,
)
from limits import parse
from opentelemetry import context as otel_context
from pydantic import BaseModel
from realtime_runtime.feed import FeedUnavailable, HistoryLost, SlowConsumer, Subscription
from realtime_runtime.presence import PresenceItem
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ingress_ws.presence import member_of
from ingress_ws.publishing import publish_board_event
from ingress_ws.refresh import CredentialLease
from ingress_ws.state import IngressRuntime

log: structlog.stdlib.BoundLogger = structlog.get_logger("ingress_ws")

WRITE_BATCH = 64  # events sent per wake-up of a socket's writer when several are waiting
MAX_IN_FLIGHT = 256  # unconfirmed publishes per connection before we stop reading
# A client that stopped reading cannot take a close frame either: give up on it after this.
CLOSE_TIMEOUT_SECONDS = 2.0


class BoardSocket:
    def __init__(
        self, websocket: WebSocket, board_id: str, lease: CredentialLease, runtime: IngressRuntime
    ) -> None:
        self.websocket = websocket
        self.board_id = board_id
        self.lease = lease  # the credential, replaced by `refresh` frames (ingress_ws.refresh)
        self.runtime = runtime
        self.sender = uuid.uuid4().hex
        self.member = member_of(
            lease.principal, websocket.query_params.get("client_id"), self.sender
        )
        self._send_lock = asyncio.Lock()
        self._last_sequence = 0
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._publishes: set[asyncio.Task[None]] = set()
        self._strikes = 0
        self._budget = runtime.budget.connection_budget()
        # A cursor to replay from (`?after=` or a resume frame), taken up by the writer; the
        # resume budget is made at the first resume frame (an idle socket holds none).
        self._resume_from: tuple[str | int, str | None] | None = None  # (cursor, epoch)
        self._resume_budget: AsyncLimiter | None = None
        self._subscription: Subscription[str] | None = None
        # Through uvicorn's trusted-proxy list: X-Forwarded-For counts only from those proxies.
        self.client = websocket.client.host if websocket.client else "unknown"

    @property
    def _log(self) -> structlog.stdlib.BoundLogger:
        # Bound when something is logged, not held by every idle socket.
        return log.bind(board_id=self.board_id, sender=self.sender)

    async def run(self, resume_from: tuple[str, str | None] | None) -> None:
        runtime = self.runtime
        runtime.sockets.add(self)
        runtime.metrics.connections.inc()
        runtime.presence.join(self.board_id, self.member)
        try:
            async with runtime.hub.subscribe_board(
                self.board_id, runtime.settings.websocket_send_queue
            ) as subscription:
                self._subscription = subscription
                self._resume_from = resume_from  # the writer replays it first
                writer = asyncio.create_task(self._write(subscription))
                # A writer stuck in a send to a client that stopped reading would never see
                # the overflow: it is cut off there.
                subscription.on_overflow = writer.cancel
                expiry = asyncio.create_task(self.lease.watch(self._send, self.close))
                tasks = [asyncio.create_task(self._read()), writer, expiry]
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    if subscription.overflowed:
                        raise SlowConsumer
                    for task in done:
                        task.result()
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    # Let confirms already under way reach the client before we leave
                    # (bounded: a stalled client cannot take them).
                    if self._publishes:
                        await asyncio.wait(self._publishes, timeout=CLOSE_TIMEOUT_SECONDS)
        except SlowConsumer:
            self._log.warning("closing a slow consumer")
            await self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume")
        except FeedUnavailable:
            self._log.warning("the board's channel was not confirmed; the client will retry")
            await self.close(CloseCode.TRY_AGAIN, "live events unavailable: reconnect shortly")
        except WebSocketDisconnect:
            pass
        finally:
            runtime.sockets.discard(self)
            runtime.metrics.connections.dec()
            runtime.presence.leave(self.board_id, self.member)

    async def close(self, code: int, reason: str = "") -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            self.runtime.metrics.closes.labels(str(code)).inc()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(code, reason), CLOSE_TIMEOUT_SECONDS)

    async def _replay(self, cursor: str | int, epoch: str | None) -> None:
        """Replay the board's retained events after `cursor`, then carry on live without a
        seam. The writer runs it, so live events wait in the subscription's bounded queue
        (its overflow cuts a slow consumer); pages are read one at a time as the client takes
        them, and acks may go out between pages."""
        runtime = self.runtime
        replay = await runtime.hub.replay_board(self.board_id, parse_board_cursor(cursor, epoch))
        if replay.reason is not None:
            runtime.metrics.resets.inc()
            reset = ResetFrame(
                board_id=self.board_id, reason=replay.reason, oldest_cursor=replay.oldest_cursor
            )
            async with self._send_lock:
                await self.websocket.send_text(codec.dumps(reset).decode())
        async with contextlib.aclosing(replay.pages) as pages:
            async for page in pages:
                total = runtime.presence.total(self.board_id)
                async with self._send_lock:
                    for event in page:
                        await self.websocket.send_text(
                            codec.event_frame(event.event, total).decode()
                        )
                runtime.metrics.replayed.inc(len(page))
        # Live events up to where the replay ended were in it.
        self._last_sequence = replay.until

    async def _resume_allowed(self) -> bool:
        """Resume frames have a budget of their own: each may cost a replay of the history."""
        if self._resume_budget is None:
            limit = parse(self.runtime.settings.websocket_resume_rate_limit)
            self._resume_budget = AsyncLimiter(limit.amount, limit.get_expiry())
        if not self._resume_budget.has_capacity():
            return False
        await self._resume_budget.acquire()  # returns at once: there is capacity
        return True

    async def _read(self) -> None:
        settings = self.runtime.settings
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            text = message.get("text")
            # Every frame counts, junk and resume requests included: each costs a reply (a
            # resume up to the whole retained history), so none may come for free.
            if not await self.runtime.budget.allow(self._budget, self.client):
                self._strikes += 1
                if self._strikes >= settings.websocket_rate_limit_strikes:
                    self._log.warning("closing a client that keeps breaking its rate limit")
                    await self.close(CloseCode.POLICY, "rate limit exceeded repeatedly")
                    return
                await self._refuse(
                    InvalidFrame(
                        ErrorCode.RATE_LIMITED,
                        "Too many messages: slow down.",
                        codec.client_id_of(text),
                    )
                )
                continue
            self._strikes = 0
            if text is None:
                await self._refuse(
                    InvalidFrame(ErrorCode.INVALID_MESSAGE, "Send JSON in text frames, not binary.")
                )
                continue
            try:
                frame = codec.decode_client_frame(text, settings.max_payload_bytes)
            except InvalidFrame as exc:
                await self._refuse(exc)
                continue
            if isinstance(frame, ResumeRequest):
                if not await self._resume_allowed():
                    limit = settings.websocket_resume_rate_limit
                    await self._refuse(
                        InvalidFrame(
                            ErrorCode.RATE_LIMITED,
                            f"Too many resume requests (at most {limit}); resume less often.",
                        )
                    )
                    continue
                self._resume_from = (frame.after, frame.epoch)
                if self._subscription is not None:
                    self._subscription.wake()  # the writer takes it up between batches
                continue
            if isinstance(frame, RefreshRequest):
                if not await self.lease.refresh(frame.token, self._send, self.close):
                    return
                continue
            await self._in_flight.acquire()
            task = asyncio.create_task(self._publish(frame, time.perf_counter()))
            self._publishes.add(task)
            task.add_done_callback(self._publishes.discard)

    async def _publish(self, message: BoardMessage, started: float) -> None:
        """Publish one accepted frame and answer it: `ack`, or `error` whatever went wrong."""
        correlation_id = message.id or uuid.uuid4().hex
        try:
            reply = await self._publish_traced(message, correlation_id, started)
        except Exception:
            # A frame is never left unanswered by a task that died: the client hears of it.
            self.runtime.metrics.published.labels("error", "websocket").inc()
            self.runtime.metrics.frames.labels(ErrorCode.UNAVAILABLE).inc()
            self._log.exception("publishing a frame failed", correlation_id=correlation_id)
            reply = ErrorFrame(
                code=ErrorCode.UNAVAILABLE,
                message="The event could not be published; retry with the same id.",
                correlation_id=correlation_id,
            )
        finally:
            self._in_flight.release()
        await self._send(reply)

    async def _publish_traced(
        self, message: BoardMessage, correlation_id: str, started: float
    ) -> AckFrame | ErrorFrame:
        # Each accepted frame starts a trace of its own (an empty parent context), however
        # long the connection lives.
        reply = await publish_board_event(
            self.runtime,
            self.board_id,
            message,
            correlation_id=correlation_id,
            sender=self.sender,
            idempotency_scope=self.lease.principal.idempotency_scope,
            started=started,
            transport="websocket",
            parent=otel_context.Context(),
        )
        outcome = "accepted" if isinstance(reply, AckFrame) else reply.code
        self.runtime.metrics.frames.labels(outcome).inc()
        return reply

    async def _write(self, subscription: Subscription[str]) -> None:
        written = self.runtime.metrics.delivery.written
        while True:
            if self._resume_from is not None:
                (cursor, epoch), self._resume_from = self._resume_from, None
                await self._replay(cursor, epoch)
                continue
            try:
                # Several events waiting are sent under one hold of the lock, without a
                # wake-up of this task per event.
                batch = subscription.take_batch(WRITE_BATCH)
            except HistoryLost:
                # Redis lost its data and sequences start again: say so, then carry on.
                async with self._send_lock:
                    self.runtime.metrics.resets.inc()
                    reset = ResetFrame(
                        board_id=self.board_id, reason=ResetReason.HISTORY_LOST, oldest_cursor=None
                    )
                    await self.websocket.send_text(codec.dumps(reset).decode())
                    self._last_sequence = 0
                continue
            if not batch:
                await subscription.wait()  # also woken by a resume request
                continue
            async with self._send_lock:
                for event, frame in batch:
                    if self.websocket.application_state != WebSocketState.CONNECTED:
                        return  # the server closed it meanwhile (a policy close): no more sends
                    if isinstance(event, PresenceItem):  # not echoed to the member it is about
                        if event.member_id != self.member.id:
                            await self.websocket.send_text(frame)
                        continue
                    if event.sequence <= self._last_sequence:
                        continue  # already sent by a replay
                    await self.websocket.send_text(frame)
                    self._last_sequence = event.sequence
                    written(event)

    async def _refuse(self, error: InvalidFrame) -> None:
        self.runtime.metrics.frames.labels(error.code).inc()
        await self._send(
            ErrorFrame.model_validate(
                {
                    "code": error.code,
                    "message": error.message,
                    "correlation_id": error.correlation_id,
                }
            )
        )

    async def _send(self, frame: BaseModel) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            async with self._send_lock:
                await self.websocket.send_text(codec.dumps(frame).decode())
