"""The credential rules of the contract's section 2: shared token, JWTs, session values."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from realtime_runtime import auth
from realtime_runtime.auth import (
    HOST_SESSION_COOKIE,
    SESSION_COOKIE,
    Authenticator,
    Principal,
    Unauthorized,
    credential_from,
    credential_source,
    session_cookie_name,
)
from realtime_runtime.settings import AuthSettings

TOKEN = "unit-" + "shared-token"
SECRET = "unit-" + "jwt-secret-0123456789-abcdefghijkl"


def settings(**overrides: Any) -> AuthSettings:
    return AuthSettings(_env_file=None, realtime_token=TOKEN, **overrides)


def claims(boards: list[str] | None = None, ttl: float = 60, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + int(ttl), **extra}
    if boards is not None:
        body["boards"] = boards
    return body


def pem_pair(kind: str) -> tuple[bytes, str]:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


# --- the shared token -----------------------------------------------------------------------


def test_the_shared_token_grants_every_board_without_expiry() -> None:
    principal = Authenticator(settings()).authenticate(TOKEN)
    assert principal == Principal(subject="token", boards=None, expires_at=None, kind="token")
    assert principal.may_access("any-board")


@pytest.mark.parametrize(
    "credential", [None, "", "wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper(), " " + TOKEN]
)
def test_anything_but_the_token_is_unauthorized(credential: str | None) -> None:
    with pytest.raises(Unauthorized):
        Authenticator(settings()).authenticate(credential)


def test_the_token_compare_is_constant_time_over_equal_length_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every credential is hashed and compared with hmac.compare_digest on 32-byte digests, so
    the time depends on neither where the first difference is nor the credential's length."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    authenticator = Authenticator(settings())
    for credential in ("x", TOKEN, "y" * 5000):
        try:
            authenticator.authenticate(credential)
        except Unauthorized:
            pass
    assert len(compared) == 3
    assert all(len(a) == len(b) == 32 for a, b in compared)
    assert compared[1][0] == hashlib.sha256(TOKEN.encode()).digest()


# --- JWTs ------------------------------------------------------------------------------------


def test_hs256_jwt_with_its_boards() -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    token = jwt.encode(claims(["a", "b"]), SECRET, algorithm="HS256")
    principal = authenticator.authenticate(token)
    assert principal.kind == "jwt" and principal.subject == "alice"
    assert principal.boards == frozenset({"a", "b"})
    assert principal.may_access("a") and not principal.may_access("c")
    assert principal.expires_at is not None and principal.expires_at > time.time()


def test_a_star_in_boards_means_every_board_and_no_claim_means_none() -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    every = authenticator.authenticate(jwt.encode(claims(["*"]), SECRET, algorithm="HS256"))
    assert every.boards is None and every.may_access("anything")
    none = authenticator.authenticate(jwt.encode(claims(None), SECRET, algorithm="HS256"))
    assert none.boards == frozenset() and not none.may_access("anything")


@pytest.mark.parametrize("boards", ["a", [1, 2], {"a": 1}, ["a", None]])
def test_a_malformed_boards_claim_is_refused(boards: Any) -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    token = jwt.encode({**claims(), "boards": boards}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="boards"):
        authenticator.authenticate(token)


def test_exp_is_required_and_enforced() -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    expired = jwt.encode(claims(["a"], ttl=-1), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="expired"):
        authenticator.authenticate(expired)
    no_exp = jwt.encode({"sub": "x", "boards": ["a"]}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        authenticator.authenticate(no_exp)


@pytest.mark.parametrize("exp", [1e300, 2**70, 10**400, 253_402_300_800])
def test_an_absurd_exp_is_refused_not_overflowed(exp: float) -> None:
    # Past year 9999: no timer, datetime or cookie Max-Age can take it (10**400 overflowed
    # float() outside the error handling; 1e300 was accepted and overflowed later).
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    token = jwt.encode({**claims(["a"]), "exp": exp}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="'exp'"):
        authenticator.authenticate(token)
    session_key = hmac.new(TOKEN.encode(), b"advanced-session-v1", hashlib.sha256).digest()
    session = jwt.encode(
        {**claims(["*"]), "aud": "advanced-session", "exp": exp}, session_key, algorithm="HS256"
    )
    with pytest.raises(Unauthorized, match="'exp'"):
        authenticator.authenticate(session)


def test_a_jwt_signed_with_another_secret_or_alg_none_is_refused() -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    with pytest.raises(Unauthorized):
        authenticator.authenticate(
            jwt.encode(claims(["a"]), "another-secret-0123456789abcdefghij", algorithm="HS256")
        )
    unsigned = jwt.encode(claims(["a"]), None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(Unauthorized):
        authenticator.authenticate(unsigned)


def test_without_jwt_configuration_a_jwt_is_just_a_wrong_token() -> None:
    token = jwt.encode(claims(["a"]), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        Authenticator(settings()).authenticate(token)


@pytest.mark.parametrize(("kind", "algorithm"), [("rsa", "RS256"), ("ec", "ES256")])
def test_public_key_mode_accepts_rs256_and_es256(kind: str, algorithm: str) -> None:
    private, public = pem_pair(kind)
    authenticator = Authenticator(settings(auth_jwt_public_key=public))
    principal = authenticator.authenticate(jwt.encode(claims(["x"]), private, algorithm=algorithm))
    assert principal.boards == frozenset({"x"}) and principal.kind == "jwt"
    expired = jwt.encode(claims(["x"], ttl=-5), private, algorithm=algorithm)
    with pytest.raises(Unauthorized):
        authenticator.authenticate(expired)


def test_public_key_mode_refuses_hs256_signed_with_the_public_key() -> None:
    """Algorithm confusion: the public key is public, so an HS256 token 'signed' with it must
    not pass. (PyJWT also refuses a PEM as an HMAC key; signed by hand here.)"""
    _, public = pem_pair("rsa")
    authenticator = Authenticator(settings(auth_jwt_public_key=public))
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    import orjson

    body = jwt.utils.base64url_encode(orjson.dumps(claims(["*"])))
    signing_input = header + b"." + body
    signature = hmac.new(public.encode(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    with pytest.raises(Unauthorized):
        authenticator.authenticate(forged)


def test_a_token_of_the_wrong_key_type_is_refused_not_crashed() -> None:
    rsa_private, _ = pem_pair("rsa")
    _, ec_public = pem_pair("ec")
    authenticator = Authenticator(settings(auth_jwt_public_key=ec_public))
    with pytest.raises(Unauthorized):
        authenticator.authenticate(jwt.encode(claims(["a"]), rsa_private, algorithm="RS256"))


def test_audience_and_issuer_are_checked_when_configured() -> None:
    authenticator = Authenticator(
        settings(
            auth_jwt_secret=SECRET, auth_jwt_audience="realtime", auth_jwt_issuer="https://idp"
        )
    )
    good = jwt.encode(claims(["a"], aud="realtime", iss="https://idp"), SECRET, algorithm="HS256")
    assert authenticator.authenticate(good).boards == frozenset({"a"})
    for wrong in (
        {"aud": "other", "iss": "https://idp"},
        {"aud": "realtime", "iss": "https://evil"},
        {},
    ):
        with pytest.raises(Unauthorized):
            authenticator.authenticate(
                jwt.encode(claims(["a"], **wrong), SECRET, algorithm="HS256")
            )


# --- session values (POST /session) ---------------------------------------------------------


def test_a_session_carries_the_principal_boards_and_expires_with_it() -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    principal = authenticator.authenticate(
        jwt.encode(claims(["a"], ttl=120), SECRET, algorithm="HS256")
    )
    value, expires_at = authenticator.issue_session(principal, ttl_seconds=3600)
    assert TOKEN not in value and SECRET not in value
    assert expires_at <= principal.expires_at  # type: ignore[operator]
    session = authenticator.authenticate(value)
    assert session.kind == "session" and session.boards == frozenset({"a"})
    assert session.expires_at == expires_at


def test_a_shared_token_session_lasts_the_ttl_and_grants_every_board() -> None:
    authenticator = Authenticator(settings())
    value, expires_at = authenticator.issue_session(authenticator.authenticate(TOKEN), 600)
    assert 590 < expires_at - time.time() <= 600
    assert authenticator.authenticate(value).boards is None


def test_an_expired_or_forged_session_is_refused() -> None:
    authenticator = Authenticator(settings())
    value, _ = authenticator.issue_session(authenticator.authenticate(TOKEN), -10)
    with pytest.raises(Unauthorized, match="POST /session"):
        authenticator.authenticate(value)
    forged = jwt.encode(
        {**claims(["*"]), "aud": "advanced-session"},
        "guessed-key-0123456789abcdef0123456",
        algorithm="HS256",
    )
    with pytest.raises(Unauthorized):
        authenticator.authenticate(forged)


def test_rotating_the_token_revokes_every_session() -> None:
    old = Authenticator(settings())
    value, _ = old.issue_session(old.authenticate(TOKEN), 600)
    rotated = Authenticator(AuthSettings(_env_file=None, realtime_token="the-next-token"))
    with pytest.raises(Unauthorized):
        rotated.authenticate(value)


def test_a_jwt_from_the_identity_provider_is_not_mistaken_for_a_session() -> None:
    authenticator = Authenticator(settings(auth_jwt_secret=SECRET))
    token = jwt.encode(claims(["a"], aud="advanced-session"), SECRET, algorithm="HS256")
    assert authenticator.authenticate(token).kind == "jwt"


# --- where the credential comes from ---------------------------------------------------------


def test_credential_sources_in_order() -> None:
    cookies = {SESSION_COOKIE: "c"}
    bearer = {"authorization": "Bearer b"}
    assert credential_source({"token": "q"}, bearer, cookies) == auth.Credential("q", "query")
    assert credential_source({}, bearer, cookies) == auth.Credential("b", "bearer")
    assert credential_source({}, {"authorization": "bearer  b2 "}, {}) == auth.Credential(
        "b2", "bearer"
    )
    assert credential_source({}, {"authorization": "Basic b"}, cookies) == auth.Credential(
        "c", "cookie"
    )
    assert credential_source({}, {"authorization": "Bearer "}, {}) is None
    # Both cookie names are read; the __Host- one wins.
    both = {SESSION_COOKIE: "plain", HOST_SESSION_COOKIE: "host"}
    assert credential_source({}, {}, both) == auth.Credential("host", "cookie")


def test_the_session_cookie_takes_the_host_prefix_whenever_it_can() -> None:
    assert session_cookie_name(secure=True, domain=None) == "__Host-advanced_session"
    assert session_cookie_name(secure=False, domain=None) == "advanced_session"  # http dev
    assert session_cookie_name(secure=True, domain="example.com") == "advanced_session"
    assert credential_from({}, {}, {}) is None


def test_a_short_hs256_secret_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        settings(auth_jwt_secret="too-short")
