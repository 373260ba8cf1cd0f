"""Structured logs, OpenTelemetry tracing and the trace-context carrier shared by the services.

One trace follows one board event: the ingress starts it when a frame is accepted, the W3C
context rides in the envelope (and the AMQP headers) to the worker, the worker re-injects its
own context into the `ActivityEvent` it relays through Redis, and each edge process adds one
"deliver board event" span when it fans the event out to its subscribers.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote_plus

import orjson
import structlog
from envelope.codec import RelayedEvent
from opentelemetry import context, propagate, trace

from realtime_runtime.settings import TelemetrySettings

if TYPE_CHECKING:
    from fastapi import FastAPI

# Query and form parameters that carry a credential, by their DECODED name (lower case): a
# server decodes `%74oken` to `token` and authenticates with it, so the redaction must too.
CREDENTIAL_PARAMETERS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "jwt",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "api_key",
        "apikey",
        "auth",
        "authorization",
        "session",
        "advanced_session",
        "__host-advanced_session",
    }
)
# A parameter's name (what precedes `=`), and where a value ends. Names are matched alone, so
# a URL inside another parameter's value (`next=/cb?token=…`) is searched too.
_PARAMETER_NAME = re.compile(r"([^\s?&;=\"'<>,/]+)=")
_VALUE_END = re.compile(r"[&;\s\"'<>]|$")
_SECRET_IN_TEXT = re.compile(
    r"(Bearer\s+)[A-Za-z0-9._~+/=-]+"
    # A URL's password, also with an empty user name (`rediss://:secret@host`).
    r"|(//[^:/@\s]*:)[^@\s]+@"
    # Header lines as the websockets library logs them at debug level ("< cookie: ...").
    r"|((?:^|<\s)(?:proxy-)?(?:authorization|cookie):\s*)[^\r\n]+",
    re.IGNORECASE | re.MULTILINE,
)

tracer = trace.get_tracer("envelope")


def _decoded_name(name: str) -> str:
    # Decoded until it stops changing, so `%2574oken` is caught as well as `%74oken`.
    for _ in range(4):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower()


def redact(text: str) -> str:
    """Hide credentials in free text: credential parameters (by decoded name), bearer tokens,
    URL passwords, authorization and cookie header lines."""

    def _hide(match: re.Match[str]) -> str:
        prefix = next(group for group in match.groups() if group is not None)
        return f"{prefix}[redacted]" + ("@" if prefix.startswith("//") else "")

    if "=" in text:
        text = _hide_parameters(text)
    return _SECRET_IN_TEXT.sub(_hide, text)


def _hide_parameters(text: str) -> str:
    kept: list[str] = []
    position = 0
    for match in _PARAMETER_NAME.finditer(text):
        if match.start() < position:  # inside a value already hidden
            continue
        if _decoded_name(match[1]) in CREDENTIAL_PARAMETERS:
            end = _VALUE_END.search(text, match.end())
            kept += [text[position : match.end()], "[redacted]"]
            position = end.start() if end is not None else len(text)
    kept.append(text[position:])
    return "".join(kept)


def _redact_event(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


def _add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict["trace_id"] = format(span_context.trace_id, "032x")
        event_dict["span_id"] = format(span_context.span_id, "016x")
    return event_dict


LogFormat = Literal["auto", "json", "console"]


def _drop_color_message(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # uvicorn passes a second, ANSI-coloured copy of some messages as `extra`; the plain
    # `event` already says it, and escape codes have no place in a log line.
    event_dict.pop("color_message", None)
    return event_dict


def configure_logging(service: str, level: str = "info", log_format: LogFormat = "auto") -> None:
    """Log lines on stdout for structlog and stdlib (uvicorn, aio-pika) alike, secrets redacted.

    `json` (one object per line, for collectors) or `console` (aligned, coloured text for a
    person); `auto` is `console` when stdout is a terminal and `json` otherwise. Every line
    carries `service`, and inside a traced event `trace_id` and `span_id`, so a log search and
    a trace lookup lead to each other.
    """
    console = log_format == "console" or (log_format == "auto" and sys.stdout.isatty())

    def _add_service(
        _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        # A processor rather than a bound contextvar: tasks and threads started before or
        # outside the request context (the span exporter, uvicorn's) still get it.
        event_dict.setdefault("service", service)
        return event_dict

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_service,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The console renderer formats tracebacks itself (and warns if they are text already).
            *([] if console else [structlog.processors.format_exc_info]),
            _redact_event,
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
            if console
            else structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def otlp_headers(settings: TelemetrySettings) -> dict[str, str]:
    """`ADVANCED_OTEL_EXPORTER_OTLP_HEADERS` (`key=value,key=value`) as a dict."""
    headers: dict[str, str] = {}
    if settings.otel_exporter_otlp_headers is not None:
        for pair in settings.otel_exporter_otlp_headers.get_secret_value().split(","):
            key, _, value = pair.partition("=")
            if key.strip():
                headers[key.strip()] = value.strip()
    return headers


def configure_tracing(settings: TelemetrySettings, service: str) -> bool:
    """Export spans over OTLP when `ADVANCED_OTEL_EXPORTER_OTLP_ENDPOINT` is set.

    Also instruments Redis commands and AMQP publish/consume. Returns whether tracing is on.
    The batch processor reads the standard `OTEL_BSP_*` variables (delay, batch size).
    """
    endpoint = settings.otel_exporter_otlp_endpoint
    if not endpoint or not settings.telemetry_enabled:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    exporter: SpanExporter
    if settings.otel_exporter_otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(endpoint=endpoint, headers=otlp_headers(settings))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        if not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        exporter = HttpExporter(endpoint=endpoint, headers=otlp_headers(settings))

    resource = Resource.create({"service.name": service})
    processors = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
    processors.add_span_processor(BatchSpanProcessor(exporter))
    provider = TracerProvider(resource=resource, active_span_processor=processors)
    trace.set_tracer_provider(provider)

    from opentelemetry.instrumentation.redis import RedisInstrumentor

    # Presence refreshes, partition leases and health checks issue Redis commands every
    # second outside any event: as root spans they would bury the event traces. Redis
    # commands are traced only inside a trace that is already sampled (an event, a request).
    RedisInstrumentor().instrument(
        tracer_provider=TracerProvider(
            sampler=ParentBased(ALWAYS_OFF),
            resource=resource,
            shutdown_on_exit=False,
            active_span_processor=processors,
        )
    )
    if importlib.util.find_spec("aio_pika") is not None:  # the gateway does not use RabbitMQ
        from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor

        AioPikaInstrumentor().instrument(tracer_provider=provider)
    return True


def _redact_span_urls(span: trace.Span, scope: dict[str, Any]) -> None:
    # The ASGI instrumentation records the full URL, query string included, and EventSource
    # clients pass their credential as `?token=`.
    attributes = getattr(span, "attributes", None) or {}
    for key, value in list(attributes.items()):
        if isinstance(value, str) and (cleaned := redact(value)) != value:
            span.set_attribute(key, cleaned)


def instrument_app(app: FastAPI, settings: TelemetrySettings) -> None:
    """A server span per HTTP request, once `configure_tracing` has set up an exporter.

    Probes and metrics are left out (scraped every few seconds, they tell nothing), and so are
    the board WebSockets: a span for a whole connection would make every event sent on it part
    of one trace, while each event is to be its own trace. The per-message ASGI send/receive
    spans are off, so an SSE stream is one span, not one per event written.
    """
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    excluded = [f"{re.escape(path)}$" for path in ("/healthz", "/readyz", settings.metrics_path)]
    FastAPIInstrumentor.instrument_app(
        app,
        excluded_urls=",".join([*excluded, "/ws/"]),
        exclude_spans=["receive", "send"],
        server_request_hook=_redact_span_urls,
    )


def inject_trace_context() -> dict[str, str]:
    """The current span's W3C trace context, to carry in the envelope and AMQP headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_trace_context(carrier: Mapping[str, str]) -> context.Context:
    return propagate.extract(dict(carrier))


