"""The suite end to end: real processes, real RabbitMQ and Redis, driven as clients would."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from conftest import TOKEN
from support.brokers import Brokers
from support.clients import board, sse
from support.processes import Suite
from support.proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]


@pytest.fixture
def running(suite: Suite) -> Suite:
    suite.start("worker")
    suite.start("ingress")
    suite.start("gateway")
    return suite


def by_kind(suite: Suite, kind: str, index: int = 0) -> str:
    return [s for s in suite.services if s.kind == kind][index].url


async def test_event_is_acked_echoed_and_streamed_on_both_sse_routes(running: Suite) -> None:
    ingress, gateway = running.services[1], running.services[2]
    async with (
        sse(f"{gateway.url}/sse/boards/demo?token={TOKEN}") as board_stream,
        sse(
            f"{gateway.url}/sse/activity", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as all_stream,
        board(f"{ingress.ws_url}/ws/boards/demo?token={TOKEN}") as client,
    ):
        correlation_id = await client.send(payload={"text": "hi"})
        ack = await client.next("ack")
        echo = await client.next("event")
        on_board = (await board_stream.next()).json()
        on_all = await all_stream.next()

    assert ack["correlation_id"] == correlation_id
    assert echo["correlation_id"] == correlation_id and echo["event_id"] == ack["event_id"]
    assert echo["active_connections"] == 1
    assert echo["sequence"] == 1 and echo["payload"] == {"text": "hi"}
    assert echo["schema_version"] == "1" and echo["published_at"] and echo["occurred_at"]
    assert on_board["event_id"] == ack["event_id"]
    assert on_all.json()["event_id"] == ack["event_id"] and on_all.id and "-" in on_all.id


async def test_a_resent_id_is_delivered_once(running: Suite) -> None:
    ingress = running.services[1]
    async with board(f"{ingress.ws_url}/ws/boards/dup?token={TOKEN}") as client:
        await client.send(id_="same-id")
        await client.next("ack")
        await client.send(id_="same-id")
        await client.next("ack")
        await client.send(id_="other-id")
        await client.next("ack")
        first = await client.next("event")
        second = await client.next("event")
    assert [first["correlation_id"], second["correlation_id"]] == ["same-id", "other-id"]
    assert [first["sequence"], second["sequence"]] == [1, 2]


async def test_bad_credentials_are_refused(running: Suite) -> None:
    ingress, gateway = running.services[1], running.services[2]
    async with websockets.connect(f"{ingress.ws_url}/ws/boards/demo?token=wrong") as connection:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(connection.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    async with websockets.connect(f"{ingress.ws_url}/ws/boards/demo") as connection:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(connection.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

    async with httpx.AsyncClient() as http:
        for url in (f"{gateway.url}/sse/activity", f"{gateway.url}/sse/boards/demo?token=wrong"):
            response = await http.get(url)
            assert response.status_code == 401
            assert "credential" in response.json()["detail"]


async def test_readiness_follows_the_brokers(suite: Suite, brokers: Brokers) -> None:
    rabbit, red = urlsplit(brokers.rabbitmq_url), urlsplit(brokers.redis_url)
    rabbit_proxy = TcpProxy(rabbit.hostname or "127.0.0.1", rabbit.port or 5672)
    redis_proxy = TcpProxy(red.hostname or "127.0.0.1", red.port or 6379)
    # Reserve ports and let nothing listen on them yet: the brokers are "down".
    await rabbit_proxy.start(), await redis_proxy.start()
    await rabbit_proxy.stop(), await redis_proxy.stop()
    overrides = {
        "ADVANCED_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{rabbit_proxy.port}/",
        "ADVANCED_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}{red.path or '/0'}",
    }
    services = [suite.start(kind, wait=False, **overrides) for kind in ("ingress", "gateway")]
    for service in services:
        service.wait_live()
    async with httpx.AsyncClient() as http:
        await asyncio.sleep(1)
        for service in services:
            response = await http.get(f"{service.url}/readyz")
            assert response.status_code == 503, service.kind
        ingress_body = (await http.get(f"{services[0].url}/readyz")).json()
        assert ingress_body["event_pipeline_ready"] is False

        await rabbit_proxy.start(), await redis_proxy.start()  # the brokers come up
        try:
            deadline = time.monotonic() + 30
            statuses: list[int] = []
            while time.monotonic() < deadline:
                statuses = [(await http.get(f"{s.url}/readyz")).status_code for s in services]
                if statuses == [200, 200]:
                    break
                await asyncio.sleep(0.2)
            assert statuses == [200, 200]
            assert (await http.get(f"{services[0].url}/readyz")).json()["status"] == "ready"
        finally:
            suite.stop_all()
            await rabbit_proxy.stop(), await redis_proxy.stop()


async def test_two_ingress_replicas_fan_out_to_each_others_sockets(running: Suite) -> None:
    second = running.start("ingress")
    first = running.services[1]
    async with (
        board(f"{first.ws_url}/ws/boards/shared?token={TOKEN}") as alice,
        board(f"{second.ws_url}/ws/boards/shared?token={TOKEN}") as bob,
    ):
        await asyncio.sleep(1.5)  # presence is refreshed across replicas every second
        correlation_id = await alice.send(payload={"from": "alice"})
        seen_by_bob = await bob.next("event")
        seen_by_alice = await alice.next("event")
        reply = await bob.send(payload={"from": "bob"})
        bob_reply_at_alice = await alice.next("event")
    assert seen_by_bob["correlation_id"] == correlation_id == seen_by_alice["correlation_id"]
    assert seen_by_bob["active_connections"] == 2
    assert bob_reply_at_alice["correlation_id"] == reply and bob_reply_at_alice["sequence"] == 2


async def test_sigterm_drains_every_service(running: Suite) -> None:
    ingress = running.services[1]
    async with websockets.connect(f"{ingress.ws_url}/ws/boards/drain?token={TOKEN}") as connection:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        codes = [service.stop() for service in reversed(running.services)]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(connection.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert codes == [0, 0, 0]
    assert time.monotonic() - started < 30
