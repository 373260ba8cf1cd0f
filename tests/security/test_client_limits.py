"""One client cannot take an instance's sockets: a per-credential share of the sockets and a
handshake rate per client address, both refused with close 1013 (try again later) while the
next user still gets in.

Client addresses come through X-Forwarded-For from the trusted 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import orjson
import pytest
import websockets
from security.edge_client import TOKEN, hs256, memory_env, running
from support.processes import Service

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def limited_ingress() -> Iterator[Service]:
    env = memory_env(
        ADVANCED_WEBSOCKET_MAX_CONNECTIONS="20",
        ADVANCED_WEBSOCKET_MAX_CONNECTIONS_PER_CREDENTIAL="3",
        ADVANCED_WEBSOCKET_HANDSHAKE_RATE_LIMIT="8/minute",
    )
    with running("ingress", "security-client-limits", env) as service:
        yield service


def url(service: Service, board: str, token: str) -> str:
    return f"{service.ws_url}/ws/boards/{board}?token={token}"


async def open_socket(
    stack: contextlib.AsyncExitStack, target: str, address: str
) -> websockets.ClientConnection | int:
    """An acked socket held open by `stack`, or the close code it was refused with."""
    ws = await stack.enter_async_context(
        websockets.connect(target, additional_headers={"X-Forwarded-For": address})
    )
    try:
        await ws.send('{"type":"limit.probe","payload":{}}')
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None
        return closed.rcvd.code
    assert reply["kind"] == "ack", reply
    return ws


async def test_one_credential_gets_its_share_of_sockets_and_the_next_user_gets_in(
    limited_ingress: Service,
) -> None:
    alice, bob = hs256(["*"], sub="alice"), hs256(["*"], sub="bob")
    async with contextlib.AsyncExitStack() as stack:
        # A JWT subject is one client wherever it connects from.
        held = [
            await open_socket(stack, url(limited_ingress, "a", alice), f"203.0.113.{n}")
            for n in (1, 2, 3)
        ]
        assert all(not isinstance(ws, int) for ws in held)
        assert await open_socket(stack, url(limited_ingress, "a", alice), "203.0.113.4") == 1013
        assert not isinstance(
            await open_socket(stack, url(limited_ingress, "a", bob), "203.0.113.4"), int
        )
        # The shared token: one share per client address.
        for _ in range(3):
            assert not isinstance(
                await open_socket(stack, url(limited_ingress, "t", TOKEN), "203.0.113.5"), int
            )
        assert await open_socket(stack, url(limited_ingress, "t", TOKEN), "203.0.113.5") == 1013
        assert not isinstance(
            await open_socket(stack, url(limited_ingress, "t", TOKEN), "203.0.113.6"), int
        )

        # A socket closed gives its slot back.
        first = held[0]
        assert not isinstance(first, int)
        await first.close()
        deadline = time.monotonic() + 10
        for attempt in range(100, 200):  # a fresh address each time: no handshake rate here
            target = url(limited_ingress, "a", alice)
            if not isinstance(await open_socket(stack, target, f"203.0.113.{attempt}"), int):
                break
            assert time.monotonic() < deadline, "the closed socket's slot never came back"
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the closed socket's slot never came back")


async def test_handshakes_past_the_rate_of_an_address_are_refused_with_1013(
    limited_ingress: Service,
) -> None:
    flood, other = "203.0.113.20", "203.0.113.21"
    for n in range(8):  # within the rate: each accepted (and closed again)
        async with contextlib.AsyncExitStack() as stack:
            accepted = await open_socket(stack, url(limited_ingress, f"r{n}", TOKEN), flood)
            assert not isinstance(accepted, int), (n, accepted)
    async with contextlib.AsyncExitStack() as stack:
        assert await open_socket(stack, url(limited_ingress, "r", TOKEN), flood) == 1013
        # Refused before the board id and the credential are even looked at.
        assert await open_socket(stack, url(limited_ingress, "bad%0A", TOKEN), flood) == 1013
        assert await open_socket(stack, url(limited_ingress, "r", "wrong"), flood) == 1013
        assert not isinstance(
            await open_socket(stack, url(limited_ingress, "r", TOKEN), other), int
        )
