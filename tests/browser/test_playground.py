"""The playground page in a real browser, against the real suite.

Controls are found by their accessible names (Token, Board, Message, Connect, Send, the log),
as a screen reader would find them. Each row of the log carries, per transport, whether the
event arrived (`data-ws`, `data-sse`: waiting / received / replayed).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import TOKEN
from playwright.async_api import Locator, Page, expect
from support.browser import STARTUP_SECONDS, Playground, Windows, start_playground
from support.clients import board
from support.processes import Suite

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.brokers]

# Generous: two services, a broker hop each way and a 2-core machine shared with other tests.
expect.set_options(timeout=20_000)
DOCS_IMAGE = Path(__file__).parents[2] / "docs" / "images" / "playground-two-windows.png"
WINDOW = {"width": 960, "height": 940}  # the README's picture: two of these side by side
LATENCY = re.compile(r"^(WS|SSE) (<1 ms|\d+ ms|\d+\.\d s)( · resumed)?$")


async def connect(page: Page, board_id: str, token: str = TOKEN) -> None:
    await page.get_by_label("Token").fill(token)
    await page.get_by_label("Board").fill(board_id)
    await page.get_by_role("button", name="Connect").click()


async def wait_open(page: Page) -> None:
    await expect(page.locator("#ws-status")).to_have_attribute("data-state", "open")
    await expect(page.locator("#sse-status")).to_have_attribute("data-state", "open")


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message").fill(text)
    await page.get_by_role("button", name="Send").click()


def row(page: Page, text: str) -> Locator:
    return page.get_by_role("log").locator("li.event", has_text=text)


async def delivered(page: Page, text: str, sequence: int, *, sse: str = "received") -> Locator:
    """The row of `text` shows both transports' copies of event `sequence`."""
    found = row(page, text)
    await expect(found).to_have_count(1)
    await expect(found).to_have_attribute("data-ws", re.compile("received|replayed"))
    await expect(found).to_have_attribute("data-sse", sse)
    await expect(found).to_have_attribute("data-sequence", str(sequence))
    for chip in await found.locator(".chip").all():
        assert LATENCY.match((await chip.inner_text()).strip()), await chip.inner_text()
    return found


async def test_the_page_is_served_with_the_suites_csp(playground: Playground) -> None:
    async with httpx.AsyncClient() as http:
        page = await http.get(playground.url)
        config = await http.get(f"{playground.ingress.url}/playground/config.json")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline
    assert config.json() == {
        "sse_public_url": playground.gateway.url,
        "reconnect_initial_ms": 300,
        "reconnect_max_ms": 2000,
        "development_token": None,  # outside development the page names no default
    }


