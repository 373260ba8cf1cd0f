"""Edge memory per client that resumes from 0 on a board at full retention and stops reading.

`uv run --group bench python -m bench.resume_memory [--clients 8] [--events 10000]
[--payload 600] [--commit REV]`: a board at full retention (written straight into Redis by the
worker's own relay step, so with the relay's layout), then the suite's processes on the shared
brokers (names of their own, deleted afterwards), then `--clients` SSE streams and as many
WebSockets that resume from 0 and read nothing (a 4 KiB receive buffer). It reports each edge's
RSS growth per stalled client once the edges stopped replaying (their replayed-events counters
stand still). `--commit` runs the edges from that commit's sources instead of this tree (the
figures before a change), by `git archive` into a temporary directory put first on PYTHONPATH.
The send timeouts are raised so that no stalled client is cut while it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis.asyncio as redis

from bench.launcher import REDIS_URL, TOKEN, ServerProcess, SuiteDeployment

BOARD = "resume-memory"
SOURCES = ("libs/envelope/src", "services/ingress-ws/src", "services/sse-gateway/src")
SOURCES += ("services/relay-worker/src",)


async def fill_board(deployment: SuiteDeployment, events: int, payload: int) -> int:
    """The board's history through the relay step; returns the bytes of event JSON retained."""
    from envelope import codec
    from envelope.models import BoardEventEnvelope
    from envelope.topology import RedisKeys
    from relay_worker.adapters.redis import RedisRelayStore

    env = deployment.processes["sse-gateway"].env
    keys = RedisKeys(env["ADVANCED_REDIS_KEY_PREFIX"], env["ADVANCED_ACTIVITY_CHANNEL"])
    client = redis.from_url(REDIS_URL)
    store = RedisRelayStore(client, keys, events)
    size = 0
    try:
        for start in range(0, events, 500):
            steps = []
            for _ in range(min(500, events - start)):
                envelope = BoardEventEnvelope(
                    event_id=uuid.uuid4(),
                    correlation_id=uuid.uuid4().hex,
                    board_id=BOARD,
                    type="note.created",
                    # A sticky note's worth of text and its place on the board.
                    payload={"text": "x" * payload, "x": 120, "y": 340, "color": "#ffd54f"},
                    sender=uuid.uuid4().hex,
                    occurred_at=datetime.now(UTC),
                )
                body = codec.activity_body(envelope, datetime.now(UTC))
                size += len(body) + 40  # with the sequence and epoch the step prepends
                steps.append((BOARD, envelope.correlation_id, body))
            for outcome in await store.relay_many(steps, 600):
                if isinstance(outcome, BaseException):
                    raise outcome
    finally:
        await client.aclose()
    return size


def stalled(port: int, request: str, expect: bytes) -> socket.socket:
    """A client that sends `request`, reads the response head, then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request.encode())
    sock.settimeout(10)
    head = sock.recv(1024)
    if not head.startswith(expect):
        raise RuntimeError(f"unexpected answer {head[:120]!r}")
    return sock


def sse_request(port: int) -> str:
    return (
        f"GET /sse/boards/{BOARD}?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Last-Event-ID: 0\r\n\r\n"
    )


def ws_request(port: int) -> str:
    return (
        f"GET /ws/boards/{BOARD}?token={TOKEN}&after=0 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def counter(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def settle(
    process: ServerProcess, name: str, seconds: float = 2.0, timeout: float = 120.0
) -> float:
    """The replayed-events counter once the edge went idle: the counter stood still and the
    process used (almost) no CPU for `seconds`, so every replay reached its stall. (A counter
    alone is not enough: an edge that reads the whole history first counts a replay only after
    it read it, and it may still be reading.)"""
    deadline = time.monotonic() + timeout
    port = process.port
    last, cpu, since = counter(port, name), process.cpu_seconds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now, used = counter(port, name), process.cpu_seconds()
        if now != last or used - cpu > 0.05 * seconds:
            last, cpu, since = now, used, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
    raise TimeoutError(f"{process.name} did not go idle within {timeout:.0f}s")


def measure(deployment: SuiteDeployment, clients: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    edges = (
        ("sse-gateway", sse_request, b"HTTP/1.1 200", "advanced_sse_replayed_events_total"),
        ("ingress-ws", ws_request, b"HTTP/1.1 101", "advanced_websocket_replayed_events_total"),
    )
    held: list[socket.socket] = []
    try:
        for name, request, expect, replayed in edges:
            process = deployment.processes[name]
            # A first resume, read to its end, warms caches and the connection pool: not
            # what a stalled client costs.
            warm = stalled(process.port, request(process.port), expect)
            warm.close()
            settle(process, replayed)
            before = process.rss_bytes()
            for _ in range(clients):
                held.append(stalled(process.port, request(process.port), expect))
            events = settle(process, replayed)
            after = process.rss_bytes()
            results[name] = {
                "rss_before_mib": before / 2**20,
                "rss_after_mib": after / 2**20,
                "growth_per_client_mib": (after - before) / clients / 2**20,
                "replayed_events_counted": events,
            }
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
    return results


def sources_of(commit: str, into: Path) -> str:
    """The edges' source directories at `commit`, as a PYTHONPATH."""
    archive = subprocess.run(  # our own repository, fixed arguments
        ["git", "archive", commit, *SOURCES], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return ":".join(str(into / source) for source in SOURCES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--payload", type=int, default=600, help="text bytes per event")
    parser.add_argument("--commit", help="run the edges from this commit's sources")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        deployment = SuiteDeployment(partitions=2)
        path = sources_of(args.commit, Path(scratch)) if args.commit else None
        for process in deployment.processes.values():
            process.env |= {
                "ADVANCED_REPLAY_RETENTION": str(args.events),
                "ADVANCED_SSE_SEND_TIMEOUT_SECONDS": "600",
                "ADVANCED_WEBSOCKET_WRITE_STALL_SECONDS": "600",
                "ADVANCED_WEBSOCKET_PING_INTERVAL_SECONDS": "600",
                "ADVANCED_WEBSOCKET_RESUME_RATE_LIMIT": "1000/second",
            }
            if path:
                process.env["PYTHONPATH"] = path
        # Written before the edges start: they meet it as a resume does, not as live events.
        history = asyncio.run(fill_board(deployment, args.events, args.payload))
        with deployment:  # stopping it deletes its queues and keys
            results = measure(deployment, args.clients)
    code = args.commit or "this tree"
    print(
        f"edges from {code}: {args.events} events retained on one board "
        f"({history / 2**20:.1f} MiB of event JSON), {args.clients} stalled clients per edge"
    )
    print(f"{'edge':<12} {'RSS before':>11} {'RSS after':>10} {'per client':>11} {'replayed':>9}")
    for name, row in results.items():
        print(
            f"{name:<12} {row['rss_before_mib']:>8.1f} MiB {row['rss_after_mib']:>6.1f} MiB "
            f"{row['growth_per_client_mib']:>7.2f} MiB {row['replayed_events_counted']:>9.0f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
