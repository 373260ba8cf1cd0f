"""The relay step: one RabbitMQ delivery in, at most one Redis publish out."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, cast

import structlog
from envelope.codec import MalformedEnvelope, activity_body, decode_envelope
from envelope.models import utcnow
from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry, Counter, Histogram
from realtime_runtime.memory import RelayOutcome
from realtime_runtime.observability import extract_trace_context, inject_trace_context

from relay_worker.faults import Source, redis_fault
from relay_worker.settings import WorkerSettings

log = structlog.get_logger("relay_worker")
tracer = trace.get_tracer("relay_worker")

Outcome = Literal["delivered", "duplicate", "retried", "dead_lettered", "held"]
"""`held`: not settled, because of an infrastructure fault; the delivery is still unacked."""


class Delivery(Protocol):
    """One message as the broker handed it over; exactly one of the three ends it."""

    body: bytes
    attempts: int  # how many times it failed before

    async def ack(self) -> None: ...

    async def retry(self, reason: str) -> None: ...

    async def dead_letter(self, reason: str) -> None: ...


D = TypeVar("D", bound=Delivery)

AcknowledgeInOrder = Callable[[Sequence[D]], Awaitable[None]]
"""Acks a run of deliveries, every earlier one of the batch already settled; the RabbitMQ
adapter sends one `basic.ack(multiple=True)` for the run where that is safe."""


async def ack_one_by_one(deliveries: Sequence[Delivery]) -> None:
    for delivery in deliveries:
        await delivery.ack()


async def _settling(settle: Awaitable[None]) -> Exception | None:
    """What settling raised, if anything: RabbitMQ not taking a settlement is not the
    message's fault."""
    try:
        await settle
    except Exception as exc:
        return exc
    return None


