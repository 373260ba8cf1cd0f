"""Services shared by the edge-hardening tests.

The ingress and the gateway run once per session on the in-memory transport (no broker needed,
quick to start) with small limits, so each rule can be reached in a few requests. Tests that need
the real pipeline (board filtering with replay, limits across replicas) start their own suite.

The shared services trust X-Forwarded-For from 127.0.0.1 (the default trusted-proxy list), so
each test takes its own client address (`client_ip`) and never eats another test's HTTP budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from security.edge_client import memory_env, running
from support.processes import Service

_addresses = itertools.count(1)

INGRESS_LIMITS = {
    "ADVANCED_WEBSOCKET_MAX_CONNECTIONS": "30",
    # Every test here connects from 127.0.0.1 with the same token: the per-credential and
    # handshake limits have a service of their own (test_client_limits.py).
    "ADVANCED_WEBSOCKET_MAX_CONNECTIONS_PER_CREDENTIAL": "1000",
    "ADVANCED_WEBSOCKET_HANDSHAKE_RATE_LIMIT": "100000/second",
    "ADVANCED_WEBSOCKET_RATE_LIMIT": "300/second",
    "ADVANCED_WEBSOCKET_RATE_LIMIT_STRIKES": "5",
    # The fuzzer sends resume frames among its hostile frames; their own budget is tested in
    # services/ingress-ws/tests/test_resume.py.
    "ADVANCED_WEBSOCKET_RESUME_RATE_LIMIT": "10000/minute",
    "ADVANCED_MAX_PAYLOAD_BYTES": "4096",  # frames over 4096 + 4096 bytes: close 1009
    "ADVANCED_WEBSOCKET_PING_INTERVAL_SECONDS": "2",
    "ADVANCED_WEBSOCKET_PING_TIMEOUT_SECONDS": "3",
    "ADVANCED_WEBSOCKET_WRITE_STALL_SECONDS": "3",
    "ADVANCED_WEBSOCKET_MAX_PINGS": "50",
    "ADVANCED_HTTP_REQUEST_TIMEOUT_SECONDS": "2",
    "ADVANCED_RATE_LIMIT_DEFAULT": "20/minute",
    "ADVANCED_LOG_LEVEL": "debug",
}
GATEWAY_LIMITS = {
    "ADVANCED_ACTIVITY_STREAM_RATE_LIMIT": "5/minute",
    "ADVANCED_SSE_MAX_CONNECTIONS": "3",
    "ADVANCED_RATE_LIMIT_DEFAULT": "20/minute",
    "ADVANCED_SSE_HEARTBEAT_SECONDS": "1",
    "ADVANCED_HTTP_REQUEST_TIMEOUT_SECONDS": "2",
    "ADVANCED_LOG_LEVEL": "debug",
}


@pytest.fixture(scope="session")
def ingress() -> Iterator[Service]:
    with running("ingress", "security-ingress", memory_env(**INGRESS_LIMITS)) as service:
        yield service


@pytest.fixture(scope="session")
def gateway() -> Iterator[Service]:
    with running("gateway", "security-gateway", memory_env(**GATEWAY_LIMITS)) as service:
        yield service


@pytest.fixture(scope="session")
def untrusting_ingress() -> Iterator[Service]:
    """Trusts X-Forwarded-For from 10.255.255.1 only; no WebSocket message limit (so a client can
    make it write faster than the client reads); pings off (60 s), so the 4 s idle rule and
    the 2 s write-stall rule are what end silent and non-reading sockets."""
    env = memory_env(
        ADVANCED_FORWARDED_ALLOW_IPS="10.255.255.1",
        ADVANCED_RATE_LIMIT_DEFAULT="5/minute",
        ADVANCED_WEBSOCKET_RATE_LIMIT="1000000/second",
        ADVANCED_WEBSOCKET_WRITE_STALL_SECONDS="2",
        ADVANCED_WEBSOCKET_IDLE_TIMEOUT_SECONDS="4",
        ADVANCED_WEBSOCKET_PING_INTERVAL_SECONDS="60",
        ADVANCED_WEBSOCKET_PING_TIMEOUT_SECONDS="60",
        ADVANCED_MAX_PAYLOAD_BYTES="16384",
        ADVANCED_WEBSOCKET_MAX_CONNECTIONS_PER_CREDENTIAL="1000",
        ADVANCED_WEBSOCKET_HANDSHAKE_RATE_LIMIT="100000/second",
    )
    with running("ingress", "security-untrusting-ingress", env) as service:
        yield service


@pytest.fixture
def client_ip() -> str:
    """A client address of its own, passed as X-Forwarded-For through the trusted 127.0.0.1."""
    n = next(_addresses)
    return f"198.51.{n // 250}.{n % 250 + 1}"
