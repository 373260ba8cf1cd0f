"""The drain's steps: open sockets get 1001, later handshakes too, and its wait is bounded."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings
from realtime_runtime.memory import MemoryTransport
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

TOKEN = "unit-test-token"


@contextlib.contextmanager
def ingress(drain_timeout: float = 5) -> Iterator[TestClient]:
    settings = IngressSettings(
        _env_file=None,
        event_transport="memory",
        realtime_token=TOKEN,
        environment="test",
        drain_timeout_seconds=drain_timeout,
    )
    with TestClient(create_app(settings, memory=MemoryTransport())) as client:
        yield client


def closed_by_server(ws: WebSocketTestSession) -> int:
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    return closed.value.code


def answer_the_close(client: TestClient, ws: WebSocketTestSession) -> None:
    """The client's side of the close; the server's handler ends before the session does (or
    TestClient cancels it, racing its own exit)."""
    ws.close(1000)
    deadline = time.monotonic() + 5
    while len(client.app.state.runtime.sockets):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the server did not finish the socket"
        time.sleep(0.01)


def test_the_drain_closes_open_sockets_with_1001_and_waits_for_them() -> None:
    with ingress() as client, client.websocket_connect(f"/ws/boards/d?token={TOKEN}") as ws:
        ws.send_text('{"type":"x","payload":{},"id":"before"}')
        assert '"ack"' in ws.receive_text()
        draining = client.portal.start_task_soon(client.app.state.drain)  # type: ignore[union-attr,attr-defined]
        assert closed_by_server(ws) == 1001  # step 2
        time.sleep(0.2)
        assert not draining.done()  # step 3: it waits for the socket to end
        answer_the_close(client, ws)
        draining.result(timeout=5)
        # Step 1: a handshake after the drain began is closed with 1001 too.
        with client.websocket_connect(f"/ws/boards/d?token={TOKEN}") as late:
            assert closed_by_server(late) == 1001


def test_the_drain_waits_no_longer_than_its_timeout() -> None:
    with (
        ingress(drain_timeout=0.5) as client,
        client.websocket_connect(f"/ws/boards/stuck?token={TOKEN}") as ws,
    ):
        started = time.monotonic()
        # The client does not answer the close: the drain gives up on it after its timeout.
        client.portal.call(client.app.state.drain)  # type: ignore[union-attr,attr-defined]
        assert 0.4 < time.monotonic() - started < 3
        assert closed_by_server(ws) == 1001
        answer_the_close(client, ws)
