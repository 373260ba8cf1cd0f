"""The suite on a six-node Redis Cluster (three masters, a replica each): compose.yaml with
compose.redis-cluster.yaml (scripts/containers/ci.sh starts it after the RabbitMQ cluster run;
docs/deploy.md).

In file order: the six nodes form one cluster, every service is ready on it, and events go
WS -> RabbitMQ -> worker -> Redis Cluster -> SSE for boards whose activity parts live on every
master: each board's SSE stream and one /sse/activity see every event once, in order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import httpx
import pytest
from chaos.harness import Ledger, Sender, report, sse_events, stop_tasks
from envelope.cursors import parse_activity_cursor
from envelope.topology import ACTIVITY_PARTS, activity_part_of

from containers.conftest import Stack

pytestmark = [pytest.mark.containers]

INGRESS = "http://127.0.0.1:8004"
GATEWAY = "http://127.0.0.1:8005"
NODES = ["redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6"]
EVENTS_PER_BOARD = 25
# Never shown by /readyz: the compose file's default password, in a seed URL.
CREDENTIAL = ":realtime@"


@pytest.fixture(scope="module")
def cluster(stack: Stack) -> Stack:
    if not any(part.endswith("compose.redis-cluster.yaml") for part in stack.compose):
        pytest.fail(
            "these tests need the Redis Cluster variant (compose.redis-cluster.yaml), which "
            "scripts/containers/ci.sh starts after the RabbitMQ cluster: run `just containers`"
        )
    return stack


def redis_cli(stack: Stack, service: str, *args: str) -> str:
    """`redis-cli ...` inside a node's container (REDISCLI_AUTH is set there)."""
    (container,) = stack.containers(service)
    return stack.docker_run("exec", container, "redis-cli", *args)


def cluster_info(stack: Stack, service: str) -> dict[str, str]:
    lines = redis_cli(stack, service, "cluster", "info").splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


def masters_by_slot_range(stack: Stack) -> tuple[dict[str, list[tuple[int, int]]], dict[str, str]]:
    """From `cluster nodes`: each master's slot ranges, and each replica's master."""
    masters: dict[str, list[tuple[int, int]]] = {}
    replicas: dict[str, str] = {}
    for line in redis_cli(stack, "redis", "cluster", "nodes").splitlines():
        # <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        fields = line.split()
        node_id, flags, master, link, slots = fields[0], fields[2], fields[3], fields[7], fields[8:]
        assert link == "connected" or "myself" in flags, line
        assert "fail" not in flags.split(","), line
        if "master" in flags.split(","):
            ranges = []
            for slot in slots:
                low, _, high = slot.partition("-")
                ranges.append((int(low), int(high or low)))
            masters[node_id] = ranges
        else:
            assert "slave" in flags.split(","), line
            replicas[node_id] = master
    return masters, replicas


def test_the_six_nodes_are_one_cluster_of_three_masters_with_a_replica_each(
    cluster: Stack,
) -> None:
    for service in NODES:
        info = cluster_info(cluster, service)
        assert info.get("cluster_state") == "ok", (service, info)
        assert info.get("cluster_known_nodes") == "6", (service, info)
        assert info.get("cluster_size") == "3", (service, info)
        assert info.get("cluster_slots_assigned") == "16384", (service, info)
        assert info.get("cluster_slots_ok") == "16384", (service, info)
    masters, replicas = masters_by_slot_range(cluster)
    assert len(masters) == 3 and all(masters.values()), masters
    assert sum(high - low + 1 for ranges in masters.values() for low, high in ranges) == 16384
    assert sorted(Counter(replicas.values()).items()) == sorted((m, 1) for m in masters), (
        masters,
        replicas,
    )


def test_every_service_is_ready_and_shows_no_credential(cluster: Stack) -> None:
    bodies: dict[str, str] = {}
    for name, url in (("ingress-ws", INGRESS), ("sse-gateway", GATEWAY)):
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, (name, ready.status_code, ready.text)
        bodies[name] = ready.text
    # The worker publishes no host port: ask from inside its container (urlopen raises on 503).
    for container in cluster.containers("relay-worker"):
        bodies[f"relay-worker {container[:12]}"] = cluster.docker_run(
            "exec", container, "python", "-c",
            "import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:8006/readyz', timeout=5).read().decode())",
        )  # fmt: skip
    for who, text in bodies.items():
        json.loads(text)
        assert CREDENTIAL not in text, f"{who}: /readyz shows a credential: {text}"


