"""The whole suite in one process on the memory transport, served by a real uvicorn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from dev_suite.__main__ import create_suite
from realtime_probe.cli import parse_options
from support.clients import board, sse

TOKEN = "change-me-realtime"  # the development default the dev suite runs with


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_suite(), port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    await task


async def test_one_event_travels_through_all_three_services(base_url: str) -> None:
    async with (
        sse(f"http://{base_url}/sse/boards/demo?token={TOKEN}") as on_board,
        sse(f"http://{base_url}/sse/activity?token={TOKEN}") as on_all,
        board(f"ws://{base_url}/ws/boards/demo?token={TOKEN}") as client,
    ):
        correlation_id = await client.send(payload={"text": "hello"})
        ack = await client.next("ack")
        echo = await client.next("event")
        board_event = await on_board.next()
        any_event = await on_all.next()
    assert ack["correlation_id"] == echo["correlation_id"] == correlation_id
    assert echo["sequence"] == 1 and echo["active_connections"] == 1
    assert board_event.id == f"1.{board_event.json()['epoch']}"
    assert board_event.json()["event_id"] == ack["event_id"]
    assert any_event.json()["event_id"] == ack["event_id"]


async def test_sse_resumes_after_its_last_event_id_without_gap_or_duplicate(base_url: str) -> None:
    async with board(f"ws://{base_url}/ws/boards/resume?token={TOKEN}") as client:
        for _ in range(5):
            await client.send()
            await client.next("ack")
        for _ in range(5):
            await client.next("event")
        headers = {"Last-Event-ID": "2"}
        async with sse(f"http://{base_url}/sse/boards/resume?token={TOKEN}", headers) as stream:
            replayed = [(await stream.next()).json()["sequence"] for _ in range(3)]
            await client.send()
            live = await stream.next()
    assert replayed == [3, 4, 5]
    assert live.json()["sequence"] == 6 and live.id == f"6.{live.json()['epoch']}"


async def test_the_page_and_probes_are_served(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{base_url}") as http:
        page = await http.get("/")
        ready = await http.get("/readyz")
    assert page.status_code == 200 and 'role="log"' in page.text
    assert ready.json()["status"] == "ready"


async def test_readiness_reports_the_memory_transport_and_no_broker(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{base_url}") as http:
        ready = await http.get("/readyz")
    body = ready.json()
    assert ready.status_code == 200 and body["status"] == "ready"
    assert body["transport"] == "memory"
    # One entry per service, none claiming a broker connection the suite does not have.
    assert set(body) == {"status", "transport", "ingress-ws", "sse-gateway", "relay-worker"}
    assert "rabbitmq" not in ready.text and "redis" not in ready.text
    assert body["relay-worker"] == {"relay_running": True}


async def test_metrics_carry_every_services_series(base_url: str) -> None:
    async with (
        sse(f"http://{base_url}/sse/boards/metrics?token={TOKEN}") as stream,
        board(f"ws://{base_url}/ws/boards/metrics?token={TOKEN}") as client,
    ):
        await client.send()
        await client.next("ack")
        await stream.next()

    def has(metric: str, service: str) -> bool:
        samples = [line for line in text.splitlines() if not line.startswith("#")]
        return any(s.startswith(metric + "{") and f'service="{service}"' in s for s in samples)

    async with httpx.AsyncClient(base_url=f"http://{base_url}") as http:
        await http.get("/")
        # Each service counts a request once its response is done, which may be after the
        # client has read it: the gateway once it has seen the stream's client go, the
        # ingress once the page has gone out.
        async with asyncio.timeout(5):
            text = ""
            while not (
                has("advanced_http_requests_total", "sse-gateway")
                and has("advanced_http_requests_total", "ingress-ws")  # the page
            ):
                text = (await http.get("/metrics")).text
    assert has("advanced_board_events_published_total", "ingress-ws")
    assert has("advanced_sse_events_sent_total", "sse-gateway")
    assert has("advanced_worker_events_total", "relay-worker")
    # Each name once: families of the three registries are merged, not repeated.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))


async def test_the_probe_finds_the_sse_routes_on_the_suites_own_port(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `just probe` after `just dev` without brokers: no --sse-url needed.
    monkeypatch.delenv("ADVANCED_SSE_PUBLIC_URL", raising=False)
    port = base_url.rsplit(":", 1)[1]
    options, _ = await asyncio.to_thread(parse_options, ["--ws-url", f"ws://{base_url}"])
    assert options.sse_url == f"http://127.0.0.1:{port}"
    monkeypatch.setenv("ADVANCED_INGRESS_PORT", port)
    options, _ = await asyncio.to_thread(parse_options, [])
    assert options.sse_url == f"http://localhost:{port}"


async def test_the_drain_drains_all_three_services() -> None:
    """SIGTERM's drain: the ingress closes its sockets (1001), the gateway ends its streams,
    the worker stops relaying and hands its partitions back."""
    suite = create_suite()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(suite, port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    base_url = f"127.0.0.1:{port}"
    try:
        async with (
            sse(f"http://{base_url}/sse/boards/drain?token={TOKEN}") as stream,
            board(f"ws://{base_url}/ws/boards/drain?token={TOKEN}") as client,
        ):
            await client.send()
            await client.next("ack")
            await stream.next()  # relayed by the worker: all three are running
            await suite.drain()
            async with asyncio.timeout(5):
                await client.connection.wait_closed()
                while not stream.response.is_stream_consumed:
                    await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=f"http://{base_url}") as http:
                ready = (await http.get("/readyz")).json()
    finally:
        server.should_exit = True
        await task
    assert client.connection.close_code == 1001
    assert ready["relay-worker"] == {"relay_running": False}
