"""What an operator sees: metrics that move as events flow, one trace per event across the three
services, and log lines that tell what happened to an event. Real processes, real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
import redis
from conftest import TOKEN
from deploy.test_config_drift import DOCUMENTED_METRICS
from envelope.topology import RedisKeys
from prometheus_client.parser import text_string_to_metric_families
from support.brokers import Brokers, Names
from support.clients import board, sse
from support.otlp import OtlpReceiver, ReceivedSpan
from support.processes import Service, Suite

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

# The metric names the dashboards and alerts are built on (deploy/compose), per service.
EXPORTED = {
    "ingress": [
        "advanced_http_requests_total",
        "advanced_http_request_duration_seconds",
        "advanced_board_events_published_total",
        "advanced_board_event_publish_duration_seconds",
        "advanced_websocket_connections",
        "advanced_websocket_frames_total",
        "advanced_websocket_replayed_events_total",
        "advanced_websocket_resets_total",
        "advanced_delivery_latency_seconds",
        "advanced_feed_frames_received_total",
    ],
    "gateway": [
        "advanced_http_requests_total",
        "advanced_http_request_duration_seconds",
        "advanced_sse_connections",
        "advanced_sse_events_sent_total",
        "advanced_sse_replayed_events_total",
        "advanced_sse_resets_total",
        "advanced_delivery_latency_seconds",
        "advanced_feed_frames_received_total",
    ],
    "worker": [
        "advanced_http_requests_total",
        "advanced_http_request_duration_seconds",
        "advanced_worker_events_total",
        "advanced_worker_processing_duration_seconds",
        "advanced_worker_consumer_lag_seconds",
        "advanced_worker_queue_depth",
        "advanced_worker_publishes_without_subscribers_total",
    ],
}
PROMETHEUS_OWN = {"up", "probe_success"}  # added by Prometheus and its blackbox exporter
REDIS_SCOPE = "opentelemetry.instrumentation.redis"
AMQP_SCOPE = "opentelemetry.instrumentation.aio_pika"


class Metrics:
    """One scrape of a service's /metrics, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))

    def value(self, sample: str, **labels: str) -> float:
        """Sum of the samples named `sample` whose labels include `labels` (0 when none)."""
        total = 0.0
        for family in self.families.values():
            for found in family.samples:
                if found.name == sample and labels.items() <= found.labels.items():
                    total += found.value
        return total


async def scrape(service: Service) -> Metrics:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{service.url}/metrics")
    assert response.status_code == 200, response.text
    return Metrics(response.text)


async def ready(service: Service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{service.url}/readyz", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{service.kind} not ready after {timeout}s: {service.tail()}")


