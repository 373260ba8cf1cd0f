"""The two stream routes; each reads the gateway's runtime from the request's state."""

from __future__ import annotations

from envelope.models import is_board_id
from fastapi import HTTPException, Request
from realtime_runtime.auth import Authenticator, Principal, credential_from
from slowapi import Limiter
from starlette.routing import Route

from sse_gateway.response import EventStreamResponse
from sse_gateway.runtime import GatewayRuntime, admit, respond
from sse_gateway.settings import GatewaySettings
from sse_gateway.streams import ActivityFeed, BoardFeed, GatewayMetrics


def stream_routes(
    settings: GatewaySettings, metrics: GatewayMetrics, limiter: Limiter
) -> list[Route]:
    authenticator = Authenticator(settings)

    def authenticate(request: Request) -> Principal:
        return authenticator.authenticate(
            credential_from(request.query_params, request.headers, request.cookies)
        )

    def cursor_of(request: Request) -> str | None:
        return request.headers.get("last-event-id") or request.query_params.get("last_event_id")

    async def board_events(request: Request) -> EventStreamResponse:
        board_id: str = request.path_params["board_id"]
        if not is_board_id(board_id):
            raise HTTPException(422, "The board id must be 1-64 of [A-Za-z0-9_.-].")
        principal = authenticate(request)
        if not principal.may_access(board_id):
            raise HTTPException(403, "This token does not grant the board.")
        runtime: GatewayRuntime = request.state.gateway
        admit(runtime, settings)
        feed = BoardFeed(
            runtime.hub, metrics, board_id, cursor_of(request), settings.sse_send_queue
        )
        return respond(runtime, settings, metrics, feed, principal)

    async def all_events(request: Request) -> EventStreamResponse:
        principal = authenticate(request)
        runtime: GatewayRuntime = request.state.gateway
        admit(runtime, settings)
        feed = ActivityFeed(
            runtime.hub, metrics, principal.boards, cursor_of(request), settings.sse_send_queue
        )
        return respond(runtime, settings, metrics, feed, principal)

    # Starlette's routes, not FastAPI's: a stream lives for hours, and FastAPI's request
    # handling (dependency resolution, its exit stacks) held ≈ 4 KiB per idle stream.
    limit = limiter.limit(settings.activity_stream_rate_limit)
    return [
        Route("/sse/boards/{board_id}", limit(board_events), methods=["GET"]),
        Route("/sse/activity", limit(all_events), methods=["GET"]),
    ]
