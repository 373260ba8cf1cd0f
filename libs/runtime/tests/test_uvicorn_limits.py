"""The private parts of uvicorn that `realtime_runtime.uvicorn_limits` relies on, checked on the
installed uvicorn: an upgrade that renames, drops or starts using them differently fails here
(then read the new uvicorn, adapt the module, and raise the pin in the `http` extra)."""

from __future__ import annotations

import inspect
import re

import pytest
from uvicorn.protocols.http import flow_control, httptools_impl
from uvicorn.protocols.websockets import websockets_sansio_impl
from websockets.frames import Opcode

HTTP = httptools_impl.HttpToolsProtocol
WEBSOCKET = websockets_sansio_impl.WebSocketsSansIOProtocol
EVENT_METHODS = {"is_set", "set", "clear", "wait"}  # what `_Flag` offers


def uses(source: str, attribute: str) -> set[str]:
    """The methods called on `attribute` in `source` (`self.pipeline.pop()` gives `pop`)."""
    return set(re.findall(rf"{re.escape(attribute)}\.(\w+)\(", source))


def test_the_flow_controls_writable_event_is_an_event_used_as_a_flag() -> None:
    source = inspect.getsource(flow_control.FlowControl)
    assert "self._is_writable_event = asyncio.Event()" in source
    assert uses(source, "self._is_writable_event") <= EVENT_METHODS


def test_the_http_protocols_pipeline_and_message_event_are_used_as_the_stand_ins_allow() -> None:
    source = inspect.getsource(httptools_impl)
    assert re.search(r"self\.pipeline: deque\[.*\] = deque\(\)", source)
    assert uses(source, "self.pipeline") <= {"appendleft", "pop"}  # `_Pipeline`'s surface
    assert "message_event=asyncio.Event()" in source
    assert uses(source, "message_event") <= EVENT_METHODS
    assert "response_complete" in inspect.getsource(httptools_impl.RequestResponseCycle)


@pytest.mark.parametrize(
    "name",
    [
        "connection_made",
        "connection_lost",
        "on_message_begin",
        "on_headers_complete",
        "on_message_complete",
        "handle_websocket_upgrade",
    ],
)
def test_the_http_protocol_has_the_callbacks_that_are_overridden(name: str) -> None:
    assert callable(getattr(HTTP, name))


def test_the_websocket_dispatch_that_is_reimplemented_has_not_changed() -> None:
    """`handle_events` is re-implemented (to count pings before their pongs are written): it
    must dispatch to the same handlers, for the same opcodes, as uvicorn's own."""
    source = inspect.getsource(WEBSOCKET.handle_events)
    handlers = set(re.findall(r"self\.(handle_\w+)\(", source))
    assert handlers == {
        "handle_connect",
        "handle_cont",
        "handle_text",
        "handle_bytes",
        "handle_ping",
        "handle_pong",
        "handle_close",
    }
    assert "self.conn.events_received()" in source
    assert set(Opcode) == {
        Opcode.CONT,
        Opcode.TEXT,
        Opcode.BINARY,
        Opcode.CLOSE,
        Opcode.PING,
        Opcode.PONG,
    }
    assert list(inspect.signature(WEBSOCKET.handle_ping).parameters) == ["self"]


def test_the_websocket_state_that_is_replaced_or_read_is_where_it_was() -> None:
    source = inspect.getsource(WEBSOCKET)
    for attribute in (
        "queue",
        "writable",
        "close_timeout",
        "conn",
        "frames",
        "curr_msg_data_type",
        "close_sent",
        "disconnected",
        "handshake_complete",
        "request",
        "response",
    ):
        assert re.search(rf"self\.{attribute}(: [^=]+)? = ", source), attribute
    assert "self.queue: asyncio.Queue" in source and "self.writable = asyncio.Event()" in source
    assert uses(source, "self.queue") <= {"put_nowait", "get", "empty"}  # `_ReceiveQueue`'s
    assert uses(source, "self.writable") <= EVENT_METHODS
    for method in ("send_receive_event_to_app", "send", "pause_writing", "resume_writing"):
        assert callable(getattr(WEBSOCKET, method)), method
    assert inspect.iscoroutinefunction(WEBSOCKET.send)
