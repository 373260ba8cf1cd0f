"""RabbitMQ connections of the services: a list of nodes with failover, and queue declarations
that stop the service, naming the queue, when it exists with the other queue type.

Needs the `amqp` extra (aio-pika).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import structlog
from aio_pika import RobustConnection
from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelPreconditionFailed
from yarl import URL

log = structlog.get_logger("realtime_runtime.amqp")

# How long one node may take to accept a connection before the next one is tried: a node
# that died refuses at once, one cut off by the network answers nothing at all.
NODE_CONNECT_TIMEOUT_SECONDS = 5.0


def node_name(url: URL) -> str:
    """`host:port` of a node: what logs and readiness show (never the credentials)."""
    port = url.port or (5671 if url.scheme == "amqps" else 5672)
    return f"{url.host}:{port}"


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection, over a list of nodes.

    The robust connection reconnects to the one URL it was given, and restores its channels,
    queues and consumers there. This one tries every node in turn, starting with the one after
    the node it was on (a dead node is not tried first again), and restores them on whichever
    answers; a connection attempt fails only once every node refused it.
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        if isinstance(urls, str) or not urls:
            raise ValueError("FailoverConnection takes a non-empty list of node URLs")
        self._nodes = [make_url(url) for url in urls]
        self._next = 0
        super().__init__(self._nodes[0], **kwargs)

    @property
    def node(self) -> str | None:
        """The node this connection is on now; None while it is not connected."""
        return node_name(self.url) if self.connected.is_set() else None

    # The robust connection's one transport attempt (name-mangled private in aio-pika 10):
    # both the first connect and every reconnect go through it. Overridden because aio-pika
    # has no public way to reconnect to another URL than the one it was given. Hence the
    # `amqp` extra's `aio-pika<11`, and tests/contract/test_failover_connection.py, which fails
    # first on a release that renames or reshapes this step.
    async def _RobustConnection__connect_transport(self) -> None:
        failure: BaseException | None = None
        for _ in self._nodes:
            self.url = self._nodes[self._next]
            self._next = (self._next + 1) % len(self._nodes)
            try:
                await super()._RobustConnection__connect_transport()  # type: ignore[misc]
            except CONNECTION_EXCEPTIONS as exc:
                failure = exc
                log.warning(
                    "RabbitMQ node not reachable", node=node_name(self.url), error=repr(exc)
                )
            else:
                log.info("connected to RabbitMQ", node=node_name(self.url))
                return
        assert failure is not None
        raise failure


async def connect_nodes(urls: Sequence[str], name: str) -> FailoverConnection:
    """A connection to the first of `urls` that answers, moving to another when it fails.

    Returned once connected; closed again if the first attempt fails on every node (a stop
    during it must close it too, or aio-pika's reconnect task outlives it, aio-pika #414).
    """
    connection = FailoverConnection(urls, client_properties={"connection_name": name})
    try:
        await connection.connect(timeout=NODE_CONNECT_TIMEOUT_SECONDS)
    except BaseException:
        await connection.close()
        raise
    return connection


class QueueTypeMismatch(Exception):
    """A queue the suite declares exists with the other queue type: the service must stop."""


# What the queue type changes in the suite's declarations: RabbitMQ's 406 names the first
# argument that differs, which for a queue of the other type may be any of these.
_TYPE_ARGUMENTS = re.compile(
    r"inequivalent arg '(x-queue-type|x-dead-letter-strategy|x-overflow|x-delivery-limit)'"
)


async def declare_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    """A durable queue with `arguments`; one of the other type is a `QueueTypeMismatch`.

    RabbitMQ answers a redeclaration with other arguments with 406 PRECONDITION_FAILED
    ("inequivalent arg ...") and closes the channel: when the argument is one the queue type
    decides, that is turned here into what the operator has to do. Other inequivalent
    arguments raise as RabbitMQ said them.
    """
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        differs = _TYPE_ARGUMENTS.search(str(exc))
        if differs is None:
            raise
        wanted = arguments.get("x-queue-type", "classic")
        raise QueueTypeMismatch(
            f"RabbitMQ queue {name!r} exists with another queue type than "
            f"ADVANCED_RABBITMQ_QUEUE_TYPE={wanted} ({differs[0]}), "
            "and a queue's type cannot change. Give the suite new names "
            "(ADVANCED_RABBITMQ_EXCHANGE, _QUEUE, _RETRY_QUEUE, _DLQ_QUEUE), drain the old "
            "queues, then delete them (docs/operations.md, 'Changing the queue type'); or set "
            "ADVANCED_RABBITMQ_QUEUE_TYPE back."
        ) from exc
