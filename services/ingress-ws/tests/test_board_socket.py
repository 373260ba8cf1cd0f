"""The ingress on the in-memory transport: frames in, acks and errors out, close codes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from envelope.codec import decode_envelope
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings
from realtime_runtime.memory import MemoryBroker, MemoryTransport
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

TOKEN = "unit-test-token"


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport()


@pytest.fixture
def client(transport: MemoryTransport) -> Iterator[TestClient]:
    settings = IngressSettings(
        _env_file=None,
        event_transport="memory",
        realtime_token=TOKEN,
        environment="test",
        websocket_max_connections=2,
        max_payload_bytes=256,
        websocket_rate_limit="5/second",
        websocket_rate_limit_strikes=3,
    )
    with TestClient(create_app(settings, memory=transport)) as test_client:
        yield test_client


@contextlib.contextmanager
def board_socket(client: TestClient, url: str, **kwargs: Any) -> Iterator[WebSocketTestSession]:
    """A socket that is closed and finished server-side before the block exits.

    TestClient cancels the app task right after sending the close; waiting for the server to
    count the socket gone keeps that cancellation from racing the handler's own exit.
    """
    with client.websocket_connect(url, **kwargs) as ws:
        yield ws
        before = open_sockets(client)
        ws.close(1000)
        deadline = time.monotonic() + 5
        while open_sockets(client) >= before:
            assert time.monotonic() < deadline, "the server did not finish the socket"
            time.sleep(0.01)


def open_sockets(client: TestClient) -> float:
    metrics = client.get("/metrics").text
    return float(re.search(r"^advanced_websocket_connections (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]


def close_code(client: TestClient, url: str, **kwargs: object) -> int:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect(url, **kwargs) as ws,
    ):  # type: ignore[arg-type]
        ws.receive_text()
    return closed.value.code


def test_an_accepted_frame_is_published_durably_then_acked(
    client: TestClient, transport: MemoryTransport
) -> None:
    with board_socket(client, f"/ws/boards/demo?token={TOKEN}") as ws:
        ws.send_text('{"type":"note.created","payload":{"text":"hi"},"id":"c-1"}')
        ack = orjson.loads(ws.receive_text())
    assert ack["kind"] == "ack" and ack["correlation_id"] == "c-1"
    published = transport.broker.queue.get_nowait()
    envelope = decode_envelope(published.body)
    assert (envelope.board_id, envelope.type, envelope.correlation_id) == (
        "demo",
        "note.created",
        "c-1",
    )
    assert str(envelope.event_id) == ack["event_id"]


def test_the_server_makes_a_correlation_id_when_the_client_has_none(client: TestClient) -> None:
    with board_socket(
        client, "/ws/boards/demo", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        ws.send_text('{"type":"note.created","payload":{}}')
        ack = orjson.loads(ws.receive_text())
    assert ack["kind"] == "ack" and len(ack["correlation_id"]) >= 16


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{oops", "invalid_message"),
        ('{"type":"UPPER","payload":{}}', "invalid_message"),
        ('{"type":"x","payload":{"t":"' + "y" * 300 + '"},"id":"big"}', "payload_too_large"),
    ],
)
def test_a_refused_frame_gets_an_error_and_the_socket_stays_open(
    client: TestClient, transport: MemoryTransport, frame: str, code: str
) -> None:
    with board_socket(client, f"/ws/boards/demo?token={TOKEN}") as ws:
        ws.send_text(frame)
        error = orjson.loads(ws.receive_text())
        ws.send_text('{"type":"still.open","payload":{}}')
        ack = orjson.loads(ws.receive_text())
    assert error["kind"] == "error" and error["code"] == code and error["message"]
    assert ack["kind"] == "ack"
    assert transport.broker.queue.qsize() == 1  # only the valid frame was published


def test_binary_frames_are_refused(client: TestClient) -> None:
    with board_socket(client, f"/ws/boards/demo?token={TOKEN}") as ws:
        ws.send_bytes(b'{"type":"x","payload":{}}')
        error = orjson.loads(ws.receive_text())
    assert error["code"] == "invalid_message" and "text" in error["message"]


def test_an_unavailable_broker_is_an_error_never_an_ack(
    client: TestClient, transport: MemoryTransport
) -> None:
    transport.broker.available = False
    with board_socket(client, f"/ws/boards/demo?token={TOKEN}") as ws:
        ws.send_text('{"type":"x","payload":{},"id":"lost-1"}')
        error = orjson.loads(ws.receive_text())
    assert error == {
        "kind": "error",
        "code": "unavailable",
        "message": error["message"],
        "correlation_id": "lost-1",
    }


def test_rate_limit_errors_then_close_1008(client: TestClient) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect(f"/ws/boards/demo?token={TOKEN}") as ws,
    ):
        kinds = []
        for _ in range(20):
            ws.send_text('{"type":"x","payload":{}}')
            kinds.append(orjson.loads(ws.receive_text())["kind"])
    assert closed.value.code == 1008
    assert kinds.count("error") >= 2 and "ack" in kinds


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("/ws/boards/demo", 4401),
        ("/ws/boards/demo?token=wrong", 4401),
        (f"/ws/boards/{'x' * 65}?token={TOKEN}", 4400),
        (f"/ws/boards/bad%20id?token={TOKEN}", 4400),
    ],
)
def test_refused_sockets_get_the_contract_close_codes(
    client: TestClient, url: str, code: int
) -> None:
    assert close_code(client, url) == code


def test_a_foreign_origin_is_refused(client: TestClient) -> None:
    assert (
        close_code(
            client, f"/ws/boards/demo?token={TOKEN}", headers={"Origin": "https://evil.example"}
        )
        == 4403
    )


def test_the_connection_limit_closes_with_1013(client: TestClient) -> None:
    with (
        board_socket(client, f"/ws/boards/a?token={TOKEN}"),
        board_socket(client, f"/ws/boards/b?token={TOKEN}"),
    ):
        assert close_code(client, f"/ws/boards/c?token={TOKEN}") == 1013


def test_probes_and_page_need_no_credential(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["event_pipeline_ready"] is True
    page = client.get("/")
    assert page.status_code == 200 and 'role="log"' in page.text
    assert "content-security-policy" in page.headers
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "advanced_board_events_published_total" in metrics.text


class UnconfirmingBroker(MemoryBroker):
    """The in-memory broker as RabbitMQ is when it stops confirming: publishes wait."""

    def __init__(self) -> None:
        super().__init__()
        self.confirming = threading.Event()

    async def publish(self, body: bytes, headers: dict[str, str | int] | None = None) -> None:
        while not self.confirming.is_set():
            await asyncio.sleep(0.01)
        await super().publish(body, headers)


def test_unconfirmed_bytes_are_bounded_per_process_and_refused_at_once() -> None:
    broker = UnconfirmingBroker()
    settings = IngressSettings(
        _env_file=None,
        event_transport="memory",
        realtime_token=TOKEN,
        environment="test",
        websocket_rate_limit="1000/second",
        websocket_unconfirmed_max_bytes=4096,  # room for a few ≈ 1 KiB envelopes, not ten
    )
    app = create_app(settings, memory=MemoryTransport(broker=broker))
    frame = (
        '{"type":"x","payload":{"t":"' + "y" * 600 + '"},"id":"u-0"}'
    )  # 852-byte envelopes: four fit

    def held(client: TestClient) -> float:
        text = client.get("/metrics").text
        return float(
            re.search(r"^advanced_websocket_unconfirmed_bytes (\S+)$", text, re.M).group(1)
        )  # type: ignore[union-attr]

    with (
        TestClient(app) as client,
        board_socket(client, f"/ws/boards/one?token={TOKEN}") as first,
        board_socket(client, f"/ws/boards/two?token={TOKEN}") as second,
    ):
        for n in range(4):
            first.send_text(frame.replace("u-0", f"held-{n}"))
        deadline = time.monotonic() + 5
        while held(client) < 4 * 800:
            assert time.monotonic() < deadline, "the four publishes were not held"
            time.sleep(0.01)
        # Another socket of the process: refused at once, while the four still wait.
        for n in range(3):
            second.send_text(frame.replace("u-0", f"refused-{n}"))
        refused = [orjson.loads(second.receive_text()) for _ in range(3)]
        assert [r["code"] for r in refused] == ["unavailable"] * 3
        assert held(client) <= 4096
        broker.confirming.set()
        acks = [orjson.loads(first.receive_text()) for _ in range(4)]
        assert {a["kind"] for a in acks} == {"ack"}
        second.send_text(frame.replace("u-0", "after"))  # room again once confirmed
        assert orjson.loads(second.receive_text())["kind"] == "ack"
    assert broker.queue.qsize() == 5


class FailingBroker(MemoryBroker):
    """A publish that fails in a way nobody foresaw (neither a refusal nor a lost link)."""

    async def publish(self, body: bytes, headers: dict[str, str | int] | None = None) -> None:
        raise RuntimeError("an unforeseen failure inside the publish")


def test_any_failure_of_a_publish_is_answered_with_an_error() -> None:
    settings = IngressSettings(
        _env_file=None, event_transport="memory", realtime_token=TOKEN, environment="test"
    )
    app = create_app(settings, memory=MemoryTransport(broker=FailingBroker()))
    with TestClient(app) as client, board_socket(client, f"/ws/boards/x?token={TOKEN}") as ws:
        ws.send_text('{"type":"x","payload":{},"id":"doomed"}')
        error = orjson.loads(ws.receive_text())
        assert (error["code"], error["correlation_id"]) == ("unavailable", "doomed")
        ws.send_text('{"type":"x","payload":{},"id":"again"}')  # the socket carries on
        assert orjson.loads(ws.receive_text())["correlation_id"] == "again"


@pytest.mark.parametrize(
    ("environment", "name", "secure"),
    [("test", "__Host-advanced_session", True), ("development", "advanced_session", False)],
)
def test_the_session_cookie_is_host_prefixed_when_secure(
    environment: str, name: str, secure: bool
) -> None:
    settings = IngressSettings(
        _env_file=None, event_transport="memory", realtime_token=TOKEN, environment=environment
    )
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        created = client.post("/session", headers={"Authorization": f"Bearer {TOKEN}"})
        set_cookie = created.headers["set-cookie"]
        assert set_cookie.startswith(f"{name}=") and ("Secure" in set_cookie) == secure
        # Over plain http in development the page keeps working with the cookie.
        cookie = {"Cookie": f"{name}={created.cookies[name]}", "Origin": "http://localhost"}
        with board_socket(client, "ws://localhost/ws/boards/cookie", headers=cookie) as ws:
            ws.send_text('{"type":"x","payload":{}}')
            assert orjson.loads(ws.receive_text())["kind"] == "ack"
        ended = client.delete("/session", headers={"Origin": "http://localhost"})
        assert ended.headers["set-cookie"].startswith(f"{name}=")


def test_a_socket_opened_while_the_event_feed_is_down_is_told_to_come_back(
    transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board's channel cannot be subscribed (Redis unreachable): the socket is closed
    with 1013 (try again later) once the join gives up, never left without live events or
    cut with an internal error."""
    import realtime_runtime.feed.hub as hub_module
    from redis.exceptions import ConnectionError as RedisConnectionError

    @contextlib.asynccontextmanager
    async def unreachable() -> Any:
        raise RedisConnectionError("Redis is unreachable")
        yield

    monkeypatch.setattr(hub_module, "JOIN_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(transport.store, "live", unreachable)
    settings = IngressSettings(
        _env_file=None, event_transport="memory", realtime_token=TOKEN, environment="test"
    )
    with TestClient(create_app(settings, memory=transport)) as down:
        assert close_code(down, f"/ws/boards/demo?token={TOKEN}") == 1013
