"""Logs, redaction and the edges' delivery spans and latency, without brokers or exporters."""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from envelope.codec import RelayedEvent
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from realtime_runtime.observability import DeliveryTracker, inject_trace_context, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /sse/activity?token=s3cret&x=1", "GET /sse/activity?token=[redacted]&x=1"),
        ("refused Bearer abc.def-ghi for board b", "refused Bearer [redacted] for board b"),
        ("< authorization: Bearer abc.def-ghi", "< authorization: [redacted]"),
        ("amqp://guest:hunter2@rabbit:5672/", "amqp://guest:[redacted]@rabbit:5672/"),
        ("nothing secret here", "nothing secret here"),
        # The name as the server decodes it: percent-encoded, double-encoded, any case.
        (
            "GET /ws/boards/b?%74oken=s3cret HTTP/1.1",
            "GET /ws/boards/b?%74oken=[redacted] HTTP/1.1",
        ),
        ("GET /x?a=1&%2574oken=s3cret", "GET /x?a=1&%2574oken=[redacted]"),
        ("GET /x?TOKEN=s3cret;password=p", "GET /x?TOKEN=[redacted];password=[redacted]"),
        ("GET /x?access%5Ftoken=s3cret", "GET /x?access%5Ftoken=[redacted]"),
        ("GET /x?board=b&after=3", "GET /x?board=b&after=3"),
        # A URL inside another parameter's value is searched too.
        ("GET /x?next=/cb?token=s3cret&a=1", "GET /x?next=/cb?token=[redacted]&a=1"),
        ("url=http://h/p?%74oken=s3cret", "url=http://h/p?%74oken=[redacted]"),
        ('"GET /x?token=ab==cd" 200', '"GET /x?token=[redacted]" 200'),
        # A URL password with an empty user, the form Redis URLs take.
        ("rediss://:s3cret@redis:6380/0", "rediss://:[redacted]@redis:6380/0"),
        ("redis://default:s3cret@redis/0", "redis://default:[redacted]@redis/0"),
    ],
)
def test_credentials_are_redacted_from_free_text(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_log_lines_are_json_with_service_trace_and_no_secret() -> None:
    # In a process of its own: logging and structlog configuration are process-wide.
    script = textwrap.dedent(
        """
        import logging
        import structlog
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from realtime_runtime.observability import configure_logging

        configure_logging("relay-worker")
        log = structlog.get_logger("relay_worker")
        with TracerProvider().get_tracer("t").start_as_current_span("relay board event"):
            log.warning("relay failed, retrying", board_id="b", correlation_id="c", attempts=1)
        access = logging.getLogger("uvicorn.access")
        access.info('"GET /sse/boards/b?token=%s HTTP/1.1" 200', "s3cret")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    first, second = (orjson.loads(line) for line in done.stdout.splitlines())
    assert first["event"] == "relay failed, retrying" and first["level"] == "warning"
    assert (first["service"], first["board_id"], first["correlation_id"]) == (
        "relay-worker",
        "b",
        "c",
    )
    assert len(first["trace_id"]) == 32 and len(first["span_id"]) == 16
    assert second["service"] == "relay-worker" and second["logger"] == "uvicorn.access"
    assert "s3cret" not in done.stdout and "token=[redacted]" in second["event"]


def run_logging(log_format: str, *, tty: bool = False) -> str:
    """What a process that configured logging with `log_format` writes for two lines."""
    script = textwrap.dedent(
        f"""
        import logging
        from realtime_runtime.observability import configure_logging

        configure_logging("ingress-ws", "info", {log_format!r})
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on %s", "http://127.0.0.1:8004",
            extra={{"color_message": "Uvicorn running on \\x1b[1m%s\\x1b[0m"}},
        )
        logging.getLogger("uvicorn.access").info("GET /?token=s3cret HTTP/1.1 200")
        """
    )
    if not tty:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout
    leader, follower = pty.openpty()
    try:
        with subprocess.Popen([sys.executable, "-c", script], stdout=follower) as process:
            os.close(follower)
            output = b""
            with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
                while chunk := os.read(leader, 4096):
                    output += chunk
            assert process.wait(timeout=60) == 0
    finally:
        os.close(leader)
    return output.decode()


def test_json_lines_carry_no_terminal_colour_codes() -> None:
    # uvicorn's "running on" line comes with an ANSI-coloured `color_message` extra.
    lines = [orjson.loads(line) for line in run_logging("json").splitlines()]
    assert lines[0]["event"] == "Uvicorn running on http://127.0.0.1:8004"
    assert all("\x1b" not in orjson.dumps(line).decode() for line in lines)
    assert "color_message" not in lines[0]


def test_console_format_is_text_for_a_person_with_secrets_redacted() -> None:
    output = run_logging("console")
    first, second = output.splitlines()
    assert first.startswith("20") and not first.startswith("{")  # a timestamp, not JSON
    assert "Uvicorn running on http://127.0.0.1:8004" in first and "[info" in first
    assert "service=ingress-ws" in first and "color_message" not in output
    assert "s3cret" not in output and "token=[redacted]" in second
    assert "\x1b" not in output  # colours only on a terminal


def test_auto_is_console_on_a_terminal_and_json_elsewhere() -> None:
    on_terminal = run_logging("auto", tty=True)
    assert "Uvicorn running on" in on_terminal and not on_terminal.lstrip().startswith("{")
    assert "\x1b[" in on_terminal  # coloured for the person reading it
    piped = run_logging("auto").splitlines()
    assert orjson.loads(piped[0])["service"] == "ingress-ws"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(spans: InMemorySpanExporter) -> trace.Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test")


def relayed(sequence: int, occurred_at: datetime, trace_context: dict[str, str]) -> RelayedEvent:
    event = {
        "sequence": sequence,
        "event_id": "e-1",
        "correlation_id": "c-1",
        "board_id": "b",
        "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
        "trace_context": trace_context,
    }
    return RelayedEvent(f"{sequence}-0", "b", sequence, orjson.dumps(event))


def test_a_fanned_out_event_gets_one_span_under_the_workers(
    tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("relay board event") as relay:
        carrier = inject_trace_context()
    tracker = DeliveryTracker("sse", lambda seconds: None, tracer=tracer)

    tracker.on_event(relayed(1, datetime.now(UTC), carrier), receivers=3)
    tracker.on_event(relayed(2, datetime.now(UTC), carrier), receivers=0)  # nobody here

    (deliver,) = [s for s in spans.get_finished_spans() if s.name == "deliver board event"]
    assert deliver.parent is not None and deliver.parent.span_id == relay.get_span_context().span_id
    assert deliver.context.trace_id == relay.get_span_context().trace_id
    assert dict(deliver.attributes or {}) == {
        "board.id": "b",
        "board.sequence": 1,
        "delivery.transport": "sse",
        "delivery.subscribers": 3,
        "messaging.message.conversation_id": "c-1",
        "messaging.message.id": "e-1",
    }


def test_an_event_without_trace_context_starts_its_own_trace(
    tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    tracker = DeliveryTracker("websocket", lambda seconds: None, tracer=tracer)
    with tracer.start_as_current_span("unrelated"):
        tracker.on_event(relayed(1, datetime.now(UTC), {}), receivers=1)
    deliver = next(s for s in spans.get_finished_spans() if s.name == "deliver board event")
    assert deliver.parent is None


def test_latency_is_observed_per_write_from_occurred_at(tracer: trace.Tracer) -> None:
    observed: list[float] = []
    tracker = DeliveryTracker("websocket", observed.append, tracer=tracer)
    event = relayed(1, datetime.now(UTC) - timedelta(seconds=2), {})
    tracker.on_event(event, receivers=2)
    tracker.written(event)
    tracker.written(event)
    # An event the tracker never saw fanned out (its cache is bounded) is read again.
    late = relayed(9, datetime.now(UTC) - timedelta(seconds=1), {})
    tracker.written(late)
    assert len(observed) == 3
    assert all(1.9 < seconds < 2 + 30 for seconds in observed[:2])
    assert 0.9 < observed[2] < observed[0]


def test_the_occurred_at_cache_is_bounded(tracer: trace.Tracer) -> None:
    tracker = DeliveryTracker("sse", lambda seconds: None, tracer=tracer)
    now = datetime.now(UTC)
    for sequence in range(1, DeliveryTracker.CACHE + 100):
        tracker.on_event(relayed(sequence, now, {}), receivers=1)
    assert len(tracker._occurred) == DeliveryTracker.CACHE