def boards_on_every_master(stack: Stack) -> tuple[list[str], dict[str, int]]:
    """Fresh board ids, two per master: each board's part hash-tags its keys (`{part-N}`) to
    one slot, and the boards' parts cover the slots of all three masters."""
    masters, _ = masters_by_slot_range(stack)
    master_of_part: dict[int, str] = {}
    for part in range(ACTIVITY_PARTS):
        slot = int(redis_cli(stack, "redis", "cluster", "keyslot", f"{{part-{part}}}"))
        (master_of_part[part],) = (
            m for m, ranges in masters.items() if any(lo <= slot <= hi for lo, hi in ranges)
        )
    run = uuid.uuid4().hex[:8]
    boards: list[str] = []
    parts: dict[str, int] = {}
    per_master: Counter[str] = Counter()
    for n in range(10_000):
        board = f"rc-{run}-{n}"
        part = activity_part_of(board)
        master = master_of_part[part]
        # Two boards a master, on two parts where the master has two (a distinct stream each).
        if per_master[master] >= 2 or part in parts.values():
            continue
        boards.append(board)
        parts[board] = part
        per_master[master] += 1
        if len(boards) == 6:
            break
    assert len({master_of_part[p] for p in parts.values()}) == 3, (parts, master_of_part)
    return boards, parts


async def activity_subscriber(
    ledger: Ledger, url: str, boards: frozenset[str], ids: list[str]
) -> None:
    """Records the events of `boards` on /sse/activity, and every event's `id:` (the cursor)."""
    name = "sse:activity"
    ledger.subscriber(name, boards)
    async for kind, ident, data in sse_events(url):
        if kind == "activity":
            event = json.loads(data)
            if event["board_id"] in boards:
                ledger.record(name, event)
                ids.append(ident or "")
        elif kind in ("close", "reset"):
            ledger.closed[name] = f"{kind}: {data}"
    ledger.closed.setdefault(name, "stream ended")


async def board_subscriber(ledger: Ledger, url: str, board: str) -> None:
    name = f"sse:{board}"
    ledger.subscriber(name, frozenset({board}))
    async for kind, _ident, data in sse_events(url):
        if kind == "activity":
            ledger.record(name, json.loads(data))
        elif kind in ("close", "reset"):
            ledger.closed[name] = f"{kind}: {data}"
    ledger.closed.setdefault(name, "stream ended")


@pytest.mark.timeout(240)
async def test_events_over_every_master_reach_each_board_stream_and_activity_once_in_order(
    cluster: Stack,
) -> None:
    boards, parts = await asyncio.to_thread(boards_on_every_master, cluster)
    print(f"\nboards and their parts: {parts}")
    ledger = Ledger()
    cursors: list[str] = []
    token = cluster.token
    listeners = [
        asyncio.create_task(board_subscriber(ledger, f"{GATEWAY}/sse/boards/{b}?token={token}", b))
        for b in boards
    ]
    listeners.append(
        asyncio.create_task(
            activity_subscriber(
                ledger, f"{GATEWAY}/sse/activity?token={token}", frozenset(boards), cursors
            )
        )
    )
    senders = [
        Sender(ledger, f"ws://127.0.0.1:8004/ws/boards/{b}?token={token}", b) for b in boards
    ]
    try:
        for sender in senders:
            await sender.__aenter__()
        await asyncio.sleep(1.5)  # every SSE subscription registered before the first event
        await asyncio.gather(*(s.send_many(EVENTS_PER_BOARD, rate=20.0) for s in senders))
        for sender in senders:
            await sender.wait_acked(60)
        await ledger.wait_complete(60)
    finally:
        failed = await stop_tasks(listeners)
        for sender in senders:
            await sender.__aexit__(None, None, None)

    verdicts = ledger.verdicts()
    report("compose: Redis Cluster, 6 boards over 3 masters", ledger, verdicts)
    assert not failed, failed
    assert not ledger.closed, ledger.closed
    assert len(ledger.acked) == len(boards) * EVENTS_PER_BOARD, len(ledger.acked)
    assert not ledger.refused, ledger.refused[:5]
    names = {v.subscriber: v for v in verdicts}
    assert {f"sse:{b}" for b in boards} | {"sse:activity"} <= set(names), sorted(names)
    for verdict in verdicts:
        assert verdict.clean, verdict.line()
        assert verdict.seen == verdict.expected, verdict.line()
    assert names["sse:activity"].seen == len(boards) * EVENTS_PER_BOARD
    # The activity stream's cursor names the 16 parts; the last one has moved on the boards'.
    last = parse_activity_cursor(cursors[-1])
    assert last is not None and len(last) == ACTIVITY_PARTS, cursors[-1]
    assert all(last[p] != "0-0" for p in parts.values()), (cursors[-1], parts)
