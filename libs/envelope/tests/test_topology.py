from __future__ import annotations

from envelope.settings import SuiteSettings


def test_a_board_always_routes_to_the_same_partition_queue() -> None:
    topology = SuiteSettings(_env_file=None, rabbitmq_partitions=8).topology
    partitions = {topology.partition_of(f"board-{n}") for n in range(200)}
    assert partitions == set(range(8))  # boards spread over every partition
    assert topology.routing_key("demo") == topology.routing_key("demo")
    partition = topology.partition_of("demo")
    assert topology.routing_key("demo") == topology.partition_routing_key(partition)
    assert topology.partition_queue(partition) == f"advanced.board.events.{partition}"


def test_every_redis_name_carries_the_prefix() -> None:
    keys = SuiteSettings(_env_file=None, redis_key_prefix="p:").redis_keys
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
