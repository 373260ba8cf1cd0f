"""`open_adapters`, the one place the transport is chosen: each setting gets its whole set."""

from __future__ import annotations

import contextlib

import pytest
from ingress_ws.adapters import open_adapters
from ingress_ws.adapters.memory import MemoryPublisher
from ingress_ws.adapters.rabbitmq import RabbitPublisher
from ingress_ws.adapters.redis import (
    RedisPresence,
    close_rate_limit_storage,
    cluster_storage_uri,
    redis_rate_limit_storage,
)
from ingress_ws.presence import REDIS_FAULTS
from ingress_ws.settings import IngressSettings
from limits import parse
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from realtime_runtime.feed import RedisActivityStore
from realtime_runtime.memory import MemoryTransport
from realtime_runtime.service import redis_client
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from support.processes import free_port


async def test_memory_wires_every_port_to_the_shared_stand_ins() -> None:
    transport = MemoryTransport()
    async with contextlib.AsyncExitStack() as stack:
        settings = IngressSettings(_env_file=None, event_transport="memory")
        adapters = open_adapters(settings, stack, transport)
    assert isinstance(adapters.publisher, MemoryPublisher)
    assert adapters.activity is transport.store and adapters.presence is transport.presence
    assert isinstance(adapters.rate_limits, MemoryStorage)
    assert not adapters.reports_brokers


async def test_rabbitmq_wires_rabbitmq_and_redis_without_connecting() -> None:
    async with contextlib.AsyncExitStack() as stack:
        settings = IngressSettings(_env_file=None, event_transport="rabbitmq")
        adapters = open_adapters(settings, stack, MemoryTransport())  # ignored: not memory
    assert isinstance(adapters.publisher, RabbitPublisher)
    assert isinstance(adapters.activity, RedisActivityStore)
    assert isinstance(adapters.presence, RedisPresence)
    assert isinstance(adapters.rate_limits, RedisStorage)
    assert adapters.reports_brokers


async def test_cluster_mode_counts_the_limits_in_redis_cluster_without_connecting() -> None:
    async with contextlib.AsyncExitStack() as stack:
        settings = IngressSettings(
            _env_file=None,
            event_transport="rabbitmq",
            redis_mode="cluster",
            redis_url="redis://127.0.0.1:7000,redis://127.0.0.1:7001",
            redis_key_prefix="p:",
        )
        adapters = open_adapters(settings, stack, MemoryTransport())
        assert isinstance(adapters.rate_limits, RedisClusterStorage)
        assert isinstance(adapters.presence, RedisPresence)
        client = adapters.rate_limits.bridge.storage
        assert isinstance(client, RedisCluster)
        assert [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()] == [
            ("127.0.0.1", 7000),
            ("127.0.0.1", 7001),
        ]
        assert adapters.rate_limits.bridge.key_prefix == "p:limits"


def test_the_cluster_storage_uri_lists_the_seeds_and_passes_the_rest_as_options() -> None:
    assert cluster_storage_uri(["redis://a:7000", "redis://b"]) == (
        "async+redis+cluster://a:7000,b:6379",
        {},
    )
    # Percent-encoded credentials are decoded (limits would pass them on as written), and
    # one TLS seed means TLS.
    uri, options = cluster_storage_uri(["rediss://user:p%40ss%2Fword@a:7000/0", "redis://b:7001"])
    assert uri == "async+redis+cluster://a:7000,b:7001"
    assert options == {"username": "user", "password": "p@ss/word", "ssl": True}


async def test_a_cluster_that_is_away_is_a_storage_error_and_a_redis_fault() -> None:
    """No seed answers: redis-py's cluster client raises `RedisClusterException`, which is no
    `RedisError`. The limits must see a `StorageError` (they fall back to memory on it) and
    presence a fault it waits out (`REDIS_FAULTS`), not a bug."""
    seeds = f"redis://127.0.0.1:{free_port()},redis://127.0.0.1:{free_port()}"
    settings = IngressSettings(
        _env_file=None,
        event_transport="rabbitmq",
        redis_mode="cluster",
        redis_url=seeds,
        redis_connect_timeout_seconds=0.5,
    )
    storage = redis_rate_limit_storage(settings)
    try:
        with pytest.raises(StorageError):
            await MovingWindowRateLimiter(storage).hit(parse("5/minute"), "k")
    finally:
        await close_rate_limit_storage(storage)
    client = redis_client(settings)
    try:
        with pytest.raises(REDIS_FAULTS) as away:
            await RedisPresence(client, settings.redis_keys).members("b")
        assert isinstance(away.value, RedisClusterException)
    finally:
        await client.aclose()
