"""Per-board presence bookkeeping: exact local counts, and nothing kept for a board that has
no socket here any more."""

from __future__ import annotations

import asyncio

from envelope.memory import MemoryStore
from ingress_ws.presence import BoardPresence


class GatedStore(MemoryStore):
    """Presence totals that wait for `gate`: a read still under way when a socket leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def presence_total(self, board_id: str) -> int:
        self.reading.set()
        await self.gate.wait()
        return await super().presence_total(board_id)


async def test_boards_whose_sockets_all_left_leave_nothing_behind() -> None:
    store = GatedStore()
    presence = BoardPresence(store, "instance")
    joining = asyncio.create_task(presence.join("b"))
    await asyncio.wait_for(store.reading.wait(), 5)  # the join's total is being read
    await presence.leave("b")
    store.gate.set()
    await joining
    assert presence.local == {} and presence.total("b") == 0
    assert presence._totals == {}

    for n in range(100):
        await presence.join(f"b{n}")
    await asyncio.gather(*(presence.leave(f"b{n}") for n in range(100)))
    assert presence.local == {} and presence._totals == {}
