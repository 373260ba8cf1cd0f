"""The relay step in Redis, and the partition leases that keep one worker per partition."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from envelope.topology import RedisKeys, activity_part_of
from realtime_runtime.memory import RelayOutcome
from realtime_runtime.service import RedisClient
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, SlotNotCoveredError

from relay_worker.faults import ReplicationNotConfirmed, redis_fault

# One atomic step: a crash before it changes nothing, a crash after it leaves a marker
# that makes the redelivery a duplicate. The sequence is assigned here, so it is gapless
# whatever the number of workers. The event is written to the board's stream (replay by
# sequence), to its part of the activity stream (replay across boards) and published for live
# readers on the board's channel and on its part's channel (ARGV[9]: PUBLISH, or SPUBLISH on a
# Redis Cluster). Every key and both channels carry the board's part hash tag: one slot.
#
# Redis does not roll a script back when a command fails half-way, so every check that can
# fail comes before the first write: the reads raise on a key of the wrong type, and the
# `#!lua` line makes Redis refuse the whole script up front when it cannot write at all (out of
# memory under noeviction, a read-only replica) instead of at its first write.
#
# The sequence never goes back: a counter that is gone while the board's stream is not
# (evicted, a partial restore) goes on after the stream's newest entry, and the step says so.
# A board that starts from nothing (new, or every key expired after ARGV[6] ms idle) gets a
# new epoch, the Redis time in ms, after any epoch still stored: a cursor of the old history
# can then never be read as one of the new. With ARGV[7] ms of time-based retention, entries
# older than that are trimmed from both streams (the activity stream's ids are its times).

RELAY_SCRIPT = """#!lua
local seen = redis.call('GET', KEYS[1])
if seen then
  -- Written again, same value and TTL: a WAIT after a duplicate then also covers its marker,
  -- which may exist on this master alone (a redelivery after a failover).
  redis.call('SET', KEYS[1], seen, 'KEEPTTL')
  return {0, tonumber(seen), '', 0, '', 0}
end
local stored = redis.call('GET', KEYS[2])
local last = 0
if stored then
  last = tonumber(stored)
  if not last or last < 0 or last ~= math.floor(last) then
    return redis.error_reply('ERR the board sequence key does not hold a sequence')
  end
end
local tail = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local recovered = 0
if tail[1] then
  local newest = tonumber(string.match(tail[1][1], '^%d+'))
  if newest > last then last = newest; recovered = 1 end
end
local activity = redis.call('TYPE', KEYS[4])['ok']
if activity ~= 'stream' and activity ~= 'none' then
  return redis.error_reply('ERR the activity stream key is not a stream')
end
local epoch = redis.call('GET', KEYS[5])
local seq = last + 1
if seq == 1 or not epoch then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if epoch and tonumber(epoch) and tonumber(epoch) >= ms then ms = tonumber(epoch) + 1 end
  epoch = string.format('%d', ms)
end
local body = '{"sequence":' .. seq .. ',"epoch":"' .. epoch .. '",' .. string.sub(ARGV[3], 2)
local gid = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
  'b', ARGV[2], 's', seq, 'p', epoch, 'e', body)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], seq .. '-0', 'a', gid, 'p', epoch, 'e', body)
local idle = tonumber(ARGV[6])
local keep = tonumber(ARGV[7])
if keep > 0 then
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - keep
  redis.call('XTRIM', KEYS[4], 'MINID', cutoff)
  -- The board stream's ids are sequences: an entry's time is its activity id (field a). At
  -- most 100 entries a step, so a long-idle board is trimmed over its next few events.
  local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 100)
  local first = nil
  for _, entry in ipairs(head) do
    local at = nil
    for i = 1, #entry[2], 2 do
      if entry[2][i] == 'a' then at = tonumber(string.match(entry[2][i + 1], '^%d+')) end
    end
    first = entry[1]
    if at == nil or at >= cutoff then break end
    first = (tonumber(string.match(entry[1], '^%d+')) + 1) .. '-0'
  end
  if first then redis.call('XTRIM', KEYS[3], 'MINID', first) end
