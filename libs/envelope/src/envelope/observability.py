"""Structured logs, OpenTelemetry tracing and the trace-context carrier shared by the services."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import context, propagate, trace

from envelope.settings import SuiteSettings

_SECRET_IN_TEXT = re.compile(
    r"((?:token|access_token|password)=)[^&\s\"']+|(Bearer\s+)[A-Za-z0-9._~+/=-]+|(//[^:/@\s]+:)[^@\s]+@",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Hide credentials in free text: query tokens, bearer tokens, URL passwords."""

    def _hide(match: re.Match[str]) -> str:
        prefix = next(group for group in match.groups() if group)
        return f"{prefix}[redacted]" + ("@" if prefix.startswith("//") else "")

    return _SECRET_IN_TEXT.sub(_hide, text)


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
    return event_dict


def configure_logging(service: str, level: str = "info") -> None:
    """JSON lines on stdout for structlog and stdlib (uvicorn, aio-pika) alike, secrets redacted."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
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
            structlog.processors.format_exc_info,
            _redact_event,
            structlog.processors.JSONRenderer(),
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
    structlog.contextvars.bind_contextvars(service=service)


def configure_tracing(settings: SuiteSettings, service: str) -> None:
    """Export spans over OTLP when `ADVANCED_OTEL_EXPORTER_OTLP_ENDPOINT` is set."""
    endpoint = settings.otel_exporter_otlp_endpoint
    if not endpoint or not settings.telemetry_enabled:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    headers = {}
    if settings.otel_exporter_otlp_headers is not None:
        for pair in settings.otel_exporter_otlp_headers.get_secret_value().split(","):
            key, _, value = pair.partition("=")
            if key.strip():
                headers[key.strip()] = value.strip()
    if settings.otel_exporter_otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )

        if not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, headers=headers))
    )
    trace.set_tracer_provider(provider)


def inject_trace_context() -> dict[str, str]:
    """The current span's W3C trace context, to carry in the envelope and AMQP headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_trace_context(carrier: Mapping[str, str]) -> context.Context:
    return propagate.extract(dict(carrier))
