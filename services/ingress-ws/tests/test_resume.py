"""Resuming a board socket, served by a real uvicorn on the memory transport: replays go out a
page at a time in order and hand over to the live events without a gap or a repeat; every
cursor form goes through one parse; resume frames have a budget of their own."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from envelope import codec
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings
from realtime_runtime.feed import PAGE
from realtime_runtime.memory import MemoryStore, MemoryTransport
from realtime_runtime.security import hardened_websocket_protocol
from support.clients import BoardClient, board, stalled_websocket
from support.envelopes import board_event
from support.processes import free_port
from support.stores import ReadCounter

TOKEN = "resume-unit-token"


@contextlib.asynccontextmanager
async def served(transport: MemoryTransport, **options: Any) -> AsyncIterator[str]:
    """The ingress under a real uvicorn (with the production WebSocket protocol): its base URL."""
    defaults: dict[str, Any] = {
        "event_transport": "memory",
        "realtime_token": TOKEN,
        "environment": "test",
    }
    settings = IngressSettings(_env_file=None, **(defaults | options))
    port = free_port()
    protocol = hardened_websocket_protocol(
        write_stall_seconds=settings.websocket_write_stall_seconds,
        idle_seconds=settings.websocket_idle_timeout_seconds,
        max_pings=settings.websocket_max_pings,
    )
    config = uvicorn.Config(
        create_app(settings, memory=transport), port=port, log_config=None, ws=protocol
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def relay(store: Any, board_id: str, count: int, pad: int = 0) -> None:
    for _ in range(count):
        envelope = board_event(board_id, uuid.uuid4().hex)
        if pad:
            envelope = envelope.model_copy(update={"payload": {"pad": "x" * pad}})
        body = codec.activity_body(envelope, datetime.now(UTC))
        await store.relay(board_id, envelope.correlation_id, body, 60)


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(0.02)


async def open_sockets(address: str) -> float:
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://{address}/metrics")).text
    found = re.search(r"^advanced_websocket_connections (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


async def events(client: BoardClient, count: int) -> list[int]:
    return [(await client.next("event"))["sequence"] for _ in range(count)]


async def test_a_resume_of_several_pages_hands_over_to_live_events_without_a_seam() -> None:
    store = MemoryStore()
    history = PAGE * 2 + 50
    await relay(store, "seam", history)
    async with (
        served(MemoryTransport(store=store), websocket_send_queue=10_000) as address,
        board(f"ws://{address}/ws/boards/seam?token={TOKEN}&after=0") as client,
    ):
        first = await events(client, 10)
        await relay(store, "seam", 5)  # live, while the replay is still going out
        rest = await events(client, history + 5 - 10)
        await client.connection.send(f'{{"kind":"resume","after":{history + 2}}}')
        again = await events(client, 3)
        await relay(store, "seam", 1)
        live = await events(client, 1)
    assert first + rest == list(range(1, history + 6))
    assert again == [history + 3, history + 4, history + 5] and live == [history + 6]
    assert client.frames["reset"].empty() and client.frames["event"].empty()


async def test_a_client_that_stalls_in_a_resume_does_not_make_the_ingress_read_the_history() -> (
    None
):
    store = ReadCounter(MemoryStore(retention=10_000))
    history = 6000
    await relay(store, "big", history, pad=2000)  # 12 MB retained
    store.rows = 0
    transport = MemoryTransport(store=store)  # type: ignore[arg-type]
    async with served(transport, websocket_write_stall_seconds=0.5) as address:
        sock = await stalled_websocket(
            int(address.rsplit(":", 1)[1]), f"/ws/boards/big?token={TOKEN}&after=0"
        )
        try:
            await until(lambda: _equals(open_sockets(address), 1))
            await until(lambda: _equals(open_sockets(address), 0), 10)  # cut by the stall
        finally:
            sock.close()
    # What the socket buffers took, and a page: not the 12 MB of history.
    assert 0 < store.rows < history // 2, store.rows


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def test_a_cursor_that_is_no_sequence_gets_a_reset_in_every_form() -> None:
    store = MemoryStore(retention=5)
    await relay(store, "c", 8)  # 4..8 retained
    too_big = str(2**63)  # past Redis' INCR: no sequence Redis could have given
    async with served(MemoryTransport(store=store)) as address:
        queries = [f"after={too_big}", "after=99999999999999999999", "after=x1", "after=²"]
        queries += ["after=3&epoch=x1", "after=3.x1", f"after=3&epoch={'9' * 21}"]
        for query in queries:
            async with board(f"ws://{address}/ws/boards/c?token={TOKEN}&{query}") as client:
                reset = await client.next("reset")
                assert await events(client, 5) == [4, 5, 6, 7, 8], query
            assert reset["board_id"] == "c" and reset["oldest_cursor"] == "4", query
        async with board(f"ws://{address}/ws/boards/c?token={TOKEN}") as client:
            await client.connection.send(f'{{"kind":"resume","after":{too_big}}}')
            await client.next("reset")
            assert await events(client, 5) == [4, 5, 6, 7, 8]
            # The largest number a frame can carry (orjson reads JSON integers up to 64 bits).
            await client.connection.send(f'{{"kind":"resume","after":{2**64 - 1}}}')
            await client.next("reset")
            assert await events(client, 5) == [4, 5, 6, 7, 8]
            assert client.frames["error"].empty()


async def test_resume_frames_count_against_a_limit_of_their_own() -> None:
    store = MemoryStore()
    await relay(store, "r", 3)
    async with (
        served(MemoryTransport(store=store), websocket_resume_rate_limit="2/minute") as address,
        board(f"ws://{address}/ws/boards/r?token={TOKEN}") as client,
    ):
        for _ in range(3):
            await client.connection.send('{"kind":"resume","after":0}')
        error = await client.next("error")
        assert await events(client, 3) == [1, 2, 3]  # a resume within the limit
        # Ordinary frames still go through: the budget is the resume frames' own.
        await client.send(id_="after-the-limit")
        ack = await client.next("ack")
    assert error["code"] == "rate_limited" and "resume" in error["message"]
    assert ack["correlation_id"] == "after-the-limit"


async def test_a_resume_frame_of_an_expired_epoch_gets_history_lost_then_the_new_events() -> None:
    store = MemoryStore()
    await relay(store, "e", 4)
    old = (await store.board_after("e", 0))[0].epoch
    store.expire_board("e")
    await relay(store, "e", 2)
    async with (
        served(MemoryTransport(store=store)) as address,
        board(f"ws://{address}/ws/boards/e?token={TOKEN}") as client,
    ):
        await client.connection.send(f'{{"kind":"resume","after":1,"epoch":"{old}"}}')
        reset = await client.next("reset")
        events = [await client.next("event") for _ in range(2)]
        # Without an epoch (an older client), the sequence is read in the current epoch.
        await client.connection.send('{"kind":"resume","after":1}')
        assert [(await client.next("event"))["sequence"]] == [2]  # plain: the current epoch
    assert reset["reason"] == "history_lost" and reset["board_id"] == "e"
    assert [(e["sequence"], e["epoch"] != old) for e in events] == [(1, True), (2, True)]
    assert client.frames["error"].empty() and client.frames["reset"].empty()
