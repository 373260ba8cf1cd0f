from __future__ import annotations

from envelope.topology import ACTIVITY_PARTS, QUORUM_DELIVERY_LIMIT, RedisKeys, activity_part_of
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
        *keys.activity_streams,
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


def test_a_board_s_keys_its_channel_and_its_activity_part_share_one_hash_tag() -> None:
    keys = RedisSettings(_env_file=None).redis_keys
    boards = [f"board-{n}" for n in range(400)]
    assert {activity_part_of(board) for board in boards} == set(range(ACTIVITY_PARTS))
    for board in boards[:50]:
        tag = RedisKeys.tag(activity_part_of(board))
        names = [
            keys.board_stream(board),
            keys.sequence(board),
            keys.epoch(board),
            keys.idempotency(board, "key"),
            keys.activity_stream(activity_part_of(board)),
            keys.board_events_channel(board),
            keys.activity_part_channel(activity_part_of(board)),
        ]
        assert all(tag in name and name.count("{") == 1 for name in names)
    channels = {keys.board_events_channel(b) for b in boards} | {
        keys.activity_part_channel(p) for p in range(ACTIVITY_PARTS)
    }
    assert len(channels) == len(boards) + ACTIVITY_PARTS
    assert keys.presence_channel not in channels
