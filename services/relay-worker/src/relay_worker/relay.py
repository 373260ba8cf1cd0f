"""The relay step: one RabbitMQ delivery in, at most one Redis publish out."""

from __future__ import annotations

import os
import time
from typing import Literal, Protocol

import structlog
from envelope.codec import MalformedEnvelope, activity_body, decode_envelope
from envelope.memory import RelayOutcome
from envelope.models import utcnow
from envelope.observability import extract_trace_context, inject_trace_context
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from relay_worker.settings import WorkerSettings

log = structlog.get_logger("relay_worker")
tracer = trace.get_tracer("relay_worker")

Outcome = Literal["delivered", "duplicate", "retried", "dead_lettered"]


class Delivery(Protocol):
    """One message as the broker handed it over; exactly one of the three ends it."""

    body: bytes
    attempts: int  # how many times it failed before

    async def ack(self) -> None: ...

    async def retry(self, reason: str) -> None: ...

    async def dead_letter(self, reason: str) -> None: ...


class RelayStore(Protocol):
    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome: ...


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "advanced_worker_events",
            "Board events handled by the relay worker, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "advanced_worker_processing_duration_seconds",
            "Time from delivery to ack for one board event.",
            registry=registry,
        )
        self.unheard = Counter(
            "advanced_worker_publishes_without_subscribers",
            "Relayed events that no edge process was subscribed to hear.",
            registry=registry,
        )
        for outcome in ("delivered", "duplicate", "retried", "dead_lettered"):
            self.events.labels(outcome)


class Relay:
    def __init__(self, store: RelayStore, settings: WorkerSettings, metrics: RelayMetrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._relayed = 0

    async def handle(self, delivery: Delivery) -> Outcome:
        started = time.perf_counter()
        outcome = await self._handle(delivery)
        self._metrics.events.labels(outcome).inc()
        self._metrics.duration.observe(time.perf_counter() - started)
        return outcome

    async def _handle(self, delivery: Delivery) -> Outcome:
        try:
            envelope = decode_envelope(delivery.body)
        except MalformedEnvelope as exc:
            # Retrying cannot fix a body: it goes to the DLQ at once, with the reason.
            log.error("dead-lettering a malformed envelope", reason=str(exc))
            await delivery.dead_letter(str(exc))
            return "dead_lettered"

        parent = extract_trace_context(envelope.trace_context)
        with tracer.start_as_current_span(
            "relay board event",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "board.id": envelope.board_id,
                "messaging.message.id": str(envelope.event_id),
            },
        ):
            traced = envelope.model_copy(update={"trace_context": inject_trace_context()})
            body = activity_body(traced, utcnow())
            bound = log.bind(board_id=envelope.board_id, correlation_id=envelope.correlation_id)
            try:
                result = await self._store.relay(
                    envelope.board_id,
                    envelope.correlation_id,
                    body,
                    self._settings.redis_idempotency_ttl_seconds,
                )
            except Exception as exc:  # any store failure: the broker retries the message
                reason = f"{type(exc).__name__}: {exc}"
                if delivery.attempts >= self._settings.rabbitmq_max_retries:
                    bound.error(
                        "dead-lettering after the last retry",
                        attempts=delivery.attempts,
                        reason=reason,
                    )
                    await delivery.dead_letter(reason)
                    return "dead_lettered"
                bound.warning(
                    "relay failed, retrying", attempts=delivery.attempts + 1, reason=reason
                )
                await delivery.retry(reason)
                return "retried"

            self._relayed += 1
            if self._relayed == self._settings.worker_fault_exit_after_relay:
                os._exit(137)  # the fault hook: die between the Redis step and the ack
            await delivery.ack()
            if not result.delivered:
                bound.info("duplicate skipped", sequence=result.sequence)
                return "duplicate"
            if result.receivers == 0:
                self._metrics.unheard.inc()
            return "delivered"
