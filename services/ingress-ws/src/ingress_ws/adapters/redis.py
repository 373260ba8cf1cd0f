"""Board presence in Redis, shared by every ingress replica (and the limits' Redis storage).

Per board (both keys under one hash tag), `RedisKeys.presence` holds `<instance>:<member id>`
→ `<connections> <member JSON>` and `RedisKeys.presence_members` each member's connections
summed over instances. One Lua step changes both and publishes the `join` or `leave` it
causes on the presence channel, so a member joins once and leaves once however many
connections it has on however many replicas, and every process hears a board's changes in
the order they happened.

Each instance beats (`RedisKeys.presence_instances`: instance → expiry in ms), lists the
boards it holds and writes each of its members again, all in one transaction: one round trip
however many members it has. Any instance reaps one whose expiry passed: a claim (only one
reaper wins it), then one step per board that drops the dead instance's connections and
sends the leaves. Reads count only connections of instances that are alive, even before a reap.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import cast

import orjson
import redis.asyncio as redis
from envelope.models import PresenceEntry, PresenceMember
from envelope.presence import member_json
from envelope.topology import RedisKeys
from limits.aio.storage import RedisStorage, Storage
from realtime_runtime.presence import RedisPresenceChanges
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from ingress_ws.settings import IngressSettings

# KEYS: the board's presence hash, its members hash. ARGV: channel, board id, board JSON.
_CHANGE = r"""
local function change(field, member, connections, json)
  local old = 0
  local held = redis.call('HGET', KEYS[1], field)
  if held then old = tonumber(string.match(held, '^%d+')) end
  if connections > 0 then
    redis.call('HSET', KEYS[1], field, connections .. ' ' .. json)
  else
    redis.call('HDEL', KEYS[1], field)
  end
  local before = tonumber(redis.call('HGET', KEYS[2], member) or '0')
  local after = before + connections - old
  if after > 0 then
    redis.call('HSET', KEYS[2], member, after)
  else
    after = 0
    redis.call('HDEL', KEYS[2], member)
  end
  local action = nil
  if before == 0 and after > 0 then action = 'join' end
  if before > 0 and after == 0 then action = 'leave' end
  if action then
    redis.call('PUBLISH', ARGV[1], ARGV[2] .. '\n{"kind":"presence","board_id":' .. ARGV[3]
      .. ',"action":"' .. action .. '","member":' .. json
      .. ',"count":' .. redis.call('HLEN', KEYS[2]) .. '}')
  end
  return action
end
"""
# ARGV[4..7]: field, member id, connections (absolute), member JSON.
SET_MEMBER = _CHANGE + "return change(ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7])"
# ARGV[4]: the dead instance's field prefix (`<instance>:`).
REAP_BOARD = (
    _CHANGE
    + r"""
