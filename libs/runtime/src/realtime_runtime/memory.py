"""The embedded in-memory transport: RabbitMQ and Redis stand-ins inside one process.

`ADVANCED_EVENT_TRANSPORT=memory` wires every service's ports to these, so the whole suite
runs in one process with no broker, and unit tests run without one. They keep the semantics
the real adapters give (idempotent relay, gapless per-board sequence, retained streams,
retries and dead letters), not their durability.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field

import orjson
from envelope.codec import RelayedEvent, with_sequence
from envelope.cursors import stream_id_key
from envelope.models import PresenceEntry, PresenceMember
from envelope.presence import member_json, presence_frame, presence_message
from envelope.topology import ACTIVITY_PARTS, RedisKeys, activity_part_of

from realtime_runtime.feed import PAGE
from realtime_runtime.pubsub import Confirmed, LiveItem


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    delivered: bool  # False: the correlation id was already relayed
    sequence: int
    stream_id: str = ""
    receivers: int = 0
    epoch: str = ""
    # The board's sequence counter was gone while its stream was not (evicted, a partial
    # restore): the step went on after the stream's newest event instead of reusing numbers.
    sequence_recovered: bool = False


def new_epoch(previous: str | None) -> str:
    """A board's epoch: the time in ms its sequence started, after any earlier epoch."""
    now = int(time.time() * 1000)
    return str(max(now, int(previous) + 1) if previous else now)


@dataclass
class MemoryMessage:
    body: bytes
    headers: dict[str, str | int] = field(default_factory=dict)


class MemoryBroker:
    """RabbitMQ as the worker sees it: a queue per partition, the retry queue and the DLQ.

    `publish` routes to a partition as the exchange does by routing key (`Topology.partition_of`
    names it); without one, to partition 0, so a caller that does not partition keeps one
    ordered queue (`queue`). What the consumer holds unsettled is handed back to the front of
    its partition, in order, as a closed channel hands it back to RabbitMQ.
    """

    def __init__(self) -> None:
        self.partitions: dict[int, asyncio.Queue[MemoryMessage]] = {}
        self.retrying: list[MemoryMessage] = []  # waiting out the retry delay
        self.dead_letters: list[MemoryMessage] = []
        self.available = True

    @property
    def queue(self) -> asyncio.Queue[MemoryMessage]:
        """Partition 0's queue: where everything published without a partition waits."""
        return self.partition(0)

    def partition(self, partition: int) -> asyncio.Queue[MemoryMessage]:
        return self.partitions.setdefault(partition, asyncio.Queue())

    async def publish(
        self, body: bytes, headers: dict[str, str | int] | None = None, *, partition: int = 0
    ) -> None:
        if not self.available:
            raise ConnectionError("the in-memory broker is marked unavailable")
        await self.partition(partition).put(MemoryMessage(body, dict(headers or {})))

    def retry_later(self, message: MemoryMessage, partition: int, delay: float) -> None:
        """The retry queue: the message goes back to the end of its partition after `delay`."""
        self.retrying.append(message)

        def back_to_work() -> None:
            self.retrying.remove(message)
            self.partition(partition).put_nowait(message)

        asyncio.get_running_loop().call_later(delay, back_to_work)

    def give_back(self, partition: int, messages: list[MemoryMessage]) -> None:
        """Unsettled messages return ahead of what waits behind them, in their order."""
        if not messages:
            return
        queue = self.partition(partition)
        behind = [queue.get_nowait() for _ in range(queue.qsize())]
        for message in [*messages, *behind]:
            queue.put_nowait(message)


