"""No credential in a span: the whole suite in one process (the dev suite, in-memory transport),
its spans collected in memory while a client connects with a query token and sends an event."""

from __future__ import annotations

import time

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from security.edge_client import TOKEN
from starlette.testclient import TestClient


def everything_in(span: ReadableSpan) -> str:
    parts = [span.name, *(f"{k}={v}" for k, v in (span.attributes or {}).items())]
    for event in span.events:
        parts += [event.name, *(f"{k}={v}" for k, v in (event.attributes or {}).items())]
    for link in span.links:
        parts += [f"{k}={v}" for k, v in (link.attributes or {}).items()]
    return " ".join(parts)


def test_spans_carry_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    monkeypatch.setenv("ADVANCED_REALTIME_TOKEN", TOKEN)
    monkeypatch.setenv("ADVANCED_ENVIRONMENT", "test")
    from dev_suite.__main__ import create_suite

    with TestClient(create_suite()) as client:  # type: ignore[arg-type]
        with client.websocket_connect(f"/ws/boards/spans?token={TOKEN}") as ws:
            ws.send_text(orjson.dumps({"type": "span.probe", "payload": {"t": 1}}).decode())
            kinds = {orjson.loads(ws.receive_text())["kind"] for _ in range(2)}
            # TestClient cancels the app task as the block exits: let the server finish the
            # socket first (as services/ingress-ws/tests do).
            ws.close(1000)
            deadline = time.monotonic() + 5
            idle = 'advanced_websocket_connections{service="ingress-ws"} 0.0'
            while idle not in client.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert kinds == {"ack", "event"}
    deadline = time.monotonic() + 5
    while not exporter.get_finished_spans() and time.monotonic() < deadline:
        time.sleep(0.05)
    spans = exporter.get_finished_spans()
    assert spans, "no span was recorded: the test would see nothing"
    for span in spans:
        text = everything_in(span)
        assert TOKEN not in text, span.name
        assert "token=" not in text, span.name