local fields = redis.call('HGETALL', KEYS[1])
local prefix = ARGV[4]
local left = 0
for i = 1, #fields, 2 do
  local field = fields[i]
  if string.sub(field, 1, #prefix) == prefix then
    local json = string.match(fields[i + 1], '^%d+ (.*)$')
    if change(field, string.sub(field, #prefix + 1), 0, json) then left = left + 1 end
  end
end
return left
"""
)
# KEYS: the instances' sorted set. ARGV: instance, now (ms). Only one reaper claims it.
CLAIM = """
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expires and tonumber(expires) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisPresence:
    """The ingress's `PresenceStore` on Redis (see the module's docstring)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys
        self._set_member = client.register_script(SET_MEMBER)
        self._reap_board = client.register_script(REAP_BOARD)
        self._claim = client.register_script(CLAIM)
        self.changes = RedisPresenceChanges(client, keys).changes

    def _board(self, board_id: str) -> tuple[list[str], list[str | bytes]]:
        keys = [self._keys.presence(board_id), self._keys.presence_members(board_id)]
        return keys, [self._keys.presence_channel, board_id, orjson.dumps(board_id)]

    async def set_member(
        self, board_id: str, instance: str, member: PresenceMember, connections: int
    ) -> None:
        keys, args = self._board(board_id)
        field = f"{instance}:{member.id}"
        await self._set_member(keys, [*args, field, member.id, connections, member_json(member)])

    async def heartbeat(self, instance: str, boards: Collection[str], expires_in: float) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            self._queue_heartbeat(pipe, instance, boards, expires_in)
            await pipe.execute()

    async def beat(
        self,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        """`heartbeat` with `members`' boards, and `set_member` for each, in one round trip."""
        try:
            await self._beat(instance, members, expires_in)
        except NoScriptError:
            # Redis lost its scripts (a restart): load it, then beat again (every write is an
            # absolute count, so any that went through are simply written twice).
            await self._client.script_load(SET_MEMBER)
            await self._beat(instance, members, expires_in)

    async def _beat(
        self,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            self._queue_heartbeat(pipe, instance, members, expires_in)
            for board_id, held in members.items():
                keys, args = self._board(board_id)
                for member, connections in held:
                    field = f"{instance}:{member.id}"
                    # EVALSHA, not the `Script`: a pipeline holding a `Script` first asks
                    # `SCRIPT EXISTS`, a second round trip on every beat.
                    pipe.evalsha(
                        self._set_member.sha,
                        len(keys),
                        *keys,
                        *args,
                        *(field, member.id, connections, member_json(member)),
                    )
            await pipe.execute()

    def _queue_heartbeat(
        self, pipe: Pipeline, instance: str, boards: Collection[str], expires_in: float
    ) -> None:
        held = self._keys.presence_instance_boards(instance)
        pipe.zadd(self._keys.presence_instances, {instance: _now_ms() + expires_in * 1000})
        pipe.delete(held)
        if boards:
            pipe.sadd(held, *boards)

    async def forget(self, instance: str) -> None:
        """A clean stop: the instance's members leave now rather than when it expires."""
        await self._client.zadd(self._keys.presence_instances, {instance: 0})
        await self.reap()

    async def reap(self) -> None:
        now = _now_ms()
        instances = self._keys.presence_instances
        dead = cast(list[bytes], await self._client.zrangebyscore(instances, "-inf", now))
        for raw in dead:
            instance = raw.decode()
            if not await self._claim([instances], [instance, now]):
                continue  # another instance reaps it, or it beat again
            held = self._keys.presence_instance_boards(instance)
            for board in cast(set[bytes], await self._client.smembers(held)):
                keys, args = self._board(board.decode())
                await self._reap_board(keys, [*args, f"{instance}:"])
            await self._client.delete(held)

    async def members(self, board_id: str) -> list[PresenceEntry]:
        fields = cast(dict[bytes, bytes], await self._client.hgetall(self._keys.presence(board_id)))
        if not fields:
            return []
        held = [(f.decode().partition(":"), v.decode().partition(" ")) for f, v in fields.items()]
        instances = sorted({instance for (instance, _, _), _ in held})
        scores = await self._client.zmscore(self._keys.presence_instances, instances)
        now = _now_ms()
        alive = {i for i, score in zip(instances, scores, strict=True) if score and score > now}
        counts: dict[str, int] = {}
        names: dict[str, str | None] = {}
        for (instance, _, member_id), (count, _, member) in held:
            if instance in alive and count.isdigit():  # anything else is not ours
                counts[member_id] = counts.get(member_id, 0) + int(count)
                names[member_id] = orjson.loads(member).get("name")
        return [PresenceEntry(id=m, name=names[m], connections=n) for m, n in counts.items()]


def redis_rate_limit_storage(settings: IngressSettings) -> Storage:
    """The limits that hold across replicas, in Redis (redis-py's asyncio client)."""
    return RedisStorage(
        "async+" + settings.redis_url.get_secret_value(),
        implementation="redispy",
        key_prefix=f"{settings.redis_key_prefix}limits",
        wrap_exceptions=True,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )
