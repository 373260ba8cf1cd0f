from __future__ import annotations

from envelope.topology import QUORUM_DELIVERY_LIMIT
from realtime_runtime.settings import RabbitMQSettings, RedisSettings


def test_a_board_always_routes_to_the_same_partition_queue() -> None:
    topology = RabbitMQSettings(_env_file=None, rabbitmq_partitions=8).topology
    partitions = {topology.partition_of(f"board-{n}") for n in range(200)}
    assert partitions == set(range(8))  # boards spread over every partition
    assert topology.routing_key("demo") == topology.routing_key("demo")
    partition = topology.partition_of("demo")
    assert topology.routing_key("demo") == topology.partition_routing_key(partition)
    assert topology.partition_queue(partition) == f"advanced.board.events.{partition}"


def test_every_redis_name_carries_the_prefix() -> None:
    keys = RedisSettings(_env_file=None, redis_key_prefix="p:").redis_keys
    names = [
        keys.activity_stream,
        keys.board_stream("b"),
        keys.sequence("b"),
        keys.idempotency("b", "c"),
        keys.presence("b"),
        keys.presence_members("b"),
        keys.presence_instances,
        keys.presence_instance_boards("i"),
        keys.workers,
        keys.partition_lease(1),
    ]
    assert all(name.startswith("p:") for name in names)
    assert len(set(names)) == len(names)


def test_classic_queues_keep_the_arguments_every_deployment_declared() -> None:
    topology = RabbitMQSettings(_env_file=None).topology
    assert topology.queue_type == "classic"
    assert topology.partition_queue_arguments == {
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": "advanced.board.events.retry",
    }
    assert topology.retry_queue_arguments(300) == {
        "x-message-ttl": 300,
        "x-dead-letter-exchange": "advanced.board.events",
    }
    assert topology.dlq_queue_arguments == {}


def test_quorum_queues_dead_letter_at_least_once_with_an_explicit_delivery_limit() -> None:
    topology = RabbitMQSettings(_env_file=None, rabbitmq_queue_type="quorum").topology
    dead_lettering = {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
    }
    assert topology.partition_queue_arguments == {
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": "advanced.board.events.retry",
        **dead_lettering,
    }
    assert topology.retry_queue_arguments(300) == {
        "x-message-ttl": 300,
        "x-dead-letter-exchange": "advanced.board.events",
        **dead_lettering,
    }
    assert topology.dlq_queue_arguments == {"x-queue-type": "quorum"}
    assert QUORUM_DELIVERY_LIMIT > 20  # RabbitMQ 4's default, which would reorder after 20