async def test_a_message_from_one_window_reaches_the_other_over_both_transports(
    playground: Playground, windows: Windows
) -> None:
    alice = await windows.open("alice", playground.url, **WINDOW)
    await expect(alice.get_by_role("log")).to_be_attached()
    await connect(alice, "demo")
    await wait_open(alice)
    # The seed's demo: a second window on the same board, connected with this tab's token.
    async with alice.context.expect_page() as opened:
        await alice.get_by_role("button", name="Open a second window").click()
    bob = windows.adopt("bob", await opened.value)
    await bob.set_viewport_size(WINDOW)  # window.open asked for a smaller one
    await wait_open(bob)
    await expect(bob.get_by_label("Board")).to_have_value("demo")
    # Each accessible name finds exactly one control, connected or not.
    for role, name in (("button", "Connect"), ("button", "Send"), ("textbox", "Board")):
        await expect(alice.get_by_role(role, name=name)).to_have_count(1)

    await send(alice, "Hello from Alice")
    for page in (alice, bob):
        await delivered(page, "Hello from Alice", 1)
    await expect(row(alice, "Hello from Alice")).to_have_attribute("data-status", "acked")
    await expect(row(alice, "Hello from Alice").locator(".who")).to_have_text("you")
    await expect(row(bob, "Hello from Alice").locator(".who")).to_have_text(re.compile("^from "))

    await send(bob, "Hi Alice, Bob here: I see it on both transports")
    await send(alice, "Same here, and the sequence numbers match")
    await send(bob, "Restart the SSE gateway: this page resumes after the last number it saw")
    await send(alice, "Each row shows the latency over each transport")
    for page in (alice, bob):
        await delivered(page, "Bob here", 2)
        await delivered(page, "sequence numbers match", 3)
        await delivered(page, "Restart the SSE gateway", 4)
        await delivered(page, "latency over each transport", 5)
        await expect(page.locator("#active-connections")).to_have_text("2")
        await expect(page.get_by_role("log").locator("li.event")).to_have_count(5)
        await expect(page.locator("#ws-status")).to_have_attribute("data-last-sequence", "5")
        await expect(page.locator("#sse-status")).to_have_attribute("data-last-sequence", "5")

    for page in (alice, bob):
        await page.evaluate("window.scrollTo(0, 0)")
    left = await windows.screenshot("alice", "alice")
    right = await windows.screenshot("bob", "bob")
    composite = await windows.side_by_side(
        left, right, "side-by-side", ("Window A — board demo", "Window B — board demo")
    )
    if os.environ.get("UPDATE_DOCS_IMAGES") == "1":  # how the README's picture is refreshed
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(composite, DOCS_IMAGE)

    # At phone width nothing overflows sideways and every control stays reachable.
    await bob.set_viewport_size({"width": 390, "height": 844})
    assert await bob.evaluate("document.documentElement.scrollWidth") <= 390
    for control in ("Token", "Board", "Message"):
        box = await bob.get_by_label(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    await windows.screenshot("bob", "phone", full_page=True)

    for name in ("alice", "bob"):
        assert await windows.csp_violations(name) == []


async def test_after_a_gateway_restart_the_page_resumes_and_shows_what_it_missed(
    playground: Playground, windows: Windows
) -> None:
    alice = await windows.open("alice", playground.url)
    bob = await windows.open("bob", playground.url)
    for page in (alice, bob):
        await connect(page, "restart")
    for page in (alice, bob):
        await wait_open(page)
    await send(alice, "before the restart")
    await delivered(bob, "before the restart", 1)

    gateway_stopped = asyncio.to_thread(playground.gateway.stop)
    assert await gateway_stopped == 0
    await expect(bob.locator("#sse-status")).to_have_attribute(
        "data-state", re.compile("waiting|connecting")
    )
    await expect(bob.locator("#ws-status")).to_have_attribute("data-state", "open")

    # The WebSocket path still works: these arrive at once over WS, and SSE misses them.
    await send(alice, "missed by SSE, one")
    await send(alice, "missed by SSE, two")
    for text, sequence in (("missed by SSE, one", 2), ("missed by SSE, two", 3)):
        missed = row(bob, text)
        await expect(missed).to_have_attribute("data-ws", "received")
        await expect(missed).to_have_attribute("data-sequence", str(sequence))
        await expect(missed).to_have_attribute("data-sse", "waiting")
    await windows.screenshot("bob", "while-the-gateway-is-down")

    await asyncio.to_thread(playground.start_gateway)

    # Back-off brings the stream back; it resumes after #1 and delivers #2 and #3, once each.
    await expect(bob.locator("#sse-status")).to_have_attribute("data-state", "open")
    for text, sequence in (("missed by SSE, one", 2), ("missed by SSE, two", 3)):
        await delivered(bob, text, sequence, sse="replayed")
        await expect(row(bob, text).locator(".chip[data-transport=sse]")).to_contain_text("resumed")
    await expect(bob.get_by_role("log").locator("li.log-notice")).to_contain_text(
        [re.compile(r"SSE reconnected.*resumed after #1, 2 missed events delivered")]
    )
    await expect(bob.locator("#sse-status")).to_have_attribute("data-last-sequence", "3")
    await expect(bob.get_by_role("log").locator("li.event")).to_have_count(3)

    # And live delivery carries on over the new streams (alice's back-off may end later).
    await expect(alice.locator("#sse-status")).to_have_attribute("data-state", "open")
    await send(alice, "after the restart")
    await delivered(bob, "after the restart", 4)
    await delivered(alice, "after the restart", 4)
    await windows.screenshot("bob", "resumed")

    # Leaving the board and connecting again resumes the same way, on both transports.
    await bob.get_by_role("button", name="Leave").click()
    await expect(bob.locator("#ws-status")).to_have_attribute("data-state", "idle")
    await send(alice, "while Bob had left")
    await delivered(alice, "while Bob had left", 5)
    await bob.get_by_role("button", name="Connect").click()
    await wait_open(bob)
    came_back = row(bob, "while Bob had left")
    await expect(came_back).to_have_attribute("data-ws", "replayed")
    await expect(came_back).to_have_attribute("data-sse", "replayed")
    await expect(bob.get_by_role("log").locator("li.event")).to_have_count(5)
    assert await windows.csp_violations("bob") == []


async def test_after_an_ingress_restart_the_websocket_resumes_after_its_cursor(
    suite: Suite, windows: Windows
) -> None:
    playground = start_playground(suite)
    other_ingress = suite.start("ingress", wait=False)  # used while ours is down
    other_ingress.wait_ready(timeout=STARTUP_SECONDS)
    page = await windows.open("page", playground.url)
    await connect(page, "ws-resume")
    await wait_open(page)
    await send(page, "first, live")
    await delivered(page, "first, live", 1)

    assert await asyncio.to_thread(playground.ingress.stop) == 0
    await expect(page.locator("#ws-status")).to_have_attribute(
        "data-state", re.compile("waiting|connecting")
    )
    async with board(f"{other_ingress.ws_url}/ws/boards/ws-resume?token={TOKEN}") as client:
        for text in (
            "sent while the ingress was down, one",
            "sent while the ingress was down, two",
        ):
            await client.send(payload={"text": text})
            await client.next("ack")
    # The SSE stream, untouched by the restart, shows them live.
    await expect(row(page, "ingress was down, two")).to_have_attribute("data-sse", "received")

    await asyncio.to_thread(playground.start_ingress)
    await expect(page.locator("#ws-status")).to_have_attribute("data-state", "open")
    for text, sequence in (("ingress was down, one", 2), ("ingress was down, two", 3)):
        found = row(page, text)
        await expect(found).to_have_attribute("data-ws", "replayed")
        await expect(found).to_have_attribute("data-sequence", str(sequence))
    await expect(page.get_by_role("log").locator("li.log-notice")).to_contain_text(
        [re.compile(r"WebSocket reconnected.*resumed after #1, 2 missed events delivered")]
    )
    await expect(page.locator("#ws-status")).to_have_attribute("data-last-sequence", "3")
    await send(page, "and live again")
    await delivered(page, "and live again", 4)
    await windows.screenshot("page", "ws-resumed")


async def test_a_wrong_token_gets_a_clear_message_and_no_retry_loop(
    suite: Suite, windows: Windows
) -> None:
    playground = start_playground(suite, worker=False)
    page = await windows.open("page", playground.url)
    await connect(page, "demo", token="not-the-token")

    alert = page.get_by_role("alert")
    await expect(alert).to_be_visible()
    await expect(alert).to_contain_text("The token was refused")
    await expect(alert).to_contain_text("ADVANCED_REALTIME_TOKEN")
    for transport in ("#ws-status", "#sse-status"):
        await expect(page.locator(transport)).to_have_attribute("data-state", "refused")
    await windows.screenshot("page", "wrong-token")

    # Refused is final: no reconnect is scheduled, however long we wait.
    await page.wait_for_timeout(2500)
    for transport in ("#ws-status", "#sse-status"):
        await expect(page.locator(transport)).to_have_attribute("data-state", "refused")

    # A new attempt drops the old refusal, even one that stops at a bad board id.
    await connect(page, "no spaces allowed", token=TOKEN)
    await expect(alert).to_contain_text("board id")
    for transport in ("#ws-status", "#sse-status"):
        await expect(page.locator(transport)).to_have_attribute("data-state", "idle")
        await expect(page.locator(transport)).not_to_contain_text("refused")
        await expect(page.locator(transport)).not_to_contain_text("token")

    # The right token then connects from the same page.
    await connect(page, "demo")
    await wait_open(page)
    await expect(alert).to_be_hidden()
    assert await windows.csp_violations("page") == []


async def test_before_connecting_the_page_shows_no_figure_and_hints_the_default_token_in_development(
    suite: Suite, windows: Windows
) -> None:
    playground = start_playground(suite, worker=False)  # ADVANCED_ENVIRONMENT=test
    development = suite.start(
        "ingress",
        wait=False,
        ADVANCED_ENVIRONMENT="development",
        ADVANCED_REALTIME_TOKEN="change-me-realtime",
    )
    development.wait_ready(timeout=STARTUP_SECONDS)

    page = await windows.open("page", playground.url)
    await expect(page.get_by_role("log")).to_be_attached()
    # No latency chip (a green "WS 12 ms") before anything was measured.
    await expect(page.locator(".chip")).to_have_count(0)
    await expect(page.locator("#token-hint")).to_have_text(re.compile("session storage"))
    await expect(page.locator("#token-hint")).not_to_contain_text("change-me-realtime")

    local = await windows.open("development", development.url)
    await expect(local.locator("#token-hint")).to_contain_text(
        "Development default: change-me-realtime"
    )
    await expect(local.locator(".chip")).to_have_count(0)
    assert await windows.csp_violations("page") == []
    assert await windows.csp_violations("development") == []