end
local stream_ttl = idle
if keep > 0 and (idle == 0 or keep < idle) then stream_ttl = keep end
if idle > 0 then
  redis.call('SET', KEYS[2], seq, 'PX', idle)
  redis.call('SET', KEYS[5], epoch, 'PX', idle)
else
  redis.call('SET', KEYS[2], seq)
  redis.call('SET', KEYS[5], epoch)
end
-- Every entry of an idle board is past the time limit once its newest is: the stream goes.
if stream_ttl > 0 then redis.call('PEXPIRE', KEYS[3], stream_ttl) end
-- Likewise the board's part of the activity stream, with a time limit: it is trimmed only
-- when one of its boards is written, so a part nobody writes to goes as a whole.
if keep > 0 then redis.call('PEXPIRE', KEYS[4], keep) end
redis.call('SET', KEYS[1], seq, 'EX', ARGV[1])
local frame = gid .. ' ' .. ARGV[2] .. ' ' .. seq .. ' ' .. epoch .. '\\n' .. body
local receivers = redis.call(ARGV[9], ARGV[5], frame) + redis.call(ARGV[9], ARGV[8], frame)
return {1, seq, gid, receivers, epoch, recovered}
"""


class RedisRelayStore:
    """The relay step on a standalone Redis or a Redis Cluster, with an optional `WAIT`.

    A batch runs as one MULTI/EXEC per hash slot (standalone: one for the whole batch), sent
    back to back on one connection per server: Redis decides whether it can write when it
    queues each step, and a step it refuses there (out of memory, a read-only replica, a slot
    moved) discards its whole transaction. A board's steps all share its slot, so a refusal
    holds every step of that board in the batch, never one while a later one is relayed.

    With `min_replicas`, each server's transactions are followed, on the same connection, by
    `WAIT min_replicas replicas_timeout_ms`: WAIT counts the replicas holding that
    connection's writes. Fewer confirm (or the WAIT fails), and every step of that server comes
    back as `ReplicationNotConfirmed`: held, and relayed again later as a duplicate, which
    rewrites its marker so that its own WAIT covers the marker too.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: RedisKeys,
        retention: int,
        idle_ttl_seconds: int = 0,
        retention_seconds: float = 0,
        *,
        min_replicas: int = 0,
        replicas_timeout_ms: int = 1000,
    ) -> None:
        self._keys = keys
        self._retention = retention
        self._idle_ttl_ms = idle_ttl_seconds * 1000  # 0: a board's keys never expire
        self._retention_ms = int(retention_seconds * 1000)  # 0: by count only
        self._min_replicas = min_replicas
        self._replicas_timeout_ms = replicas_timeout_ms
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._standalone = None if isinstance(client, RedisCluster) else client
        self._publish = "PUBLISH" if self._cluster is None else "SPUBLISH"
        # What Redis names the script by (EVALSHA), not a security digest.
        self.sha = hashlib.sha1(RELAY_SCRIPT.encode(), usedforsecurity=False).hexdigest()
        # Cluster mode: a plain client per master (node name), so that a server's
        # transactions and its WAIT share one connection whatever the cluster client retries.
        self._servers: dict[str, redis.Redis] = {}

    def _step(self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int) -> _Call:
        keys = self._keys
        part = activity_part_of(board_id)
        return (
            [
                keys.idempotency(board_id, correlation_id),
                keys.sequence(board_id),
                keys.board_stream(board_id),
                keys.activity_stream(part),
                keys.epoch(board_id),
            ],
            [
                ttl_seconds,
                board_id,
                body,
                self._retention,
                keys.board_events_channel(board_id),
                self._idle_ttl_ms,
                self._retention_ms,
                keys.activity_part_channel(part),
                self._publish,
            ],
        )

    @staticmethod
    def _outcome(reply: Any) -> RelayOutcome:
        delivered, sequence, stream_id, receivers, epoch, recovered = reply
        return RelayOutcome(
            bool(delivered),
            int(sequence),
            stream_id.decode(),
            int(receivers),
            epoch.decode(),
            bool(recovered),
        )

    async def relay(
        self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int
    ) -> RelayOutcome:
        (result,) = await self.relay_many([(board_id, correlation_id, body)], ttl_seconds)
        if isinstance(result, BaseException):
            raise result
        return result

    async def relay_many(
        self, steps: Sequence[tuple[str, str, bytes]], ttl_seconds: int
    ) -> list[RelayOutcome | BaseException]:
        """The same relay steps in one round trip per server, in order, each still atomic.

        A step that fails comes back as its exception (a script error; a refused transaction
        or an unconfirmed WAIT, for every step it covers). On a standalone Redis a lost
        connection raises; on a cluster it comes back for the steps of that master only.
        """
        calls = [self._step(*step, ttl_seconds) for step in steps]
        if self._standalone is not None:
            replies = await self._on_server(self._standalone, calls)
        else:
            assert self._cluster is not None
            replies = await self._on_cluster(self._cluster, calls)
        return [r if isinstance(r, BaseException) else self._outcome(r) for r in replies]

    async def _on_cluster(self, cluster: RedisCluster, calls: list[_Call]) -> list[Any]:
        await cluster.initialize()  # once; the slot map is refreshed below when it is stale
        replies: list[Any] = [None] * len(calls)
        by_master: dict[str, tuple[ClusterNode, list[int]]] = {}
        for index, (keys, _args) in enumerate(calls):
            try:
                node = cluster.get_node_from_key(keys[0])
            except Exception as exc:  # the slot is served by nobody right now (a failover)
                replies[index] = exc
                continue
            if node is None:
                replies[index] = SlotNotCoveredError(f"no master serves {keys[0]!r} now")
                continue
            by_master.setdefault(node.name, (node, []))[1].append(index)
        runs = await asyncio.gather(
            *(
                self._on_server(self._server(node), [calls[i] for i in indices])
                for node, indices in by_master.values()
            ),
            return_exceptions=True,
        )
        for (_node, indices), run in zip(by_master.values(), runs, strict=True):
            if isinstance(run, BaseException) and not isinstance(run, Exception):
                raise run  # cancelled
            results = [run] * len(indices) if isinstance(run, Exception) else run
            for index, result in zip(indices, results, strict=True):
                replies[index] = result
        if any(isinstance(r, BaseException) and redis_fault(r) for r in replies):
            # A master gone or a slot moved: ask the cluster where the slots are now, for the
            # held steps' next attempt (redis-py's own refresh needs a command of its own).
            with contextlib.suppress(redis.RedisError, OSError):
                await cluster.nodes_manager.initialize()
        return replies

    def _server(self, node: ClusterNode) -> redis.Redis:
        server = self._servers.get(node.name)
        if server is None:
            # The node's own connection settings (timeouts, TLS, credentials), without
            # retries: a failed attempt is held and tried again after the slot map refresh.
            pool = redis.ConnectionPool(
                connection_class=node.connection_class,
                **{**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)},
            )
            server = self._servers[node.name] = redis.Redis(connection_pool=pool)
        return server

    async def _on_server(self, server: redis.Redis, calls: Sequence[_Call]) -> list[Any]:
        replies = await self._transactions(server, calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # The server lost its script cache (a restart without it, a replica promoted,
            # SCRIPT FLUSH): the steps that met NOSCRIPT changed nothing. Load the script and
            # run them again, when they are this server's tail: run in order after the others,
            # they keep the queue's order. Otherwise (another client loaded it meanwhile)
            # they take the retry path.
            self.sha = await server.script_load(RELAY_SCRIPT)
            first = missing[0]
            if missing == list(range(first, len(replies))):
                replies[first:] = await self._transactions(server, calls[first:])
        return replies

    async def _transactions(self, server: redis.Redis, calls: Sequence[_Call]) -> list[Any]:
        """One MULTI/EXEC per slot, then the WAIT, in one non-transactional pipeline: one
        connection, one round trip. EVALSHA queued by hand: redis-py's pipeline, given a
        Script, asks SCRIPT EXISTS in a round trip of its own before every batch."""
        groups = self._by_slot(calls)
        async with server.pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.execute_command("MULTI")
                for index in group:
                    keys, args = calls[index]
                    pipe.evalsha(self.sha, len(keys), *keys, *args)
                pipe.execute_command("EXEC")
            if self._min_replicas:
                pipe.execute_command("WAIT", self._min_replicas, self._replicas_timeout_ms)
            raw = list(await pipe.execute(raise_on_error=False))
        replies: list[Any] = [None] * len(calls)
        position = 0
        for group in groups:
            queued = raw[position : position + len(group) + 1]  # MULTI's reply, then QUEUED
            executed = raw[position + len(group) + 1]
            position += len(group) + 2
            if not isinstance(executed, list):  # EXECABORT: what refused a step says why
                refused = next((r for r in queued if isinstance(r, Exception)), executed)
                executed = [refused] * len(group)
            for index, reply in zip(group, executed, strict=True):
                replies[index] = reply
        if self._min_replicas:
            replies = self._replicated(replies, raw[position])
        return replies

    def _by_slot(self, calls: Sequence[_Call]) -> list[list[int]]:
        """The calls' positions grouped by hash slot, each group in queue order (so is each
        board's, all in its slot)."""
        if self._cluster is None:
            return [list(range(len(calls)))]
        groups: dict[int, list[int]] = {}
        for index, (keys, _args) in enumerate(calls):
            groups.setdefault(self._cluster.keyslot(keys[0]), []).append(index)
        return list(groups.values())

    def _replicated(self, replies: list[Any], waited: Any) -> list[Any]:
        required = self._min_replicas
        if isinstance(waited, int) and waited >= required:
            return replies
        seen = f"{waited} replica(s)" if isinstance(waited, int) else f"{waited!r}"
        error = ReplicationNotConfirmed(
            f"WAIT {required} {self._replicas_timeout_ms}: {seen} confirmed the relay steps; "
            f"ADVANCED_REDIS_MIN_REPLICAS={required} holds them until enough replicas answer"
        )
        return [r if isinstance(r, BaseException) else error for r in replies]

    async def aclose(self) -> None:
        """Close the per-master clients of cluster mode (the main client is the caller's)."""
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            await server.aclose(close_connection_pool=True)


_Call = tuple[list[str], list[Any]]
"""One relay step as the script takes it: its KEYS and its ARGV."""


# Renew only a lease we still hold; release likewise.
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


class PartitionLeases:
    """Shares the partitions fairly among the live workers, one owner per partition.

    Each worker heartbeats into a sorted set, holds at most ceil(partitions / workers)
    leases, and consumes only the partition queues it leases. Queues are also
    single-active-consumer, so even a worker that lost its lease while stalled cannot
    process a partition alongside the new owner.
    """

    def __init__(
        self, client: RedisClient, keys: RedisKeys, worker_id: str, partitions: int, ttl_ms: int
    ) -> None:
        self._client = client
        self._keys = keys
        self._worker_id = worker_id
        self._partitions = partitions
        self._ttl_ms = ttl_ms
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def plan(self, owned: set[int]) -> tuple[set[int], set[int]]:
        """Renew what we hold; return (partitions to start, partitions to give up)."""
        now = int(time.time() * 1000)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys.workers, {self._worker_id: now})
            pipe.zremrangebyscore(self._keys.workers, "-inf", now - self._ttl_ms)
            pipe.zcard(self._keys.workers)
            _, _, live = await pipe.execute()
        fair = math.ceil(self._partitions / max(int(live), 1))

        kept: set[int] = set()
        for partition in sorted(owned):
            renewed = await self._renew(
                keys=[self._keys.partition_lease(partition)], args=[self._worker_id, self._ttl_ms]
            )
            if renewed:
                kept.add(partition)
        lost = owned - kept
        surplus = set(sorted(kept)[fair:])
        wanted: set[int] = set()
        if len(kept) < fair:
            for partition in range(self._partitions):
                if partition in kept:
                    continue
                if await self._client.set(
                    self._keys.partition_lease(partition), self._worker_id, nx=True, px=self._ttl_ms
                ):
                    wanted.add(partition)
                    if len(kept) + len(wanted) >= fair:
                        break
        return wanted, lost | surplus

    async def release(self, partition: int) -> None:
        await self._release(keys=[self._keys.partition_lease(partition)], args=[self._worker_id])

    async def leave(self, owned: set[int]) -> None:
        for partition in owned:
            await self.release(partition)
        await self._client.zrem(self._keys.workers, self._worker_id)
