"""The WebSocket route's refusals through real sockets: credentials, boards, origins, limits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import orjson
import pytest
import websockets
from security.edge_client import TOKEN, hs256
from support.processes import Service

pytestmark = [pytest.mark.e2e]


async def close_code_of(url: str, timeout: float = 10, **kwargs: Any) -> int | None:
    """Connect, then wait for the server's close; None when it sends a frame first."""
    async with websockets.connect(url, open_timeout=10, **kwargs) as connection:
        try:
            await asyncio.wait_for(connection.recv(), timeout)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
    return None


async def next_reply(ws: websockets.ClientConnection, timeout: float = 10) -> dict[str, Any]:
    """The next frame that is not presence (the board's other sockets coming and going)."""
    async with asyncio.timeout(timeout):
        while (reply := orjson.loads(await ws.recv()))["kind"] == "presence":
            continue
    return reply  # type: ignore[no-any-return]


async def stays_open(url: str, **kwargs: Any) -> bool:
    """The socket is accepted and answers a frame with an ack."""
    async with websockets.connect(url, open_timeout=10, **kwargs) as connection:
        await connection.send(orjson.dumps({"type": "probe", "payload": {}}).decode())
        return (await next_reply(connection))["kind"] == "ack"


async def test_credentials_decide_4401(ingress: Service) -> None:
    base = f"{ingress.ws_url}/ws/boards/auth"
    assert await stays_open(f"{base}?token={TOKEN}")
    assert await stays_open(base, additional_headers={"Authorization": f"Bearer {TOKEN}"})
    assert await close_code_of(base) == 4401
    assert await close_code_of(f"{base}?token=wrong") == 4401
    assert await close_code_of(f"{base}?token={TOKEN}x") == 4401
    assert await close_code_of(f"{base}?token={TOKEN[:-1]}") == 4401
    assert await close_code_of(base, additional_headers={"Authorization": f"Basic {TOKEN}"}) == 4401
    expired = hs256(["auth"], ttl=-5)
    assert await close_code_of(f"{base}?token={expired}") == 4401
    other_key = hs256(["auth"], secret="not-the-configured-secret-at-all-0123")
    assert await close_code_of(f"{base}?token={other_key}") == 4401
    assert await close_code_of(f"{ingress.ws_url}/ws/boards/bad%20board?token={TOKEN}") == 4400


async def test_the_boards_claim_is_enforced_with_4403(ingress: Service) -> None:
    token = hs256(["granted", "also"])
    assert await stays_open(f"{ingress.ws_url}/ws/boards/granted?token={token}")
    assert await close_code_of(f"{ingress.ws_url}/ws/boards/other?token={token}") == 4403
    everything = hs256(["*"])
    assert await stays_open(f"{ingress.ws_url}/ws/boards/anything?token={everything}")
    nothing = hs256([])
    assert await close_code_of(f"{ingress.ws_url}/ws/boards/granted?token={nothing}") == 4403


async def test_a_live_socket_is_closed_when_its_token_expires(ingress: Service) -> None:
    token = hs256(["expiring"], ttl=3)
    async with websockets.connect(f"{ingress.ws_url}/ws/boards/expiring?token={token}") as ws:
        await ws.send(orjson.dumps({"type": "probe", "payload": {}}).decode())
        # Under 30 s left (ADVANCED_AUTH_REFRESH_WARNING_SECONDS): warned at once, then acked.
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["kind"] == "expiring"
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["kind"] == "ack"
        started = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 15)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert "expired" in closed.value.rcvd.reason
    assert time.monotonic() - started < 8


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Origin": "https://app.example"}, None),
        ({"Origin": "http://localhost:5173"}, None),
        ({"Origin": "https://evil.test"}, 4403),
        ({"Origin": "null"}, 4403),
        ({"Origin": "https://app.example.evil.test"}, 4403),  # look-alike suffix
        ({"Origin": "https://evilapp.example"}, 4403),
        ({"Origin": "http://app.example"}, 4403),  # wrong scheme
        ({"Origin": "https://APP.example"}, 4403),  # browsers send lower case
        ({"Origin": "https://app.example:444"}, 4403),
        ({}, None),  # no Origin and no browser marks: a script (curl, websocat)
        (
            {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "websocket"},
            4403,
        ),  # browser, Origin stripped
        ({"Sec-Fetch-Dest": "websocket"}, 4403),  # browser, Origin stripped
        ({"Sec-Fetch-Mode": "websocket"}, None),  # Node's WebSocket (undici): no Origin
    ],
)
async def test_the_origin_allowlist_is_exact(
    ingress: Service, headers: dict[str, str], code: int | None
) -> None:
    url = f"{ingress.ws_url}/ws/boards/origins?token={TOKEN}"
    if code is None:
        assert await stays_open(url, additional_headers=headers)
    else:
        assert await close_code_of(url, additional_headers=headers) == code


