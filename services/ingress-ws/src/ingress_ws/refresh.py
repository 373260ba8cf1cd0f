"""The credential a board socket runs on, replaced live by a `refresh` frame (contract 13).

A socket's credential can expire while the socket is open. The server warns with an `expiring`
frame `ADVANCED_AUTH_REFRESH_WARNING_SECONDS` before, the client answers with a `refresh`
frame carrying a new credential, and the socket carries on under it without a reconnect (so no
resume, no replay). Without a refresh the socket closes with 4401 at expiry.

The new credential must be valid (else 4401), grant the socket's board and belong to the same
identity (else 4403): a socket's identity (its presence member, the scope its event ids are
deduplicated in) is fixed at the handshake. It also takes its own place in the per-credential
socket limit, which a refresh moves from the old credential to the new one (1013 when the new
one has no room).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from envelope.codes import CloseCode
from envelope.models import ExpiringFrame, RefreshedFrame
from pydantic import BaseModel
from realtime_runtime.auth import Authenticator, Principal, Unauthorized

from ingress_ws.admission import SocketSlots, credential_key

Send = Callable[[BaseModel], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class CredentialLease:
    """What one socket is authorised by, and for how long."""

    def __init__(
        self,
        principal: Principal,
        key: str,
        *,
        slots: SocketSlots,
        authenticator: Authenticator,
        board_id: str,
        client: str,
        warning_seconds: float,
    ) -> None:
        self.principal = principal
        self.key = key  # its place in `slots`, taken at the handshake
        self._slots = slots
        self._authenticator = authenticator
        self._board_id = board_id
        self._client = client
        self._warning = warning_seconds
        self._changed = asyncio.Event()
        self._released = False

    def release(self) -> None:
        """Give back the socket's place in the per-credential limit (once)."""
        if not self._released:
            self._released = True
            self._slots.release(self.key)

    async def watch(self, send: Send, close: Close) -> None:
        """Warn before the credential expires and close the socket when it does; a refresh
        starts the count again from the new credential's expiry (or stops it: no expiry)."""
        while True:
            self._changed.clear()
            expires_at = self.principal.expires_at
            if expires_at is None:
                await self._changed.wait()
                continue
            if not await self._until(expires_at - self._warning):
                continue  # refreshed before the warning was due
            await send(ExpiringFrame(expires_at=_when(expires_at)))
            if await self._until(expires_at):
                await close(CloseCode.UNAUTHORISED, "token expired")
                return

    async def refresh(self, token: str, send: Send, close: Close) -> bool:
        """Replace the credential with `token` and answer `refreshed`; or close the socket and
        return False when `token` may not carry it on."""
        try:
            principal = self._authenticator.authenticate(token)
        except Unauthorized as exc:
            await close(CloseCode.UNAUTHORISED, str(exc)[:120])
            return False
        if not principal.may_access(self._board_id):
            await close(CloseCode.FORBIDDEN, "the new credential does not grant the board")
            return False
        if principal.subject != self.principal.subject:
            await close(CloseCode.FORBIDDEN, "the new credential is another identity's: reconnect")
            return False
        key = credential_key(principal, token, self._client)
        if key != self.key:
            # Synchronous from the check to the count, like the handshake's.
            if not self._slots.take(key):
                await close(CloseCode.TRY_AGAIN, "too many sockets for the new credential")
                return False
            self._slots.release(self.key)
            self.key = key
        self.principal = principal
        self._changed.set()
        expires_at = None if principal.expires_at is None else _when(principal.expires_at)
        await send(RefreshedFrame(expires_at=expires_at))
        return True

    async def _until(self, timestamp: float) -> bool:
        """Sleep until `timestamp` (wall clock, as `exp` is): True when it came, False when
        the credential changed first."""
        delay = timestamp - time.time()
        if delay <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), delay)
            return False
        return True
