"""Credential checks shared by the ingress and the gateway (the contract's section 2).

Three kinds of credential are accepted, wherever they come from (`?token=`, `Authorization:
Bearer`, or the session cookie, `__Host-advanced_session` or `advanced_session`):

- the shared `ADVANCED_REALTIME_TOKEN`, compared in constant time (digests of equal length, so
  not even the token's length leaks);
- a JWT signed with `ADVANCED_AUTH_JWT_SECRET` (HS256) or the private half of
  `ADVANCED_AUTH_JWT_PUBLIC_KEY` (RS256/ES256), with `exp` required and a `boards` claim;
- a session value minted by the ingress's `POST /session` for browsers whose EventSource cannot
  send headers. It is an HS256 JWT signed with a key derived from the shared token, so every
  replica of both services can check it, rotating the token revokes every session, and the
  long-lived token itself never sits in a cookie jar.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from realtime_runtime.settings import AuthSettings

SESSION_COOKIE = "advanced_session"
# With the `__Host-` prefix a browser takes the cookie only when it is Secure, has Path=/ and
# no Domain, so neither a sibling subdomain nor a plain-http page can plant or shadow it.
HOST_SESSION_COOKIE = "__Host-" + SESSION_COOKIE


def session_cookie_name(*, secure: bool, domain: str | None) -> str:
    """The session cookie's name: `__Host-` prefixed whenever its attributes allow it (Secure,
    no Domain); the plain name for development over http and for a cookie shared by Domain."""
    return HOST_SESSION_COOKIE if secure and domain is None else SESSION_COOKIE


SESSION_AUDIENCE = "advanced-session"
_SESSION_KEY_LABEL = b"advanced-session-v1"


class Unauthorized(Exception):
    """Missing, wrong or expired credential: WebSocket close 4401, HTTP 401."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    boards: frozenset[str] | None  # None: every board
    expires_at: float | None = None
    kind: str = "token"  # "token", "jwt" or "session": for logs and metrics, never the secret
    name: str | None = None  # a JWT's optional `name` claim: presence's display name

    def may_access(self, board_id: str) -> bool:
        return self.boards is None or board_id in self.boards

    @property
    def idempotency_scope(self) -> str:
        """Whose event `id`s these are: a digest of the subject, the same for a JWT and the
        sessions made from it, so one writer cannot pre-claim another writer's `id`."""
        return hashlib.sha256(self.subject.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential and where it came from: a cookie is ambient (the browser sends it on its
    own), so the WebSocket route accepts it only together with an allowed `Origin`."""

    value: str
    source: str  # "query", "bearer" or "cookie"


def credential_source(
    query: Mapping[str, str], headers: Mapping[str, str], cookies: Mapping[str, str]
) -> Credential | None:
    """The credential from `?token=`, `Authorization: Bearer` or the session cookie (either
    name), in order."""
    if token := query.get("token"):
        return Credential(token, "query")
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Credential(value.strip(), "bearer")
    if cookie := cookies.get(HOST_SESSION_COOKIE) or cookies.get(SESSION_COOKIE):
        return Credential(cookie, "cookie")
    return None


def credential_from(
    query: Mapping[str, str], headers: Mapping[str, str], cookies: Mapping[str, str]
) -> str | None:
    """The credential from `?token=`, `Authorization: Bearer`, or the session cookie."""
    found = credential_source(query, headers, cookies)
    return found.value if found is not None else None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Authenticator:
    """Accepts the shared token (constant-time compare), session values and configured JWTs."""

    def __init__(self, settings: AuthSettings) -> None:
        token = settings.realtime_token.get_secret_value().encode()
        self._token_digest = _digest(token)
        self._session_key = hmac.new(token, _SESSION_KEY_LABEL, hashlib.sha256).digest()
        self._jwt_key: str | None = None
        self._algorithms: list[str] = []
        self._audience = settings.auth_jwt_audience
        self._issuer = settings.auth_jwt_issuer
        if settings.auth_jwt_public_key is not None:
            # Only asymmetric algorithms here: accepting HS256 with a public key would let anyone
            # who has the (public) key sign tokens (the classic algorithm-confusion attack).
            self._jwt_key = settings.auth_jwt_public_key.get_secret_value()
            self._algorithms = ["RS256", "ES256"]
        elif settings.auth_jwt_secret is not None:
            self._jwt_key = settings.auth_jwt_secret.get_secret_value()
            self._algorithms = ["HS256"]

    @property
    def jwt_enabled(self) -> bool:
        return self._jwt_key is not None

    def authenticate(self, credential: str | None) -> Principal:
        if not credential:
            raise Unauthorized(
                "A credential is required: pass ?token=, Authorization: Bearer, "
                "or the session cookie from POST /session."
            )
        if hmac.compare_digest(_digest(credential.encode()), self._token_digest):
            return Principal(subject="token", boards=None, kind="token")
        if credential.count(".") != 2:
            raise Unauthorized("The credential is not valid.")
        session = self._session(credential)
        if session is not None:
            return session
        if self._jwt_key is None:
            raise Unauthorized("The credential is not valid.")
        try:
            claims = jwt.decode(
                credential,
                self._jwt_key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            # ValueError/TypeError: a key of the wrong type for the token's algorithm.
            raise Unauthorized("The credential is not valid or has expired.") from None
        return Principal(
            subject=str(claims.get("sub", "jwt")),
            boards=_boards_claim(claims),
            expires_at=_expiry(claims),
            kind="jwt",
            name=_name_claim(claims),
        )

    def issue_session(self, principal: Principal, ttl_seconds: float) -> tuple[str, float]:
        """A session value for `principal` that expires with it or after `ttl_seconds`."""
        now = time.time()
        expires_at = now + ttl_seconds
        if principal.expires_at is not None:
            expires_at = min(expires_at, principal.expires_at)
        boards = ["*"] if principal.boards is None else sorted(principal.boards)
        claims: dict[str, Any] = {
            "sub": principal.subject,
            "boards": boards,
            "aud": SESSION_AUDIENCE,
            "iat": int(now),
            "exp": int(expires_at),
        }
        if principal.name is not None:
            claims["name"] = principal.name
        return jwt.encode(claims, self._session_key, algorithm="HS256"), float(int(expires_at))

    def _session(self, credential: str) -> Principal | None:
        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            return None
        if header.get("alg") != "HS256":
            return None
        try:
            claims = jwt.decode(
                credential,
                self._session_key,
                algorithms=["HS256"],
                audience=SESSION_AUDIENCE,
                options={"require": ["exp", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized(
                "The session has expired: create a new one with POST /session."
            ) from None
        except jwt.PyJWTError:
            return None  # not one of ours: maybe a JWT from the identity provider
        return Principal(
            subject=str(claims.get("sub", "session")),
            boards=_boards_claim(claims),
            expires_at=_expiry(claims),
            kind="session",
            name=_name_claim(claims),
        )


LATEST_EXPIRY = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last second datetime can hold


def _expiry(claims: Mapping[str, Any]) -> float:
    """`exp` as a timestamp a timer and a cookie can take: PyJWT checks only that it is past
    now, so 2**70 or 1e300 would pass it and overflow later (float(), a timer, `max_age`)."""
    try:
        expires_at = float(claims["exp"])
    except (OverflowError, TypeError, ValueError):
        raise Unauthorized("The token's 'exp' claim is not a valid time.") from None
    if not expires_at <= LATEST_EXPIRY:  # also NaN
        raise Unauthorized("The token's 'exp' claim is not a valid time.")
    return expires_at


MAX_NAME_LENGTH = 128


def _name_claim(claims: Mapping[str, Any]) -> str | None:
    """The optional `name` claim, shown to a board's members: a non-empty string, cut to
    `MAX_NAME_LENGTH` characters; anything else is no name (never a refusal)."""
    name = claims.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    return name.strip()[:MAX_NAME_LENGTH]


def _boards_claim(claims: Mapping[str, Any]) -> frozenset[str] | None:
    boards = claims.get("boards", [])
    if not isinstance(boards, list) or not all(isinstance(b, str) for b in boards):
        raise Unauthorized("The token's 'boards' claim must be a list of board ids.")
    return None if "*" in boards else frozenset(boards)
