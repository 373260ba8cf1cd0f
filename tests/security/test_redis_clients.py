"""The edges' Redis client (`realtime_runtime.service.redis_client`) on the real Redis: it sets its own
timeouts, so a Redis that stops answering fails a command in bounded time, and the pub/sub
feed stays quiet on an idle channel for longer than that timeout. In cluster mode (a private
Redis Cluster) the same holds for every node the client finds, and for the cluster client the
ingress's rate limits build."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ingress_ws.adapters.redis import close_rate_limit_storage, redis_rate_limit_storage
from ingress_ws.settings import IngressSettings
from realtime_runtime.feed import RedisActivityStore
from realtime_runtime.pubsub import Confirmed
from realtime_runtime.service import redis_client
from realtime_runtime.settings import RedisSettings
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from support.brokers import Brokers
from support.proxy import TcpProxy
from support.redis_cluster import LocalRedisCluster, RedisNode, redis_cluster

pytestmark = [pytest.mark.e2e]


def settings_for(url: str, prefix: str = "t:", mode: str = "standalone") -> RedisSettings:
    return RedisSettings(
        _env_file=None,
        redis_mode=mode,
        redis_url=url,
        redis_key_prefix=prefix,
        activity_channel=f"{prefix}activity",
        redis_socket_timeout_seconds=0.5,
        redis_connect_timeout_seconds=0.5,
    )


async def test_a_command_to_a_redis_that_stopped_answering_fails_in_bounded_time(
    brokers: Brokers,
) -> None:
    target = urlsplit(brokers.redis_url)
    proxy = await TcpProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    url = brokers.redis_url.replace(target.netloc.rsplit("@", 1)[-1], f"127.0.0.1:{proxy.port}")
    client = redis_client(settings_for(url))
    try:
        assert await client.ping()
        proxy.blackhole()  # the link stays open and nothing comes back: a silently dead peer
        started = time.monotonic()
        with pytest.raises((RedisTimeoutError, RedisConnectionError)):
            await asyncio.wait_for(client.get("t:any"), 10)  # redis-py's default waits for ever
        assert time.monotonic() - started < 3
    finally:
        proxy.cut()
        await proxy.stop()
        await client.aclose()


async def test_the_feed_stays_subscribed_on_an_idle_channel_past_the_socket_timeout(
    brokers: Brokers,
) -> None:
    settings = settings_for(brokers.redis_url, prefix=f"t:{uuid.uuid4().hex[:12]}:")
    client = redis_client(settings)
    try:
        store = RedisActivityStore(client, settings.redis_keys)
        channel = settings.redis_keys.board_events_channel("b")
        async with store.live() as live:
            await live.subscribe([channel])
            assert await asyncio.wait_for(live.next(), 5) == Confirmed(channel)
            await asyncio.sleep(1.5)  # idle for three socket timeouts: the point of the test
            await client.publish(channel, b"0-1 b 1\n{}")
            frame = await asyncio.wait_for(live.next(), 5)
        assert frame == b"0-1 b 1\n{}"
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with redis_cluster(Path(tmp_path_factory.mktemp("client-cluster"))) as started:
        yield started


async def test_the_cluster_clients_set_their_timeouts_on_every_node(
    cluster: LocalRedisCluster,
) -> None:
    client = redis_client(settings_for(cluster.seed_urls(), mode="cluster"))
    assert isinstance(client, RedisCluster)
    limits = redis_rate_limit_storage(
        IngressSettings(_env_file=None, redis_mode="cluster", redis_url=cluster.seed_urls())
    )
    limits_client = limits.bridge.storage
    try:
        await client.initialize()
        await limits_client.initialize()
        nodes = client.get_nodes()
        assert {node.port for node in nodes} == {master.port for master in cluster.masters()}
        for node in nodes:
            assert node.connection_kwargs["socket_timeout"] == 0.5
            assert node.connection_kwargs["socket_connect_timeout"] == 0.5
            assert node.connection_kwargs["health_check_interval"] > 0
        for node in limits_client.get_nodes():
            assert node.connection_kwargs["socket_timeout"] == 1.0
            assert node.connection_kwargs["socket_connect_timeout"] == 1.0
    finally:
        await client.aclose()
        await close_rate_limit_storage(limits)


def pause(node: RedisNode, sig: signal.Signals) -> None:
    assert node.process is not None
    os.kill(node.process.pid, sig)


# Run in a process of its own: redis-py 8.1's cluster client leaves the connections to a node
# that timed out unclosed (`ClusterNode.update_active_connections_for_reconnect`), and
# collected after the test's loop has gone they would fail whatever test runs then.
TIMED_GET = """
import asyncio, sys, time
from realtime_runtime.service import redis_client
from realtime_runtime.settings import RedisSettings

async def main(seeds: str, key: str) -> None:
    settings = RedisSettings(
        _env_file=None, redis_mode="cluster", redis_url=seeds,
        redis_socket_timeout_seconds=0.5, redis_connect_timeout_seconds=0.5,
    )
    client = redis_client(settings)
    await client.set(key, "1")
    print("ready", flush=True)
    sys.stdin.readline()  # the test stops the nodes
    started = time.monotonic()
    try:
        await asyncio.wait_for(client.get(key), 30)  # redis-py's default waits for ever
        outcome = "answered"
    except asyncio.TimeoutError:
        outcome = "waited"
    except Exception as exc:
        outcome = type(exc).__name__
    print(outcome, round(time.monotonic() - started, 2), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_command_to_a_cluster_master_that_stopped_answering_fails_in_bounded_time(
    cluster: LocalRedisCluster,
) -> None:
    """The master of the key and its replica stop (SIGSTOP: their sockets stay open and
    nothing comes back, and no replica can take over); the command fails within the
    client's timeouts and retries instead of waiting for ever. Last in the module: it
    leaves the cluster whole again, but it is a fault."""
    key = f"t:{{{uuid.uuid4().hex}}}"
    master = cluster.master_of(key)
    stopped = [master, *cluster.replicas_of(master)]
    with subprocess.Popen(
        [sys.executable, "-c", TIMED_GET, cluster.seed_urls(), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "ready"
            for node in stopped:
                pause(node, signal.SIGSTOP)
            child.stdin.write("go\n")
            child.stdin.flush()
            outcome, seconds = child.stdout.readline().split()
            assert outcome in {"TimeoutError", "ConnectionError", "ClusterDownError"}, outcome
            assert float(seconds) < 15
        finally:
            for node in stopped:
                pause(node, signal.SIGCONT)
            child.kill()
    cluster.wait_until_ok(60)
