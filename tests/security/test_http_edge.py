"""HTTP at the edge, through real sockets: headers, CORS, rate limits, caps, the session cookie."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import httpx
import pytest
from security.edge_client import TOKEN, RawSocket, hs256
from support.clients import sse
from support.processes import Service

pytestmark = [pytest.mark.e2e]

REQUIRED_HEADERS = {
    "content-security-policy",
    "strict-transport-security",
    "referrer-policy",
    "permissions-policy",
    "x-content-type-options",
    "x-frame-options",
}


def assert_hardened(response: httpx.Response) -> None:
    missing = REQUIRED_HEADERS - set(response.headers)
    assert not missing, (response.status_code, response.request.url.path, missing)
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["strict-transport-security"].startswith("max-age=")


async def test_every_kind_of_answer_carries_the_security_headers(
    ingress: Service, gateway: Service, client_ip: str
) -> None:
    xff = {"X-Forwarded-For": client_ip}
    async with httpx.AsyncClient(timeout=10) as http:
        answers = [
            await http.get(f"{ingress.url}/", headers=xff),  # 200, the page
            await http.get(f"{ingress.url}/healthz"),
            await http.get(f"{ingress.url}/metrics"),
            await http.get(f"{ingress.url}/no-such-page", headers=xff),  # 404
            await http.post(f"{ingress.url}/session", headers=xff),  # 401
            await http.get(f"{gateway.url}/sse/activity", headers=xff),  # 401
            await http.get(f"{gateway.url}/sse/boards/bad%20id?token={TOKEN}", headers=xff),  # 422
            await http.get(  # 403: the JWT does not list the board
                f"{gateway.url}/sse/boards/other",
                headers={**xff, "Authorization": f"Bearer {hs256(['mine'])}"},
            ),
        ]
        limited = None
        for _ in range(30):  # past the 20/minute default limit: 429
            response = await http.get(f"{ingress.url}/playground/config.json", headers=xff)
            if response.status_code == 429:
                limited = response
                break
    assert [a.status_code for a in answers] == [200, 200, 200, 404, 401, 401, 422, 403]
    assert limited is not None, "the HTTP rate limit never answered 429"
    for response in [*answers, limited]:
        assert_hardened(response)
    assert answers[4].json()["detail"] and answers[5].json()["detail"]
    assert int(limited.headers["retry-after"]) > 0 and "retry" in limited.json()["detail"]

    # An SSE stream's own response head carries them too.
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http,
        http.stream(
            "GET",
            f"{gateway.url}/sse/boards/demo?token={TOKEN}",
            headers={"X-Forwarded-For": "192.0.2.200"},
        ) as stream,
    ):
        assert stream.status_code == 200
        assert_hardened(stream)
        assert stream.headers["cache-control"] == "no-cache"


def test_the_csp_allows_no_inline_script_on_the_page(ingress: Service, client_ip: str) -> None:
    page = httpx.get(f"{ingress.url}/", headers={"X-Forwarded-For": client_ip})
    assert "<script>" not in page.text.replace(" ", "").lower()
    assert "onclick=" not in page.text.lower()


async def test_cors_answers_listed_origins_only_and_varies_on_origin(
    gateway: Service, ingress: Service, client_ip: str
) -> None:
    xff = {"X-Forwarded-For": client_ip}
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with httpx.AsyncClient(timeout=10) as http:
        allowed = await http.options(
            f"{gateway.url}/sse/activity",
            headers={**xff, **preflight, "Origin": "https://app.example"},
        )
        lookalikes = [
            await http.options(
                f"{gateway.url}/sse/activity", headers={**xff, **preflight, "Origin": origin}
            )
            for origin in (
                "https://app.example.evil.test",
                "https://evil-app.example",
                "http://app.example",  # wrong scheme
                "https://app.example:8443",
                "null",
            )
        ]
        simple = await http.get(f"{gateway.url}/healthz", headers={"Origin": "https://app.example"})
        foreign = await http.get(f"{gateway.url}/healthz", headers={"Origin": "https://evil.test"})
        session_preflight = await http.options(
            f"{ingress.url}/session",
            headers={
                **xff,
                "Origin": "http://localhost:5173",
                "Access-Control-Request-Method": "POST",
            },
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in allowed.headers["vary"]
    assert_hardened(allowed)
    for refused in lookalikes:
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    assert "Origin" in simple.headers["vary"]
    assert "access-control-allow-origin" not in foreign.headers
    assert "Origin" in foreign.headers["vary"]
    assert session_preflight.headers["access-control-allow-origin"] == "http://localhost:5173"


async def test_probes_are_exempt_from_the_rate_limit(ingress: Service, gateway: Service) -> None:
    xff = {"X-Forwarded-For": "192.0.2.77"}
    async with httpx.AsyncClient(timeout=10) as http:
        for service in (ingress, gateway):
            for path in ("/healthz", "/readyz", "/metrics"):
                codes = {
                    (await http.get(service.url + path, headers=xff)).status_code for _ in range(25)
                }
                assert codes == {200}, (service.kind, path, codes)


async def test_sse_connects_are_rate_limited_per_client(gateway: Service, client_ip: str) -> None:
    url = f"{gateway.url}/sse/boards/demo?token=wrong"  # the limit applies before the credential
    async with httpx.AsyncClient(timeout=10) as http:
        codes = [
            (await http.get(url, headers={"X-Forwarded-For": client_ip})).status_code
            for _ in range(7)
        ]
        other_client = await http.get(url, headers={"X-Forwarded-For": "203.0.113.9"})
    assert codes[:5] == [401] * 5 and codes[5:] == [
        429,
        429,
    ]  # ADVANCED_ACTIVITY_STREAM_RATE_LIMIT=5/minute
    assert other_client.status_code == 401


async def test_the_sse_connection_cap_answers_503(gateway: Service) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for n in range(3):  # ADVANCED_SSE_MAX_CONNECTIONS=3
            await stack.enter_async_context(
                sse(
                    f"{gateway.url}/sse/boards/cap?token={TOKEN}",
                    headers={"X-Forwarded-For": f"192.0.2.{10 + n}"},
                )
            )
        async with httpx.AsyncClient(timeout=10) as http:
            over = await http.get(
                f"{gateway.url}/sse/boards/cap?token={TOKEN}",
                headers={"X-Forwarded-For": "192.0.2.14"},
            )
    assert over.status_code == 503 and "limit" in over.json()["detail"]
    assert_hardened(over)
    # The cap counts open streams: once they are closed, a new one is admitted.
    deadline = time.monotonic() + 10
    while True:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            async with http.stream(
                "GET",
                f"{gateway.url}/sse/boards/cap?token={TOKEN}",
                headers={"X-Forwarded-For": "192.0.2.15"},
            ) as again:
                if again.status_code == 200:
                    break
        assert time.monotonic() < deadline, "the cap did not free its slots"
        await asyncio.sleep(0.2)


async def test_x_forwarded_for_counts_only_from_trusted_proxies(
    untrusting_ingress: Service,
) -> None:
    """The shared services trust 127.0.0.1, so a rotating X-Forwarded-For gets fresh budgets
    there (the other tests rely on it); this ingress trusts another address only, and the same
    rotation must not escape its 5/minute limit."""
    async with httpx.AsyncClient(timeout=10) as http:
        codes = [
            (
                await http.get(
                    f"{untrusting_ingress.url}/playground/config.json",
                    headers={"X-Forwarded-For": f"203.0.113.{n}"},
                )
            ).status_code
            for n in range(8)
        ]
    assert codes[:5] == [200] * 5 and set(codes[5:]) == {429}


def test_a_silent_websocket_is_closed_by_the_idle_rule(untrusting_ingress: Service) -> None:
    """Pings are off on this ingress (60 s): the 4 s idle rule closes a client that sends
    nothing, with 1001."""
    raw = RawSocket(untrusting_ingress.port, f"/ws/boards/idle?token={TOKEN}")
    try:
        assert raw.upgraded
        started = time.monotonic()
        frames, code = raw.read_until_close(timeout=15)
        assert code == 1001, frames
        assert 3 < time.monotonic() - started < 12
    finally:
        raw.close()


def test_a_request_head_that_never_completes_is_cut(ingress: Service, gateway: Service) -> None:
    """Slowloris: uvicorn has no deadline of its own; ADVANCED_HTTP_REQUEST_TIMEOUT_SECONDS=2."""
    for service in (ingress, gateway):
        with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            started = time.monotonic()
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
            elapsed = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 408"), received[:80]
        assert 1.5 < elapsed < 10, elapsed
        # ...and the service still answers everyone else.
        assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=15) as sock:
        started = time.monotonic()
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")  # nothing sent at all
        assert time.monotonic() - started < 10


async def test_session_cookie_is_http_only_and_opens_the_sse_stream(
    ingress: Service, gateway: Service, client_ip: str
) -> None:
    xff = {"X-Forwarded-For": client_ip}
    async with httpx.AsyncClient(timeout=10) as http:
        in_query = await http.post(f"{ingress.url}/session?token={TOKEN}", headers=xff)
        foreign = await http.post(
            f"{ingress.url}/session",
            headers={**xff, "Authorization": f"Bearer {TOKEN}", "Origin": "https://evil.test"},
        )
        created = await http.post(
            f"{ingress.url}/session",
            headers={**xff, "Authorization": f"Bearer {TOKEN}", "Origin": "https://app.example"},
        )
        scoped = await http.post(
            f"{ingress.url}/session",
            headers={**xff, "Authorization": f"Bearer {hs256(['mine'])}"},
        )
    assert in_query.status_code == 401  # a token in a URL is not traded for a cookie
    assert foreign.status_code == 403
    assert created.status_code == 200 and created.json()["boards"] == "*"
    set_cookie = created.headers["set-cookie"]
    assert set_cookie.startswith("__Host-advanced_session="), set_cookie
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in set_cookie.lower(), set_cookie
    value = created.cookies["__Host-advanced_session"]
    assert TOKEN not in set_cookie and TOKEN not in created.text
    assert created.headers["cache-control"] == "no-store"
    assert scoped.json()["boards"] == ["mine"]
    scoped_value = scoped.cookies["__Host-advanced_session"]

    cookie = {"Cookie": f"__Host-advanced_session={value}", "X-Forwarded-For": "192.0.2.90"}
    async with sse(f"{gateway.url}/sse/boards/any-board", headers=cookie) as stream:
        await asyncio.sleep(1.5)  # heartbeats every second on this gateway
        assert stream.comments >= 1 or not stream.events.empty()
    async with httpx.AsyncClient(timeout=10) as http:
        denied = await http.get(
            f"{gateway.url}/sse/boards/other",
            headers={
                "Cookie": f"__Host-advanced_session={scoped_value}",
                "X-Forwarded-For": "192.0.2.91",
            },
        )
        forged = await http.get(
            f"{gateway.url}/sse/boards/any",
            headers={
                "Cookie": f"__Host-advanced_session={value[:-4]}AAAA",
                "X-Forwarded-For": "192.0.2.92",
            },
        )
    assert denied.status_code == 403
    assert forged.status_code == 401
