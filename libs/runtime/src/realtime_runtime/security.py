"""Edge hardening shared by the services: security headers and the WebSocket `Origin` rule.

- `SecurityHeadersMiddleware` (pure ASGI) and `secure_app`, which adds it so that every
  answer carries the headers: streams, 404s and 429s through the middleware, 500s through the
  error handler (Starlette sends those from outside every added middleware).
- `websocket_origin_allowed`: the exact-match `Origin` rule for WebSocket handshakes.
- `rate_limit_exceeded`: slowapi's 429 with a sentence and `Retry-After`.

The hardened uvicorn protocols live in `realtime_runtime.uvicorn_limits` (the one module that
touches uvicorn's private parts); they are re-exported here for the callers that import them
from this module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from realtime_runtime.settings import ServiceSettings
from realtime_runtime.uvicorn_limits import hardened_http_protocol, hardened_websocket_protocol

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "SecurityHeadersMiddleware",
    "Send",
    "hardened_http_protocol",
    "hardened_websocket_protocol",
    "rate_limit_exceeded",
    "secure_app",
    "security_headers",
    "shows_browser_marks",
    "websocket_origin_allowed",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PERMISSIONS_POLICY = (
    "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), "
    "microphone=(), payment=(), usb=(), interest-cohort=()"
)


def security_headers(settings: ServiceSettings) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", settings.content_security_policy.encode()),
        (b"strict-transport-security", settings.strict_transport_security.encode()),
        (b"referrer-policy", b"no-referrer"),
        (b"permissions-policy", PERMISSIONS_POLICY.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-site"),
    ]


class SecurityHeadersMiddleware:
    """Adds the headers at the ASGI level, so streaming and error responses get them too."""

    def __init__(self, app: ASGIApp, settings: ServiceSettings) -> None:
        self.app = app
        self.headers = security_headers(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def secure_app(app: Any, settings: ServiceSettings) -> None:
    """Give every HTTP answer of `app` (a Starlette or FastAPI app) the security headers.

    Call it after the other `add_middleware` calls whose answers need the headers (CORS
    preflights, 429s, the Host allowlist's 400s): `add_middleware` puts the newest outermost.
    Starlette's `ServerErrorMiddleware` stays outside every added middleware, so its 500 gets
    the headers from the 500 handler instead, the same bare "Internal Server Error" as
    Starlette's own. Calling it twice changes nothing.
    """
    if any(entry.cls is SecurityHeadersMiddleware for entry in app.user_middleware):
        return
    app.add_middleware(SecurityHeadersMiddleware, settings=settings)
    headers = {name.decode(): value.decode() for name, value in security_headers(settings)}

    async def internal_error(request: Any, exc: Exception) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("Internal Server Error", status_code=500, headers=headers)

    app.add_exception_handler(500, internal_error)


def websocket_origin_allowed(
    origin: str | None,
    host: str | None,
    allowed: list[str],
    *,
    from_browser: bool,
    require_origin: bool = False,
) -> bool:
    """The WebSocket `Origin` rule (OWASP: validate Origin against an exact allowlist).

    - Listed origins match exactly (no prefix, suffix or case folding: `https://app.example.evil`
      and `https://APP.example` are not `https://app.example`). `null` (sandboxed frames, file://
      pages) is never allowed.
    - The page's own origin (`http(s)://<Host>`) is allowed: the playground served by the ingress.
    - A missing `Origin` means a non-browser client (browsers always send it on WebSocket
      handshakes): allowed unless `require_origin`, or unless the request still shows a browser's
      marks (`from_browser`: `Sec-Fetch-*` headers or a cookie credential), because then the
      header was stripped on the way and the cookie would make it a cross-site hijack.
    """
    if origin is None:
        return not (require_origin or from_browser)
    if origin == "null":
        return False
    if origin in allowed:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


def shows_browser_marks(headers: Mapping[str, str]) -> bool:
    """Fetch metadata headers that browsers set and scripts do not. `Sec-Fetch-Mode` alone is
    no such mark: Node's own fetch() and WebSocket (undici) send it, with no `Sec-Fetch-Site`
    or `Sec-Fetch-Dest` and no `Origin`; every browser that sends one sends all three."""
    return any(name in headers for name in ("sec-fetch-site", "sec-fetch-dest"))


async def rate_limit_exceeded(request: Any, exc: Exception) -> Any:
    """slowapi's `RateLimitExceeded` as a 429 that says what to do, with `Retry-After`.

    (slowapi's own handler answers `{"error": ...}` without a `Retry-After`.)
    """
    from starlette.responses import JSONResponse

    item = getattr(getattr(exc, "limit", None), "limit", None)
    retry_after = int(item.get_expiry()) if item is not None else 60
    detail = getattr(exc, "detail", "") or "the rate limit"
    return JSONResponse(
        {"detail": f"Too many requests ({detail}): retry after {retry_after} seconds."},
        status_code=429,
        headers={"Retry-After": str(retry_after)},
    )
