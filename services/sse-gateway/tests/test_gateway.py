"""The gateway on the memory transport, served by a real uvicorn and read as EventSource does."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
import uvicorn
from envelope import codec
from envelope.memory import MemoryStore, MemoryTransport
from envelope.models import BoardEventEnvelope
from sse_gateway.app import create_app
from sse_gateway.settings import GatewaySettings
from support.clients import sse

TOKEN = "gateway-unit-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport(store=MemoryStore(retention=5))


@pytest.fixture
async def url(transport: MemoryTransport) -> AsyncIterator[str]:
    settings = GatewaySettings(
        _env_file=None,
        event_transport="memory",
        realtime_token=TOKEN,
        environment="test",
        sse_heartbeat_seconds=0.2,
        sse_send_queue=8,
        activity_stream_rate_limit="1000/minute",
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, memory=transport), port=port, log_config=None)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def relay(transport: MemoryTransport, board_id: str, count: int) -> None:
    for _ in range(count):
        envelope = BoardEventEnvelope(
            event_id=uuid.uuid4(),
            correlation_id=uuid.uuid4().hex,
            board_id=board_id,
            type="note.created",
            payload={},
            sender="s",
            occurred_at=datetime.now(UTC),
        )
        body = codec.activity_body(envelope, datetime.now(UTC))
        await transport.store.relay(board_id, envelope.correlation_id, body, 60)


async def test_streams_carry_the_contract_headers_and_heartbeats(url: str) -> None:
    async with sse(f"{url}/sse/boards/demo?token={TOKEN}") as stream:
        await asyncio.sleep(0.7)
        headers = stream.response.headers
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert "content-security-policy" in headers and headers["x-content-type-options"] == "nosniff"
    assert stream.comments >= 2  # heartbeats while idle


async def test_live_events_carry_the_board_sequence_as_id(
    url: str, transport: MemoryTransport
) -> None:
    async with sse(f"{url}/sse/boards/demo?token={TOKEN}") as stream:
        await relay(transport, "other", 1)
        await relay(transport, "demo", 2)
        first, second = await stream.next(), await stream.next()
    assert (first.id, second.id) == ("1", "2")
    assert first.json()["board_id"] == "demo"


async def test_an_expired_cursor_gets_a_reset_then_what_is_retained(
    url: str, transport: MemoryTransport
) -> None:
    await relay(transport, "demo", 12)  # retention is 5: events 8..12 remain
    async with sse(f"{url}/sse/boards/demo?token={TOKEN}&last_event_id=2") as stream:
        reset = await stream.next(kind="reset")
        replayed = [int((await stream.next()).id or 0) for _ in range(5)]
    assert reset.json() == {"reason": "cursor_expired", "board_id": "demo", "oldest_cursor": "8"}
    assert replayed == [8, 9, 10, 11, 12]


async def test_the_activity_stream_resumes_by_stream_id(
    url: str, transport: MemoryTransport
) -> None:
    await relay(transport, "a", 2)
    history = await transport.store.activity_after("0-0")
    async with sse(
        f"{url}/sse/activity?token={TOKEN}", {"Last-Event-ID": history[0].stream_id}
    ) as stream:
        replayed = await stream.next()
        await relay(transport, "b", 1)
        live = await stream.next()
    assert replayed.id == history[1].stream_id
    assert live.json()["board_id"] == "b"


async def test_refusals_are_json_with_the_contract_statuses(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        missing = await http.get("/sse/activity")
        wrong = await http.get("/sse/boards/demo", headers={"Authorization": "Bearer nope"})
        bad_board = await http.get(f"/sse/boards/{'x' * 65}?token={TOKEN}")
    assert missing.status_code == wrong.status_code == 401
    assert "credential" in missing.json()["detail"]
    assert bad_board.status_code == 422
    assert "content-security-policy" in missing.headers


async def test_a_client_that_falls_behind_is_cut_with_a_reason(
    url: str, transport: MemoryTransport
) -> None:
    async with sse(f"{url}/sse/boards/slow?token={TOKEN}") as stream:
        # 200 events land in one burst, faster than the stream's queue of 8 drains.
        await relay(transport, "slow", 200)
        closing = await stream.next(kind="close")
        delivered = stream.events.qsize()
    assert closing.json()["reason"] == "slow_consumer"
    assert delivered < 200