class MemoryStore:
    """Redis as the suite uses it: relay step, board streams, the parts of the activity stream,
    and pub/sub by channel (a board's channel and its part's, as the relay's Lua step)."""

    def __init__(
        self,
        retention: int = 10_000,
        retention_seconds: float = 0,
        *,
        keys: RedisKeys | None = None,
    ) -> None:
        self._retention = retention
        self._retention_ms = int(retention_seconds * 1000)  # 0: by count only
        self._keys = keys or RedisKeys(prefix="memory:", activity_channel="activity")
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}
        self._sequences: dict[str, int] = {}
        self._epochs: dict[str, str] = {}
        self._boards: dict[str, deque[RelayedEvent]] = {}
        self._activity = [deque[RelayedEvent](maxlen=retention) for _ in range(ACTIVITY_PARTS)]
        self._channels: dict[str, set[MemoryLiveFeed]] = {}
        self._firehose: set[asyncio.Queue[bytes]] = set()
        self._clock = itertools.count(1)

    @property
    def keys(self) -> RedisKeys:
        return self._keys

    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome:
        now = time.monotonic()
        seen = self._seen.get((board_id, correlation_id))
        if seen is not None and seen[1] > now:
            return RelayOutcome(delivered=False, sequence=seen[0])
        sequence = self._sequences.get(board_id, 0) + 1
        self._sequences[board_id] = sequence
        if sequence == 1 or board_id not in self._epochs:
            self._epochs[board_id] = new_epoch(self._epochs.get(board_id))
        epoch = self._epochs[board_id]
        event = with_sequence(body, sequence, epoch)
        stream_id = f"{int(time.time() * 1000)}-{next(self._clock)}"
        relayed = RelayedEvent(stream_id, board_id, sequence, event, epoch)
        self._boards.setdefault(board_id, deque(maxlen=self._retention)).append(relayed)
        part = activity_part_of(board_id)
        self._activity[part].append(relayed)
        self._trim(self._activity[part])
        self._seen[(board_id, correlation_id)] = (sequence, now + ttl_seconds)
        frame = relayed.to_frame()
        receivers = self.publish(self._keys.board_events_channel(board_id), frame)
        receivers += self.publish(self._keys.activity_part_channel(part), frame)
        for queue in self._firehose:
            queue.put_nowait(frame)
        return RelayOutcome(True, sequence, stream_id, receivers, epoch)

    def publish(self, channel: str, frame: bytes) -> int:
        """PUBLISH: the sessions subscribed to `channel` get the frame; returns how many."""
        listeners = self._channels.get(channel, ())
        for listener in listeners:
            listener.deliver(frame)
        return len(listeners)

    def _trim(self, events: deque[RelayedEvent] | None) -> None:
        """Drop what is older than the time-based retention (Redis: XTRIM MINID, PEXPIRE)."""
        if not self._retention_ms or not events:
            return
        cutoff = int(time.time() * 1000) - self._retention_ms
        while events and stream_id_key(events[0].stream_id)[0] < cutoff:
            events.popleft()

    def expire_board(self, board_id: str) -> None:
        """What Redis does to a board idle for `ADVANCED_BOARD_IDLE_TTL_SECONDS`: its sequence
        and stream go (the activity stream keeps its entries until trimmed)."""
        self._sequences.pop(board_id, None)
        self._boards.pop(board_id, None)

    def lose_writes(self, board_id: str, keep: int) -> None:
        """What a failover before the replica had the last writes does: the board's sequence
        and stream go back to `keep` (its epoch stays), and the next event is `keep + 1`."""
        self._sequences[board_id] = keep
        events = self._boards.get(board_id)
        if events is not None:
            kept = [event for event in events if event.sequence <= keep]
            events.clear()
            events.extend(kept)

    async def board_epoch(self, board_id: str) -> str | None:
        return self._epochs.get(board_id) if board_id in self._sequences else None

    @contextlib.asynccontextmanager
    async def live(self) -> AsyncIterator[MemoryLiveFeed]:
        session = MemoryLiveFeed(self._channels)
        try:
            yield session
        finally:
            session.close()

    @contextlib.asynccontextmanager
    async def feed(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """Every frame the relay publishes, once per event (whatever its channels): what a
        test of the relay watches."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._firehose.add(queue)
        try:
            yield self._frames(queue)
        finally:
            self._firehose.discard(queue)

    @staticmethod
    async def _frames(queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
        while True:
            yield await queue.get()

    async def board_after(
        self, board_id: str, sequence: int, count: int = PAGE
    ) -> list[RelayedEvent]:
        self._trim(self._boards.get(board_id))
        events = self._boards.get(board_id, ())
        return list(itertools.islice((e for e in events if e.sequence > sequence), count))

    async def boards_after(
        self, after: Mapping[str, int], count: int = PAGE
    ) -> dict[str, list[RelayedEvent]]:
        return {b: await self.board_after(b, sequence, count) for b, sequence in after.items()}

    async def activity_after(
        self, part: int, stream_id: str, count: int = PAGE
    ) -> list[RelayedEvent]:
        # A part only its own boards' writes trim: past the time limit it goes as a whole, as
        # its key expires in Redis.
        self._trim(self._activity[part])
        after = stream_id_key(stream_id)
        later = (e for e in self._activity[part] if stream_id_key(e.stream_id) > after)
        return list(itertools.islice(later, count))

    async def parts_after(
        self, after: Mapping[int, str], count: int = PAGE
    ) -> dict[int, list[RelayedEvent]]:
        return {p: await self.activity_after(p, stream_id, count) for p, stream_id in after.items()}

    async def board_head(self, board_id: str) -> tuple[int, int]:
        events = self._boards.get(board_id)
        self._trim(events)
        if not events:
            return 0, 0
        return events[0].sequence, events[-1].sequence

    async def activity_heads(self) -> list[tuple[str, str]]:
        for events in self._activity:
            self._trim(events)
        return [
            (events[0].stream_id, events[-1].stream_id) if events else ("0-0", "0-0")
            for events in self._activity
        ]


class MemoryLiveFeed:
    """`LiveFeed` in memory: a subscription is confirmed in band, as Redis does."""

    def __init__(self, channels: dict[str, set[MemoryLiveFeed]]) -> None:
        self._channels = channels
        self._queue: asyncio.Queue[LiveItem] = asyncio.Queue()
        self._mine: set[str] = set()

    def deliver(self, frame: bytes) -> None:
        self._queue.put_nowait(frame)

    async def subscribe(self, channels: Collection[str]) -> None:
        for channel in channels:
            self._channels.setdefault(channel, set()).add(self)
            self._mine.add(channel)
            self._queue.put_nowait(Confirmed(channel))

    async def unsubscribe(self, channels: Collection[str]) -> None:
        for channel in channels:
            self._drop(channel)

    def _drop(self, channel: str) -> None:
        self._mine.discard(channel)
        listeners = self._channels.get(channel)
        if listeners is not None:
            listeners.discard(self)
            if not listeners:
                del self._channels[channel]

    async def next(self) -> LiveItem:
        return await self._queue.get()

    def close(self) -> None:
        for channel in list(self._mine):
            self._drop(channel)


class MemoryPresence:
    """Presence as the Redis adapter keeps it (`ingress_ws.adapters.redis.RedisPresence`):
    connections per (instance, member), members summed over instances, instances that expire
    unless they beat, and each change published to the process's listeners."""

    def __init__(self) -> None:
        # board -> (instance, member id) -> (connections, member JSON)
        self._connections: dict[str, dict[tuple[str, str], tuple[int, bytes]]] = {}
        self._members: dict[str, dict[str, int]] = {}  # board -> member id -> connections
        self._instances: dict[str, float] = {}  # instance -> expiry (monotonic)
        self._instance_boards: dict[str, set[str]] = {}
        self._listeners: set[asyncio.Queue[bytes]] = set()

    async def set_member(
        self, board_id: str, instance: str, member: PresenceMember, connections: int
    ) -> None:
        self._instance_boards.setdefault(instance, set()).add(board_id)
        self._change(board_id, instance, member.id, member_json(member), connections)

    async def heartbeat(self, instance: str, boards: Collection[str], expires_in: float) -> None:
        self._instances[instance] = time.monotonic() + expires_in
        self._instance_boards[instance] = set(boards)

    async def beat(
        self,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        await self.heartbeat(instance, members, expires_in)
        for board_id, held in members.items():
            for member, connections in held:
                self._change(board_id, instance, member.id, member_json(member), connections)

    async def forget(self, instance: str) -> None:
        self._instances[instance] = 0.0
        await self.reap()

    async def reap(self) -> None:
        now = time.monotonic()
        for instance in [i for i, expires in self._instances.items() if expires <= now]:
            del self._instances[instance]
            for board_id in self._instance_boards.pop(instance, set()):
                held = self._connections.get(board_id, {})
                for (owner, member_id), (_count, member) in list(held.items()):
                    if owner == instance:
                        self._change(board_id, instance, member_id, member, 0)

    async def members(self, board_id: str) -> list[PresenceEntry]:
        now = time.monotonic()
        counts: dict[str, int] = {}
        names: dict[str, str | None] = {}
        for (instance, member_id), (count, member) in self._connections.get(board_id, {}).items():
            if self._instances.get(instance, 0.0) > now:
                counts[member_id] = counts.get(member_id, 0) + count
                names[member_id] = orjson.loads(member).get("name")
        return [PresenceEntry(id=m, name=names[m], connections=n) for m, n in counts.items()]

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[AsyncIterator[bytes]]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            yield MemoryStore._frames(queue)
        finally:
            self._listeners.discard(queue)

    def _change(
        self, board_id: str, instance: str, member_id: str, member: bytes, connections: int
    ) -> None:
        held = self._connections.setdefault(board_id, {})
        totals = self._members.setdefault(board_id, {})
        old = held.pop((instance, member_id), (0, b""))[0]
        if connections > 0:
            held[(instance, member_id)] = (connections, member)
        before = totals.pop(member_id, 0)
        after = max(before + connections - old, 0)
        if after:
            totals[member_id] = after
        if not held:
            del self._connections[board_id]
        action = "join" if not before and after else "leave" if before and not after else None
        if action is not None:
            frame = presence_frame(board_id, action, member, len(totals))
            for queue in self._listeners:
                queue.put_nowait(presence_message(board_id, frame))
        if not totals:
            del self._members[board_id]


@dataclass
class MemoryTransport:
    """The two stand-ins that the services of one process share."""

    broker: MemoryBroker = field(default_factory=MemoryBroker)
    store: MemoryStore = field(default_factory=MemoryStore)
    presence: MemoryPresence = field(default_factory=MemoryPresence)
