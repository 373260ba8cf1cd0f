"""The suite on three RabbitMQ nodes with quorum queues: compose.yaml with
compose.rabbitmq-cluster.yaml (scripts/containers/ci.sh starts it after the single-node run;
docs/deploy.md).

In file order: the three nodes form one cluster, the suite's vhost defaults to quorum queues,
events go WS -> RabbitMQ -> worker -> Redis -> SSE, every queue the suite declared is a quorum
queue that dead-letters at least once, and readiness names the node each process is on.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from containers.conftest import Stack

pytestmark = [pytest.mark.containers]

NODES = {
    "rabbitmq": "rabbit@rabbitmq",
    "rabbitmq-2": "rabbit@rabbitmq-2",
    "rabbitmq-3": "rabbit@rabbitmq-3",
}
VHOST = "realtime"
# compose sets no ADVANCED_RABBITMQ_PARTITIONS: the default 8, and the default queue names.
SUITE_QUEUES = {
    *(f"advanced.board.events.{p}" for p in range(8)),
    "advanced.board.events.retry",
    "advanced.board.events.dlq",
}
# A node's host name, address or node name (rabbitmq-2, rabbitmq:5672, rabbit@rabbitmq), not
# the word "rabbitmq" alone (a transport's name).
NODE_ADDRESS = re.compile(r"rabbitmq-[23]\b|[@/]rabbitmq\b|\brabbitmq:5672")


@pytest.fixture(scope="module")
def cluster(stack: Stack) -> Stack:
    if not any(part.endswith("compose.rabbitmq-cluster.yaml") for part in stack.compose):
        pytest.fail(
            "these tests need the cluster variant (compose.rabbitmq-cluster.yaml), which "
            "scripts/containers/ci.sh starts after the single-node tests: run `just containers`"
        )
    return stack


def rabbitmqctl(stack: Stack, service: str, *args: str) -> Any:
    """`rabbitmqctl ... --formatter json` inside a node's container, parsed. The CLI first
    prints a deprecation notice for RABBITMQ_ERLANG_COOKIE: the JSON starts at the first line
    that opens an object or an array."""
    (container,) = stack.containers(service)
    out = stack.docker_run("exec", container, "rabbitmqctl", *args, "--formatter", "json")
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(("{", "["))), None)
    assert start is not None, f"rabbitmqctl {' '.join(args)} on {service}: no JSON in {out!r}"
    return json.loads("\n".join(lines[start:]))


def as_dict(arguments: Any) -> dict[str, Any]:
    """Queue arguments as rabbitmqctl's JSON gives them: an object, or a list of AMQP table
    entries `[name, type, value]` (RabbitMQ 3.10)."""
    if isinstance(arguments, dict):
        return arguments
    return {entry[0]: entry[-1] for entry in arguments}


def test_the_three_nodes_are_one_cluster(cluster: Stack) -> None:
    for service in NODES:
        status = rabbitmqctl(cluster, service, "cluster_status")
        assert set(status["running_nodes"]) == set(NODES.values()), (service, status)
        assert set(status["disk_nodes"]) == set(NODES.values()), (service, status)
        assert not status.get("partitions"), (service, status["partitions"])


def test_the_suites_vhost_defaults_to_quorum_queues(cluster: Stack) -> None:
    vhosts = rabbitmqctl(cluster, "rabbitmq-3", "list_vhosts", "name", "default_queue_type")
    assert {"name": VHOST, "default_queue_type": "quorum"} in vhosts, vhosts


def test_events_go_from_websocket_to_sse_through_the_cluster(cluster: Stack) -> None:
    cluster.probe(count=10)


def test_every_suite_queue_is_a_quorum_queue_that_dead_letters_at_least_once(
    cluster: Stack,
) -> None:
    """Declared by the suite (ADVANCED_RABBITMQ_QUEUE_TYPE=quorum), not merely defaulted by
    the vhost: a queue that dead-letters does it at least once (the broker keeps a message
    until the dead-letter target confirms it), which needs reject-publish on overflow."""
    queues = {
        q["name"]: q
        for q in rabbitmqctl(
            cluster, "rabbitmq-2", "list_queues", "--vhost", VHOST, "name", "type", "arguments"
        )
    }
    assert SUITE_QUEUES <= set(queues), f"missing: {sorted(SUITE_QUEUES - set(queues))}"
    types = {name: queues[name]["type"] for name in sorted(SUITE_QUEUES)}
    assert set(types.values()) == {"quorum"}, types
    dead_lettering = {
        name: args
        for name in sorted(SUITE_QUEUES)
        if "x-dead-letter-exchange" in (args := as_dict(queues[name]["arguments"]))
    }
    assert {f"advanced.board.events.{p}" for p in range(8)} <= set(dead_lettering), queues
    for name, args in dead_lettering.items():
        assert args.get("x-dead-letter-strategy") == "at-least-once", (name, args)
        assert args.get("x-overflow") == "reject-publish", (name, args)


def node_named(body: Any) -> list[str]:
    """The strings of a /readyz body that name one of the three nodes."""
    if isinstance(body, dict):
        return [s for value in body.values() for s in node_named(value)]
    if isinstance(body, list):
        return [s for value in body for s in node_named(value)]
    return [body] if isinstance(body, str) and NODE_ADDRESS.search(body) else []


def test_readiness_names_the_node_and_no_credential(cluster: Stack) -> None:
    ingress = httpx.get("http://127.0.0.1:8004/readyz", timeout=10)
    bodies = {"ingress-ws": ingress.text}
    for container in cluster.containers("relay-worker"):
        bodies[f"relay-worker {container[:12]}"] = cluster.docker_run(
            "exec", container, "python", "-c",
            "import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:8006/readyz', timeout=5).read().decode())",
        )  # fmt: skip
    for who, text in bodies.items():
        assert "realtime:realtime@" not in text, f"{who}: /readyz shows a credential: {text}"
        assert node_named(json.loads(text)), f"{who}: /readyz names no RabbitMQ node: {text}"
