"""Redis pub/sub as the edges read it: the presence channel (`channel_frames`), and the live
feed whose channels follow the clients (`LiveFeed`, `live_feed`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

# After this long without a frame, the feed pings the subscription connection and expects
# the reply within as long again: a connection dropped without a reset cannot go unnoticed.
LIVENESS_SECONDS = 5.0
LIVENESS_PING = "advanced-feed-liveness"


@contextlib.asynccontextmanager
async def channel_frames(
    client: redis.Redis | RedisCluster, channel: str, what: str
) -> AsyncIterator[AsyncIterator[bytes]]:
    """A classic pub/sub channel's messages, once the subscription is confirmed (in cluster
    mode a PUBLISH reaches every node, so any node's connection hears it)."""
    if isinstance(client, RedisCluster):
        # Its pub/sub picks a node from the slot map, which a client that has sent nothing
        # yet (an edge at start-up) does not have: redis-py raises KeyError(<slot>) then.
        await client.initialize()
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        # Wait for the confirmation: only then is every later publish sure to reach us,
        # and the catch-up read that follows cannot leave a window behind it.
        confirmation = await pubsub.get_message(timeout=5.0)
        if confirmation is None or confirmation["type"] != "subscribe":
            raise RedisError(f"the {what} channel subscription was not confirmed")
        yield channel_messages(pubsub, what)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


async def channel_messages(pubsub: PubSub, what: str) -> AsyncIterator[bytes]:
    # redis-py reconnects a pub/sub connection by itself and subscribes again, silently:
    # frames published in between would be lost. A second subscribe confirmation is how
    # that shows, and it is raised as a lost connection so the hub catches up.
    async for message in _messages(pubsub, what):
        kind = message["type"]
        if kind == "message":
            yield message["data"]
        elif kind == "subscribe":
            raise RedisConnectionError(f"the {what} subscription was re-established")


async def _messages(pubsub: PubSub, what: str) -> AsyncIterator[dict[str, Any]]:
    """Every message of a pub/sub connection; after `LIVENESS_SECONDS` without one it pings,
    and raises if the reply does not come within as long again."""
    loop = asyncio.get_running_loop()
    heard_at = loop.time()
    pinged_at: float | None = None
    while True:
        message = await pubsub.get_message(timeout=1.0)
        now = loop.time()
        if message is None:
            if pinged_at is not None and now - pinged_at > LIVENESS_SECONDS:
                raise RedisTimeoutError(f"the {what} subscription stopped answering pings")
            if pinged_at is None and now - heard_at > LIVENESS_SECONDS:
                await pubsub.ping(LIVENESS_PING)
                pinged_at = now
            continue
        heard_at, pinged_at = now, None
        yield message


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Redis confirmed a subscription to `channel`, in band: every frame after it on the same
    connection was published after the subscription took effect."""

    channel: str


LiveItem = bytes | Confirmed
"""What a live feed yields: a frame, or the confirmation of a subscription it asked for."""


class LiveFeed(Protocol):
    """A pub/sub session whose channels change while it runs.

    `subscribe` and `unsubscribe` only send the command: each subscription's confirmation
    comes back through `next`, in order with the frames, so the reader knows exactly which
    frames follow it. `next` raises `RedisError` or `OSError` once the session is lost (a
    connection dropped, a node failed over, a subscription Redis ended by itself).
    """

    async def subscribe(self, channels: Collection[str]) -> None: ...

    async def unsubscribe(self, channels: Collection[str]) -> None: ...

    async def next(self) -> LiveItem:
        """The next frame or confirmation, waiting for it."""
        ...


class _Lost:
    """Queued by a connection's reader when it ends: the session is over."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Connection:
    """One pub/sub connection and its reader task, feeding the session's one queue.

    Standalone Redis: SUBSCRIBE on the one connection. Redis Cluster: SSUBSCRIBE on the master
    that owns the channel's slot, one connection per master, each read in its own task (redis-py's
    `ClusterPubSub.get_sharded_message` polls the nodes in turn, a timeout each).
    """

    def __init__(
        self, pubsub: PubSub, sharded: bool, out: asyncio.Queue[LiveItem | _Lost], what: str
    ) -> None:
        self._pubsub = pubsub
        self._sharded = sharded
        self._out = out
        self._what = what
        # Confirmations asked for and not yet seen, per channel. One that comes unasked is
        # redis-py resubscribing by itself after a silent reconnect (frames were lost in
        # between), or Redis ending a sharded subscription (its slot moved): the session is
        # over either way.
        self._asked: dict[str, int] = {}
        self._leaving: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self._task = asyncio.create_task(self._read())

    async def subscribe(self, channels: Collection[str]) -> None:
        for channel in channels:
            self._asked[channel] = self._asked.get(channel, 0) + 1
        if self._sharded:
            await self._pubsub.ssubscribe(*channels)
        else:
            await self._pubsub.subscribe(*channels)

    async def unsubscribe(self, channels: Collection[str]) -> None:
        for channel in channels:
            self._leaving[channel] = self._leaving.get(channel, 0) + 1
        if self._sharded:
            await self._pubsub.sunsubscribe(*channels)
        else:
            await self._pubsub.unsubscribe(*channels)

    async def _read(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the session ends with it, whatever it was
            self._out.put_nowait(_Lost(exc))

    async def _loop(self) -> None:
        what = self._what
        async for message in _messages(self._pubsub, what):
            kind = message["type"]
            if kind in ("message", "smessage"):
                self._out.put_nowait(message["data"])
            elif kind in ("subscribe", "ssubscribe"):
                channel = _text(message["channel"])
                asked = self._asked.get(channel, 0)
                if not asked:
                    raise RedisConnectionError(f"the {what} subscription was re-established")
                self._asked[channel] = asked - 1
                self._out.put_nowait(Confirmed(channel))
            elif kind in ("unsubscribe", "sunsubscribe"):
                channel = _text(message["channel"])
                leaving = self._leaving.get(channel, 0)
                if not leaving:
                    raise RedisConnectionError(f"Redis ended the {what} subscription to {channel}")
                if leaving == 1:
                    del self._leaving[channel]
                else:
                    self._leaving[channel] = leaving - 1

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]


