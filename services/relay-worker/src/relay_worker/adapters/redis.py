"""The relay step in Redis, and the partition leases that keep one worker per partition."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from envelope.topology import RedisKeys
from realtime_runtime.memory import RelayOutcome
from redis.exceptions import NoScriptError

# One atomic step: a crash before it changes nothing, a crash after it leaves a marker
# that makes the redelivery a duplicate. The sequence is assigned here, so it is gapless
# whatever the number of workers. The event is written to the board's stream (replay by
# sequence), to the activity stream (replay across boards) and published for live readers.
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
if seen then return {0, tonumber(seen), '', 0, '', 0} end
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
redis.call('SET', KEYS[1], seq, 'EX', ARGV[1])
local frame = gid .. ' ' .. ARGV[2] .. ' ' .. seq .. ' ' .. epoch .. '\\n' .. body
local receivers = redis.call('PUBLISH', ARGV[5], frame)
return {1, seq, gid, receivers, epoch, recovered}
"""


class RedisRelayStore:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        retention: int,
        idle_ttl_seconds: int = 0,
        retention_seconds: float = 0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._retention = retention
        self._idle_ttl_ms = idle_ttl_seconds * 1000  # 0: a board's keys never expire
        self._retention_ms = int(retention_seconds * 1000)  # 0: by count only
        self._script = client.register_script(RELAY_SCRIPT)

    def _step(self, board_id: str, correlation_id: str, body: bytes, ttl_seconds: int) -> Any:
        keys = self._keys
        return {
            "keys": [
                keys.idempotency(board_id, correlation_id),
                keys.sequence(board_id),
                keys.board_stream(board_id),
                keys.activity_stream,
                keys.epoch(board_id),
            ],
            "args": [
                ttl_seconds,
                board_id,
                body,
                self._retention,
                keys.activity_channel,
                self._idle_ttl_ms,
                self._retention_ms,
            ],
        }

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
        reply = await self._script(**self._step(board_id, correlation_id, body, ttl_seconds))
        return self._outcome(reply)

    async def relay_many(
        self, steps: Sequence[tuple[str, str, bytes]], ttl_seconds: int
    ) -> list[RelayOutcome | BaseException]:
        """The same relay steps in one round trip, in order, each still atomic.

        They go as one MULTI/EXEC: Redis decides whether it can write when it queues each
        step, and a step it refuses there (out of memory, a read-only replica) discards the
        whole transaction. So a refusal holds every step of the batch, never just one of them
        while a later one is relayed ahead of it. A step that fails while running (a script
        error) comes back as its exception; a refused batch or a lost connection raises.
        """
        replies = await self._evalsha_pipeline(steps, ttl_seconds)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart without it, SCRIPT FLUSH): the steps that
            # met NOSCRIPT changed nothing. Load the script and run them again, when they are
            # the batch's tail: run in order after the others, they keep the queue's order.
            # Otherwise (another client loaded it meanwhile) they take the retry path.
            self._script.sha = await self._client.script_load(RELAY_SCRIPT)
            first = missing[0]
            if missing == list(range(first, len(replies))):
                replies[first:] = await self._evalsha_pipeline(steps[first:], ttl_seconds)
        return [r if isinstance(r, BaseException) else self._outcome(r) for r in replies]

    async def _evalsha_pipeline(
        self, steps: Sequence[tuple[str, str, bytes]], ttl_seconds: int
    ) -> list[Any]:
        # EVALSHA queued by hand: redis-py's pipeline, given a Script, asks SCRIPT EXISTS in
        # a round trip of its own before every batch.
        async with self._client.pipeline(transaction=True) as pipe:
            for board_id, correlation_id, body in steps:
                step = self._step(board_id, correlation_id, body, ttl_seconds)
                pipe.evalsha(self._script.sha, len(step["keys"]), *step["keys"], *step["args"])
            return list(await pipe.execute(raise_on_error=False))


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
        self, client: redis.Redis, keys: RedisKeys, worker_id: str, partitions: int, ttl_ms: int
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
