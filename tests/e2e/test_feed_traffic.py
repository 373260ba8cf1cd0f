"""Each edge process draws from Redis only the frames of its own clients' boards.

Two ingress processes with WebSocket clients on disjoint sets of boards, and a gateway with SSE
streams on one of the sets: after N events on each set, every process's
`advanced_feed_frames_received_total` is its own boards' N. (With one channel for every board,
each process drew every event: 2N each.)
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import pytest
from conftest import TOKEN
from prometheus_client.parser import text_string_to_metric_families
from support.clients import BoardClient, SseStream, board, sse
from support.processes import Service, Suite

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

EVENTS_PER_BOARD = 10
BOARDS_PER_SET = 3


async def frames_received(service: Service) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{service.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "advanced_feed_frames_received_total":
                return sample.value
    raise AssertionError(f"{service.kind} does not export advanced_feed_frames_received_total")


async def test_each_edge_process_receives_only_its_own_boards_frames(suite: Suite) -> None:
    suite.start("worker")
    first, second = suite.start("ingress"), suite.start("ingress")
    gateway = suite.start("gateway")
    run = uuid.uuid4().hex[:8]
    left = [f"traffic-{run}-l{n}" for n in range(BOARDS_PER_SET)]
    right = [f"traffic-{run}-r{n}" for n in range(BOARDS_PER_SET)]
    edges = [first, second, gateway]
    before = [await frames_received(edge) for edge in edges]
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, BoardClient] = {}
        for ingress, boards in ((first, left), (second, right)):
            for board_id in boards:
                url = f"{ingress.ws_url}/ws/boards/{board_id}?token={TOKEN}"
                clients[board_id] = await stack.enter_async_context(board(url))
        streams: dict[str, SseStream] = {}
        for board_id in left:
            url = f"{gateway.url}/sse/boards/{board_id}?token={TOKEN}"
            streams[board_id] = await stack.enter_async_context(sse(url))
        for client in clients.values():
            for n in range(EVENTS_PER_BOARD):
                await client.send(payload={"n": n})
                await client.next("ack")
        for board_id, client in clients.items():
            sequences = [(await client.next("event"))["sequence"] for _ in range(EVENTS_PER_BOARD)]
            assert sequences == list(range(1, EVENTS_PER_BOARD + 1)), board_id
        for board_id, stream in streams.items():
            sequences = [(await stream.next()).json()["sequence"] for _ in range(EVENTS_PER_BOARD)]
            assert sequences == list(range(1, EVENTS_PER_BOARD + 1)), board_id
        await asyncio.sleep(0.5)  # anything extra would have arrived by now
        drawn = [await frames_received(edge) - b for edge, b in zip(edges, before, strict=True)]
    own = BOARDS_PER_SET * EVENTS_PER_BOARD
    print(f"frames received (ingress 1, ingress 2, gateway), {own} per set, {2 * own} in all:")
    print(drawn)
    assert drawn == [own, own, own]
