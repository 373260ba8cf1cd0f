"""Headless Debian Chromium driven by Playwright, against the suite's real processes.

No browser download: Playwright launches the distribution's /usr/bin/chromium. Its absence
is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import async_playwright
from support.browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    INSTALL_HINT,
    Playground,
    Windows,
    start_playground,
)
from support.processes import Suite


@pytest.fixture
def playground(suite: Suite) -> Playground:
    return start_playground(suite)


@pytest.fixture
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Headless Chromium not found at {CHROMIUM}: the browser tests need Debian's "
            f"chromium package ({INSTALL_HINT}), or CHROMIUM_PATH pointing at a Chromium binary.",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def windows(request: pytest.FixtureRequest, chromium_path: Path) -> AsyncIterator[Windows]:
    name = re.sub(r"\W+", "-", request.node.name)[:60]
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=str(chromium_path), args=CHROMIUM_ARGS
        )
        opened = Windows(browser, name)
        try:
            yield opened
        finally:
            for label, page in opened.pages.items():
                if not page.is_closed():
                    await page.screenshot(path=opened.path(f"{label}-final"), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            log = ARTIFACTS / f"{name}-console.log"
            log.write_text(
                "\n".join(
                    f"[{label}] {line}" for label, lines in opened.console.items() for line in lines
                )
            )
            for context in opened.contexts:
                await context.close()
            await browser.close()
