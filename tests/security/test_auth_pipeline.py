"""Authorisation through the real pipeline (RabbitMQ, worker, Redis), and start-up refusals."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import websockets
from security.edge_client import JWT_SECRET, TOKEN, hs256
from support.brokers import Brokers, Names
from support.clients import board, sse
from support.processes import Service, Suite

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def pipeline(brokers: Brokers) -> Iterator[Suite]:
    """worker + two ingress replicas + gateway on real brokers, in JWT mode, with a per-client
    message budget of 25 a minute counted in Redis."""
    names = Names.fresh()
    env = {
        "ADVANCED_ENVIRONMENT": "test",
        "ADVANCED_REALTIME_TOKEN": TOKEN,
        "ADVANCED_AUTH_JWT_SECRET": JWT_SECRET,
        "ADVANCED_RABBITMQ_URL": brokers.rabbitmq_url,
        "ADVANCED_REDIS_URL": brokers.redis_url,
        "ADVANCED_EVENT_TRANSPORT": "rabbitmq",
        "ADVANCED_RABBITMQ_RETRY_DELAY_MS": "300",
        "ADVANCED_WEBSOCKET_CLIENT_RATE_LIMIT": "25/minute",
        "ADVANCED_WEBSOCKET_RATE_LIMIT_STRIKES": "100",
        "ADVANCED_LOG_LEVEL": "debug",
        **names.env(),
    }
    suite = Suite("security-pipeline", env)
    try:
        # Started side by side: on a loaded 2-core machine each start takes seconds.
        for kind in ("worker", "ingress", "ingress", "gateway"):
            suite.start(kind, wait=False)
        for started in suite.services:
            started.wait_ready(90)
        yield suite
    finally:
        suite.stop_all()
        asyncio.run(names.cleanup(brokers))


def service(suite: Suite, kind: str, index: int = 0) -> Service:
    return [s for s in suite.services if s.kind == kind][index]


@pytest.mark.brokers
async def test_activity_stream_shows_only_the_jwt_boards_replay_included(pipeline: Suite) -> None:
    ingress, gateway = service(pipeline, "ingress"), service(pipeline, "gateway")
    jwt_alpha = hs256(["alpha"])
    xff = {"X-Forwarded-For": "203.0.113.10"}

    async def publish(board_id: str, label: str) -> None:
        async with board(
            f"{ingress.ws_url}/ws/boards/{board_id}?token={TOKEN}", additional_headers=xff
        ) as client:
            await client.send(payload={"label": label})
            await client.next("ack")

    for board_id, label in (("alpha", "a1"), ("beta", "b1"), ("alpha", "a2")):
        await publish(board_id, label)

    url = f"{gateway.url}/sse/activity?last_event_id=0-0"
    async with sse(url, headers={"Authorization": f"Bearer {jwt_alpha}", **xff}) as stream:
        replayed = [(await stream.next(15)).json() for _ in range(2)]
        await publish("beta", "b2")
        await publish("alpha", "a3")
        live = (await stream.next(15)).json()
        await asyncio.sleep(1)  # b2 was published before a3: anything left would be late
        while not stream.events.empty():
            assert stream.events.get_nowait().event != "activity"
    assert [e["payload"]["label"] for e in replayed] == ["a1", "a2"]
    assert live["payload"]["label"] == "a3" and live["board_id"] == "alpha"

    # The same JWT on the board it does not list: 403 on SSE, 4403 on the WebSocket.
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.get(
            f"{gateway.url}/sse/boards/beta",
            headers={"Authorization": f"Bearer {jwt_alpha}", **xff},
        )
    assert refused.status_code == 403
    async with websockets.connect(
        f"{ingress.ws_url}/ws/boards/beta?token={jwt_alpha}", additional_headers=xff
    ) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


@pytest.mark.brokers
async def test_the_per_client_budget_holds_across_replicas(pipeline: Suite) -> None:
    """25 messages a minute per client address, counted in Redis: a client spreading its frames
    over two replicas still gets 25 in total, not 25 on each."""
    first, second = service(pipeline, "ingress", 0), service(pipeline, "ingress", 1)
    xff = {"X-Forwarded-For": "203.0.113.77"}
    outcomes: dict[str, int] = {}
    async with (
        websockets.connect(
            f"{first.ws_url}/ws/boards/budget?token={TOKEN}", additional_headers=xff
        ) as a,
        websockets.connect(
            f"{second.ws_url}/ws/boards/budget?token={TOKEN}", additional_headers=xff
        ) as b,
    ):
        for n in range(20):
            for ws in (a, b):
                await ws.send(orjson.dumps({"type": "budget", "payload": {"n": n}}).decode())
                while True:
                    reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    if reply["kind"] in {"ack", "error"}:
                        break
                key = reply.get("code") or reply["kind"]
                outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes == {"ack": 25, "rate_limited": 15}


@pytest.mark.brokers
async def test_the_sse_stream_ends_when_its_jwt_expires(pipeline: Suite) -> None:
    gateway = service(pipeline, "gateway")
    token = hs256(["alpha"], ttl=3)
    started = time.monotonic()
    async with sse(
        f"{gateway.url}/sse/boards/alpha?token={token}", headers={"X-Forwarded-For": "203.0.113.11"}
    ) as stream:
        closing = await stream.next(15, kind="close")
    assert orjson.loads(closing.data)["reason"] == "token_expired"
    assert time.monotonic() - started < 10


@pytest.mark.brokers
async def test_a_stream_back_with_a_fresh_jwt_and_last_event_id_loses_nothing(
    pipeline: Suite,
) -> None:
    """Contract 13 for SSE: the stream ends with `close`/`token_expired`; events published
    while the client is away arrive after it comes back with a new JWT and `Last-Event-ID`,
    each once and in order."""
    ingress, gateway = service(pipeline, "ingress"), service(pipeline, "gateway")
    xff = {"X-Forwarded-For": "203.0.113.12"}
    board_id = "refresh-sse"
    stream_url = f"{gateway.url}/sse/boards/{board_id}"
    async with board(
        f"{ingress.ws_url}/ws/boards/{board_id}?token={TOKEN}", additional_headers=xff
    ) as publisher:

        async def publish(n: int) -> None:
            await publisher.send(payload={"n": n})
            await publisher.next("ack", 15)

        short = hs256([board_id], ttl=4)
        async with sse(stream_url, headers={"Authorization": f"Bearer {short}", **xff}) as stream:
            for n in range(3):
                await publish(n)
            first = [await stream.next(15) for _ in range(3)]
            closing = await stream.next(20, kind="close")
        assert orjson.loads(closing.data)["reason"] == "token_expired"
        for n in range(3, 6):  # while the client is away
            await publish(n)
        fresh = hs256([board_id], ttl=60)
        headers = {"Authorization": f"Bearer {fresh}", "Last-Event-ID": str(first[-1].id), **xff}
        async with sse(stream_url, headers=headers) as stream:
            await publish(6)
            resumed = [await stream.next(15) for _ in range(4)]
            await asyncio.sleep(1)  # anything more would be a duplicate
            while not stream.events.empty():
                assert stream.events.get_nowait().event != "activity"
    numbers = [event.json()["payload"]["n"] for event in first + resumed]
    assert numbers == list(range(7))
    sequences = [event.json()["sequence"] for event in first + resumed]
    assert sequences == list(range(sequences[0], sequences[0] + 7))


def test_services_refuse_to_start_on_unsafe_settings_without_printing_secrets() -> None:
    """A real process; the other unsafe settings (every service's settings class, wildcard,
    `null` and malformed origins) go through the same `load_settings` in-process below."""
    secret_password = "rabbit-" + "password-that-must-not-print"
    base = {k: v for k, v in os.environ.items() if not k.startswith("ADVANCED_")}
    base |= {
        "ADVANCED_EVENT_TRANSPORT": "memory",
        "ADVANCED_RABBITMQ_URL": f"amqp://user:{secret_password}@127.0.0.1:1/",
        "ADVANCED_REDIS_URL": f"redis://:{secret_password}@127.0.0.1:1/0",
    }
    cases = [
        ("ingress_ws", {"ADVANCED_ENVIRONMENT": "production"}, "ADVANCED_REALTIME_TOKEN"),
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", module],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for module, env, _ in cases
    ]
    for process, (module, _, expected) in zip(processes, cases, strict=True):
        output, _ = process.communicate(timeout=90)
        assert process.returncode != 0, module
        assert expected in output and "will not start" in output, output
        assert secret_password not in output  # pydantic's own message would print the inputs
        assert "Traceback" not in output


@pytest.mark.parametrize(
    ("settings_class", "env", "expected"),
    [
        ("relay", {"ADVANCED_ENVIRONMENT": "production"}, "ADVANCED_REALTIME_TOKEN"),
        ("gateway", {"ADVANCED_ENVIRONMENT": "staging"}, "ADVANCED_REALTIME_TOKEN"),
        ("ingress", {"ADVANCED_ALLOWED_ORIGINS": "https://*.example"}, "wildcard"),
        ("gateway", {"ADVANCED_ALLOWED_ORIGINS": "https://app.example,*"}, "wildcard"),
        ("ingress", {"ADVANCED_ALLOWED_ORIGINS": "null"}, "not an origin"),
        ("gateway", {"ADVANCED_ALLOWED_ORIGINS": "https://app.example/"}, "not an origin"),
        ("gateway", {"ADVANCED_ALLOWED_ORIGINS": "https://user@app.example"}, "not an origin"),
    ],
)
def test_unsafe_settings_are_refused_with_a_plain_message(
    monkeypatch: pytest.MonkeyPatch, settings_class: str, env: dict[str, str], expected: str
) -> None:
    from ingress_ws.settings import IngressSettings
    from realtime_runtime.settings import load_settings
    from relay_worker.settings import WorkerSettings
    from sse_gateway.settings import GatewaySettings

    classes = {"relay": WorkerSettings, "gateway": GatewaySettings, "ingress": IngressSettings}
    for name in [k for k in os.environ if k.startswith("ADVANCED_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ADVANCED_RABBITMQ_URL", "amqp://user:hunter2-secret@127.0.0.1:1/")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir("/")  # no .env file
    with pytest.raises(SystemExit) as refused:
        load_settings(classes[settings_class])  # type: ignore[type-var]
    message = str(refused.value.code)
    assert expected in message and "will not start" in message
    assert "hunter2-secret" not in message


@pytest.mark.brokers
async def test_a_writer_cannot_pre_claim_another_writers_id(pipeline: Suite) -> None:
    """Idempotency keys are scoped to the sender's credential subject (docs/security.md)."""
    ingress, gateway = service(pipeline, "ingress"), service(pipeline, "gateway")
    board_id = f"claims-{time.monotonic_ns()}"
    alice, mallory = hs256([board_id], sub="alice"), hs256([board_id], sub="mallory")
    xff = {"X-Forwarded-For": "203.0.113.30"}

    async def send(token: str, label: str) -> None:
        url = f"{ingress.ws_url}/ws/boards/{board_id}?token={token}"
        async with board(url, additional_headers=xff) as client:
            await client.send(payload={"label": label}, id_="guessable-1")
            await client.next("ack")

    url = f"{gateway.url}/sse/boards/{board_id}?token={TOKEN}"
    async with sse(url, headers=xff) as stream:
        await send(mallory, "squatter")
        await send(alice, "victim")
        await send(mallory, "squatter again")  # the same sender's resend: delivered once
        labels = [(await stream.next(15)).json()["payload"]["label"] for _ in range(2)]
        with pytest.raises(TimeoutError):
            await stream.next(2)
    assert labels == ["squatter", "victim"]
