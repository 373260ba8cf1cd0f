"""The contract's codes, each defined once: WebSocket close codes, error codes, reset reasons.

Every edge, the probe, the client module (`clients/js`, checked against these by a test) and
the docs read them from here. Adding a code means adding it here, and to its test.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """Why the ingress closed a WebSocket (contract section 4)."""

    GOING_AWAY = 1001  # the replica is draining: reconnect, to another replica
    POLICY = 1008  # the message rate limit or the ping limit was broken
    TRY_AGAIN = 1013  # at a connection limit, or too many attempts: back off
    BAD_BOARD = 4400  # the board id (or client_id) is not valid
    UNAUTHORISED = 4401  # no valid credential, or it expired
    FORBIDDEN = 4403  # the origin, the board or the new identity is not allowed
    SLOW_CONSUMER = 4408  # the socket fell too far behind its board


class ErrorCode(StrEnum):
    """The `code` of an `error` frame, and of an HTTP API refusal's body."""

    INVALID_MESSAGE = "invalid_message"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    # Answers to HTTP API requests only (401, 403): a WebSocket closes with 4401 or 4403.
    FORBIDDEN = "forbidden"
    UNAUTHORIZED = "unauthorized"


class ResetReason(StrEnum):
    """Why a `reset` frame tells a resuming client to drop its cursor."""

    CURSOR_EXPIRED = "cursor_expired"  # the events after the cursor are no longer retained
    HISTORY_LOST = "history_lost"  # the board started again under a new epoch