async def test_the_page_own_origin_is_allowed(ingress: Service) -> None:
    own = f"http://127.0.0.1:{ingress.port}"
    assert await stays_open(
        f"{ingress.ws_url}/ws/boards/origins?token={TOKEN}", additional_headers={"Origin": own}
    )


async def test_a_cookie_credential_needs_an_allowed_origin(ingress: Service) -> None:
    created = httpx.post(
        f"{ingress.url}/session",
        headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "192.0.2.150"},
    )
    cookie = f"__Host-advanced_session={created.cookies['__Host-advanced_session']}"
    url = f"{ingress.ws_url}/ws/boards/cookie"
    assert await stays_open(
        url, additional_headers={"Cookie": cookie, "Origin": "https://app.example"}
    )
    # Cross-site WebSocket hijacking: the browser would attach the cookie for any page.
    assert (
        await close_code_of(
            url, additional_headers={"Cookie": cookie, "Origin": "https://evil.test"}
        )
        == 4403
    )
    assert await close_code_of(url, additional_headers={"Cookie": cookie}) == 4403


async def test_a_client_that_keeps_breaking_its_rate_limit_gets_1008(ingress: Service) -> None:
    async with (
        websockets.connect(f"{ingress.ws_url}/ws/boards/flood?token={TOKEN}") as flooder,
        websockets.connect(f"{ingress.ws_url}/ws/boards/flood?token={TOKEN}") as bystander,
    ):
        frame = orjson.dumps({"type": "flood", "payload": {}}).decode()
        for _ in range(700):  # ADVANCED_WEBSOCKET_RATE_LIMIT=300/second
            with contextlib.suppress(websockets.ConnectionClosed):
                await flooder.send(frame)
        kinds: dict[str, int] = {}
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                reply = orjson.loads(await asyncio.wait_for(flooder.recv(), 10))
                kinds[reply.get("code") or reply["kind"]] = (
                    kinds.get(reply.get("code") or reply["kind"], 0) + 1
                )
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert kinds.get("rate_limited", 0) >= 4  # strikes 1..4 are answered, the 5th closes
        assert kinds.get("ack", 0) >= 250  # the budget was served before the refusals
        # The other connection has its own budget and was not touched.
        await bystander.send(frame)
        assert (await next_reply(bystander))["kind"] == "ack"


async def test_a_frame_over_the_size_limit_is_closed_with_1009(ingress: Service) -> None:
    async with websockets.connect(
        f"{ingress.ws_url}/ws/boards/big?token={TOKEN}", max_size=None
    ) as ws:
        await ws.send("x" * (4096 + 4096 + 1))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_permessage_deflate_is_not_negotiated(ingress: Service) -> None:
    async with websockets.connect(
        f"{ingress.ws_url}/ws/boards/deflate?token={TOKEN}", compression="deflate"
    ) as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers


async def test_the_connection_cap_closes_with_1013(ingress: Service) -> None:
    """ADVANCED_WEBSOCKET_MAX_CONNECTIONS=30: 32 sockets at once, the ones past the cap get
    1013, the others live on."""

    async def outcome(ws: websockets.ClientConnection) -> int | None:
        try:
            await next_reply(ws, timeout=3)
        except TimeoutError:
            return None  # accepted, and quiet
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else -1
        return -2

    async with contextlib.AsyncExitStack() as stack:
        sockets = await asyncio.gather(
            *(
                stack.enter_async_context(
                    websockets.connect(
                        f"{ingress.ws_url}/ws/boards/cap?token={TOKEN}", open_timeout=20
                    )
                )
                for _ in range(32)
            )
        )
        outcomes = await asyncio.gather(*(outcome(ws) for ws in sockets))
        refused = [code for code in outcomes if code is not None]
        assert refused and set(refused) == {1013}, outcomes
        metrics = httpx.get(f"{ingress.url}/metrics").text
        assert "advanced_websocket_connections 30.0" in metrics
        alive = sockets[outcomes.index(None)]
        await alive.send(orjson.dumps({"type": "still", "payload": {}}).decode())
        assert (await next_reply(alive))["kind"] == "ack"


async def test_junk_frames_count_against_the_budget_too(ingress: Service) -> None:
    """Invalid frames and resume requests each cost a reply: they are not free of the limit."""
    async with websockets.connect(f"{ingress.ws_url}/ws/boards/junk?token={TOKEN}") as ws:
        for n in range(700):
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send("not json" if n % 2 else '{"kind":"resume","after":0}')
        codes: set[str] = set()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                codes.add(reply.get("code", reply["kind"]))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert {"invalid_message", "rate_limited"} <= codes