class DeliveryTracker:
    """An edge's view of the events it delivers: one span per event, latency per socket write.

    `on_event` is the `ActivityHub.on_event` hook: it runs once per event per process, after
    the event was handed to the subscribers' queues and before any of them writes it. It reads
    the event's JSON once, records a "deliver board event" span as a child of the worker's, and
    keeps `occurred_at` so that each socket write (`written`) observes the end-to-end latency
    without decoding the event again.
    """

    CACHE = 4096  # events remembered per process; a writer further behind re-reads the event

    def __init__(
        self,
        transport: str,
        observe_latency: Callable[[float], None],
        *,
        tracer: trace.Tracer = tracer,
    ) -> None:
        self._transport = transport
        self._observe = observe_latency
        self._tracer = tracer
        self._occurred: dict[tuple[str, str, int], float] = {}

    def on_event(self, event: RelayedEvent, receivers: int) -> None:
        if receivers == 0:
            return  # no subscriber here: nothing was delivered by this process
        fields = _event_fields(event.event)
        self._remember(event, _timestamp(fields.get("occurred_at")))
        carrier = fields.get("trace_context")
        # Without a carrier the span starts a trace of its own, never joins whatever is current.
        parent = extract_trace_context(carrier) if isinstance(carrier, dict) else context.Context()
        attributes: dict[str, str | int] = {
            "board.id": event.board_id,
            "board.sequence": event.sequence,
            "delivery.transport": self._transport,
            "delivery.subscribers": receivers,
        }
        if isinstance(fields.get("correlation_id"), str):
            attributes["messaging.message.conversation_id"] = fields["correlation_id"]
        if isinstance(fields.get("event_id"), str):
            attributes["messaging.message.id"] = fields["event_id"]
        self._tracer.start_span(
            "deliver board event",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        ).end()

    def written(self, event: RelayedEvent) -> None:
        """One socket wrote this live event: observe occurred_at → now."""
        occurred = self._occurred.get((event.stream_id, event.board_id, event.sequence))
        if occurred is None:
            occurred = _timestamp(_event_fields(event.event).get("occurred_at"))
        if occurred is not None:
            self._observe(max(0.0, time.time() - occurred))

    def _remember(self, event: RelayedEvent, occurred: float | None) -> None:
        if occurred is None:
            return
        self._occurred[(event.stream_id, event.board_id, event.sequence)] = occurred
        if len(self._occurred) > self.CACHE:
            del self._occurred[next(iter(self._occurred))]  # dicts keep insertion order


def _event_fields(event: bytes) -> dict[str, Any]:
    try:
        fields = orjson.loads(event)
    except orjson.JSONDecodeError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
