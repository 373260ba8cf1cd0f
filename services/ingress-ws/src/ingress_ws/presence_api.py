"""`GET /api/boards/{board_id}/presence`: a board's members across every ingress replica."""

from __future__ import annotations

from envelope.models import PresenceSnapshot, is_board_id
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from realtime_runtime.auth import Unauthorized, credential_from

from ingress_ws.presence import REDIS_FAULTS
from ingress_ws.state import runtime_of


def add_presence_api(app: FastAPI) -> None:
    """The snapshot route, on the running process's `BoardPresence`."""

    def refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.get("/api/boards/{board_id}/presence")
    async def board_presence(board_id: str, request: Request) -> Response:
        """The board's members (one per identity) and each one's open sockets."""
        if not is_board_id(board_id):
            return refuse(422, "The board id must be 1-64 of [A-Za-z0-9_.-].")
        runtime = runtime_of(request)
        try:
            principal = runtime.authenticator.authenticate(
                credential_from(request.query_params, request.headers, request.cookies)
            )
        except Unauthorized as exc:
            return refuse(401, str(exc), {"WWW-Authenticate": "Bearer"})
        if not principal.may_access(board_id):
            return refuse(403, "This token does not grant the board.")
        try:
            members = await runtime.presence.store.members(board_id)
        except REDIS_FAULTS:
            return refuse(503, "Presence is unavailable; retry shortly.", {"Retry-After": "1"})
        members.sort(key=lambda member: member.id)
        snapshot = PresenceSnapshot(board_id=board_id, count=len(members), members=members)
        return Response(
            snapshot.model_dump_json(), media_type="application/json", headers=_NO_STORE
        )


_NO_STORE = {"Cache-Control": "no-store"}
