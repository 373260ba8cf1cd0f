"""Which RabbitMQ and Redis the tests use, and isolated names on them.

With a Docker engine, testcontainers starts both; without one, the brokers at
ADVANCED_RABBITMQ_URL / ADVANCED_REDIS_URL (defaults: the local ones) are used. Either way
the mode is printed, and no reachable broker is a failure, never a skip.

`ADVANCED_TEST_BROKERS=testcontainers` (or `configured`) insists on one mode: a run meant for
testcontainers fails when no engine answers rather than quietly using the configured brokers.
`ADVANCED_TEST_RABBITMQ_IMAGE` and `ADVANCED_TEST_REDIS_IMAGE` name the images testcontainers
starts (defaults: the registry's `rabbitmq:3.13-management` and `redis:7`); CI, which reaches no
registry, points them at stand-ins it builds (scripts/containers/stand-ins.sh).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aio_pika
import redis

DEFAULT_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/2"
RABBITMQ_IMAGE = "rabbitmq:3.13-management"
REDIS_IMAGE = "redis:7"


@dataclass(frozen=True)
class Brokers:
    rabbitmq_url: str
    redis_url: str
    mode: str


def docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _answers(url: str, port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or port), 2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def provide_brokers(rabbitmq_url: str | None, redis_url: str | None) -> Iterator[Brokers]:
    wanted = os.environ.get("ADVANCED_TEST_BROKERS", "auto")
    if wanted not in ("auto", "testcontainers", "configured"):
        raise RuntimeError(
            f"ADVANCED_TEST_BROKERS={wanted!r}: use auto, testcontainers or configured."
        )
    engine = wanted != "configured" and docker_engine_answers()
    if wanted == "testcontainers" and not engine:
        raise RuntimeError(
            "ADVANCED_TEST_BROKERS=testcontainers but no Docker engine answers `docker info` "
            "(check DOCKER_HOST)."
        )
    if engine:
        # The community modules: the top-level `testcontainers.rabbitmq` and `.redis` are
        # deprecated aliases, and their warning is an error here.
        from testcontainers.community.rabbitmq import RabbitMqContainer
        from testcontainers.community.redis import RedisContainer

        rabbitmq_image = os.environ.get("ADVANCED_TEST_RABBITMQ_IMAGE", RABBITMQ_IMAGE)
        redis_image = os.environ.get("ADVANCED_TEST_REDIS_IMAGE", REDIS_IMAGE)
        with RabbitMqContainer(rabbitmq_image) as rabbit, RedisContainer(redis_image) as red:
            params = rabbit.get_connection_params()
            yield Brokers(
                f"amqp://guest:guest@{params.host}:{params.port}/",
                f"redis://{red.get_container_host_ip()}:{red.get_exposed_port(6379)}/0",
                f"testcontainers ({rabbitmq_image}, {redis_image})",
            )
        return
    rabbitmq_url = rabbitmq_url or DEFAULT_RABBITMQ
    redis_url = redis_url or DEFAULT_REDIS
    missing = [
        name
        for name, url, port in (("RabbitMQ", rabbitmq_url, 5672), ("Redis", redis_url, 6379))
        if not _answers(url, port)
    ]
    if missing:
        raise RuntimeError(
            f"No Docker engine and {' and '.join(missing)} not reachable at the configured "
            "URLs: start the brokers or set ADVANCED_RABBITMQ_URL / ADVANCED_REDIS_URL."
        )
    yield Brokers(rabbitmq_url, redis_url, "configured brokers (no Docker engine answered)")


@dataclass(frozen=True)
class Names:
    """Unique names for one test, so that tests on shared brokers never see each other."""

    tag: str

    @classmethod
    def fresh(cls) -> Names:
        return cls(uuid.uuid4().hex[:12])

    def env(self, partitions: int = 4) -> dict[str, str]:
        return {
            "ADVANCED_RABBITMQ_EXCHANGE": f"t.{self.tag}.events",
            "ADVANCED_RABBITMQ_QUEUE": f"t.{self.tag}.events",
            "ADVANCED_RABBITMQ_RETRY_QUEUE": f"t.{self.tag}.events.retry",
            "ADVANCED_RABBITMQ_DLQ_QUEUE": f"t.{self.tag}.events.dlq",
            "ADVANCED_RABBITMQ_PARTITIONS": str(partitions),
            "ADVANCED_ACTIVITY_CHANNEL": f"t:{self.tag}:activity",
            "ADVANCED_REDIS_KEY_PREFIX": f"t:{self.tag}:",
        }

    async def cleanup(self, brokers: Brokers, partitions: int = 4) -> None:
        env = self.env(partitions)
        connection = await aio_pika.connect(brokers.rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            queues = [f"{env['ADVANCED_RABBITMQ_QUEUE']}.{p}" for p in range(partitions)]
            queues += [env["ADVANCED_RABBITMQ_RETRY_QUEUE"], env["ADVANCED_RABBITMQ_DLQ_QUEUE"]]
            for queue in queues:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
                    channel = await connection.channel()
            for exchange in (
                env["ADVANCED_RABBITMQ_EXCHANGE"],
                env["ADVANCED_RABBITMQ_EXCHANGE"] + ".retry",
            ):
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)
                    channel = await connection.channel()
        client = redis.Redis.from_url(brokers.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{env['ADVANCED_REDIS_KEY_PREFIX']}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
