"""The one SSE parser and the probe's reading of close codes, which the tests rely on too."""

from __future__ import annotations

import pytest
from envelope.codes import CloseCode
from realtime_probe.feeds import socket_closed
from realtime_probe.report import EXIT_FAILED, EXIT_UNKNOWN
from realtime_probe.sse import SseParser
from realtime_probe.websocket import Closed


def test_events_end_at_blank_lines_with_their_fields_as_written() -> None:
    parser = SseParser()
    body = ': hi\r\nevent: activity\nid: 3.17\ndata: {"a":\ndata:1}\r\rretry: 5\n\ndata: x'
    first, second = parser.feed_text(body)  # the unterminated last event is not one
    assert (first.event, first.id, first.data) == ("activity", "3.17", '{"a":\n1}')
    assert first.json() == {"a": 1} and first.other_fields == []
    assert (second.event, second.data_lines, second.other_fields) == ("message", [], ["retry"])
    assert parser.comments == 1


def test_only_the_three_line_ends_split_a_field() -> None:
    (event,) = SseParser().feed_text("data: a\x0cb\u2028c\n\n")
    assert event.data == "a\x0cb\u2028c"


async def test_a_stream_of_lines_yields_each_event_as_it_ends() -> None:
    async def lines():  # type: ignore[no-untyped-def]
        for line in ("event: presence", "data: {}", "", ":", "data: 1", ""):
            yield line

    events = [e async for e in SseParser().events(lines())]
    assert [(e.event, e.data) for e in events] == [("presence", "{}"), ("message", "1")]


@pytest.mark.parametrize(
    ("code", "exit_code", "said"),
    [
        (CloseCode.UNAUTHORISED, EXIT_UNKNOWN, "refused the credential (close 4401"),
        (CloseCode.FORBIDDEN, EXIT_UNKNOWN, "denied the board (close 4403"),
        (CloseCode.TRY_AGAIN, EXIT_FAILED, "connection limit (close 1013)"),
        (CloseCode.GOING_AWAY, EXIT_FAILED, "shutting down (close 1001)"),
        (CloseCode.SLOW_CONSUMER, EXIT_FAILED, "closed the WebSocket with code 4408"),
        (None, EXIT_FAILED, "closed the WebSocket without a close code"),
    ],
)
def test_each_close_code_is_told_as_the_contract_means_it(
    code: int | None, exit_code: int, said: str
) -> None:
    verdict = socket_closed(Closed(code, ""))
    assert verdict.code == exit_code and said in verdict.message
