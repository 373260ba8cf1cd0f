"""No credential in any service's log output or metrics.

Named to run last in this directory (and after tests/e2e in a full run): it first sends every
kind of credential in every place it can travel to the shared services (query, header, cookie,
good and bad, WebSocket and SSE), then reads every log file the test session's services wrote
(test-artifacts/logs: the e2e, chaos and security runs) and looks for the secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import httpx
import pytest
import websockets
from conftest import TOKEN as E2E_TOKEN
from security.edge_client import JWT_SECRET, TOKEN, hs256
from support.processes import LOG_DIR, Service

pytestmark = [pytest.mark.e2e]

# Any JWT or session value: base64url JSON header and claims, then a signature.
# A password in a URL with an empty user name, as Redis URLs carry it.
URL_PASSWORD = "url-password-" + "for-edge-tests"
A_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}")


async def exercise_every_credential_path(ingress: Service, gateway: Service) -> list[str]:
    jwt_token = hs256(["logs"])
    wrong = TOKEN + "-but-wrong"
    async with httpx.AsyncClient(timeout=10) as http:
        session = await http.post(
            f"{ingress.url}/session",
            headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "192.0.2.240"},
        )
        cookie = session.cookies["__Host-advanced_session"]
        for credential in (TOKEN, jwt_token, wrong):
            for target in (f"{gateway.url}/sse/boards/logs", f"{gateway.url}/sse/activity"):
                with contextlib.suppress(httpx.HTTPError):
                    async with http.stream(
                        "GET",
                        f"{target}?token={credential}",
                        headers={"X-Forwarded-For": "192.0.2.241"},
                    ) as response:
                        if response.status_code != 200:  # a 200 is a stream: just leave
                            await response.aread()
            await http.get(
                f"{gateway.url}/sse/boards/x%20y",
                headers={"Authorization": f"Bearer {credential}", "X-Forwarded-For": "192.0.2.242"},
            )
        async with http.stream(
            "GET",
            f"{gateway.url}/sse/boards/other",
            headers={
                "Cookie": f"__Host-advanced_session={cookie}",
                "X-Forwarded-For": "192.0.2.243",
            },
        ) as response:
            assert response.status_code in {200, 503}  # a stream (or the cap): leave at once
    # A credential-bearing parameter whose name is percent-encoded (servers decode it, and
    # authenticate with it), and a URL password with an empty user name, in a query string.
    async with httpx.AsyncClient(timeout=10) as http:
        for query in (
            f"?%74oken={TOKEN}",
            f"?%2574oken={TOKEN}",
            f"?next=rediss://:{URL_PASSWORD}@h",
        ):
            with contextlib.suppress(httpx.HTTPError):
                async with http.stream(
                    "GET",
                    f"{gateway.url}/sse/boards/logs{query}",
                    headers={"X-Forwarded-For": "192.0.2.244"},
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                async with websockets.connect(f"{ingress.ws_url}/ws/boards/logs{query}") as ws:
                    await ws.send('{"type":"log.probe","payload":{}}')
                    await asyncio.wait_for(ws.recv(), 5)
    for credential in (TOKEN, jwt_token, wrong):
        for url, headers in (
            (f"{ingress.ws_url}/ws/boards/logs?token={credential}", {}),
            (f"{ingress.ws_url}/ws/boards/logs", {"Authorization": f"Bearer {credential}"}),
            (f"{ingress.ws_url}/ws/boards/logs", {"Authorization": f"Basic {credential}"}),
            (
                f"{ingress.ws_url}/ws/boards/logs",
                {"Cookie": f"__Host-advanced_session={cookie}", "Origin": "https://app.example"},
            ),
        ):
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                async with websockets.connect(url, additional_headers=headers) as ws:
                    await ws.send('{"type":"log.probe","payload":{}}')
                    await asyncio.wait_for(ws.recv(), 5)
    return [jwt_token, cookie]


async def test_no_credential_reaches_a_log_line_or_a_metric(
    ingress: Service, gateway: Service
) -> None:
    issued = await exercise_every_credential_path(ingress, gateway)
    await asyncio.sleep(0.5)  # the services write their last lines

    secrets = [TOKEN, JWT_SECRET, E2E_TOKEN, URL_PASSWORD, *issued]
    logs = sorted(LOG_DIR.glob("*.log"))
    assert ingress.log_path in logs and gateway.log_path in logs
    hits: list[str] = []
    redacted = 0
    for path in logs:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            redacted += line.count("[redacted]")
            if any(secret in line for secret in secrets) or A_JWT.search(line):
                hits.append(f"{path.name}:{number}: {line[:200]}")
    assert not hits, "credentials in logs:\n" + "\n".join(hits[:20])
    # The credentials did reach the logging path (query strings, headers at debug level) and
    # were redacted there: this test would see them if the redaction went away.
    assert redacted >= 10

    async with httpx.AsyncClient(timeout=10) as http:
        for service in (ingress, gateway):
            metrics = (await http.get(f"{service.url}/metrics")).text
            assert not any(secret in metrics for secret in secrets)
            assert not A_JWT.search(metrics)
            assert "token=" not in metrics
