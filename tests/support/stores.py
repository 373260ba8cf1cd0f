"""Store wrappers for tests that look at what an edge reads from Redis."""

from __future__ import annotations

from typing import Any

from envelope.codec import RelayedEvent


class ReadCounter:
    """An activity store (memory or Redis) that counts the history rows it hands out, so a
    test sees how much of a board's history an edge pulled into memory."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.rows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def board_after(self, *args: Any, **kwargs: Any) -> list[RelayedEvent]:
        events: list[RelayedEvent] = await self.store.board_after(*args, **kwargs)
        self.rows += len(events)
        return events

    async def activity_after(self, *args: Any, **kwargs: Any) -> list[RelayedEvent]:
        events: list[RelayedEvent] = await self.store.activity_after(*args, **kwargs)
        self.rows += len(events)
        return events

    async def boards_after(self, *args: Any, **kwargs: Any) -> dict[str, list[RelayedEvent]]:
        pages: dict[str, list[RelayedEvent]] = await self.store.boards_after(*args, **kwargs)
        self.rows += sum(len(events) for events in pages.values())
        return pages

    async def parts_after(self, *args: Any, **kwargs: Any) -> dict[int, list[RelayedEvent]]:
        pages: dict[int, list[RelayedEvent]] = await self.store.parts_after(*args, **kwargs)
        self.rows += sum(len(events) for events in pages.values())
        return pages
