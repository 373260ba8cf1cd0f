"""The one SSE parser of the repository: the probe reads the gateway's streams with it, and so
do the tests (`tests/support/clients.py`, the chaos harness, the framing fuzz test).

It reports the fields exactly as the server wrote them, with none of an EventSource's repairs
(an `id:` holding NUL is kept, an event without `data:` is still dispatched), so that a test
sees what went over the wire and a reader picks what it needs.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

# The three line ends of the SSE grammar (and of httpx's `aiter_lines`); str.splitlines would
# also split on form feeds and Unicode separators, which SSE keeps in a field.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass
class SseEvent:
    """One event: the fields between two blank lines."""

    event: str = "message"
    id: str | None = None
    data_lines: list[str] = field(default_factory=list)
    # Names of the fields this parser does not read (`retry`, or anything unknown).
    other_fields: list[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        return "\n".join(self.data_lines)

    def json(self) -> Any:
        return orjson.loads(self.data)


class SseParser:
    """Lines in, events out. `comments` counts `:` lines (the gateway's heartbeats)."""

    def __init__(self) -> None:
        self.comments = 0
        self._event: SseEvent | None = None

    def feed(self, line: str) -> SseEvent | None:
        """The event a blank line ends, if any field came before it."""
        if line == "":
            event, self._event = self._event, None
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        event = self._event = self._event or SseEvent()
        if name == "event":
            event.event = value
        elif name == "id":
            event.id = value
        elif name == "data":
            event.data_lines.append(value)
        else:
            event.other_fields.append(name)
        return None

    def feed_text(self, text: str) -> list[SseEvent]:
        """Every event a whole body holds (an unterminated last event is not one)."""
        return [event for line in _LINE_END.split(text) if (event := self.feed(line))]

    async def events(self, lines: AsyncIterable[str]) -> AsyncIterator[SseEvent]:
        """The events of a stream's lines (`httpx.Response.aiter_lines()`), as they end."""
        async for line in lines:
            event = self.feed(line)
            if event is not None:
                yield event
