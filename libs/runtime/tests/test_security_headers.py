"""`secure_app`: every HTTP answer carries the security headers, whoever sends it."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from realtime_runtime.security import SecurityHeadersMiddleware, secure_app
from realtime_runtime.settings import ServiceSettings
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

HEADERS = ("content-security-policy", "strict-transport-security", "x-frame-options")


class Refusing:
    """A middleware that answers by itself (as the rate limiter or the Host check do)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/refused":
            await PlainTextResponse("no", status_code=429)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def secured_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(Refusing)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/page")
    async def page() -> dict[str, str]:
        return {"ok": "yes"}

    secure_app(app, ServiceSettings(_env_file=None))
    return app


async def get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        return await http.get(path)


async def test_answers_of_routes_of_middleware_and_of_the_error_handler_carry_the_headers() -> None:
    app = secured_app()
    for path, status in [("/page", 200), ("/missing", 404), ("/refused", 429), ("/boom", 500)]:
        response = await get(app, path)
        assert response.status_code == status, path
        for header in HEADERS:
            assert header in response.headers, (path, header)
    assert (await get(app, "/boom")).text == "Internal Server Error"  # bare, as Starlette's


async def test_the_headers_middleware_is_outside_those_added_before_and_added_once() -> None:
    app = secured_app()
    secure_app(app, ServiceSettings(_env_file=None))
    classes = [entry.cls for entry in app.user_middleware]
    assert classes == [SecurityHeadersMiddleware, Refusing]
