"""One board-id rule at both edges: the same hostile ids are refused by the ingress (close
4400) and by the gateway (422), and the same valid ids are accepted by both.

`re.match` with `$` accepts a trailing newline (`/ws/boards/x%0A`): such an id was acked at
the ingress and dead-lettered by the worker."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets
from security.edge_client import TOKEN
from support.processes import Service

pytestmark = [pytest.mark.e2e]

# As written in the URL path (percent-encoded where a URL needs it).
HOSTILE = {
    "trailing newline": "x%0A",
    "trailing CR": "x%0D",
    "CRLF inside": "a%0D%0Ab",
    "NUL": "x%00",
    "leading newline": "%0Ax",
    "Unicode digit": "x%C2%B2",  # '²', which str.isdigit() calls a digit
    "Arabic-Indic digit": "%D9%A3",
    "Unicode letter": "%C3%A9t%C3%A9",
    "fullwidth letter": "%EF%BC%A1",
    "65 characters": "x" * 65,
    "space": "a%20b",
    "percent-encoded percent": "a%2525",
    "colon": "a:b",
    "tab": "x%09",
    "plus": "a+b",
    "tilde": "a~b",
}
VALID = {
    "64 characters": "y" * 64,
    "every allowed character": "Az09_.-",
    "dots": "a..b",
    "percent-encoded letters": "%61%62",  # "ab", decoded before the check
}


async def ingress_close_code(ingress: Service, path_id: str) -> int | None:
    url = f"{ingress.ws_url}/ws/boards/{path_id}?token={TOKEN}"
    async with websockets.connect(url, open_timeout=10) as ws:
        try:
            await ws.send('{"type":"board.id.probe","payload":{}}')
            reply = await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
    assert '"ack"' in str(reply)
    return None


def gateway_status(gateway: Service, path_id: str, client_ip: str) -> int:
    with httpx.stream(
        "GET",
        f"{gateway.url}/sse/boards/{path_id}",
        headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": client_ip},
        timeout=10,
    ) as response:
        return response.status_code  # a 200 is a stream: leave at once


@pytest.mark.parametrize("path_id", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_board_id_is_refused_by_both_edges(
    ingress: Service, gateway: Service, path_id: str, client_ip: str
) -> None:
    assert await ingress_close_code(ingress, path_id) == 4400
    assert await asyncio.to_thread(gateway_status, gateway, path_id, client_ip) == 422


@pytest.mark.parametrize("path_id", VALID.values(), ids=VALID.keys())
async def test_a_valid_board_id_is_accepted_by_both_edges(
    ingress: Service, gateway: Service, path_id: str, client_ip: str
) -> None:
    assert await ingress_close_code(ingress, path_id) is None
    assert await asyncio.to_thread(gateway_status, gateway, path_id, client_ip) in {200, 503}
