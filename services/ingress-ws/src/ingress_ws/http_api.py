"""The ingress's HTTP API: publish a board event (or a batch) and read a board's history.

A publish goes through `publish_board_event`, the WebSocket frame's own path: the same
envelope and idempotency scope (a resend with the same key, over either transport, is
delivered once), `202` only after RabbitMQ's confirm. History reads the board's retained
stream through `ActivityHub.replay_board`, the WebSocket and SSE resume's one cursor rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from envelope import codec
from envelope.api import MAX_BATCH, BatchAccepted, BatchRefused, HistoryReset, PublishAccepted
from envelope.codec import InvalidFrame
from envelope.codes import ErrorCode
from envelope.cursors import BoardCursor, parse_board_cursor
from envelope.models import CLIENT_ID_PATTERN, AckFrame, BoardMessage, ErrorFrame, is_board_id
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import context as otel_context
from realtime_runtime.auth import Credential, Principal, Unauthorized, credential_source

from ingress_ws.admission import credential_key
from ingress_ws.presence import REDIS_FAULTS
from ingress_ws.publishing import publish_board_event
from ingress_ws.settings import IngressSettings
from ingress_ws.state import runtime_of

log: structlog.stdlib.BoundLogger = structlog.get_logger("ingress_ws")

STATUS: dict[str, int] = {
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
}
# What a client waits before trying again when RabbitMQ (or Redis) is away: about the time
# the publisher's robust connection takes to come back.
UNAVAILABLE_RETRY_SECONDS = 2
# Body bytes one event may take beside its payload's limit (pretty-printed JSON, type, id).
BODY_ALLOWANCE = 1024
MAX_HISTORY_LIMIT = 1000
DEFAULT_HISTORY_LIMIT = 100
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


class Refused(Exception):
    """A request refused whole: its status and the `error` body that says why."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS[code]


