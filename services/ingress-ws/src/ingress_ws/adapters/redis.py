"""Board presence in Redis, shared by every ingress replica (and the limits' Redis storage).

Per board (both keys under one hash tag), `RedisKeys.presence` holds `<instance>:<member id>`
→ `<connections> <member JSON>` and `RedisKeys.presence_members` each member's connections
summed over instances. One Lua step changes both and publishes the `join` or `leave` it
causes on the presence channel, so a member joins once and leaves once however many
connections it has on however many replicas, and every process hears a board's changes in
the order they happened.

Each instance beats (`RedisKeys.presence_instances`: instance → expiry in ms), lists the
boards it holds and writes each of its members again. On one Redis that is one transaction:
one round trip however many members it has. On Redis Cluster a transaction stays within one
slot, so the beat is one pipeline of atomic steps, the instance's registry (expiry and boards,
one slot: `{instances}`) and one per member, that redis-py sends as one request per node, all
at once. Any instance reaps one whose expiry passed: a claim (only one reaper wins it), then
one step per board that drops the dead instance's connections and sends the leaves. Reads
count only connections of instances that are alive, even before a reap. Every other command
and script touches one slot, and the presence channel is a classic one (a cluster broadcasts
a PUBLISH to every node), so they run unchanged on both.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import cast
from urllib.parse import unquote, urlsplit

import orjson
from envelope.models import PresenceEntry, PresenceMember
from envelope.presence import member_json
from envelope.topology import RedisKeys
from limits.aio.storage import RedisClusterStorage, RedisStorage, Storage
from realtime_runtime.presence import RedisPresenceChanges
from realtime_runtime.service import RedisClient
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

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
# KEYS: the instances' sorted set, the instance's boards set (one slot: `{instances}`).
# ARGV: instance, expiry (ms), its boards. What the standalone beat's transaction does, as one
# atomic step that a cluster pipeline can carry (SADD in chunks: Lua's stack holds ~8000).
REGISTER = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 1000 do
  redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
"""
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

    def __init__(self, client: RedisClient, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys
        self._set_member = client.register_script(SET_MEMBER)
        self._reap_board = client.register_script(REAP_BOARD)
        self._claim = client.register_script(CLAIM)
        self._register = client.register_script(REGISTER)
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
        if isinstance(self._client, RedisCluster):
            await self._register(*self._registration(instance, boards, expires_in))
            return
        async with self._client.pipeline(transaction=True) as pipe:
            self._queue_heartbeat(pipe, instance, boards, expires_in)
            await pipe.execute()

    async def beat(
        self,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        """`heartbeat` with `members`' boards, and `set_member` for each, in one round trip
        (on a cluster, one per node, all at once)."""
        try:
            await self._beat(instance, members, expires_in)
        except NoScriptError:
            # Redis lost its scripts (a restart, or a promoted replica, which has no script
            # cache): load them, then beat again (every write is an absolute count, so any
            # that went through are simply written twice). On a cluster a load goes to every
            # master.
            await self._client.script_load(SET_MEMBER)
            if isinstance(self._client, RedisCluster):
                await self._client.script_load(REGISTER)
            await self._beat(instance, members, expires_in)

    async def _beat(
        self,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        if isinstance(self._client, RedisCluster):
            await self._beat_on_cluster(self._client, instance, members, expires_in)
            return
        async with self._client.pipeline(transaction=True) as pipe:
            self._queue_heartbeat(pipe, instance, members, expires_in)
            self._queue_members(pipe, instance, members)
            await pipe.execute()

    async def _beat_on_cluster(
        self,
        client: RedisCluster,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
        expires_in: float,
    ) -> None:
        """The beat where a transaction cannot span slots (and redis-py's asyncio cluster
        transactions run each queued command in a thread of its own): one pipeline, which
        redis-py sends as one request per node, all at once. The registry's step (one slot)
        and each member's are atomic and write absolute values, so nothing needs them in one
        transaction: one that failed is written again by the next beat."""
        pipe = client.pipeline()
        keys, args = self._registration(instance, members, expires_in)
        pipe.execute_command("EVALSHA", self._register.sha, len(keys), *keys, *args)
        self._queue_members(pipe, instance, members)
        await pipe.execute()

    def _registration(
        self, instance: str, boards: Collection[str], expires_in: float
    ) -> tuple[list[str], list[str | float]]:
        keys = [self._keys.presence_instances, self._keys.presence_instance_boards(instance)]
        return keys, [instance, _now_ms() + expires_in * 1000, *boards]

    def _queue_members(
        self,
        pipe: Pipeline | ClusterPipeline,
        instance: str,
        members: Mapping[str, Collection[tuple[PresenceMember, int]]],
    ) -> None:
        for board_id, held in members.items():
            keys, args = self._board(board_id)
            for member, connections in held:
                field = f"{instance}:{member.id}"
                # EVALSHA, not the `Script`: a pipeline holding a `Script` first asks
                # `SCRIPT EXISTS`, a second round trip on every beat. By name, since the
                # cluster pipeline blocks its `evalsha` method, though it routes the command
                # by its keys like any other (`RedisCluster._determine_slot`).
                pipe.execute_command(
                    "EVALSHA",
                    self._set_member.sha,
                    len(keys),
                    *keys,
                    *args,
                    *(field, member.id, connections, member_json(member)),
                )

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
    """The limits that hold across replicas, in Redis (redis-py's asyncio client), or in Redis
    Cluster with `ADVANCED_REDIS_MODE=cluster` (each limit is one key: any slot will do)."""
    options: dict[str, float | str | bool] = {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
    }
    prefix = f"{settings.redis_key_prefix}limits"
    if settings.redis_mode == "standalone":
        return RedisStorage(
            "async+" + settings.redis_url.get_secret_value(),
            implementation="redispy",
            key_prefix=prefix,
            wrap_exceptions=True,
            **options,
        )
    uri, credentials = cluster_storage_uri(settings.redis_nodes)
    return ClusterRateLimitStorage(
        uri,
        implementation="redispy",
        key_prefix=prefix,
        wrap_exceptions=True,
        **options,
        **credentials,
    )


class ClusterRateLimitStorage(RedisClusterStorage):
    """`limits`' cluster storage, whose wrapped exceptions include redis-py's
    `RedisClusterException` (no `RedisError`: raised when no seed answers, or a slot has no
    master yet), so that a cluster that is away is a `StorageError` like a Redis that is."""

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return (RedisError, RedisClusterException)


def cluster_storage_uri(nodes: list[str]) -> tuple[str, dict[str, str | bool]]:
    """`limits`' cluster URI (`async+redis+cluster://h1:p1,h2:p2`) for the seed URLs, and what
    the URI cannot carry as the seeds do. The credentials go as options: `limits` reads the
    URI's user and password without percent-decoding them. `rediss://` turns TLS on."""
    seeds = [urlsplit(node) for node in nodes]
    locations = ",".join(f"{seed.hostname or 'localhost'}:{seed.port or 6379}" for seed in seeds)
    first = seeds[0]
    options: dict[str, str | bool] = {}
    if first.username:
        options["username"] = unquote(first.username)
    if first.password:
        options["password"] = unquote(first.password)
    if any(seed.scheme == "rediss" for seed in seeds):
        options["ssl"] = True
    return f"async+redis+cluster://{locations}", options


async def close_rate_limit_storage(storage: Storage) -> None:
    """Close the Redis client `limits` made for `storage` (it has no close of its own)."""
    client = getattr(getattr(storage, "bridge", None), "storage", None)
    if client is not None:
        await client.aclose()
