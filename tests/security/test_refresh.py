"""Live credential refresh on real sockets (contract section 13): the `expiring` warning, the
`refresh` frame and its refusals, the expiry timer following the new credential, and the
per-credential socket limit following it too."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest
import websockets
from security.edge_client import TOKEN, hs256, memory_env, running
from support.processes import Service

pytestmark = [pytest.mark.e2e]

WARNING = 3.0  # ADVANCED_AUTH_REFRESH_WARNING_SECONDS of the ingress below


@pytest.fixture(scope="module")
def ingress() -> Iterator[Service]:
    env = memory_env(
        ADVANCED_AUTH_REFRESH_WARNING_SECONDS=str(WARNING),
        ADVANCED_WEBSOCKET_MAX_CONNECTIONS_PER_CREDENTIAL="1",
        ADVANCED_WEBSOCKET_HANDSHAKE_RATE_LIMIT="100000/second",
    )
    with running("ingress", "security-refresh", env) as service:
        yield service


def url(service: Service, board: str, token: str) -> str:
    return f"{service.ws_url}/ws/boards/{board}?token={token}"


async def next_frame(ws: websockets.ClientConnection, kind: str, timeout: float = 20) -> Any:
    """The next frame of `kind`; frames of other kinds (events, warnings) are passed over."""
    deadline = time.monotonic() + timeout
    while True:
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if frame["kind"] == kind:
            return frame


async def acked(ws: websockets.ClientConnection) -> bool:
    await ws.send('{"type":"refresh.probe","payload":{}}')
    return bool((await next_frame(ws, "ack"))["kind"] == "ack")


async def closed_with(ws: websockets.ClientConnection, timeout: float = 20) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


def timestamp(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_a_refresh_carries_the_socket_past_its_first_expiry(ingress: Service) -> None:
    first = hs256(["live"], ttl=WARNING + 3, sub="refresher")
    exp = int(time.time() + WARNING + 3)
    async with websockets.connect(url(ingress, "live", first)) as ws:
        assert await acked(ws)
        expiring = await next_frame(ws, "expiring")
        warned_at = time.time()
        # At least the warning ahead (the timer fires at exp - WARNING; only its delivery can
        # be late), and for the credential the socket runs on.
        assert timestamp(expiring["expires_at"]) == exp
        assert warned_at < exp
        second = hs256(["live"], ttl=WARNING + 5, sub="refresher")
        await ws.send(orjson.dumps({"kind": "refresh", "token": second}).decode())
        refreshed = await next_frame(ws, "refreshed")
        new_exp = timestamp(refreshed["expires_at"])
        assert new_exp > exp
        # Past the first credential's expiry the socket is still open and publishing.
        await asyncio.sleep(max(0.0, exp - time.time()) + 1)
        assert await acked(ws)
        # The timer follows the new credential: its own warning, then 4401 at its expiry.
        assert timestamp((await next_frame(ws, "expiring"))["expires_at"]) == new_exp
        code, reason = await closed_with(ws)
    assert (code, reason) == (4401, "token expired")
    assert time.time() >= new_exp - 1  # not closed on the first credential's schedule


async def test_a_shared_token_socket_refreshed_with_the_token_does_not_expire(
    ingress: Service,
) -> None:
    async with websockets.connect(url(ingress, "shared", TOKEN)) as ws:
        await ws.send(orjson.dumps({"kind": "refresh", "token": TOKEN}).decode())
        assert await next_frame(ws, "refreshed") == {"kind": "refreshed", "expires_at": None}
        assert await acked(ws)


REFUSED: dict[str, tuple[Any, int]] = {
    "wrong": (lambda sub: "not-the-token", 4401),
    "expired": (lambda sub: hs256(["live"], ttl=-5, sub=sub), 4401),
    "other-key": (
        lambda sub: hs256(["live"], sub=sub, secret="another-secret-entirely-0123456789"),
        4401,
    ),
    "other-board": (lambda sub: hs256(["elsewhere"], sub=sub), 4403),
    "other-identity": (lambda sub: hs256(["live"], sub=f"{sub}-else"), 4403),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_refresh_the_socket_may_not_take_closes_it(ingress: Service, case: str) -> None:
    make, code = REFUSED[case]
    sub = f"refused-{case}"  # a subject per case: one socket per credential here
    token = make(sub)
    async with websockets.connect(url(ingress, "live", hs256(["live"], sub=sub))) as ws:
        assert await acked(ws)
        await ws.send(orjson.dumps({"kind": "refresh", "token": token}).decode())
        closed, reason = await closed_with(ws)
    assert closed == code
    assert token not in reason


async def test_a_malformed_refresh_is_an_error_and_the_socket_stays(ingress: Service) -> None:
    async with websockets.connect(url(ingress, "live", TOKEN)) as ws:
        await ws.send('{"kind":"refresh","token":""}')
        error = await next_frame(ws, "error")
        assert error["code"] == "invalid_message" and "token" in error["message"]
        assert await acked(ws)


async def test_the_per_credential_limit_follows_the_refreshed_credential(
    ingress: Service,
) -> None:
    """One socket per credential here. The shared token and a session minted from it are
    different credentials of the same identity, so a socket can refresh from one to the other;
    its place in the limit moves with it."""
    async with httpx.AsyncClient(timeout=10) as http:
        made = await http.post(
            f"{ingress.url}/session", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert made.status_code == 200, made.text
    session = made.cookies.get("advanced_session") or next(iter(made.cookies.values()))
    refresh = orjson.dumps({"kind": "refresh", "token": session}).decode()
    async with contextlib.AsyncExitStack() as stack:
        by_token = await stack.enter_async_context(websockets.connect(url(ingress, "a", TOKEN)))
        assert await acked(by_token)
        async with websockets.connect(url(ingress, "a", session)) as by_session:
            assert await acked(by_session)
            # The session's one place is taken: the token socket cannot move onto it.
            await by_token.send(refresh)
            assert (await closed_with(by_token))[0] == 1013
        await asyncio.sleep(0.5)  # both places given back
        by_token = await stack.enter_async_context(websockets.connect(url(ingress, "a", TOKEN)))
        assert await acked(by_token)
        await by_token.send(refresh)
        assert (await next_frame(by_token, "refreshed"))["expires_at"] is not None
        # The socket now counts against the session, and the token's place is free again.
        async with websockets.connect(url(ingress, "a", TOKEN)) as again:
            assert await acked(again)
        async with websockets.connect(url(ingress, "a", session)) as refused:
            assert (await closed_with(refused))[0] == 1013
