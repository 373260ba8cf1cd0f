"""Who is on each board, across every ingress replica, and how many sockets it has open.

This process keeps its own sockets exactly (per board, per member); one writer task copies
them to the `PresenceStore`, which decides the joins and leaves across replicas and publishes
them. The writer sends absolute counts, one at a time, so a retry after a lost write or a
lost Redis can only converge on what is true here; it also beats every `ttl / 4` seconds
(expiring after `ttl / 2`, and writing all its members again in the same round trip) and
reaps dead instances, so a crashed replica's members are gone within
`ADVANCED_PRESENCE_TTL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Protocol

import structlog
from envelope import codec
from envelope.codec import RelayedEvent
from envelope.models import PresenceEntry, PresenceMember
from realtime_runtime.auth import Principal
from redis.exceptions import RedisClusterException, RedisError

log = structlog.get_logger("ingress_ws")

# What a store on Redis raises while Redis is away: redis-py's cluster client raises
# `RedisClusterException`, which is no `RedisError`, when no seed answers or a slot has no
# master yet (a failover in progress).
REDIS_FAULTS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
RETRY_SECONDS = 0.5


class PresenceStore(Protocol):
    """Where presence is shared: Redis (`adapters.redis.RedisPresence`) or the memory stand-in."""

    async def set_member(
        self, board_id: str, instance: str, member: PresenceMember, connections: int
    ) -> None: ...

    async def heartbeat(
        self, instance: str, boards: Collection[str], expires_in: float
    ) -> None: ...

    async def beat(
        self,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        """`heartbeat` with the boards of `members`, and `set_member` for each, at once."""
        ...

    async def reap(self) -> None: ...

    async def forget(self, instance: str) -> None: ...

    async def members(self, board_id: str) -> list[PresenceEntry]: ...

    def changes(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


def is_client_id(text: str) -> bool:
    """`?client_id=`: 1 to 64 of `[A-Za-z0-9_.:-]`, the whole text."""
    return CLIENT_ID.fullmatch(text) is not None


def member_of(principal: Principal, client_id: str | None, connection: str) -> PresenceMember:
    """A socket's identity on its board: a JWT's `sub` (and `name`), also through a session
    made from it; with the shared token, which every client holds alike, the `client_id` the
    client chose or else the connection's own id (its events' `sender`)."""
    if principal.kind == "jwt" or (principal.kind == "session" and principal.subject != "token"):
        return PresenceMember(id=principal.subject, name=principal.name)
    return PresenceMember(id=client_id or connection, name=None)


class BoardPresence:
    """Local counts are exact; totals across replicas (`active_connections`) are read every
    `refresh` seconds, so they are at most that stale."""

    def __init__(
        self, store: PresenceStore, instance: str, *, ttl: float, refresh: float = 1.0
    ) -> None:
        self.store = store
        self._instance = instance
        self._beat = ttl / 4
        self._expires_in = ttl / 2
        self._refresh = refresh
        self.local: dict[str, int] = {}  # board -> sockets here
        self._members: dict[str, dict[str, tuple[PresenceMember, int]]] = {}
        self._dirty: dict[tuple[str, str], PresenceMember] = {}
        self._held: set[str] = set()  # boards the store knows this instance holds
        self._wake = asyncio.Event()
        self._totals: dict[str, int] = {}

    @property
    def connections(self) -> int:
        return sum(self.local.values())

    def total(self, board_id: str) -> int:
        return max(self._totals.get(board_id, 0), self.local.get(board_id, 0))

    def join(self, board_id: str, member: PresenceMember) -> None:
        self.local[board_id] = self.local.get(board_id, 0) + 1
        members = self._members.setdefault(board_id, {})
        _held, count = members.get(member.id, (member, 0))
        members[member.id] = (member, count + 1)
        self._changed(board_id, member)

    def leave(self, board_id: str, member: PresenceMember) -> None:
        remaining = self.local.get(board_id, 0) - 1
        if remaining > 0:
            self.local[board_id] = remaining
        else:
            self.local.pop(board_id, None)
            self._totals.pop(board_id, None)
        members = self._members.get(board_id, {})
        _held, count = members.pop(member.id, (member, 0))
        if count > 1:
            members[member.id] = (member, count - 1)
        if not members:
            self._members.pop(board_id, None)
        self._changed(board_id, member)

    def _changed(self, board_id: str, member: PresenceMember) -> None:
        self._dirty[(board_id, member.id)] = member
        self._wake.set()

    def _connections_of(self, board_id: str, member_id: str) -> int:
        return self._members.get(board_id, {}).get(member_id, (None, 0))[1]

    async def run(self) -> None:
        """The writer and the totals' refresh, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._write())
            group.create_task(self._refresh_totals())

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        beat_due = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(beat_due):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if loop.time() >= beat_due:
                    await self._heartbeat()
                    beat_due = loop.time() + self._beat
                await self._flush(beat_due)
            except REDIS_FAULTS as exc:
                log.warning("presence not written; retrying", error=str(exc))
            except Exception:  # a bug must not stop the beats: this instance would be reaped
                log.exception("presence writer failed; retrying")
            else:
                continue
            self._wake.set()
            await asyncio.sleep(RETRY_SECONDS)

    async def _heartbeat(self) -> None:
        """Say this instance lives, with the boards it holds; write every member again (a
        Redis that lost its data, or reaped this instance after a stall, has it back), and
        reap the instances that stopped beating."""
        members = {board: list(held.values()) for board, held in self._members.items()}
        # Taken off first, as in `_flush`: a change during the beat marks its member again.
        written = [(board, member.id) for board, held in members.items() for member, _ in held]
        taken = {key: self._dirty.pop(key) for key in written if key in self._dirty}
        try:
            await self.store.beat(self._instance, members, self._expires_in)
        except BaseException:
            for key, member in taken.items():
                self._dirty.setdefault(key, member)
            raise
        self._held = set(members)
        await self.store.reap()

    async def _flush(self, beat_due: float) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            if loop.time() >= beat_due:  # a stream of changes must not starve the beat
                self._wake.set()
                return
            (board_id, member_id), member = next(iter(self._dirty.items()))
            if board_id not in self._held:
                # A board joined since the last beat: listed first, so a crash reaps it too.
                boards = {*self._held, board_id}
                await self.store.heartbeat(self._instance, boards, self._expires_in)
                self._held = boards
            # Taken off first: a change during the write marks it again.
            del self._dirty[(board_id, member_id)]
            connections = self._connections_of(board_id, member_id)
            try:
                await self.store.set_member(board_id, self._instance, member, connections)
            except BaseException:
                self._dirty.setdefault((board_id, member_id), member)
                raise

    async def _refresh_totals(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            for board_id in list(self.local):
                try:
                    members = await self.store.members(board_id)
                except REDIS_FAULTS:
                    continue  # the cached total stays; the next round reads it again
                # Checked again after the read: the board's last socket may have left during
                # it, and a total kept for a board with none here would never be dropped.
                if board_id in self.local:
                    self._totals[board_id] = sum(m.connections for m in members)

    async def clear(self) -> None:
        """A clean stop: this instance's members leave at once (close 1001 came first)."""
        self._members.clear()
        self.local.clear()
        await self.store.forget(self._instance)


def render_event_frame(presence: BoardPresence) -> Callable[[RelayedEvent], str]:
    """Builds each event's frame once per process; every socket of the board sends that string."""

    def render(event: RelayedEvent) -> str:
        return codec.event_frame(event.event, presence.total(event.board_id)).decode()

    return render
