"""Live credential refresh on the in-memory transport (contract section 13): the frames, the
identity rule, and the events published under the refreshed credential. The timing of the
warning and the expiry is tested on real processes in tests/security/test_refresh.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import jwt
import orjson
import pytest
from envelope.codec import decode_envelope
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings
from realtime_runtime.memory import MemoryTransport
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

TOKEN = "unit-test-token"
SECRET = "unit-" + "jwt-secret-for-refresh-tests-0123456789"


def signed(sub: str, boards: list[str], ttl: float = 600) -> str:
    now = int(time.time())
    claims = {"sub": sub, "boards": boards, "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport()


@pytest.fixture
def client(transport: MemoryTransport) -> Iterator[TestClient]:
    settings = IngressSettings(
        _env_file=None,
        event_transport="memory",
        realtime_token=TOKEN,
        auth_jwt_secret=SECRET,
        environment="test",
        auth_refresh_warning_seconds=30,
    )
    with TestClient(create_app(settings, memory=transport)) as test_client:
        yield test_client


def frames(ws: Any, count: int) -> list[dict[str, Any]]:
    return [orjson.loads(ws.receive_text()) for _ in range(count)]


def test_a_refresh_is_answered_and_the_socket_publishes_on(
    client: TestClient, transport: MemoryTransport
) -> None:
    later = int(time.time()) + 600
    with client.websocket_connect(f"/ws/boards/b?token={signed('ann', ['b'], ttl=20)}") as ws:
        # 20 s left, under the 30 s warning: warned at once.
        (expiring,) = frames(ws, 1)
        assert expiring["kind"] == "expiring"
        ws.send_text(orjson.dumps({"kind": "refresh", "token": signed("ann", ["b"])}).decode())
        (refreshed,) = frames(ws, 1)
        assert refreshed["kind"] == "refreshed"
        expires_at = datetime.fromisoformat(refreshed["expires_at"].replace("Z", "+00:00"))
        assert abs(expires_at.timestamp() - later) <= 2
        ws.send_text('{"type":"note.created","payload":{},"id":"after-refresh"}')
        (ack,) = frames(ws, 1)
    assert ack["kind"] == "ack"
    envelope = decode_envelope(transport.broker.queue.get_nowait().body)
    assert envelope.correlation_id == "after-refresh"


# Signed when the test runs, not when it is collected: a long run would outlast their `exp`.
@pytest.mark.parametrize(
    ("make_token", "code"),
    [
        (lambda: signed("ann", ["other"]), 4403),
        (lambda: signed("bob", ["b"]), 4403),
        (lambda: signed("ann", ["b"], ttl=-10), 4401),
        (lambda: "wrong", 4401),
    ],
    ids=["other-board", "other-identity", "expired", "not-a-token"],
)
def test_a_refresh_that_may_not_carry_the_socket_closes_it(
    client: TestClient, make_token: Callable[[], str], code: int
) -> None:
    token = make_token()
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect(f"/ws/boards/b?token={signed('ann', ['b'])}") as ws,
    ):
        ws.send_text(orjson.dumps({"kind": "refresh", "token": token}).decode())
        ws.receive_text()
    assert closed.value.code == code
