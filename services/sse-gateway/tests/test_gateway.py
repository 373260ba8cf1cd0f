"""The gateway on the memory transport, served by a real uvicorn and read as EventSource does."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from envelope import codec
from envelope.cursors import activity_cursor, parse_activity_cursor
from envelope.models import BoardEventEnvelope, PresenceMember
from envelope.topology import ACTIVITY_PARTS, activity_part_of
from fastapi import FastAPI
from realtime_runtime.memory import MemoryStore, MemoryTransport
from sse_gateway.app import create_app
from sse_gateway.settings import GatewaySettings
from support.clients import sse, stalled_sse
from support.stores import ReadCounter

TOKEN = "gateway-unit-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport(store=MemoryStore(retention=5))


@contextlib.asynccontextmanager
async def served(transport: MemoryTransport, **options: Any) -> AsyncIterator[tuple[str, FastAPI]]:
    """The gateway under a real uvicorn: its base URL and its app."""
    defaults: dict[str, Any] = {
        "event_transport": "memory",
        "realtime_token": TOKEN,
        "environment": "test",
        "sse_heartbeat_seconds": 0.2,
        "sse_send_queue": 8,
        "activity_stream_rate_limit": "1000/minute",
    }
    settings = GatewaySettings(_env_file=None, **(defaults | options))
    port = free_port()
    app = create_app(settings, memory=transport)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def url(transport: MemoryTransport) -> AsyncIterator[str]:
    async with served(transport) as (url, _app):
        yield url


async def relay(transport: MemoryTransport, board_id: str, count: int, pad: int = 0) -> None:
    for _ in range(count):
        envelope = BoardEventEnvelope(
            event_id=uuid.uuid4(),
            correlation_id=uuid.uuid4().hex,
            board_id=board_id,
            type="note.created",
            payload={"pad": "x" * pad} if pad else {},
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
    # `<sequence>.<epoch>`: a cursor of another epoch of the board is never taken for this one.
    epoch = first.json()["epoch"]
    assert (first.id, second.id) == (f"1.{epoch}", f"2.{epoch}") and epoch.isdigit()
    assert first.json()["board_id"] == "demo"


async def test_board_streams_carry_presence_in_band_without_an_id(
    url: str, transport: MemoryTransport
) -> None:
    """`event: presence` between the board's events, never counted as one (no `id:`, and a
    resumed stream's cursor still filters only events)."""
    presence = transport.presence
    alice = PresenceMember(id="alice", name="Alice")
    await presence.heartbeat("ingress-1", ["demo"], 30)
    async with (
        sse(f"{url}/sse/boards/demo?token={TOKEN}&last_event_id=0") as stream,
        sse(f"{url}/sse/activity?token={TOKEN}") as everything,
    ):
        await relay(transport, "demo", 1)
        await stream.next()
        await presence.set_member("demo", "ingress-1", alice, 2)
        await presence.set_member("other", "ingress-1", alice, 1)
        await relay(transport, "demo", 1)
        # In whichever order the two arrive: both, and nothing else.
        two = [await asyncio.wait_for(stream.events.get(), 10) for _ in range(2)]
        joined, second = sorted(two, key=lambda e: e.event != "presence")
        await presence.set_member("demo", "ingress-1", alice, 0)
        left = await asyncio.wait_for(stream.events.get(), 10)
        await relay(transport, "demo", 1)
        seen = [await asyncio.wait_for(everything.events.get(), 10) for _ in range(3)]
    assert joined.id is None and joined.json() == {
        "kind": "presence",
        "board_id": "demo",
        "action": "join",
        "member": {"id": "alice", "name": "Alice"},
        "count": 1,
    }
    assert second.event == "activity" and second.json()["sequence"] == 2 and second.id
    assert left.event == "presence"
    assert (left.json()["action"], left.json()["count"]) == ("leave", 0)
    assert {e.event for e in seen} == {"activity"}  # the activity stream: events only


async def test_an_expired_cursor_gets_a_reset_then_what_is_retained(
    url: str, transport: MemoryTransport
) -> None:
    await relay(transport, "demo", 12)  # retention is 5: events 8..12 remain
    async with sse(f"{url}/sse/boards/demo?token={TOKEN}&last_event_id=2") as stream:
        reset = await stream.next(kind="reset")
        replayed = [(await stream.next()).json()["sequence"] for _ in range(5)]
    assert reset.json() == {"reason": "cursor_expired", "board_id": "demo", "oldest_cursor": "8"}
    assert replayed == [8, 9, 10, 11, 12]


def vector(**entries: str) -> str:
    """An activity cursor: `p<N>=<id>` entries, every other part at 0."""
    ids = ["0-0"] * ACTIVITY_PARTS
    for name, stream_id in entries.items():
        ids[int(name[1:])] = stream_id
    return activity_cursor(ids)


async def test_the_activity_stream_resumes_by_its_vector_of_part_ids(
    url: str, transport: MemoryTransport
) -> None:
    a, b = (
        "a",
        next(f"b{n}" for n in range(100) if activity_part_of(f"b{n}") != activity_part_of("a")),
    )
    pa, pb = activity_part_of(a), activity_part_of(b)
    await relay(transport, a, 2)
    history = await transport.store.activity_after(pa, "0-0")
    cursor = vector(**{f"p{pa}": history[0].stream_id})
    async with sse(f"{url}/sse/activity?token={TOKEN}", {"Last-Event-ID": cursor}) as stream:
        replayed = await stream.next()
        await relay(transport, b, 1)
        live = await stream.next()
    [b_event] = await transport.store.activity_after(pb, "0-0")
    # Each event's id is the stream's own position: every part's last id sent.
    assert replayed.id == vector(**{f"p{pa}": history[1].stream_id})
    assert live.json()["board_id"] == b
    assert live.id == vector(**{f"p{pa}": history[1].stream_id, f"p{pb}": b_event.stream_id})
    assert parse_activity_cursor(live.id) is not None

    # A cursor of one stream id (from before the stream was split) is a reset, not an error.
    async with sse(
        f"{url}/sse/activity?token={TOKEN}", {"Last-Event-ID": history[0].stream_id}
    ) as old:
        reset = await old.next(kind="reset")
        again = [(await old.next()).json()["board_id"] for _ in range(3)]
    assert reset.json()["reason"] == "cursor_expired"
    assert sorted(again) == sorted([a, a, b])


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


async def gauge(url: str, route: str = "board") -> float:
    async with httpx.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'advanced_sse_connections{{route="{route}"}}'):
            return float(line.split()[-1])
    return 0.0


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(0.02)


async def test_an_idle_stream_holds_two_tasks(url: str) -> None:
    """The request's own task writes and one small task watches for the disconnect."""
    before = len(asyncio.all_tasks())
    async with contextlib.AsyncExitStack() as streams:
        for n in range(5):
            await streams.enter_async_context(sse(f"{url}/sse/boards/idle-{n}?token={TOKEN}"))
        await until(lambda: _equals(gauge(url), 5))
        # Each client adds its own reading task (`SseStream.pump`) on this loop too.
        per_stream = (len(asyncio.all_tasks()) - before - 5) / 5
    assert per_stream <= 2


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def test_a_client_that_leaves_is_noticed_without_a_write(
    transport: MemoryTransport,
) -> None:
    # Heartbeats far apart: only the disconnect watcher can notice the client has gone.
    async with served(transport, sse_heartbeat_seconds=60) as (url, _app):
        async with sse(f"{url}/sse/boards/leaving?token={TOKEN}"):
            await until(lambda: _equals(gauge(url), 1))
        await until(lambda: _equals(gauge(url), 0), 2)


async def test_heartbeats_keep_coming_while_events_flow(
    url: str, transport: MemoryTransport
) -> None:
    async with sse(f"{url}/sse/boards/beat?token={TOKEN}") as stream:
        await asyncio.sleep(0.5)
        idle_beats = stream.comments
        # An event every 50 ms for a second: never 0.2 s (the heartbeat) without a write.
        for _ in range(20):
            await relay(transport, "beat", 1)
            await stream.next()
            await asyncio.sleep(0.05)
        busy_beats = stream.comments - idle_beats
    assert idle_beats >= 2
    assert busy_beats >= 3


async def test_the_drain_ends_every_stream_and_refuses_new_ones(
    transport: MemoryTransport,
) -> None:
    async with (
        served(transport) as (url, app),
        sse(f"{url}/sse/boards/drain?token={TOKEN}") as stream,
    ):
        await until(lambda: _equals(gauge(url), 1))
        await app.state.drain()
        await until(lambda: _equals(gauge(url), 0), 2)
        async with asyncio.timeout(2):  # the client read the end of the body
            while not stream.response.is_stream_consumed:
                await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=url) as http:
            refused = await http.get(f"/sse/boards/drain?token={TOKEN}")
    assert refused.status_code == 503


async def test_a_client_that_stops_reading_is_cut_after_the_send_timeout(
    transport: MemoryTransport,
) -> None:
    async with served(transport, sse_send_timeout_seconds=0.5, sse_send_queue=100_000) as (
        url,
        _app,
    ):
        port = int(url.rsplit(":", 1)[1])
        sock = await stalled_sse(port, "stall", TOKEN)
        await until(lambda: _equals(gauge(url), 1))
        try:
            # Large events until the socket's buffers are full and a write blocks.
            for _ in range(40):
                await relay(transport, "stall", 20, pad=20_000)
                await asyncio.sleep(0.05)
            await until(lambda: _equals(gauge(url), 0), 5)
            async with httpx.AsyncClient(base_url=url) as http:
                text = (await http.get("/metrics")).text
        finally:
            sock.close()
    assert "advanced_sse_slow_consumers_total 1.0" in text


async def test_a_client_that_stalls_in_a_resume_does_not_make_the_gateway_read_the_history() -> (
    None
):
    store = ReadCounter(MemoryStore(retention=10_000))
    transport = MemoryTransport(store=store)  # type: ignore[arg-type]
    history = 6000
    await relay(transport, "big", history, pad=2000)  # 12 MB retained
    store.rows = 0
    async with served(transport, sse_send_timeout_seconds=0.5) as (url, _app):
        port = int(url.rsplit(":", 1)[1])
        sock = await stalled_sse(port, "big", TOKEN, last_event_id="0")
        try:
            await until(lambda: _equals(gauge(url), 1))
            await until(lambda: _equals(gauge(url), 0), 10)  # cut by the send timeout
        finally:
            sock.close()
    # What the socket buffers took, and a page: not the 12 MB of history.
    assert 0 < store.rows < history // 2, store.rows


async def test_a_cursor_redis_would_refuse_gets_a_reset_and_the_stream_goes_on(
    url: str, transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    refused = {
        # Stream ids are two unsigned 64-bit numbers, board sequences signed 64 bits.
        "activity": ["0-99999999999999999999", "99999999999999999999-0", str(2**64), "1-2-3"],
        "boards/far": [str(2**63), "99999999999999999999", "12a", "-1"],
    }
    for route, cursors in refused.items():
        for cursor in cursors:
            for header in (True, False):
                query = "" if header else f"&last_event_id={cursor}"
                headers = {"Last-Event-ID": cursor} if header else {}
                async with sse(f"{url}/sse/{route}?token={TOKEN}{query}", headers) as stream:
                    reset = await stream.next(kind="reset")
                    await relay(transport, "far", 1)
                    newest = (await transport.store.board_head("far"))[1]
                    while (await stream.next()).json()["sequence"] != newest:
                        pass  # what was retained, then the live event: the stream goes on
                assert reset.json()["reason"] == "cursor_expired", (route, cursor)
    assert not [record for record in caplog.records if record.exc_info], caplog.text


async def test_the_drain_cuts_a_stream_still_writing_after_the_drain_timeout(
    transport: MemoryTransport,
) -> None:
    options = {"sse_send_timeout_seconds": 60, "sse_send_queue": 100_000}
    async with served(transport, drain_timeout_seconds=0.5, **options) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        sock = await stalled_sse(port, "stuck", TOKEN)
        await until(lambda: _equals(gauge(url), 1))
        try:
            # Large events until the socket's buffers are full and a write blocks.
            for _ in range(40):
                await relay(transport, "stuck", 20, pad=20_000)
                await asyncio.sleep(0.05)
            async with asyncio.timeout(5):
                await app.state.drain()  # the stream cannot end by itself: it is cut
            await until(lambda: _equals(gauge(url), 0), 2)
        finally:
            sock.close()


async def test_a_stream_whose_channel_is_never_confirmed_gets_503_not_an_error(
    transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops confirming subscriptions after the feed came up: the stream cannot promise
    live events, so it answers 503 (retry shortly) before any header of a 200 went out."""
    import realtime_runtime.feed.hub as hub_module
    from realtime_runtime.memory import MemoryLiveFeed

    async def never_confirmed(self: MemoryLiveFeed, channels: object) -> None:
        return None

    monkeypatch.setattr(hub_module, "JOIN_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(MemoryLiveFeed, "subscribe", never_confirmed)
    async with served(transport) as (url, _app), httpx.AsyncClient(timeout=5) as http:
        for route in ("/sse/boards/demo", "/sse/activity"):
            response = await http.get(f"{url}{route}?token={TOKEN}")
            assert response.status_code == 503, route
            assert response.headers["retry-after"] == "1"