async def eventually(
    service: Service, condition: Callable[[Metrics], bool], what: str, timeout: float = 20
) -> Metrics:
    """Scrape until `condition` holds: counters move a moment after the client sees the effect."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            metrics = await scrape(service)
        except httpx.HTTPError:  # not listening yet
            metrics = Metrics("")
        if condition(metrics):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"{service.kind}: {what} did not happen in {timeout}s")
        await asyncio.sleep(0.2)


def log_lines(service: Service) -> list[dict[str, Any]]:
    """This process's JSON log lines (the log file may hold an earlier run's before them)."""
    assert service.log_path is not None and service.process is not None
    started = f"Started server process [{service.process.pid}]"
    lines: list[dict[str, Any]] = []
    for line in Path(service.log_path).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            parsed = orjson.loads(line)
            if parsed.get("event") == started:
                lines.clear()
            lines.append(parsed)
    return lines


async def logged(
    service: Service, match: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for line in log_lines(service):
            if match(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"{service.kind} never logged {what}: {service.tail(15)}")
        await asyncio.sleep(0.2)


def of(suite: Suite, kind: str) -> Service:
    return next(s for s in suite.services if s.kind == kind)


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def traced(suite: Suite, otlp: OtlpReceiver) -> Suite:
    """The three services exporting spans to the test receiver, in batches every 100 ms."""
    tracing = {
        "ADVANCED_OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    for kind in ("worker", "ingress", "gateway"):
        suite.start(kind, **tracing)
    return suite


def receive_span(spans: list[ReceivedSpan], correlation_id: str) -> ReceivedSpan | None:
    return next(
        (
            s
            for s in spans
            if s.name == "receive board event"
            and s.attributes.get("messaging.message.conversation_id") == correlation_id
        ),
        None,
    )


EVENT_PATH = {
    ("ingress-ws", "receive board event"),
    ("ingress-ws", "publish board event"),
    ("relay-worker", "relay board event"),
    ("ingress-ws", "deliver board event"),
    ("sse-gateway", "deliver board event"),
}


def whole_trace(correlation_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    def complete(spans: list[ReceivedSpan]) -> bool:
        root = receive_span(spans, correlation_id)
        if root is None:
            return False
        names = {(s.service, s.name) for s in spans if s.trace_id == root.trace_id}
        amqp = {s.kind for s in spans if s.trace_id == root.trace_id and s.scope == AMQP_SCOPE}
        return EVENT_PATH <= names and amqp >= {"producer", "consumer"}

    return complete


async def test_one_event_is_one_trace_from_the_frame_to_every_subscriber(
    traced: Suite, otlp: OtlpReceiver
) -> None:
    ingress, gateway = of(traced, "ingress"), of(traced, "gateway")
    async with (
        sse(f"{gateway.url}/sse/boards/traced?token={TOKEN}") as board_stream,
        sse(f"{gateway.url}/sse/activity", headers={"Authorization": f"Bearer {TOKEN}"}) as every,
        board(f"{ingress.ws_url}/ws/boards/traced?token={TOKEN}") as client,
    ):
        correlation_id = await client.send(payload={"text": "follow me"})
        await client.next("ack")
        await client.next("event")
        await board_stream.next()
        await every.next()

    spans = await otlp.wait_for(whole_trace(correlation_id), what="the event's whole trace")
    root = receive_span(spans, correlation_id)
    assert root is not None and root.parent_span_id == "" and root.kind == "server"
    in_trace = [s for s in spans if s.trace_id == root.trace_id]
    named = {(s.service, s.name): s for s in in_trace}

    publish = named["ingress-ws", "publish board event"]
    relay = named["relay-worker", "relay board event"]
    assert publish.parent_span_id == root.span_id
    # The worker's span hangs off the ingress's publish: the context crossed RabbitMQ.
    assert relay.parent_span_id == publish.span_id
    assert relay.attributes["board.id"] == "traced"
    assert relay.attributes["relay.outcome"] == "delivered"

    # Each edge process records the fan-out once, as a child of the worker's span: the
    # context crossed Redis inside the ActivityEvent.
    delivered = [s for s in in_trace if s.name == "deliver board event"]
    assert sorted(s.service for s in delivered) == ["ingress-ws", "sse-gateway"]
    for span in delivered:
        assert span.parent_span_id == relay.span_id
        assert span.attributes["board.id"] == "traced"
        assert span.attributes["board.sequence"] == 1
    websocket = named["ingress-ws", "deliver board event"]
    streams = named["sse-gateway", "deliver board event"]
    assert websocket.attributes["delivery.subscribers"] == 1
    assert streams.attributes["delivery.subscribers"] == 2  # the board and the activity stream
    assert websocket.attributes["delivery.transport"] == "websocket"
    assert streams.attributes["delivery.transport"] == "sse"

    # The instrumentation libraries add the AMQP send/receive and the Redis relay step.
    send = next(s for s in in_trace if s.scope == AMQP_SCOPE and s.kind == "producer")
    assert send.service == "ingress-ws" and send.parent_span_id == publish.span_id
    receive = next(s for s in in_trace if s.scope == AMQP_SCOPE and s.kind == "consumer")
    assert receive.service == "relay-worker" and receive.parent_span_id == send.span_id
    assert any(s.scope == REDIS_SCOPE and s.parent_span_id == relay.span_id for s in in_trace)


async def test_traces_are_per_event_and_logs_lead_to_them(
    traced: Suite, otlp: OtlpReceiver
) -> None:
    ingress, gateway, worker = (of(traced, kind) for kind in ("ingress", "gateway", "worker"))
    async with (
        sse(f"{gateway.url}/sse/boards/story?token={TOKEN}") as board_stream,
        board(f"{ingress.ws_url}/ws/boards/story?token={TOKEN}") as client,
    ):
        ids = [await client.send(id_=f"story-{n}") for n in range(3)]
        for _ in ids:
            await client.next("ack")
            await client.next("event")
            await board_stream.next()
        await client.send(id_="story-0")  # a resend: the worker skips it as a duplicate
        await client.next("ack")

    spans = await otlp.wait_for(
        lambda spans: all(whole_trace(i)(spans) for i in ids), what="three whole traces"
    )
    roots = [receive_span(spans, i) for i in ids]
    # One connection, three events: three traces, not one trace for the connection.
    assert len({root.trace_id for root in roots if root is not None}) == 3
    # No span per WebSocket frame or per connection: the board socket is not traced as HTTP.
    assert not [s for s in spans if s.service == "ingress-ws" and "websocket" in s.name.lower()]
    # Background Redis traffic (presence refreshes every second, partition leases) is not
    # traced on its own: a Redis span is always part of an event's or a request's trace.
    assert not [s for s in spans if s.scope == REDIS_SCOPE and s.parent_span_id == ""]

    # The SSE request span arrives once the stream has ended; its URL had the token.
    spans = await otlp.wait_for(
        lambda spans: any(
            s.service == "sse-gateway" and s.kind == "server" and "/sse/boards" in s.name
            for s in spans
        ),
        what="the SSE request's span",
    )
    for span in spans:
        for key, value in span.attributes.items():
            assert TOKEN not in str(value), (span.service, span.name, key)

    # The duplicate is logged with what an operator searches by, and the trace id leads to
    # the trace of the resent frame.
    duplicate = await logged(
        worker, lambda line: line.get("event") == "duplicate skipped", "the duplicate"
    )
    assert duplicate["service"] == "relay-worker"
    assert duplicate["board_id"] == "story" and duplicate["correlation_id"] == "story-0"
    assert re.fullmatch(r"[0-9a-f]{32}", duplicate["trace_id"])

    # Each service exports its own batches: wait for the worker's span as well as the ingress's.
    def resent_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == duplicate["trace_id"]]

    resent = resent_spans(
        await otlp.wait_for(
            lambda spans: (
                {"receive board event", "relay board event"}
                <= {s.name for s in resent_spans(spans)}
            ),
            what="the duplicate's trace, from the ingress and the worker",
        )
    )
    relay = next(s for s in resent if s.name == "relay board event")
    assert relay.attributes["relay.outcome"] == "duplicate"
    for service in (ingress, gateway, worker):
        assert TOKEN not in str(log_lines(service))


async def test_metrics_move_as_events_flow(suite: Suite) -> None:
    worker, ingress, gateway = (suite.start(kind) for kind in ("worker", "ingress", "gateway"))
    before = {service.kind: await scrape(service) for service in (worker, ingress, gateway)}
    for kind, names in EXPORTED.items():
        missing = set(names) - before[kind].declared
        assert not missing, f"{kind} does not export {sorted(missing)}"
    # The dashboard and the alert rules may query only DOCUMENTED_METRICS (tests/deploy checks
    # that); each of those must be in a real scrape, so every panel shows something.
    exported = set().union(*(scrape.declared for scrape in before.values()))
    unexported = DOCUMENTED_METRICS - PROMETHEUS_OWN - exported
    assert not unexported, f"dashboards or alerts query metrics no service exports: {unexported}"

    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{ingress.url}/")).status_code == 200
    async with (
        sse(f"{gateway.url}/sse/boards/flow?token={TOKEN}") as board_stream,
        sse(f"{gateway.url}/sse/activity", headers={"Authorization": f"Bearer {TOKEN}"}) as every,
        board(f"{ingress.ws_url}/ws/boards/flow?token={TOKEN}") as client,
    ):
        open_now = await scrape(gateway)
        assert open_now.value("advanced_sse_connections", route="board") == 1
        assert open_now.value("advanced_sse_connections", route="activity") == 1
        assert (await scrape(ingress)).value("advanced_websocket_connections") == 1
        for correlation_id in ("flow-1", "flow-2", "flow-1"):
            await client.send(id_=correlation_id)
            await client.next("ack")
        await client.connection.send("not json")
        await client.next("error")
        for _ in range(2):
            await client.next("event")
            await board_stream.next()
            await every.next()
        await asyncio.sleep(2)  # a stream that lasts: its length must not count as latency
    # Resumes: the WebSocket and SSE streams replay from the board's stream, or reset.
    async with board(f"{ingress.ws_url}/ws/boards/flow?token={TOKEN}&after=0") as resumed:
        assert [(await resumed.next("event"))["sequence"] for _ in range(2)] == [1, 2]
    async with sse(
        f"{gateway.url}/sse/boards/flow?token={TOKEN}", headers={"Last-Event-ID": "0"}
    ) as replayed:
        ids = [(await replayed.next()).id or "" for _ in range(2)]
        assert [cursor.split(".")[0] for cursor in ids] == ["1", "2"]  # `<sequence>.<epoch>`
    async with sse(
        f"{gateway.url}/sse/boards/flow?token={TOKEN}", headers={"Last-Event-ID": "nonsense"}
    ) as reset:
        await reset.next(kind="reset")

    def moved(metrics: Metrics, kind: str, sample: str, by: float, **labels: str) -> bool:
        return metrics.value(sample, **labels) - before[kind].value(sample, **labels) >= by

    await eventually(
        ingress,
        lambda m: (
            moved(m, "ingress", "advanced_board_events_published_total", 3, status="success")
            and moved(m, "ingress", "advanced_websocket_frames_total", 3, outcome="accepted")
            and moved(m, "ingress", "advanced_websocket_frames_total", 1, outcome="invalid_message")
            and moved(m, "ingress", "advanced_board_event_publish_duration_seconds_count", 3)
            and moved(
                m, "ingress", "advanced_delivery_latency_seconds_count", 2, transport="websocket"
            )
            and moved(m, "ingress", "advanced_websocket_replayed_events_total", 2)
            and moved(m, "ingress", "advanced_http_requests_total", 1, handler="/", status="200")
            and moved(m, "ingress", "advanced_http_request_duration_seconds_count", 1, handler="/")
        ),
        "publishes, frames, latency, replays and HTTP requests counted",
    )
    await eventually(
        worker,
        lambda m: (
            moved(m, "worker", "advanced_worker_events_total", 2, outcome="delivered")
            and moved(m, "worker", "advanced_worker_events_total", 1, outcome="duplicate")
            and moved(m, "worker", "advanced_worker_processing_duration_seconds_count", 3)
            and moved(m, "worker", "advanced_worker_consumer_lag_seconds_count", 3)
            and any(
                s.labels.get("queue", "").endswith(".dlq")
                for s in m.families["advanced_worker_queue_depth"].samples
            )
        ),
        "delivered, duplicate, durations, lag and queue depths counted",
    )
    await eventually(
        gateway,
        lambda m: (
            moved(m, "gateway", "advanced_sse_events_sent_total", 2, route="board")
            and moved(m, "gateway", "advanced_sse_events_sent_total", 2, route="activity")
            and moved(m, "gateway", "advanced_delivery_latency_seconds_count", 4, transport="sse")
            and moved(m, "gateway", "advanced_sse_replayed_events_total", 2)
            and moved(m, "gateway", "advanced_sse_resets_total", 1)
            and moved(
                m, "gateway", "advanced_http_requests_total", 3, handler="/sse/boards/{board_id}"
            )
        ),
        "events sent, latency, replays, resets and SSE requests counted",
    )
    after = await scrape(gateway)
    assert after.value("advanced_sse_connections") == 0
    # SSE streams are counted as requests, but the duration histogram takes only the time to
    # the response's start: the first stream stayed open for over two seconds.
    sse_duration = after.value(
        "advanced_http_request_duration_seconds_sum", handler="/sse/boards/{board_id}"
    ) - before["gateway"].value(
        "advanced_http_request_duration_seconds_sum", handler="/sse/boards/{board_id}"
    )
    assert 0 <= sse_duration < 1.5
    # Latency is end to end (occurred_at at the ingress to the socket write), so it is small
    # here but never zero or negative.
    latency = after.value("advanced_delivery_latency_seconds_sum", transport="sse")
    assert 0 < latency < 4 * 10


async def test_retries_and_dead_letters_are_counted_and_logged(
    suite: Suite, brokers: Brokers, names: Names
) -> None:
    env = names.env()
    worker = suite.start("worker", ADVANCED_RABBITMQ_MAX_RETRIES="1")
    ingress = suite.start("ingress")
    before = await scrape(worker)

    # A body that is not an envelope goes to the DLQ at once, with the reason logged.
    connection = await aio_pika.connect(brokers.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(env["ADVANCED_RABBITMQ_EXCHANGE"])
        await exchange.publish(aio_pika.Message(b"not an envelope"), routing_key="board.0")
    malformed = await logged(
        worker,
        lambda line: line.get("event") == "dead-lettering a malformed envelope",
        "the malformed envelope",
    )
    assert malformed["service"] == "relay-worker" and "not JSON" in malformed["reason"]

    # Redis answers but the relay step fails (the board's sequence counter is corrupt): the
    # event is retried once, then dead-lettered, each step logged with its board and id.
    red = redis.Redis.from_url(brokers.redis_url)
    try:
        keys = RedisKeys(env["ADVANCED_REDIS_KEY_PREFIX"], env["ADVANCED_ACTIVITY_CHANNEL"])
        red.set(keys.sequence("poisoned"), "not-a-number")
    finally:
        red.close()
    async with board(f"{ingress.ws_url}/ws/boards/poisoned?token={TOKEN}") as client:
        await client.send(id_="poisoned-1")
        await client.next("ack")
    retried = await logged(
        worker, lambda line: line.get("event") == "relay failed, retrying", "the retry"
    )
    dead = await logged(
        worker,
        lambda line: line.get("event") == "dead-lettering after the last retry",
        "the dead letter",
    )
    for line in (retried, dead):
        assert line["board_id"] == "poisoned" and line["correlation_id"] == "poisoned-1"
        assert "does not hold a sequence" in line["reason"] and line["service"] == "relay-worker"
    assert (retried["level"], retried["attempts"]) == ("warning", 1)
    assert (dead["level"], dead["attempts"]) == ("error", 1)

    def counted(m: Metrics) -> bool:
        def grew(outcome: str) -> float:
            sample = "advanced_worker_events_total"
            return m.value(sample, outcome=outcome) - before.value(sample, outcome=outcome)

        dlq = env["ADVANCED_RABBITMQ_DLQ_QUEUE"]
        return (
            grew("retried") == 1
            and grew("dead_lettered") == 2
            and m.value("advanced_worker_queue_depth", queue=dlq) == 2
        )

    await eventually(worker, counted, "one retry and two dead letters counted, the DLQ at 2")


async def test_metrics_answer_503_when_telemetry_is_disabled(suite: Suite) -> None:
    services = [
        suite.start(kind, ADVANCED_TELEMETRY_ENABLED="false")
        for kind in ("worker", "ingress", "gateway")
    ]
    async with httpx.AsyncClient() as http:
        for service in services:
            response = await http.get(f"{service.url}/metrics")
            assert (response.status_code, response.text) == (503, "telemetry disabled")
