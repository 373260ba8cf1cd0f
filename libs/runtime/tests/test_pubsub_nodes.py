"""The per-master connections of a sharded subscription keep the cluster's connection settings."""

from __future__ import annotations

from realtime_runtime.pubsub import _node_client
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection


def test_a_master_s_subscription_client_keeps_tls_credentials_and_timeouts() -> None:
    """A managed Redis Cluster with TLS and a password: the plain client the feed opens on
    each master (SSUBSCRIBE is not redirected) must not fall back to cleartext or no auth."""
    node = ClusterNode(
        "127.0.0.1",
        7000,
        connection_class=SSLConnection,
        username="edge",
        password="s3cret",
        socket_timeout=3.0,
        socket_connect_timeout=2.0,
    )
    pool = _node_client(node).connection_pool
    assert pool.connection_class is SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 7000)
    assert (kwargs["username"], kwargs["password"]) == ("edge", "s3cret")
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3.0, 2.0)
