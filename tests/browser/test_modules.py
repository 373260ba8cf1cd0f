"""The playground's JavaScript modules, unit by unit, in the same headless Chromium.

No suite is needed: Playwright answers the page's requests from the static directory, so
these run in a second or two and pin the back-off, time parsing and the log's ordering.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ingress_ws
import pytest
from playwright.async_api import Page, Route
from support.browser import Windows

pytestmark = [pytest.mark.browser]

STATIC = Path(ingress_ws.__file__).parent / "static"
ORIGIN = "http://playground.test"
PAGE = """<!doctype html><meta charset="utf-8">
<div id="scroll"><ol id="log" role="log"></ol><p id="empty">No events yet.</p></div>"""


@pytest.fixture
async def page(windows: Windows) -> AsyncIterator[Page]:
    context = await windows.browser.new_context()

    async def serve(route: Route) -> None:
        path = route.request.url.removeprefix(ORIGIN)
        if path.startswith("/static/"):
            await route.fulfill(
                path=STATIC / path.removeprefix("/static/"),
                content_type="text/javascript",
            )
        else:
            await route.fulfill(body=PAGE, content_type="text/html")

    await context.route(f"{ORIGIN}/**", serve)
    opened = windows.adopt("modules", await context.new_page())
    await opened.goto(f"{ORIGIN}/")
    yield opened
    await context.close()


async def in_modules(page: Page, body: str) -> Any:
    """Evaluates `body` (an async function body) with the three modules imported."""
    return await page.evaluate(
        f"""async () => {{
            const connections = await import("/static/transports.js");
            const eventlog = await import("/static/eventlog.js");
            {body}
        }}"""
    )


async def test_back_off_doubles_with_jitter_up_to_the_maximum(page: Page) -> None:
    delays: list[list[int]] = await in_modules(
        page,
        """
        const runs = [];
        for (let run = 0; run < 50; run++) {
          const backoff = new connections.Backoff(300, 2000);
          const delays = [];
          for (let i = 0; i < 7; i++) delays.push(backoff.next());
          backoff.reset();
          delays.push(backoff.next());
          runs.push(delays);
        }
        return runs;
        """,
    )
    ceilings = [300, 600, 1200, 2000, 2000, 2000, 2000, 300]
    for client in delays:
        for delay, ceiling in zip(client, ceilings, strict=True):
            assert ceiling / 2 <= delay <= ceiling, (client, ceilings)
    # Jitter: fifty clients cut off together do not come back at the same instant.
    assert len({client[3] for client in delays}) > 10


async def test_times_with_microseconds_parse_to_the_millisecond(page: Page) -> None:
    parsed = await in_modules(
        page,
        """
        return [
          connections.parseTime("2026-03-01T12:00:00.123456Z"),
          connections.parseTime("2026-03-01T12:00:00.123456+00:00"),
          connections.parseTime("2026-03-01T12:00:00Z"),
          connections.parseTime(null),
        ];
        """,
    )
    expected = 1772366400123  # 2026-03-01T12:00:00.123Z
    assert parsed[:3] == [expected, expected, expected - 123]
    assert math.isnan(parsed[3])


async def test_latency_is_formatted_for_people(page: Page) -> None:
    shown = await in_modules(
        page,
        "return [0.4, 7.6, 999.4, 1530, 61000].map((ms) => eventlog.formatLatency(ms));",
    )
    assert shown == ["<1 ms", "8 ms", "999 ms", "1.5 s", "61.0 s"]


async def test_the_log_keeps_rows_in_sequence_order_with_pending_sends_last(page: Page) -> None:
    rows = await in_modules(
        page,
        """
        const log = new eventlog.EventLog(
          document.getElementById("log"),
          document.getElementById("scroll"),
          document.getElementById("empty"),
        );
        const event = (sequence, id, text) => ({
          sequence, correlation_id: id, event_id: `e${sequence}`, type: "note.created",
          payload: { text }, sender: "abcdef123456",
          occurred_at: new Date(Date.now() - 20).toISOString(),
          published_at: new Date().toISOString(),
        });
        const at = { receivedAt: Date.now(), replayed: false };
        log.sending("mine-1", "not yet echoed", false);
        log.received("ws", event(3, "c", "third"), at);
        log.received("ws", event(1, "a", "first"), at);
        log.received("sse", event(3, "c", "third"), { ...at, replayed: true });
        log.received("ws", event(2, "a2", "second"), at);
        log.acked("mine-1");
        return [...document.querySelectorAll("#log li")].map((li) => ({
          text: li.querySelector(".event-text").textContent,
          sequence: li.dataset.sequence ?? null,
          ws: li.dataset.ws, sse: li.dataset.sse, status: li.dataset.status ?? null,
        }));
        """,
    )
    assert [(r["sequence"], r["text"]) for r in rows] == [
        ("1", "first"),
        ("2", "second"),
        ("3", "third"),
        (None, "not yet echoed"),
    ]
    assert rows[2]["ws"] == "received" and rows[2]["sse"] == "replayed"
    assert rows[0]["sse"] == "waiting"
    assert rows[3]["status"] == "acked"


async def test_a_board_that_starts_again_is_followed_not_hidden_as_seen(page: Page) -> None:
    """A board whose history expired counts from 1 under a new epoch: the page must show those
    events (not drop them as already seen) and resume with the new epoch in its cursor."""
    seen = await in_modules(
        page,
        """
        const shown = [], notices = [], urls = [];
        const handlers = {
          onState() {}, onEvent: (event) => shown.push(`${event.epoch}:${event.sequence}`),
          onNotice: (text) => { notices.push(text); return { update() {} }; },
          onFatal() {},
        };
        const socket = new connections.SocketTransport(
          (cursor) => { urls.push(cursor); return "ws://127.0.0.1:9/nowhere"; },
          new connections.Backoff(1000, 1000), handlers,
        );
        const frame = (sequence, epoch) => JSON.stringify(
          { kind: "event", sequence, epoch, published_at: new Date().toISOString() });
        socket.receive(frame(1, "100"));
        socket.receive(frame(2, "100"));
        socket.receive(frame(2, "100"));           // a duplicate of a resume's overlap
        socket.receive(frame(1, "200"));           // the board started again, live
        const afterRestart = socket.cursor;
        socket.receive(JSON.stringify({ kind: "reset", reason: "history_lost" }));
        socket.receive(frame(1, "300"));           // announced by a reset first
        socket.connect(); socket.stop();
        return { shown, afterRestart, cursor: socket.cursor, urls, notices: notices.length };
        """,
    )
    assert seen["shown"] == ["100:1", "100:2", "200:1", "300:1"]
    assert seen["afterRestart"] == {"after": 1, "epoch": "200"}
    assert seen["cursor"] == {"after": 1, "epoch": "300"}
    assert seen["urls"] == [{"after": 1, "epoch": "300"}]
    assert seen["notices"] == 2
