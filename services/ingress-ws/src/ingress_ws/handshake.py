"""`/ws/boards/{board_id}`: the handshake's checks, in order, then the socket's life
(`sessions.BoardSocket`). Every refusal is a close code (`envelope.codes.CloseCode`)."""

from __future__ import annotations

from envelope.codes import CloseCode
from envelope.models import is_board_id
from realtime_runtime.auth import Credential, Unauthorized, credential_source
from realtime_runtime.security import shows_browser_marks, websocket_origin_allowed
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from ingress_ws.admission import credential_key
from ingress_ws.presence import is_client_id
from ingress_ws.refresh import CredentialLease
from ingress_ws.sessions import BoardSocket
from ingress_ws.settings import IngressSettings
from ingress_ws.state import runtime_of


def origin_allowed(
    websocket: WebSocket, credential: Credential | None, settings: IngressSettings
) -> bool:
    """The handshake's `Origin` against the allowlist (see `websocket_origin_allowed`)."""
    headers = websocket.headers
    from_browser = shows_browser_marks(headers) or (
        credential is not None and credential.source == "cookie"
    )
    return websocket_origin_allowed(
        headers.get("origin"),
        headers.get("host"),
        settings.allowed_origins,
        from_browser=from_browser,
        require_origin=settings.websocket_require_origin,
    )


async def board_socket(websocket: WebSocket) -> None:
    runtime = runtime_of(websocket)
    settings = runtime.settings
    board_id = websocket.path_params["board_id"]
    # The contract closes with codes, which needs an accepted socket; nothing flows before
    # every check below has passed.
    await websocket.accept()
    # Every handshake counts, refused ones included. Through uvicorn's trusted-proxy list:
    # X-Forwarded-For counts only from those proxies.
    client = websocket.client.host if websocket.client else "unknown"
    if not await runtime.handshakes.allow(client):
        await websocket.close(CloseCode.TRY_AGAIN, "too many connection attempts: back off")
        return
    if not is_board_id(board_id):
        await websocket.close(CloseCode.BAD_BOARD, "board id must be 1-64 of [A-Za-z0-9_.-]")
        return
    client_id = websocket.query_params.get("client_id")
    if client_id is not None and not is_client_id(client_id):
        await websocket.close(CloseCode.BAD_BOARD, "client_id must be 1-64 of [A-Za-z0-9_.:-]")
        return
    credential = credential_source(websocket.query_params, websocket.headers, websocket.cookies)
    if not origin_allowed(websocket, credential, settings):
        await websocket.close(CloseCode.FORBIDDEN, "origin not allowed")
        return
    try:
        principal = runtime.authenticator.authenticate(credential.value if credential else None)
    except Unauthorized as exc:
        await websocket.close(CloseCode.UNAUTHORISED, str(exc)[:120])
        return
    if not principal.may_access(board_id):
        await websocket.close(CloseCode.FORBIDDEN, "this token does not grant the board")
        return
    # No await between these checks and `presence.join` counting the socket (the first thing
    # `run` does), so concurrent handshakes cannot all pass them and overshoot the limit, and
    # none slips in after the drain told the open sockets to close.
    if not runtime.accepting:  # draining: this replica is going away, as its sockets are
        await websocket.close(CloseCode.GOING_AWAY, "server shutting down")
        return
    if runtime.presence.connections >= settings.websocket_max_connections:
        await websocket.close(CloseCode.TRY_AGAIN, "instance at its connection limit")
        return
    assert credential is not None  # authenticate() refused a missing one
    key = credential_key(principal, credential.value, client)
    if not runtime.slots.take(key):
        await websocket.close(CloseCode.TRY_AGAIN, "too many sockets for this credential")
        return
    lease = CredentialLease(
        principal,
        key,
        slots=runtime.slots,
        authenticator=runtime.authenticator,
        board_id=board_id,
        client=client,
        warning_seconds=settings.auth_refresh_warning_seconds,
    )
    try:
        # Validated where it is replayed (`parse_board_cursor`): an invalid one gets a reset.
        query = websocket.query_params
        cursor = query.get("after") or query.get("last_event_id")
        resume = None if cursor is None else (cursor, query.get("epoch") or None)
        await BoardSocket(websocket, board_id, lease, runtime).run(resume)
    finally:
        lease.release()  # the credential's place, the refreshed one's if it changed


def board_socket_route() -> WebSocketRoute:
    # Starlette's route, not FastAPI's: no dependency injection to resolve, and none of its
    # per-request state held for the socket's whole life (≈ 4 KiB per idle socket).
    return WebSocketRoute("/ws/boards/{board_id}", board_socket)
