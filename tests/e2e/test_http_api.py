"""The HTTP API end to end: real processes, real RabbitMQ and Redis.

Publishes (one event, batches, resends) reach WebSocket and SSE subscribers exactly once, in
order; every refusal has its status and the error frame as body; a RabbitMQ outage is 503 with
Retry-After, never a 202 without a confirm; history pages through the retained stream and says
when a cursor has expired, also under the time-based retention.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from conftest import TOKEN
from envelope.api import HistoryPage, PublishAccepted, PublishBatchReply
from envelope.models import ErrorFrame
from support.brokers import Brokers
from support.clients import BoardClient, SseStream, board, sse
from support.otlp import OtlpReceiver, ReceivedSpan
from support.processes import Service, Suite
from support.proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

BEARER = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "e2e-http-api-jwt-secret-of-32-bytes"


def events_url(ingress: Service, board_id: str, suffix: str = "") -> str:
    return f"{ingress.url}/api/boards/{board_id}/events{suffix}"


def message(n: int, id_: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "note.created", "payload": {"n": n}}
    return body if id_ is None else body | {"id": id_}


async def no_more(client: BoardClient, stream: SseStream, seconds: float = 2.0) -> None:
    """Nothing else arrives on either transport within `seconds` (no second delivery)."""
    await asyncio.sleep(seconds)
    assert client.frames["event"].empty(), client.frames["event"].get_nowait()
    extra = [e for e in list(stream.events._queue) if e.event == "activity"]  # type: ignore[attr-defined]
    assert not extra, extra


async def test_http_publishes_and_resends_reach_websocket_and_sse_once_in_order(
    suite: Suite,
) -> None:
    suite.start("worker")
    ingress = suite.start("ingress")
    gateway = suite.start("gateway")
    url = events_url(ingress, "http-demo")
    async with (
        sse(f"{gateway.url}/sse/boards/http-demo?token={TOKEN}") as stream,
        board(f"{ingress.ws_url}/ws/boards/http-demo?token={TOKEN}") as client,
        httpx.AsyncClient(timeout=30) as http,
    ):
        keyed = BEARER | {"Idempotency-Key": "k-1"}
        first = await http.post(url, json=message(0, "ignored-body-id"), headers=keyed)
        again = await http.post(url, json=message(0), headers=keyed)  # a resend
        assert first.status_code == again.status_code == 202, first.text
        accepted = PublishAccepted.model_validate(first.json())
        assert accepted.correlation_id == "k-1" == again.json()["correlation_id"]
        # The same key as a frame's id: the same idempotency scope, so a duplicate too.
        await client.send(payload={"n": 0}, id_="k-1")
        await client.next("ack")
        batch = [message(1), message(2, "own-id"), message(3)]
        batch_headers = BEARER | {"Idempotency-Key": "b-1"}
        replies = [
            await http.post(f"{url}:batch", json=batch, headers=batch_headers) for _ in range(2)
        ]
        for reply in replies:
            assert reply.status_code == 207, reply.text
            results = PublishBatchReply.model_validate(reply.json()).results
            assert [r.status for r in results] == [202, 202, 202]
        expected = ["k-1", "b-1:0", "own-id", "b-1:2"]
        on_socket = [await client.next("event") for _ in expected]
        on_sse = [(await stream.next()).json() for _ in expected]
        await no_more(client, stream)

    assert on_socket[0]["correlation_id"] == "k-1" and on_socket[0]["payload"] == {"n": 0}
    assert on_socket[0]["event_id"] == str(accepted.event_id)
    assert sorted(e["correlation_id"] for e in on_socket) == sorted(expected)
    for received in (on_socket, on_sse):
        assert [e["sequence"] for e in received] == [1, 2, 3, 4]
    assert [e["event_id"] for e in on_sse] == [e["event_id"] for e in on_socket]


async def test_every_refusal_has_its_status_and_the_error_frame_as_body(suite: Suite) -> None:
    ingress = suite.start(
        "ingress",
        ADVANCED_AUTH_JWT_SECRET=SECRET,
        ADVANCED_HTTP_PUBLISH_RATE_LIMIT="4/minute",
        ADVANCED_MAX_PAYLOAD_BYTES="512",
    )
    token = jwt.encode(
        {"sub": "backend", "boards": ["allowed"], "exp": int(time.time()) + 600},
        SECRET,
        algorithm="HS256",
    )
    scoped = {"Authorization": f"Bearer {token}"}
    url = events_url(ingress, "allowed")

    async def refused(response: httpx.Response, status: int, code: str) -> httpx.Response:
        assert response.status_code == status, response.text
        frame = ErrorFrame.model_validate(response.json())
        assert frame.kind == "error" and frame.code == code and frame.message
        return response

    async with httpx.AsyncClient(timeout=30) as http:
        await refused(
            await http.post(url, content=b"{not json", headers=scoped), 400, "invalid_message"
        )
        await refused(
            await http.post(url, json={"type": "Bad Type", "payload": {}}, headers=scoped),
            400,
            "invalid_message",
        )
        big = {"type": "x", "payload": {"t": "y" * 600}}
        await refused(await http.post(url, json=big, headers=scoped), 413, "payload_too_large")
        huge = b'{"type":"x","payload":{"t":"' + b"y" * 200_000 + b'"}}'
        await refused(await http.post(url, content=huge, headers=scoped), 413, "payload_too_large")
        too_many = [message(n) for n in range(101)]
        await refused(
            await http.post(f"{url}:batch", json=too_many, headers=scoped), 413, "payload_too_large"
        )
        bad_board = events_url(ingress, "no%20spaces")
        await refused(
            await http.post(bad_board, json=message(0), headers=scoped), 422, "invalid_message"
        )
        no_token = await refused(await http.post(url, json=message(0)), 401, "unauthorized")
        assert no_token.headers["www-authenticate"] == "Bearer"
        await refused(await http.post(f"{url}?token=wrong", json=message(0)), 401, "unauthorized")
        other = events_url(ingress, "not-listed")
        await refused(await http.post(other, json=message(0), headers=scoped), 403, "forbidden")
        await refused(await http.get(other, headers=scoped), 403, "forbidden")

        # Four events a minute for this credential: the fifth waits, the shared token's own
        # budget is untouched (limits are per credential).
        statuses = [
            (await http.post(url, json=message(n), headers=scoped)).status_code for n in range(4)
        ]
        assert statuses == [202] * 4
        limited = await refused(
            await http.post(url, json=message(4), headers=scoped), 429, "rate_limited"
        )
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        batch = await http.post(f"{url}:batch", json=[message(5)], headers=scoped)
        assert batch.status_code == 207 and batch.json()["results"][0]["status"] == 429
        assert (await http.post(url, json=message(6), headers=BEARER)).status_code == 202


async def test_a_rabbitmq_outage_is_503_with_retry_after_never_a_202_without_a_confirm(
    suite: Suite, brokers: Brokers
) -> None:
    rabbit = urlsplit(brokers.rabbitmq_url)
    proxy = await TcpProxy(rabbit.hostname or "127.0.0.1", rabbit.port or 5672).start()
    suite.start("worker")  # straight to RabbitMQ: only the ingress loses it
    ingress = suite.start(
        "ingress", wait=False, ADVANCED_RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    )
    # In a thread: the proxy runs on this event loop, which a blocking wait would stall.
    await asyncio.to_thread(ingress.wait_ready)
    url = events_url(ingress, "outage")
    accepted: dict[str, int] = {}  # idempotency key → 202s it got
    refused: list[str] = []

    async def publish(http: httpx.AsyncClient, key: str) -> httpx.Response:
        response = await http.post(
            url, json=message(len(accepted)), headers=BEARER | {"Idempotency-Key": key}
        )
        if response.status_code == 202:
            accepted[key] = accepted.get(key, 0) + 1
        else:
            assert response.status_code == 503, response.text
            assert ErrorFrame.model_validate(response.json()).code == "unavailable"
            assert int(response.headers["retry-after"]) >= 1
            refused.append(key)
        return response

    try:
        async with (
            board(f"{ingress.ws_url}/ws/boards/outage?token={TOKEN}") as client,
            httpx.AsyncClient(timeout=60) as http,
        ):
            assert (await publish(http, "before")).status_code == 202
            # Blackholed: the broker takes nothing and confirms nothing, so the publish is
            # answered 503 when the confirm does not come (15 s), never 202.
            proxy.blackhole()
            assert (await publish(http, "blackholed")).status_code == 503
            await proxy.stop()  # down: refused at once
            down = [await publish(http, f"down-{n}") for n in range(3)]
            assert [r.status_code for r in down] == [503] * 3
            batch = await http.post(f"{url}:batch", json=[message(9)], headers=BEARER)
            assert batch.json()["results"][0]["status"] == 503
            await proxy.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (await publish(http, "after")).status_code == 202:
                    break
                await asyncio.sleep(0.5)
            assert accepted.get("after") == 1, (
                "publishes were still refused after RabbitMQ came back"
            )
            for key in sorted(set(refused) - {"after"}):  # the client resends what was refused
                assert (await publish(http, key)).status_code == 202
            keys = {"before", "blackholed", "down-0", "down-1", "down-2", "after"}
            delivered = [(await client.next("event", timeout=30))["correlation_id"] for _ in keys]
            await asyncio.sleep(2)
            assert client.frames["event"].empty(), "an event was delivered twice"
    finally:
        await proxy.stop()
    assert sorted(delivered) == sorted(keys)
    assert {"blackholed", "down-0", "down-1", "down-2"} <= set(refused)
    assert all(count == 1 for count in accepted.values()), accepted


async def history(http: httpx.AsyncClient, ingress: Service, query: str) -> HistoryPage:
    response = await http.get(events_url(ingress, "history", query), headers=BEARER)
    assert response.status_code == 200, response.text
    return HistoryPage.model_validate(response.json())


async def until_retained(http: httpx.AsyncClient, ingress: Service, count: int) -> None:
    deadline = time.monotonic() + 60
    while len((await history(http, ingress, "?limit=1000")).events) < count:
        assert time.monotonic() < deadline, "the events were not relayed"
        await asyncio.sleep(0.2)


async def test_history_pages_and_says_when_time_retention_expired_a_cursor(suite: Suite) -> None:
    # Long enough to page through before it, on a loaded machine, counted from the last write.
    retention = {"ADVANCED_REPLAY_RETENTION_SECONDS": "6"}
    suite.start("worker", **retention)
    ingress = suite.start("ingress", **retention)
    url = events_url(ingress, "history")
    async with httpx.AsyncClient(timeout=30) as http:
        batch = [message(n, f"old-{n}") for n in range(5)]
        assert (await http.post(f"{url}:batch", json=batch, headers=BEARER)).status_code == 207
        await until_retained(http, ingress, 5)
        first = await history(http, ingress, "?limit=2")
        assert [e.sequence for e in first.events] == [1, 2] and first.next_after == 2
        second = await history(http, ingress, f"?after={first.next_after}&limit=2")
        assert [e.sequence for e in second.events] == [3, 4] and second.next_after == 4
        epoch = first.events[0].epoch
        last = await history(http, ingress, f"?after=4.{epoch}")
        assert [e.correlation_id for e in last.events] == ["old-4"] and last.next_after is None
        assert last.reset is None

        await asyncio.sleep(7)  # past the time limit: the old events go
        for n in range(5, 8):
            assert (await http.post(url, json=message(n), headers=BEARER)).status_code == 202
        deadline = time.monotonic() + 60
        while [e.sequence for e in (await history(http, ingress, "")).events] != [6, 7, 8]:
            assert time.monotonic() < deadline, "the old events were not trimmed by time"
            await asyncio.sleep(0.2)
        expired = await history(http, ingress, "?after=2&limit=2")
        assert expired.reset is not None and expired.reset.reason == "cursor_expired"
        assert expired.reset.oldest_cursor == "6"
        assert [e.sequence for e in expired.events] == [6, 7] and expired.next_after == 7
        other_epoch = await history(http, ingress, "?after=2.1")
        assert other_epoch.reset is not None and other_epoch.reset.reason == "history_lost"


async def test_history_reads_what_a_websocket_resume_reads(suite: Suite) -> None:
    suite.start("worker")
    ingress = suite.start("ingress")
    board_id = f"same-{uuid.uuid4().hex[:8]}"
    url = events_url(ingress, board_id)
    async with httpx.AsyncClient(timeout=30) as http:
        batch = [message(n) for n in range(4)]
        assert (await http.post(f"{url}:batch", json=batch, headers=BEARER)).status_code == 207
        deadline = time.monotonic() + 60
        while True:
            page = (await http.get(f"{url}?after=1", headers=BEARER)).json()
            if len(page["events"]) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    async with board(f"{ingress.ws_url}/ws/boards/{board_id}?token={TOKEN}&after=1") as client:
        resumed = [await client.next("event") for _ in range(3)]
    assert [e["event_id"] for e in page["events"]] == [e["event_id"] for e in resumed]


async def test_an_http_publish_is_traced_like_a_frame_within_the_callers_trace(
    suite: Suite,
) -> None:
    receiver = OtlpReceiver().start()
    try:
        tracing = {
            "ADVANCED_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        suite.start("worker", **tracing)
        ingress = suite.start("ingress", **tracing)
        caller_trace = uuid.uuid4().hex
        traceparent = f"00-{caller_trace}-{uuid.uuid4().hex[:16]}-01"
        async with (
            board(f"{ingress.ws_url}/ws/boards/traced-http?token={TOKEN}") as client,
            httpx.AsyncClient(timeout=30) as http,
        ):
            response = await http.post(
                events_url(ingress, "traced-http"),
                json=message(0),
                headers=BEARER | {"Idempotency-Key": "traced-1", "traceparent": traceparent},
            )
            assert response.status_code == 202, response.text
            await client.next("event")

        def whole(spans: list[ReceivedSpan]) -> bool:
            names = {(s.service, s.name) for s in spans if s.trace_id == caller_trace}
            return {
                ("ingress-ws", "receive board event"),
                ("ingress-ws", "publish board event"),
                ("relay-worker", "relay board event"),
                ("ingress-ws", "deliver board event"),
            } <= names

        spans = await receiver.wait_for(whole, what="the HTTP event's whole trace")
    finally:
        receiver.stop()
    in_trace = {s.name: s for s in spans if s.trace_id == caller_trace}
    received = in_trace["receive board event"]
    assert received.attributes["board.event.transport"] == "http"
    assert received.attributes["messaging.message.conversation_id"] == "traced-1"
    # The worker's span hangs off the ingress's publish: the context went in the envelope.
    assert in_trace["relay board event"].parent_span_id == in_trace["publish board event"].span_id
