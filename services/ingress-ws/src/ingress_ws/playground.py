"""The playground page, its static files and `/playground/config.json`, which tells the page
where the SSE gateway is and how to reconnect."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from realtime_runtime.settings import DEFAULT_TOKEN

from ingress_ws.settings import IngressSettings

STATIC = Path(__file__).parent / "static"


def add_playground(app: FastAPI, settings: IngressSettings) -> None:
    @app.get("/", include_in_schema=False)
    async def playground(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/playground/config.json", include_in_schema=False)
    async def playground_config(request: Request) -> dict[str, object]:
        sse_url = settings.sse_public_url
        if sse_url is None:
            # The page's own host name, so a session cookie set here is sent there too.
            host = request.url.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            sse_url = f"{request.url.scheme}://{host}:{settings.sse_port}"
        return {
            "sse_public_url": sse_url,
            # The page hints at the documented default only where it is accepted.
            "development_token": DEFAULT_TOKEN
            if settings.environment == "development"
            and settings.realtime_token.get_secret_value() == DEFAULT_TOKEN
            else None,
            "reconnect_initial_ms": settings.reconnect_initial_ms,
            "reconnect_max_ms": settings.reconnect_max_ms,
        }

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