class RelayStore(Protocol):
    """Stores may also offer `relay_many(steps, ttl_seconds)`: the same steps, pipelined,
    returning one `RelayOutcome` or exception per step (see `RedisRelayStore`)."""

    async def relay(
        self, board_id: str, idempotency_key: str, body: bytes, ttl_seconds: int
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
        self.lag = Histogram(
            "advanced_worker_consumer_lag_seconds",
            "How old an event is when the worker takes it up (now - occurred_at): queueing, "
            "retry back-off and the ingress's publish included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.recovered = Counter(
            "advanced_worker_sequence_recoveries",
            "Relay steps that found a board's sequence counter missing while its stream was "
            "not, and numbered on after the stream instead of reusing sequences.",
            registry=registry,
        )
        self.infrastructure_faults = Counter(
            "advanced_worker_infrastructure_faults",
            "Relay batches stopped by an infrastructure fault (source: redis refused or lost the "
            "write; rabbitmq did not take an ack, a retry or a dead letter); their messages "
            "are held, not retried.",
            ["source"],
            registry=registry,
        )
        # Resolved once: `labels()` per event takes a lock and a dict lookup.
        self.outcomes = {
            outcome: self.events.labels(outcome)
            for outcome in ("delivered", "duplicate", "retried", "dead_lettered")
        }


class Relay:
    def __init__(self, store: RelayStore, settings: WorkerSettings, metrics: RelayMetrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._relayed = 0

    async def handle(self, delivery: Delivery) -> Outcome:
        return (await self.handle_batch([delivery]))[0]

    async def handle_batch(
        self,
        deliveries: Sequence[D],
        *,
        acknowledge: AcknowledgeInOrder[D] = ack_one_by_one,
    ) -> list[Outcome]:
        """Relay deliveries of one partition: one Redis round trip for all (on a cluster, one
        per master, side by side), settled in order.

        Each relay step stays one atomic Lua call; a pipeline only sends them back to back,
        and Redis runs them in that order, so the board's sequence follows the queue's order.

        Nothing a delivery raises escapes: a failure of the message (it cannot be decoded,
        validated, prepared or serialised; a relay step that fails because of it) settles it
        by the retry queue or the DLQ, and the deliveries behind it go on. An infrastructure
        fault (Redis refusing the write, RabbitMQ not taking a settlement) settles nothing
        from that delivery on: they are `held`, still unacked and in order, for the caller to
        hand back once the infrastructure takes writes again (see `PartitionedConsumer`).

        Deliveries to ack are gathered into runs and handed to `acknowledge` after their
        Redis steps: before a retry or a dead letter (so settling stays in queue order) and
        at the end of the batch.
        """
        started = time.perf_counter()
        prepared = [self._prepare(delivery) for delivery in deliveries]
        steps = [step for step in prepared if isinstance(step, _Step)]
        try:
            results = await self._relay_all(steps)
        except BaseException:  # cancelled: the broker gets every delivery back unsettled
            for step in steps:
                step.span.end()
            raise
        relayed = sum(1 for result in results if not isinstance(result, BaseException))
        fault_at = self._settings.worker_fault_exit_after_relay
        if self._relayed < fault_at <= self._relayed + relayed:
            os._exit(137)  # the fault hook: die between the Redis step and the ack
        self._relayed += relayed
        outcomes: list[Outcome] = []
        to_ack: list[D] = []
        items = list(zip(prepared, _results_in_place(prepared, results), strict=True))
        for index, (item, result) in enumerate(items):
            if isinstance(item, _Step) and isinstance(result, RelayOutcome):
                outcome = self._relayed_outcome(item, result)
                to_ack.append(cast(D, item.delivery))
                self._metrics.outcomes[outcome].inc()
                outcomes.append(outcome)
                continue
            if to_ack:
                error = await _settling(acknowledge(to_ack))
                if error is not None:
                    return self._hold(outcomes, items, index - len(to_ack), "rabbitmq", error)
                to_ack = []
            if isinstance(item, _Step) and redis_fault(cast(BaseException, result)):
                return self._hold(outcomes, items, index, "redis", cast(BaseException, result))
            try:
                if isinstance(item, _Step):
                    outcome = await self._settle_failure(item, cast(BaseException, result))
                else:
                    outcome = await self._dead_letter_malformed(item)
            except Exception as exc:  # the broker did not take the retry or the dead letter
                return self._hold(outcomes, items, index, "rabbitmq", exc)
            self._metrics.outcomes[outcome].inc()
            outcomes.append(outcome)
        if to_ack:
            error = await _settling(acknowledge(to_ack))
            if error is not None:
                return self._hold(outcomes, items, len(items) - len(to_ack), "rabbitmq", error)
        elapsed = time.perf_counter() - started
        for _ in outcomes:
            self._metrics.duration.observe(elapsed)
        return outcomes

    def _hold(
        self,
        outcomes: list[Outcome],
        items: Sequence[tuple[_Step | _Malformed, RelayOutcome | BaseException | None]],
        first: int,
        source: Source,
        error: BaseException,
    ) -> list[Outcome]:
        """Outcomes of a batch that stops at an infrastructure fault: `held` from `first` on.

        A held delivery may have been relayed already (its ack is what failed, or its step
        ran before a timeout): relayed again later it is a duplicate, acked and not resent.
        """
        self._metrics.infrastructure_faults.labels(source).inc()
        log.warning(
            "infrastructure fault; holding the partition's messages",
            source=source,
            held=len(items) - first,
            error=f"{type(error).__name__}: {error}",
        )
        for item, _result in items[first:]:
            if isinstance(item, _Step) and item.span.is_recording():
                item.span.set_attribute("relay.outcome", "held")
                item.span.end()
        held: list[Outcome] = ["held"] * (len(items) - first)
        return [*outcomes[:first], *held]

    def _prepare(self, delivery: Delivery) -> _Step | _Malformed:
        """Decode, validate and serialise one delivery; any failure here is the message's.

        No retry can change what the body says, so such a message goes to the DLQ at once,
        with the reason, and the messages behind it go on.
        """
        try:
            return self._prepare_step(delivery)
        except MalformedEnvelope as exc:
            return _Malformed(delivery, str(exc))
        except Exception as exc:  # whatever else this body makes the preparation raise
            return _Malformed(
                delivery, f"the event cannot be prepared: {type(exc).__name__}: {exc}"
            )

    def _prepare_step(self, delivery: Delivery) -> _Step:
        envelope = decode_envelope(delivery.body)
        self._metrics.lag.observe(max(0.0, (utcnow() - envelope.occurred_at).total_seconds()))
        span = tracer.start_span(
            "relay board event",
            context=extract_trace_context(envelope.trace_context),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "board.id": envelope.board_id,
                "messaging.message.id": str(envelope.event_id),
                "messaging.message.conversation_id": envelope.correlation_id,
                "messaging.rabbitmq.attempt": delivery.attempts + 1,
            },
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                # The edges' spans hang off this one; without a tracer here, pass the
                # ingress's on.
                carrier = inject_trace_context() or envelope.trace_context
            try:
                body = activity_body(envelope, utcnow(), carrier)
            except (TypeError, ValueError) as exc:
                # orjson reads 1024 levels of nesting but writes only 254 (pydantic fewer).
                raise MalformedEnvelope(
                    f"the event cannot be serialised again (a payload nested too deeply?): {exc}"
                ) from exc
        except BaseException as exc:
            span.record_exception(exc)
            span.end()
            raise
        return _Step(
            delivery,
            envelope.board_id,
            envelope.correlation_id,
            envelope.idempotency_key,
            body,
            span,
        )

    async def _relay_all(self, steps: list[_Step]) -> list[RelayOutcome | BaseException]:
        """One result per step, in order: its outcome or what it raised. Raises nothing but
        cancellation."""
        if not steps:
            return []
        ttl = self._settings.redis_idempotency_ttl_seconds
        relay_many = getattr(self._store, "relay_many", None)
        if relay_many is not None and len(steps) > 1:
            batch = [(s.board_id, s.idempotency_key, s.body) for s in steps]
            try:
                # The pipeline's own spans (Redis instrumentation) hang off the batch's first.
                with trace.use_span(steps[0].span, end_on_exit=False):
                    return cast(list[RelayOutcome | BaseException], await relay_many(batch, ttl))
            except Exception as exc:
                if redis_fault(exc):
                    # All held; a step Redis ran before the fault comes back a duplicate.
                    return [exc] * len(steps)
                # Not Redis's doing: one at a time, so only the step that fails pays for it.
                log.warning("relay pipeline failed; relaying one at a time", error=repr(exc))
        results: list[RelayOutcome | BaseException] = []
        for step in steps:
            try:
                with trace.use_span(step.span, end_on_exit=False):
                    results.append(
                        await self._store.relay(step.board_id, step.idempotency_key, step.body, ttl)
                    )
            except Exception as exc:  # settled by the caller: held, retried or dead-lettered
                results.append(exc)
                if redis_fault(exc):
                    # The steps behind it are held with it: no point asking Redis for them.
                    results += [exc] * (len(steps) - len(results))
                    break
        return results

    async def _dead_letter_malformed(self, malformed: _Malformed) -> Outcome:
        # Retrying cannot fix a body: it goes to the DLQ at once, with the reason.
        log.error("dead-lettering a malformed envelope", reason=malformed.reason)
        await malformed.delivery.dead_letter(malformed.reason)
        return "dead_lettered"

    async def _settle_failure(self, step: _Step, error: BaseException) -> Outcome:
        delivery, span = step.delivery, step.span
        with trace.use_span(span, end_on_exit=True):
            bound = log.bind(board_id=step.board_id, correlation_id=step.correlation_id)
            reason = f"{type(error).__name__}: {error}"
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, reason)
            if delivery.attempts >= self._settings.rabbitmq_max_retries:
                bound.error(
                    "dead-lettering after the last retry",
                    attempts=delivery.attempts,
                    reason=reason,
                )
                await delivery.dead_letter(reason)
                return "dead_lettered"
            bound.warning("relay failed, retrying", attempts=delivery.attempts + 1, reason=reason)
            await delivery.retry(reason)
            return "retried"

    def _relayed_outcome(self, step: _Step, result: RelayOutcome) -> Outcome:
        """The outcome of a step Redis ran; its delivery is acked by the caller."""
        span = step.span
        with trace.use_span(span, end_on_exit=True):
            if not result.delivered:
                span.set_attribute("relay.outcome", "duplicate")
                log.info(
                    "duplicate skipped",
                    board_id=step.board_id,
                    correlation_id=step.correlation_id,
                    sequence=result.sequence,
                )
                return "duplicate"
            span.set_attributes(
                {
                    "relay.outcome": "delivered",
                    "board.sequence": result.sequence,
                    "relay.receivers": result.receivers,
                }
            )
            if result.receivers == 0:
                self._metrics.unheard.inc()
            if result.sequence_recovered:
                # Redis had lost the board's counter but not its stream: numbering went on
                # after the stream's newest event. Someone should find out why (eviction?).
                self._metrics.recovered.inc()
                log.error(
                    "the board's sequence counter was missing; continued after its stream",
                    board_id=step.board_id,
                    sequence=result.sequence,
                )
            return "delivered"


def _results_in_place(
    prepared: Sequence[_Step | _Malformed], results: Sequence[RelayOutcome | BaseException]
) -> list[RelayOutcome | BaseException | None]:
    """The relay results lined up with `prepared`: None where a body was malformed."""
    found = iter(results)
    return [next(found) if isinstance(item, _Step) else None for item in prepared]


@dataclass(slots=True)
class _Step:
    """A decoded delivery, its activity body and its span, waiting for its relay step."""

    delivery: Delivery
    board_id: str
    correlation_id: str
    idempotency_key: str
    body: bytes
    span: Span


@dataclass(slots=True)
class _Malformed:
    delivery: Delivery
    reason: str
