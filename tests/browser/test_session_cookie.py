"""The page trades its token for the session cookie and keeps the token out of every URL:
URLs are what proxies and ingress controllers log."""

from __future__ import annotations

import pytest
from conftest import TOKEN
from playwright.async_api import WebSocket, expect
from support.browser import Windows, start_playground
from support.processes import Suite

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.brokers]

expect.set_options(timeout=20_000)


async def test_the_page_connects_with_the_session_cookie_and_no_token_in_any_url(
    suite: Suite, windows: Windows
) -> None:
    playground = start_playground(suite)
    page = await windows.open("page", playground.url)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    sockets: list[str] = []

    def opened(ws: WebSocket) -> None:
        sockets.append(ws.url)

    page.on("websocket", opened)
    await page.get_by_label("Token").fill(TOKEN)
    await page.get_by_label("Board").fill("cookie")
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#ws-status")).to_have_attribute("data-state", "open")
    await expect(page.locator("#sse-status")).to_have_attribute("data-state", "open")

    assert any(url.endswith("/session") for url in urls), urls  # the cookie was asked for
    assert any("/sse/boards/cookie" in url for url in urls), urls
    assert sockets and all("/ws/boards/cookie" in url for url in sockets), sockets
    leaked = [url for url in urls + sockets if TOKEN in url or "token=" in url]
    assert not leaked, leaked
