"""Who may open another board socket: a handshake rate per client address, and a share of
the instance's sockets per credential, so that one client cannot take every slot."""

from __future__ import annotations

import hashlib
from collections import Counter

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from realtime_runtime.auth import Principal


def credential_key(principal: Principal, credential: str, client: str) -> str:
    """Whose sockets these are: a JWT's (or its session's) subject; for the shared token, and
    sessions minted from it, which every client holds alike, the credential's digest together
    with the client address."""
    if principal.kind == "jwt" or (principal.kind == "session" and principal.subject != "token"):
        return f"sub:{principal.subject}"
    digest = hashlib.sha256(credential.encode()).hexdigest()[:32]
    return f"credential:{digest}@{client}"


class SocketSlots:
    """Open sockets per credential key in this process, at most `per_key` each."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._open: Counter[str] = Counter()

    def take(self, key: str) -> bool:
        """Count one more socket for `key`, unless it has its share already. Synchronous, so
        concurrent handshakes cannot all pass the check before any is counted."""
        if self._open[key] >= self.per_key:
            return False
        self._open[key] += 1
        return True

    def release(self, key: str) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]  # no entry kept for a credential that has gone


class HandshakeRate:
    """WebSocket handshakes per client address in this process (a `limits` moving window in
    memory: a handshake is refused before any Redis round trip is worth making for it)."""

    def __init__(self, limit: RateLimitItem) -> None:
        self._limit = limit
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def allow(self, client: str) -> bool:
        return await self._limiter.hit(self._limit, "ws-handshake", client)