def _text(channel: bytes | str) -> str:
    return channel.decode() if isinstance(channel, bytes) else channel


class PubSubFeed:
    """`LiveFeed` on Redis: one connection (standalone) or one per master (cluster)."""

    def __init__(self, client: redis.Redis | RedisCluster, what: str) -> None:
        self._client = client
        self._what = what
        self._queue: asyncio.Queue[LiveItem | _Lost] = asyncio.Queue()
        self._connections: dict[str, _Connection] = {}  # by node address ("" standalone)
        self._owner: dict[str, str] = {}  # channel -> node address, as subscribed

    async def open(self) -> None:
        """Connect now (every master, in cluster mode): a session that cannot reach Redis
        fails here, and each connection's pings notice a loss even before it subscribes."""
        client = self._client
        if isinstance(client, RedisCluster):
            for node in client.get_primaries():
                await self._node(node.name, node)
        else:
            await self._node("", None)

    async def _node(self, address: str, node: ClusterNode | None) -> _Connection:
        connection = self._connections.get(address)
        if connection is None:
            client = self._client
            if node is not None:
                pubsub = _node_client(node).pubsub()
            else:
                pubsub = client.pubsub()
            connection = _Connection(
                pubsub, isinstance(client, RedisCluster), self._queue, self._what
            )
            self._connections[address] = connection
            await connection.open()
        return connection

    async def _connection(self, channel: str) -> _Connection:
        client = self._client
        if isinstance(client, RedisCluster):
            node = client.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
            connection = await self._node(node.name, node)
            self._owner[channel] = node.name
        else:
            connection = await self._node("", None)
            self._owner[channel] = ""
        return connection

    def _batches(self, channels: Collection[str]) -> list[list[str]]:
        """One command per slot in cluster mode (SSUBSCRIBE takes channels of one slot only),
        one for all on a standalone Redis."""
        if not isinstance(self._client, RedisCluster):
            return [list(channels)] if channels else []
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        return list(by_slot.values())

    async def subscribe(self, channels: Collection[str]) -> None:
        sends = []
        for batch in self._batches(channels):
            connection = await self._connection(batch[0])
            for channel in batch:
                self._owner[channel] = self._owner[batch[0]]
            sends.append(connection.subscribe(batch))
        await asyncio.gather(*sends)

    async def unsubscribe(self, channels: Collection[str]) -> None:
        sends = []
        for batch in self._batches(channels):
            address = self._owner.get(batch[0])
            for channel in batch:
                self._owner.pop(channel, None)
            connection = self._connections.get(address) if address is not None else None
            if connection is not None:
                sends.append(connection.unsubscribe(batch))
        await asyncio.gather(*sends)

    async def next(self) -> LiveItem:
        item = await self._queue.get()
        if isinstance(item, _Lost):
            self._queue.put_nowait(item)  # every later call fails the same way
            raise item.error
        return item

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(c.aclose() for c in connections))


def _node_client(node: ClusterNode) -> redis.Redis:
    """A plain client of one cluster node, with that node's own connection settings (TLS,
    credentials, timeouts): sharded subscriptions are not redirected, they go to the slot's
    master."""
    pool = redis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    return redis.Redis(connection_pool=pool)


@contextlib.asynccontextmanager
async def live_feed(client: redis.Redis | RedisCluster, what: str) -> AsyncIterator[PubSubFeed]:
    """A `LiveFeed` session on `client`; in cluster mode the slot map is read afresh first,
    so that a session opened after a failover subscribes on the new masters."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # once per client: nothing the first time round
        await client.nodes_manager.initialize()
    feed = PubSubFeed(client, what)
    try:
        await feed.open()
        yield feed
    finally:
        await feed.aclose()
