"""The HTTP API on the in-memory transport: publish (one event, a batch), its refusals, history."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import orjson
import pytest
from envelope import codec
from envelope.api import HistoryPage, PublishBatchReply
from envelope.codec import decode_envelope
from envelope.models import BoardEventEnvelope, ErrorFrame
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings
from realtime_runtime.auth import SESSION_COOKIE
from realtime_runtime.memory import MemoryStore, MemoryTransport
from starlette.testclient import TestClient

TOKEN = "http-unit-token"
SECRET = "http-unit-jwt-secret-of-32-bytes-at-least"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
EVENTS = "/api/boards/demo/events"


def settings(**options: Any) -> IngressSettings:
    defaults: dict[str, Any] = {
        "event_transport": "memory",
        "realtime_token": TOKEN,
        "environment": "test",
        "max_payload_bytes": 256,
        "http_publish_rate_limit": "20/minute",
    }
    return IngressSettings(_env_file=None, **(defaults | options))


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport(store=MemoryStore(retention=5))


@pytest.fixture
def client(transport: MemoryTransport) -> Iterator[TestClient]:
    with TestClient(create_app(settings(), memory=transport)) as test_client:
        yield test_client


def published(transport: MemoryTransport) -> list[BoardEventEnvelope]:
    queue = transport.broker.queue
    return [decode_envelope(queue.get_nowait().body) for _ in range(queue.qsize())]


def relay_all(client: TestClient, transport: MemoryTransport) -> list[bool]:
    """What the worker does with each queued envelope: the relay step, idempotent on its key."""
    delivered = []
    for envelope in published(transport):
        body = codec.activity_body(envelope, datetime.now(UTC))
        outcome = client.portal.call(  # type: ignore[union-attr]
            transport.store.relay, envelope.board_id, envelope.idempotency_key, body, 60
        )
        delivered.append(outcome.delivered)
    return delivered


def error_of(response: Any, status: int, code: str) -> ErrorFrame:
    assert response.status_code == status, response.text
    frame = ErrorFrame.model_validate(response.json())  # the `error` frame's own JSON
    assert frame.code == code and frame.message
    return frame


def test_a_publish_is_answered_202_after_the_broker_took_it(
    client: TestClient, transport: MemoryTransport
) -> None:
    response = client.post(
        EVENTS, json={"type": "note.created", "payload": {"t": 1}}, headers=BEARER
    )
    assert response.status_code == 202, response.text
    body = response.json()
    [envelope] = published(transport)
    assert (envelope.board_id, envelope.type, envelope.payload) == (
        "demo",
        "note.created",
        {"t": 1},
    )
    assert body == {"correlation_id": envelope.correlation_id, "event_id": str(envelope.event_id)}


def test_the_idempotency_key_wins_and_a_resend_on_either_transport_is_delivered_once(
    client: TestClient, transport: MemoryTransport
) -> None:
    message = {"type": "note.created", "payload": {}, "id": "body-id"}
    headers = BEARER | {"Idempotency-Key": "key-1"}
    first = client.post(EVENTS, json=message, headers=headers)
    again = client.post(
        f"{EVENTS}?token={TOKEN}", json=message, headers={"Idempotency-Key": "key-1"}
    )
    with client.websocket_connect(f"/ws/boards/demo?token={TOKEN}") as ws:
        ws.send_text(orjson.dumps(message | {"id": "key-1"}).decode())
        ack = orjson.loads(ws.receive_text())
        ws.close(1000)
        # TestClient cancels the app task at the block's end: let the server finish first.
        deadline = time.monotonic() + 10
        while "advanced_websocket_connections 0.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the server did not finish the socket"
            time.sleep(0.01)
    assert first.status_code == again.status_code == 202
    assert first.json()["correlation_id"] == again.json()["correlation_id"] == "key-1"
    assert ack["correlation_id"] == "key-1"
    # Three envelopes reached the broker, one idempotency key: the relay delivers one.
    assert relay_all(client, transport) == [True, False, False]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{oops", {}, 400, "invalid_message"),
        (b"[1]", {}, 400, "invalid_message"),
        (b'{"type":"UPPER","payload":{}}', {}, 400, "invalid_message"),
        (b'{"kind":"resume","after":1}', {}, 400, "invalid_message"),
        (b'{"type":"x","payload":{}}', {"Idempotency-Key": "not ok!"}, 400, "invalid_message"),
        (b'{"type":"x","payload":{"t":"' + b"y" * 300 + b'"}}', {}, 413, "payload_too_large"),
        (b'{"type":"x","payload":{"t":"' + b"y" * 2000 + b'"}}', {}, 413, "payload_too_large"),
    ],
)
def test_a_refused_publish_gets_the_error_frame_as_its_body(
    client: TestClient,
    transport: MemoryTransport,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    response = client.post(EVENTS, content=body, headers=BEARER | headers)
    error_of(response, status, code)
    assert published(transport) == []


def test_an_oversized_body_is_refused_from_its_length_before_it_is_read(client: TestClient) -> None:
    # 2 x 256 + 1024 bytes at most for one event; the header alone refuses it.
    headers = BEARER | {"Content-Length": "100000", "Content-Type": "application/json"}
    response = client.post(EVENTS, content=b"{" + b" " * 99_998 + b"}", headers=headers)
    error_of(response, 413, "payload_too_large")


def test_board_id_and_credential_refusals(client: TestClient) -> None:
    message = {"type": "x", "payload": {}}
    error_of(
        client.post("/api/boards/bad!id/events", json=message, headers=BEARER),
        422,
        "invalid_message",
    )
    unauthorised = client.post(EVENTS, json=message)
    error_of(unauthorised, 401, "unauthorized")
    assert unauthorised.headers["www-authenticate"] == "Bearer"
    error_of(
        client.post(EVENTS, json=message, headers={"Authorization": "Bearer wrong"}),
        401,
        "unauthorized",
    )
    # A session cookie is no credential for a publish (a cross-site form could send it).
    error_of(
        client.post(EVENTS, json=message, headers={"Cookie": f"{SESSION_COOKIE}={TOKEN}"}),
        401,
        "unauthorized",
    )


def test_a_jwt_publishes_only_to_the_boards_it_lists(transport: MemoryTransport) -> None:
    app = create_app(settings(auth_jwt_secret=SECRET), memory=transport)
    token = jwt.encode(
        {"sub": "svc", "boards": ["demo"], "exp": int(time.time()) + 600}, SECRET, algorithm="HS256"
    )
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        message = {"type": "x", "payload": {}}
        assert client.post(EVENTS, json=message, headers=auth).status_code == 202
        error_of(
            client.post("/api/boards/other/events", json=message, headers=auth), 403, "forbidden"
        )
        error_of(client.get("/api/boards/other/events", headers=auth), 403, "forbidden")
        batch = client.post("/api/boards/other/events:batch", json=[message], headers=auth)
        error_of(batch, 403, "forbidden")


def test_publishes_past_the_credentials_rate_are_refused_with_retry_after(
    client: TestClient, transport: MemoryTransport
) -> None:
    statuses = [
        client.post(EVENTS, json={"type": "x", "payload": {}}, headers=BEARER) for _ in range(21)
    ]
    assert [r.status_code for r in statuses[:20]] == [202] * 20
    limited = error_of(statuses[20], 429, "rate_limited")
    assert int(statuses[20].headers["retry-after"]) >= 1 and limited.correlation_id
    assert len(published(transport)) == 20


def test_a_broker_outage_is_503_with_retry_after_and_nothing_is_published(
    client: TestClient, transport: MemoryTransport
) -> None:
    transport.broker.available = False
    response = client.post(
        EVENTS, json={"type": "x", "payload": {}}, headers=BEARER | {"Idempotency-Key": "k-503"}
    )
    assert error_of(response, 503, "unavailable").correlation_id == "k-503"
    assert int(response.headers["retry-after"]) >= 1
    batch = client.post(f"{EVENTS}:batch", json=[{"type": "x", "payload": {}}], headers=BEARER)
    [result] = batch.json()["results"]
    assert result["status"] == 503 and result["code"] == "unavailable" and result["retry_after"]
    assert published(transport) == []
    transport.broker.available = True
    again = client.post(
        EVENTS, json={"type": "x", "payload": {}}, headers=BEARER | {"Idempotency-Key": "k-503"}
    )
    assert again.status_code == 202


def test_a_batch_answers_each_event_in_order(
    client: TestClient, transport: MemoryTransport
) -> None:
    batch = [
        {"type": "a", "payload": {"n": 0}},
        {"type": "BAD", "payload": {}},
        {"type": "c", "payload": {"n": 2}, "id": "own-id"},
        {"type": "d", "payload": {"t": "y" * 300}},
        {"type": "e", "payload": {"n": 4}},
    ]
    response = client.post(
        f"{EVENTS}:batch", json=batch, headers=BEARER | {"Idempotency-Key": "batch-7"}
    )
    assert response.status_code == 207, response.text
    results = PublishBatchReply.model_validate(response.json()).results
    assert [r.status for r in results] == [202, 400, 202, 413, 202]
    ids = [r.correlation_id for r in results if r.status == 202]
    assert ids == ["batch-7:0", "own-id", "batch-7:4"]
    assert relay_all(client, transport) == [True] * 3
    # The same batch again with the same key: each of its events is a duplicate at the relay.
    client.post(f"{EVENTS}:batch", json=batch, headers=BEARER | {"Idempotency-Key": "batch-7"})
    assert relay_all(client, transport) == [False] * 3


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{}", 400, "invalid_message"),
        (b"[]", 400, "invalid_message"),
        (orjson.dumps([{"type": "x", "payload": {}}] * 101), 413, "payload_too_large"),
    ],
)
def test_a_batch_that_is_no_batch_is_refused_whole(
    client: TestClient, transport: MemoryTransport, body: bytes, status: int, code: str
) -> None:
    error_of(client.post(f"{EVENTS}:batch", content=body, headers=BEARER), status, code)
    assert published(transport) == []


def test_a_batch_past_the_rate_publishes_what_fits(
    client: TestClient, transport: MemoryTransport
) -> None:
    response = client.post(
        f"{EVENTS}:batch", json=[{"type": "x", "payload": {}}] * 25, headers=BEARER
    )
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == [202] * 20 + [429] * 5
    assert len(published(transport)) == 20


def fill_history(client: TestClient, transport: MemoryTransport, count: int) -> None:
    for n in range(count):
        client.post(EVENTS, json={"type": "x", "payload": {"n": n}}, headers=BEARER)
    assert all(relay_all(client, transport))


def history(client: TestClient, query: str = "") -> HistoryPage:
    response = client.get(f"{EVENTS}{query}", headers=BEARER)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return HistoryPage.model_validate(response.json())


def test_history_pages_through_the_retained_events(
    client: TestClient, transport: MemoryTransport
) -> None:
    fill_history(client, transport, 5)
    first = history(client, "?limit=2")
    assert [e.sequence for e in first.events] == [1, 2] and first.next_after == 2
    assert first.reset is None
    second = history(client, "?after=2&limit=2")
    assert [e.sequence for e in second.events] == [3, 4] and second.next_after == 4
    last = history(client, f"?after=4.{first.events[0].epoch}&limit=2")
    assert [e.payload for e in last.events] == [{"n": 4}] and last.next_after is None
    assert history(client, "?after=5").events == []


def test_an_expired_cursor_gets_a_reset_then_the_oldest_retained(
    client: TestClient, transport: MemoryTransport
) -> None:
    fill_history(client, transport, 8)  # the store retains 5: sequences 4 to 8
    page = history(client, "?after=1&limit=3")
    assert page.reset is not None and page.reset.reason == "cursor_expired"
    assert page.reset.oldest_cursor == "4"
    assert [e.sequence for e in page.events] == [4, 5, 6] and page.next_after == 6
    # Without `after`, the oldest retained events are what was asked for: no reset.
    unasked = history(client)
    assert unasked.reset is None and [e.sequence for e in unasked.events] == [4, 5, 6, 7, 8]
    # A cursor of another epoch is of a history the board no longer has.
    lost = history(client, "?after=6.1")
    assert lost.reset is not None and lost.reset.reason == "history_lost"
    assert [e.sequence for e in lost.events] == [4, 5, 6, 7, 8]


@pytest.mark.parametrize("query", ["?after=x", "?after=-1", "?limit=0", "?limit=1001", "?limit=a"])
def test_history_refuses_a_query_it_cannot_read(client: TestClient, query: str) -> None:
    error_of(client.get(f"{EVENTS}{query}", headers=BEARER), 400, "invalid_message")


def test_http_publishes_count_in_the_publish_metrics_under_their_transport(
    client: TestClient,
) -> None:
    client.post(EVENTS, json={"type": "x", "payload": {}}, headers=BEARER)
    metrics = client.get("/metrics").text
    found = re.search(
        r'^advanced_board_events_published_total\{status="success",transport="http"\} (\S+)$',
        metrics,
        re.M,
    )
    assert found and float(found.group(1)) == 1.0
    assert 'advanced_board_event_publish_duration_seconds_count{transport="http"} 1.0' in metrics