def refusal(
    code: str,
    message: str,
    correlation_id: str | None = None,
    *,
    status: int | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    frame = ErrorFrame.model_validate(
        {"code": code, "message": message, "correlation_id": correlation_id}
    )
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return error_response(frame, status or STATUS[code], headers)


def refused(exc: Refused) -> JSONResponse:
    return refusal(exc.code, exc.message, status=exc.status)


def error_response(frame: ErrorFrame, status: int, headers: dict[str, str]) -> JSONResponse:
    if status == 401:
        headers = {**headers, "WWW-Authenticate": "Bearer"}
    if status in (429, 503) and "Retry-After" not in headers:
        headers = {**headers, "Retry-After": str(UNAVAILABLE_RETRY_SECONDS)}
    return JSONResponse(frame.model_dump(mode="json"), status_code=status, headers=headers)


def add_http_api(
    app: FastAPI,
    settings: IngressSettings,
    *,
    exempt: Callable[[Any], Any],
) -> None:
    """Mount `POST /api/boards/{board_id}/events[:batch]` and `GET …/events`.

    The publish routes are `exempt` from the per-address HTTP limit: they have their own, per
    credential and per event (`ADVANCED_HTTP_PUBLISH_RATE_LIMIT`).
    """
    event_body_limit = 2 * settings.max_payload_bytes + BODY_ALLOWANCE

    def authorise(request: Request, board_id: str, *, cookie: bool) -> tuple[Principal, str]:
        if not is_board_id(board_id):
            raise Refused(
                ErrorCode.INVALID_MESSAGE,
                "The board id must be 1-64 of [A-Za-z0-9_.-].",
                status=422,
            )
        # No session cookie for a publish: a cookie is ambient, and a page of another site
        # could make the browser send it with a form's POST.
        found: Credential | None = credential_source(
            request.query_params, request.headers, request.cookies if cookie else {}
        )
        try:
            principal = runtime_of(request).authenticator.authenticate(
                found.value if found else None
            )
        except Unauthorized as exc:
            raise Refused(ErrorCode.UNAUTHORIZED, str(exc)) from None
        if not principal.may_access(board_id):
            raise Refused(ErrorCode.FORBIDDEN, "This token does not grant the board.")
        assert found is not None  # authenticate() refused a missing one
        client = request.client.host if request.client else "unknown"
        return principal, credential_key(principal, found.value, client)

    async def read_body(request: Request, limit: int) -> Any:
        """The JSON body, refused (413) as soon as it is known to pass `limit` bytes."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise Refused(ErrorCode.PAYLOAD_TOO_LARGE, f"The body is larger than {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(
                    ErrorCode.PAYLOAD_TOO_LARGE, f"The body is larger than {limit} bytes."
                )
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise Refused(ErrorCode.INVALID_MESSAGE, "The body is not valid JSON.") from None

    def board_message(data: Any) -> BoardMessage:
        """One message through the WebSocket frame's own validation (`decode_client_frame`)."""
        try:
            frame = codec.decode_client_frame(orjson.dumps(data), settings.max_payload_bytes)
        except orjson.JSONEncodeError:
            raise InvalidFrame(
                ErrorCode.INVALID_MESSAGE, "The payload is nested too deeply."
            ) from None
        if not isinstance(frame, BoardMessage):
            raise InvalidFrame(ErrorCode.INVALID_MESSAGE, "Send a BoardMessage: type, payload, id.")
        return frame

    def idempotency_key(request: Request, most: int = 128) -> str | None:
        key = request.headers.get("idempotency-key")
        if key is not None and (len(key) > most or not _CLIENT_ID.fullmatch(key)):
            raise Refused(
                ErrorCode.INVALID_MESSAGE,
                f"Idempotency-Key must be 1-{most} of [A-Za-z0-9_.:-].",
            )
        return key

    async def publish(
        request: Request,
        board_id: str,
        message: BoardMessage,
        correlation_id: str,
        principal: Principal,
        sender: str,
        started: float,
    ) -> AckFrame | ErrorFrame:
        runtime = runtime_of(request)
        try:
            return await publish_board_event(
                runtime,
                board_id,
                message,
                correlation_id=correlation_id,
                sender=sender,
                idempotency_scope=principal.idempotency_scope,
                started=started,
                transport="http",
                parent=otel_context.get_current(),  # the request's span, when traced
            )
        except Exception:
            # Never a 500 that leaves the client guessing: it may resend with the same key.
            runtime.metrics.published.labels("error", "http").inc()
            log.exception("publishing an HTTP event failed", correlation_id=correlation_id)
            return ErrorFrame(
                code=ErrorCode.UNAVAILABLE,
                message="The event could not be published; retry with the same key.",
                correlation_id=correlation_id,
            )

    @app.post("/api/boards/{board_id}/events", status_code=202)
    @exempt
    async def publish_event(request: Request, board_id: str) -> Response:
        """Publish one `BoardMessage`; `202` once RabbitMQ has confirmed it."""
        started = time.perf_counter()
        try:
            principal, key = authorise(request, board_id, cookie=False)
            header_key = idempotency_key(request)
            data = await read_body(request, event_body_limit)
            try:
                message = board_message(data)
            except InvalidFrame as exc:
                return refusal(exc.code, exc.message, header_key or exc.correlation_id)
            correlation_id = header_key or message.id or uuid.uuid4().hex
            granted, retry_after = await runtime_of(request).publish_rate.take(key, 1)
            if not granted:
                return refusal(
                    ErrorCode.RATE_LIMITED,
                    "Too many events for this credential: slow down.",
                    correlation_id,
                    retry_after=retry_after,
                )
        except Refused as exc:
            return refused(exc)
        reply = await publish(
            request, board_id, message, correlation_id, principal, uuid.uuid4().hex, started
        )
        if isinstance(reply, ErrorFrame):
            return error_response(reply, STATUS[reply.code], {})
        accepted = PublishAccepted(correlation_id=reply.correlation_id, event_id=reply.event_id)
        return JSONResponse(accepted.model_dump(mode="json"), status_code=202)

    @app.post("/api/boards/{board_id}/events:batch", status_code=207)
    @exempt
    async def publish_batch(request: Request, board_id: str) -> Response:
        """Publish up to 100 messages concurrently; one result per message, in order."""
        started = time.perf_counter()
        try:
            principal, key = authorise(request, board_id, cookie=False)
            # Room for `:<index>`, the key of a message that brings no `id` of its own.
            batch_key = idempotency_key(request, most=124)
            data = await read_body(request, MAX_BATCH * event_body_limit)
            if not isinstance(data, list) or not data:
                raise Refused(ErrorCode.INVALID_MESSAGE, "Send a JSON array of 1 to 100 messages.")
            if len(data) > MAX_BATCH:
                raise Refused(
                    ErrorCode.PAYLOAD_TOO_LARGE, f"A batch holds at most {MAX_BATCH} messages."
                )
        except Refused as exc:
            return refused(exc)

        results: list[BatchAccepted | BatchRefused | None] = [None] * len(data)
        accepted: list[tuple[int, BoardMessage, str]] = []
        for index, item in enumerate(data):
            try:
                message = board_message(item)
            except InvalidFrame as exc:
                results[index] = refused_item(exc.code, exc.message, exc.correlation_id)
                continue
            derived = f"{batch_key}:{index}" if batch_key else None
            accepted.append((index, message, message.id or derived or uuid.uuid4().hex))
        rate = runtime_of(request).publish_rate
        granted, retry_after = await rate.take(key, len(accepted)) if accepted else (0, 0)
        for index, _message, correlation_id in accepted[granted:]:
            results[index] = refused_item(
                ErrorCode.RATE_LIMITED,
                "Too many events for this credential: slow down.",
                correlation_id,
                retry_after,
            )
        sender = uuid.uuid4().hex
        replies = await asyncio.gather(
            *(
                publish(request, board_id, message, correlation_id, principal, sender, started)
                for _index, message, correlation_id in accepted[:granted]
            )
        )
        for (index, _message, _cid), reply in zip(accepted[:granted], replies, strict=True):
            if isinstance(reply, AckFrame):
                results[index] = BatchAccepted(
                    correlation_id=reply.correlation_id, event_id=reply.event_id
                )
            else:
                results[index] = refused_item(reply.code, reply.message, reply.correlation_id)
        body = {"results": [r.model_dump(mode="json", exclude_none=True) for r in results if r]}
        return JSONResponse(body, status_code=207)

    def refused_item(
        code: str, message: str, correlation_id: str | None, retry_after: int | None = None
    ) -> BatchRefused:
        if retry_after is None and code == ErrorCode.UNAVAILABLE:
            retry_after = UNAVAILABLE_RETRY_SECONDS
        return BatchRefused.model_validate(
            {
                "status": STATUS[code],
                "code": code,
                "message": message,
                "correlation_id": correlation_id,
                "retry_after": retry_after,
            }
        )

    @app.get("/api/boards/{board_id}/events")
    async def board_history(request: Request, board_id: str) -> Response:
        """The board's retained events after `after`, `limit` at a time (docs/http-api.md)."""
        try:
            authorise(request, board_id, cookie=True)
            query = request.query_params
            limit = _limit(query.get("limit"))
            after = query.get("after")
            cursor = parse_board_cursor(after or "0", query.get("epoch") or None)
            if cursor is None:
                raise Refused(
                    ErrorCode.INVALID_MESSAGE,
                    "`after` must be a sequence, or <sequence>.<epoch> as the events carry it.",
                )
        except Refused as exc:
            return refused(exc)
        try:
            return await history_page(request, board_id, cursor, limit, explicit=after is not None)
        except REDIS_FAULTS as exc:
            log.warning("reading a board's history failed", board_id=board_id, error=str(exc))
            return refusal(ErrorCode.UNAVAILABLE, "The history cannot be read now; retry shortly.")

    async def history_page(
        request: Request, board_id: str, cursor: BoardCursor, limit: int, *, explicit: bool
    ) -> Response:
        replay = await runtime_of(request).hub.replay_board(board_id, cursor)
        events: list[bytes] = []
        last = 0
        more = False
        async with contextlib.aclosing(replay.pages) as pages:
            async for page in pages:
                room = limit - len(events)
                events.extend(event.event for event in page[:room])
                last = page[min(room, len(page)) - 1].sequence
                if len(page) > room or (len(events) == limit and last < replay.until):
                    more = True
                    break
        parts = [b'{"events":[', b",".join(events), b'],"next_after":']
        parts.append(str(last).encode() if more else b"null")
        # Without `after`, the oldest retained events are what was asked for: no reset.
        if replay.reason is not None and (explicit or replay.reason != "cursor_expired"):
            reset = HistoryReset(reason=replay.reason, oldest_cursor=replay.oldest_cursor)
            parts += [b',"reset":', codec.dumps(reset)]
        parts.append(b"}")
        return Response(
            b"".join(parts),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_HISTORY_LIMIT
    if text.isascii() and text.isdigit() and len(text) <= 4 and 1 <= int(text) <= 1000:
        return int(text)
    raise Refused(ErrorCode.INVALID_MESSAGE, f"`limit` must be 1 to {MAX_HISTORY_LIMIT}.")
