"""`POST /session` and `DELETE /session`: a bearer credential traded for an HttpOnly session
cookie, which EventSource (it sends no headers) and the page's sockets present instead."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from realtime_runtime.auth import (
    HOST_SESSION_COOKIE,
    SESSION_COOKIE,
    Unauthorized,
    credential_source,
    session_cookie_name,
)
from realtime_runtime.security import websocket_origin_allowed

from ingress_ws.settings import IngressSettings
from ingress_ws.state import runtime_of


def _refuse(status: int, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def add_session_api(app: FastAPI, settings: IngressSettings) -> None:
    cookie_secure = (
        settings.session_cookie_secure
        if settings.session_cookie_secure is not None
        else settings.environment != "development"
    )
    cookie_name = session_cookie_name(secure=cookie_secure, domain=settings.session_cookie_domain)
    # The same attributes on set and delete, or browsers keep the old cookie.
    cookie_attributes: dict[str, Any] = {
        "path": "/",
        "domain": settings.session_cookie_domain,
        "secure": cookie_secure,
        "httponly": True,
        "samesite": "strict",
    }

    def page_origin_allowed(request: Request) -> bool:
        origin = request.headers.get("origin")
        return websocket_origin_allowed(
            origin, request.headers.get("host"), settings.allowed_origins, from_browser=False
        )

    @app.post("/session")
    async def create_session(request: Request) -> Response:
        """Trade a bearer credential for an HttpOnly session cookie (EventSource sends no headers).

        Only `Authorization: Bearer` is accepted here: a token in the URL would be logged by
        proxies, and accepting the cookie would let a page extend a session it cannot read.
        """
        if not page_origin_allowed(request):
            return _refuse(403, "This origin may not create sessions.")
        found = credential_source({}, request.headers, {})
        if found is None:
            return _refuse(401, "Send the token as Authorization: Bearer to create a session.")
        authenticator = runtime_of(request).authenticator
        try:
            principal = authenticator.authenticate(found.value)
        except Unauthorized as exc:
            return _refuse(401, str(exc))
        value, expires_at = authenticator.issue_session(principal, settings.session_ttl_seconds)
        body = {
            "boards": "*" if principal.boards is None else sorted(principal.boards),
            "expires_at": expires_at,
        }
        response = JSONResponse(body, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            cookie_name,
            value,
            max_age=max(int(expires_at - time.time()), 0),
            **cookie_attributes,
        )
        return response

    @app.delete("/session")
    async def end_session(request: Request) -> Response:
        if not page_origin_allowed(request):
            return _refuse(403, "This origin may not end sessions.")
        response = Response(status_code=204, headers={"Cache-Control": "no-store"})
        response.delete_cookie(cookie_name, **cookie_attributes)
        for other in {SESSION_COOKIE, HOST_SESSION_COOKIE} - {cookie_name}:
            if other in request.cookies:  # set before a change of settings: end it too
                secure = cookie_secure or other == HOST_SESSION_COOKIE
                response.delete_cookie(
                    other, path="/", secure=secure, httponly=True, samesite="strict"
                )
        return response
