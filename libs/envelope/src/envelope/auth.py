"""Credential checks shared by the ingress and the gateway (the contract's section 2)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from envelope.settings import SuiteSettings

SESSION_COOKIE = "advanced_session"


class Unauthorized(Exception):
    """Missing, wrong or expired credential: WebSocket close 4401, HTTP 401."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    boards: frozenset[str] | None  # None: every board
    expires_at: float | None = None

    def may_access(self, board_id: str) -> bool:
        return self.boards is None or board_id in self.boards


def credential_from(
    query: Mapping[str, str], headers: Mapping[str, str], cookies: Mapping[str, str]
) -> str | None:
    """The credential from `?token=`, `Authorization: Bearer`, or the session cookie."""
    if token := query.get("token"):
        return token
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return cookies.get(SESSION_COOKIE) or None


class Authenticator:
    """Accepts the shared token (constant-time compare) and, when configured, JWTs."""

    def __init__(self, settings: SuiteSettings) -> None:
        self._token = settings.realtime_token.get_secret_value().encode()
        self._jwt_key: str | None = None
        self._algorithms: list[str] = []
        if settings.auth_jwt_public_key is not None:
            self._jwt_key = settings.auth_jwt_public_key.get_secret_value()
            self._algorithms = ["RS256", "ES256"]
        elif settings.auth_jwt_secret is not None:
            self._jwt_key = settings.auth_jwt_secret.get_secret_value()
            self._algorithms = ["HS256"]

    def authenticate(self, credential: str | None) -> Principal:
        if not credential:
            raise Unauthorized("A credential is required: pass ?token= or Authorization: Bearer.")
        if hmac.compare_digest(credential.encode(), self._token):
            return Principal(subject="token", boards=None)
        if self._jwt_key is None:
            raise Unauthorized("The credential is not valid.")
        try:
            claims = jwt.decode(
                credential,
                self._jwt_key,
                algorithms=self._algorithms,
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError:
            raise Unauthorized("The credential is not valid or has expired.") from None
        boards = claims.get("boards", [])
        if not isinstance(boards, list) or not all(isinstance(b, str) for b in boards):
            raise Unauthorized("The token's 'boards' claim must be a list of board ids.")
        return Principal(
            subject=str(claims.get("sub", "jwt")),
            boards=None if "*" in boards else frozenset(boards),
            expires_at=float(claims["exp"]),
        )
