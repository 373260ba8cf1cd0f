"""Helpers for the browser tests: the suite as the playground page sees it, and the windows."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page

from support.processes import Service, Suite, free_port

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
# Three interpreters importing at once on a busy 2-core runner can take this long together.
STARTUP_SECONDS = 90
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts")) / "browser"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # containers and CI runners have no user namespaces for the sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--font-render-hinting=none",
]
# Records every Content-Security-Policy violation, so tests can show the page runs under it.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


@dataclass
class Playground:
    """The suite as the page sees it: the page on the ingress, the gateway on its own port.

    Both ports are fixed, so that a service restarted on the same port is found again by
    the page's WebSocket and EventSource, as behind a real load balancer.
    """

    suite: Suite
    ingress: Service
    gateway: Service
    ingress_env: dict[str, str]
    gateway_env: dict[str, str]

    @property
    def url(self) -> str:
        return self.ingress.url + "/"

    def start_gateway(self) -> Service:
        self.gateway = self.suite.start(
            "gateway", wait=False, port=self.gateway.port, **self.gateway_env
        )
        self.gateway.wait_ready(timeout=STARTUP_SECONDS)
        return self.gateway

    def start_ingress(self) -> Service:
        self.ingress = self.suite.start(
            "ingress", wait=False, port=self.ingress.port, **self.ingress_env
        )
        self.ingress.wait_ready(timeout=STARTUP_SECONDS)
        return self.ingress


def start_playground(suite: Suite, *, worker: bool = True) -> Playground:
    ingress_port, gateway_port = free_port(), free_port()
    # The page is served by the ingress; its EventSource goes to the gateway, cross-origin.
    gateway_env = {"ADVANCED_ALLOWED_ORIGINS": f"http://127.0.0.1:{ingress_port}"}
    ingress_env = {
        "ADVANCED_SSE_PUBLIC_URL": f"http://127.0.0.1:{gateway_port}",
        # A short back-off, so that a reconnect after a restart happens within the test's patience.
        "ADVANCED_RECONNECT_INITIAL_MS": "300",
        "ADVANCED_RECONNECT_MAX_MS": "2000",
    }
    # Started together and then awaited: on a small CI runner each takes seconds to import.
    starting = [
        suite.start("gateway", wait=False, port=gateway_port, **gateway_env),
        suite.start("ingress", wait=False, port=ingress_port, **ingress_env),
    ]
    if worker:
        starting.append(suite.start("worker", wait=False))
    for service in starting:
        service.wait_ready(timeout=STARTUP_SECONDS)
    return Playground(suite, starting[1], starting[0], ingress_env, gateway_env)


@dataclass
class Windows:
    """The test's browser windows; each one's console is kept, and each is photographed at
    the end of the test (pass or fail) under test-artifacts/browser/."""

    browser: Browser
    test_name: str
    contexts: list[BrowserContext] = field(default_factory=list)
    pages: dict[str, Page] = field(default_factory=dict)
    console: dict[str, list[str]] = field(default_factory=dict)

    async def open(self, name: str, url: str, *, width: int = 1180, height: int = 780) -> Page:
        # One context per window: separate storage, as two real browser windows of two people.
        context = await self.browser.new_context(
            viewport={"width": width, "height": height}, device_scale_factor=1
        )
        await context.add_init_script(RECORD_CSP_VIOLATIONS)
        self.contexts.append(context)
        page = self.adopt(name, await context.new_page())
        await page.goto(url)
        return page

    def adopt(self, name: str, page: Page) -> Page:
        """Keep the console of a window, including one the page opened itself."""
        lines: list[str] = []
        self.console[name] = lines

        def keep(message: ConsoleMessage) -> None:
            lines.append(f"{message.type}: {message.text}")

        page.on("console", keep)
        page.on("pageerror", lambda error: lines.append(f"pageerror: {error}"))
        self.pages[name] = page
        return page

    def path(self, label: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        return ARTIFACTS / f"{self.test_name}-{label}.png"

    async def screenshot(self, name: str, label: str, *, full_page: bool = False) -> bytes:
        return await self.pages[name].screenshot(path=self.path(label), full_page=full_page)

    async def csp_violations(self, name: str) -> list[str]:
        page = self.pages[name]
        recorded: list[str] = await page.evaluate("window.__cspViolations")
        in_console = [line for line in self.console[name] if "Content Security Policy" in line]
        return recorded + in_console

    async def side_by_side(
        self, left: bytes, right: bytes, label: str, titles: tuple[str, str]
    ) -> Path:
        """Two screenshots as two windows next to each other (Chromium composes the picture)."""
        frames = "".join(
            f"<figure><figcaption><i></i><i></i><i></i><span>{title}</span></figcaption>"
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
            for png, title in zip((left, right), titles, strict=True)
        )
        style = (
            "html{background:linear-gradient(135deg,#e9ecf3,#d9deea)}"
            "body{margin:0;padding:28px;display:flex;gap:28px;align-items:flex-start;"
            "width:max-content}"
            "figure{margin:0;border-radius:12px;overflow:hidden;background:#fff;"
            "box-shadow:0 12px 32px rgb(15 23 42/18%),0 2px 6px rgb(15 23 42/10%)}"
            "figcaption{display:flex;align-items:center;gap:7px;height:34px;padding:0 14px;"
            "background:#f1f3f6;border-bottom:1px solid #dde1e7;"
            "font:13px system-ui,sans-serif;color:#4b5563}"
            "i{width:11px;height:11px;border-radius:50%;background:#d1d5db}"
            "span{margin-left:10px}img{display:block}"
        )
        page = await self.browser.new_page(device_scale_factor=1)
        try:
            await page.set_content(f"<style>{style}</style>{frames}")
            size = await page.evaluate(
                "({width: document.body.scrollWidth, height: document.body.scrollHeight})"
            )
            await page.set_viewport_size(size)
            path = self.path(label)
            await page.screenshot(path=path)
            return path
        finally:
            await page.close()
