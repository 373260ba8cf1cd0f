"""Every frame gets an answer, also around the payload's nesting limit.

orjson writes 254 levels of nesting at most and the envelope carries the payload one level
down: a payload of 253 levels (its own object included) is stored, one of 254 is refused with
`invalid_message`. Neither may go unanswered, and the socket stays usable after each.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from security.edge_client import TOKEN
from support.processes import Service
from websockets.sync.client import ClientConnection, connect

pytestmark = [pytest.mark.e2e]

MAX_PAYLOAD_DEPTH = 253  # envelope.codec.MAX_PAYLOAD_DEPTH, written out: the contract's figure


def nested_payload(depth: int, kind: str) -> str:
    """A payload object of exactly `depth` levels, itself included."""
    if kind == "dict":
        return '{"a":' * depth + "1" + "}" * depth
    return '{"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.fixture(scope="module")
def connection(ingress: Service) -> Iterator[ClientConnection]:
    with connect(f"{ingress.ws_url}/ws/boards/nesting?token={TOKEN}", open_timeout=10) as ws:
        yield ws


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(depth=st.integers(250, 256), kind=st.sampled_from(["dict", "list"]))
@example(depth=MAX_PAYLOAD_DEPTH, kind="dict")
@example(depth=MAX_PAYLOAD_DEPTH + 1, kind="dict")
def test_a_payload_around_the_depth_limit_is_acked_or_refused_never_ignored(
    connection: ClientConnection, depth: int, kind: str
) -> None:
    frame_id = uuid.uuid4().hex
    connection.send(f'{{"type":"deep","id":"{frame_id}","payload":{nested_payload(depth, kind)}}}')
    reply = orjson.loads(connection.recv(timeout=10))
    while reply["kind"] == "event":  # the board's own echoes of earlier frames
        reply = orjson.loads(connection.recv(timeout=10))
    assert reply["correlation_id"] == frame_id
    if depth <= MAX_PAYLOAD_DEPTH:
        assert reply["kind"] == "ack", reply
    else:
        assert (reply["kind"], reply["code"]) == ("error", "invalid_message"), reply
        assert "nested too deeply" in reply["message"]
