"""Publishing one accepted `BoardMessage`: the one path of WebSocket frames and HTTP requests.

Both transports build the same envelope (same idempotency scope, so a resend over either is
delivered once), hold the same share of the process's unconfirmed bytes, answer only after
RabbitMQ's confirm, and count in the same metrics under their `transport` label.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Literal

import orjson
import structlog
from envelope import codec
from envelope.codes import ErrorCode
from envelope.models import (
    SCHEMA_VERSION,
    AckFrame,
    BoardEventEnvelope,
    BoardMessage,
    ErrorFrame,
    utcnow,
)
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import ValidationError
from realtime_runtime.observability import inject_trace_context

from ingress_ws.publisher import PublishUnavailable

if TYPE_CHECKING:
    from ingress_ws.state import IngressRuntime

Transport = Literal["websocket", "http"]
TRANSPORTS: tuple[Transport, ...] = ("websocket", "http")

log: structlog.stdlib.BoundLogger = structlog.get_logger("ingress_ws")
tracer = trace.get_tracer("ingress_ws")


async def publish_board_event(
    runtime: IngressRuntime,
    board_id: str,
    message: BoardMessage,
    *,
    correlation_id: str,
    sender: str,
    idempotency_scope: str,
    started: float,
    transport: Transport,
    parent: otel_context.Context,
) -> AckFrame | ErrorFrame:
    """Publish `message` and say how it went: `ack` after the confirm, else `error`.

    `started` (a `perf_counter` time) is when the message was taken up; `parent` the trace
    context its spans belong to (an empty one starts a trace of its own).
    """
    metrics = runtime.metrics
    received_ns = time.time_ns() - int((time.perf_counter() - started) * 1e9)
    with tracer.start_as_current_span(
        "receive board event",
        context=parent,
        kind=trace.SpanKind.SERVER,
        start_time=received_ns,
        attributes={
            "board.id": board_id,
            "board.event.type": message.type,
            "board.event.transport": transport,
        },
    ) as received:
        with tracer.start_as_current_span(
            "publish board event",
            kind=trace.SpanKind.PRODUCER,
            attributes={"board.id": board_id, "messaging.system": "rabbitmq"},
        ):
            try:
                # Validated, not constructed: the ingress never publishes an envelope the
                # worker would refuse (and dead-letter after the client's `ack`).
                envelope = BoardEventEnvelope(
                    schema_version=SCHEMA_VERSION,
                    event_id=uuid.uuid4(),
                    correlation_id=correlation_id,
                    board_id=board_id,
                    type=message.type,
                    payload=message.payload,
                    sender=sender,
                    occurred_at=utcnow(),
                    trace_context=inject_trace_context(),
                    idempotency_scope=idempotency_scope,
                )
                body = codec.dumps(envelope)
            except (ValidationError, orjson.JSONEncodeError) as exc:
                received.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                return ErrorFrame(
                    code=ErrorCode.INVALID_MESSAGE,
                    message="The event cannot be stored as sent; change it before resending.",
                    correlation_id=correlation_id,
                )
            received.set_attributes(
                {
                    "messaging.message.id": str(envelope.event_id),
                    "messaging.message.conversation_id": envelope.correlation_id,
                }
            )
            unconfirmed = runtime.unconfirmed
            if not unconfirmed.reserve(len(body)):
                # RabbitMQ is slow to confirm and this process already holds its share:
                # refuse at once rather than hold more memory or stall the reader.
                metrics.published.labels("error", transport).inc()
                received.set_status(trace.StatusCode.ERROR, "unconfirmed bytes at the bound")
                return ErrorFrame(
                    code=ErrorCode.UNAVAILABLE,
                    message="Too many events await the broker's confirm; "
                    "retry with the same id shortly.",
                    correlation_id=correlation_id,
                )
            try:
                await runtime.publisher.publish(envelope, body, envelope.trace_context)
            except PublishUnavailable as exc:
                metrics.published.labels("error", transport).inc()
                received.set_status(trace.StatusCode.ERROR, str(exc))
                log.warning(
                    "publish failed",
                    reason=str(exc),
                    board_id=board_id,
                    sender=sender,
                    correlation_id=correlation_id,
                    transport=transport,
                )
                return ErrorFrame(
                    code=ErrorCode.UNAVAILABLE,
                    message="The event could not be stored; retry with the same id.",
                    correlation_id=correlation_id,
                )
            finally:
                unconfirmed.release(len(body))
        metrics.published.labels("success", transport).inc()
        metrics.publish_duration.labels(transport).observe(time.perf_counter() - started)
        return AckFrame(correlation_id=envelope.correlation_id, event_id=envelope.event_id)
