"""The fault tests' machinery: a ledger of what was sent, acked and seen; recording
subscribers (WebSocket and SSE); paced senders that resend on `unavailable`; a private
Redis; a TCP proxy that cuts, blackholes or refuses; and metrics scraping.

The ledger's verdict is the issue's arithmetic: for each subscriber, `lost` = acked events of
its boards it never saw, `duplicated` = extra copies it saw, `unexpected` = events it saw that
were never acked, plus sequence faults (a gap or a step back within a board) and order faults
(an event seen after one its sender sent later; events the sender had to resend after an
`unavailable` answer are left out of that check, since the client itself reordered them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
import websockets
from conftest import TOKEN
from realtime_probe.sse import SseParser
from support.brokers import Brokers, Names
from support.processes import Service, Suite, free_port

# --------------------------------------------------------------------------- ledger


@dataclass
class Seen:
    correlation_id: str
    board_id: str
    sequence: int
    index: int | None  # the sender's running number, from the payload


@dataclass
class Verdict:
    subscriber: str
    expected: int
    seen: int
    lost: int
    duplicated: int
    unexpected: int
    sequence_faults: list[str]
    order_faults: list[str]

    @property
    def clean(self) -> bool:
        return (
            not (self.lost or self.duplicated or self.unexpected or self.sequence_faults)
            and not self.order_faults
        )

    def line(self) -> str:
        return (
            f"{self.subscriber:<28} expected={self.expected:>6} seen={self.seen:>6} "
            f"lost={self.lost} duplicated={self.duplicated} unexpected={self.unexpected} "
            f"sequence_faults={len(self.sequence_faults)} order_faults={len(self.order_faults)}"
        )


@dataclass
class Ledger:
    sent: dict[str, str] = field(default_factory=dict)  # correlation id -> board
    acked: dict[str, str] = field(default_factory=dict)
    unavailable: int = 0
    # Events answered `unavailable` at least once: the sender resent them after later ones,
    # so they are left out of the send-order check (their sequence order is still checked).
    resent: set[str] = field(default_factory=set)
    refused: list[dict[str, Any]] = field(default_factory=list)
    scopes: dict[str, frozenset[str] | None] = field(default_factory=dict)
    seen: dict[str, list[Seen]] = field(default_factory=dict)
    closed: dict[str, str] = field(default_factory=dict)  # subscriber -> why its stream ended

    def subscriber(self, name: str, boards: frozenset[str] | None) -> list[Seen]:
        self.scopes[name] = boards
        return self.seen.setdefault(name, [])

    def record(self, name: str, event: dict[str, Any]) -> None:
        payload = event.get("payload") or {}
        self.seen[name].append(
            Seen(event["correlation_id"], event["board_id"], event["sequence"], payload.get("i"))
        )

    def count_for(self, name: str) -> int:
        return len(self.seen.get(name, ()))

    def expected_for(self, name: str) -> set[str]:
        scope = self.scopes[name]
        return {cid for cid, b in self.acked.items() if scope is None or b in scope}

    def complete(self) -> bool:
        return all(
            self.expected_for(name) <= {s.correlation_id for s in seen}
            for name, seen in self.seen.items()
        )

    def verdicts(self, *, check_order: bool = True, from_start: bool = True) -> list[Verdict]:
        results = []
        for name, seen in self.seen.items():
            expected = self.expected_for(name)
            counts = Counter(s.correlation_id for s in seen)
            sequence_faults: list[str] = []
            order_faults: list[str] = []
            last: dict[str, Seen] = {}
            last_in_order: dict[str, Seen] = {}  # the last one sent once only
            for s in seen:
                before = last.get(s.board_id)
                want = (before.sequence + 1) if before else (1 if from_start else s.sequence)
                if s.sequence != want:
                    sequence_faults.append(f"{s.board_id}: {s.sequence} after {want - 1}")
                last[s.board_id] = s
                if not check_order or s.index is None or s.correlation_id in self.resent:
                    continue
                prior = last_in_order.get(s.board_id)
                if prior is not None and prior.index is not None and s.index < prior.index:
                    order_faults.append(f"{s.board_id}: #{s.index} after #{prior.index}")
                last_in_order[s.board_id] = s
            results.append(
                Verdict(
                    subscriber=name,
                    expected=len(expected),
                    seen=len(seen),
                    lost=len(expected - counts.keys()),
                    duplicated=sum(n - 1 for n in counts.values() if n > 1),
                    unexpected=len(counts.keys() - self.acked.keys()),
                    sequence_faults=sequence_faults[:20],
                    order_faults=order_faults[:20],
                )
            )
        return results

    async def wait_complete(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.complete() and time.monotonic() < deadline:
            await asyncio.sleep(0.25)


def report(title: str, ledger: Ledger, verdicts: list[Verdict], **figures: object) -> str:
    lines = [
        f"== {title}: sent={len(ledger.sent)} acked={len(ledger.acked)} "
        f"unavailable_answers={ledger.unavailable} resent_events={len(ledger.resent)}"
    ]
    lines += [f"   {k}={v}" for k, v in figures.items()]
    lines += ["   " + v.line() for v in verdicts]
    for v in verdicts:
        for fault in v.sequence_faults[:5] + v.order_faults[:5]:
            lines.append(f"   ! {v.subscriber}: {fault}")
    text = "\n".join(lines)
    print("\n" + text)
    artifacts = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with (artifacts / "chaos-report.txt").open("a") as out:
        out.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + text + "\n")
    return text


# ---------------------------------------------------------------------- subscribers


async def ws_subscriber(
    ledger: Ledger, name: str, url: str, board: str, ready: asyncio.Event | None = None
) -> None:
    """Records every `event` frame of one board until cancelled; a close is recorded."""
    ledger.subscriber(name, frozenset({board}))
    try:
        async with websockets.connect(url, max_size=None, open_timeout=30) as connection:
            if ready is not None:
                ready.set()
            async for raw in connection:
                frame = orjson.loads(raw)
                if frame["kind"] == "event":
                    ledger.record(name, frame)
    except websockets.ConnectionClosed as exc:
        ledger.closed[name] = f"closed {exc.rcvd.code if exc.rcvd else None}"
        raise


async def sse_events(
    url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, str | None, str]]:
    """(event, id, data) of an SSE stream, until it ends."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        async with client.stream("GET", url, headers=headers or {}) as response:
            if response.status_code != 200:
                raise AssertionError(f"{url}: {response.status_code} {await response.aread()!r}")
            async for event in SseParser().events(response.aiter_lines()):
                if event.data_lines:
                    yield event.event, event.id, event.data


async def sse_subscriber(
    ledger: Ledger,
    name: str,
    url: str,
    boards: frozenset[str] | None,
    ready: asyncio.Event | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    ledger.subscriber(name, boards)
    if ready is not None:
        ready.set()
    async for kind, _ident, data in sse_events(url, headers):
        if kind == "activity":
            ledger.record(name, orjson.loads(data))
        elif kind in ("close", "reset"):
            ledger.closed[name] = f"{kind}: {data}"
    ledger.closed.setdefault(name, "stream ended")


# -------------------------------------------------------------------------- senders


class Sender:
    """One WebSocket on a board that sends numbered events and resends the same id after
    `unavailable` until it is acked. It reads every frame, so it is never a slow consumer.

    Sending is closed-loop: at most `window` events await their ack, so a machine busy with
    other work slows the test down instead of piling up publishes until they time out.
    """

    def __init__(
        self,
        ledger: Ledger,
        url: str,
        board: str,
        *,
        pad: int = 0,
        failover_url: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.url = url
        self.board = board
        self.pad = "x" * pad
        self.failover_url = failover_url
        self.failovers = 0
        self._pending: dict[str, bytes] = {}
        self._acked = asyncio.Event()
        self._connection: websockets.ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._resends: set[asyncio.Task[None]] = set()
        self._switching = asyncio.Lock()
        self.name = f"ws-sender:{board}"
        self._recording = True

    async def __aenter__(self) -> Sender:
        self._connection = await websockets.connect(self.url, max_size=None, open_timeout=30)
        self.ledger.subscriber(self.name, frozenset({self.board}))
        self._reader = asyncio.create_task(self._read())
        self._readers.append(self._reader)
        return self

    async def _fail_over(self, dead: websockets.ClientConnection) -> None:
        """The ingress went away: connect to the other replica and resend every event not
        acked yet, with the same ids (what a client does; the relay makes it exactly once).
        Its echo is no longer a subscriber that stayed connected: it is not checked."""
        async with self._switching:
            if self._connection is not dead or self.failover_url is None:
                return
            self.failovers += 1
            self.url = self.failover_url
            self._recording = False
            self.ledger.seen.pop(self.name, None)
            self.ledger.scopes.pop(self.name, None)
            self._connection = await websockets.connect(self.url, max_size=None, open_timeout=30)
            self._reader = asyncio.create_task(self._read())
            self._readers.append(self._reader)
            for body in list(self._pending.values()):
                await self._connection.send(body.decode())

    async def __aexit__(self, *exc: object) -> None:
        for task in [*self._readers, *self._resends]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                    await task
        if self._connection is not None:
            await self._connection.close()

    def frame(self, index: int) -> tuple[str, bytes]:
        correlation_id = f"{self.board}-{index}"
        body = {
            "type": "chaos.tick",
            "payload": {"i": index, "pad": self.pad},
            "id": correlation_id,
        }
        return correlation_id, orjson.dumps(body)

    async def send(self, index: int) -> str:
        correlation_id, body = self.frame(index)
        self.ledger.sent[correlation_id] = self.board
        self._pending[correlation_id] = body
        await self._write(body)
        return correlation_id

    async def _write(self, body: bytes) -> None:
        while True:
            connection = self._connection
            assert connection is not None
            try:
                await connection.send(body.decode())
                return
            except websockets.ConnectionClosed:
                if self.failover_url is None:
                    raise
                await self._fail_over(connection)

    async def send_many(self, count: int, *, rate: float, window: int = 32, start: int = 0) -> None:
        """`count` events at no more than `rate` per second and `window` unacked."""
        began = time.monotonic()
        for n in range(count):
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(self._pending) >= window:
                self._acked.clear()
                await self._acked.wait()
            await self.send(start + n)

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not self._pending, f"{self.board}: {len(self._pending)} events never acked"

    async def _resend(self, correlation_id: str) -> None:
        await asyncio.sleep(0.3)
        body = self._pending.get(correlation_id)
        if body is not None and self._connection is not None:
            await self._write(body)

    async def _read(self) -> None:
        connection = self._connection
        assert connection is not None
        try:
            await self._read_frames(connection)
        except websockets.ConnectionClosed as exc:
            if self.failover_url is None:
                self.ledger.closed[self.name] = f"closed {exc.rcvd.code if exc.rcvd else None}"
                raise
        if self.failover_url is not None:
            await self._fail_over(connection)

    async def _read_frames(self, connection: websockets.ClientConnection) -> None:
        async for raw in connection:
            frame = orjson.loads(raw)
            kind = frame["kind"]
            if kind == "event":
                if self._recording:
                    self.ledger.record(self.name, frame)
            elif kind == "ack":
                self.ledger.acked[frame["correlation_id"]] = self.board
                self._pending.pop(frame["correlation_id"], None)
                self._acked.set()
            elif kind == "error" and frame.get("code") == "unavailable":
                self.ledger.unavailable += 1
                self.ledger.resent.add(frame["correlation_id"])
                task = asyncio.create_task(self._resend(frame["correlation_id"]))
                self._resends.add(task)
                task.add_done_callback(self._resends.discard)
            elif kind != "presence":  # the board's other sockets coming and going
                self.ledger.refused.append(frame)


# ------------------------------------------------------------------- process faults


async def start_all(services: list[Service], timeout: float = 90) -> None:
    """Wait for services started with `wait=False` (they boot side by side). In a thread:
    the test's event loop keeps serving (a proxy the services connect through, say)."""

    def wait() -> None:
        for service in services:
            service.wait_ready(timeout)

    await asyncio.to_thread(wait)


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> list[BaseException]:
    """Cancel the subscribers; return the errors of any that had already failed."""
    failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [e for e in failed if e is not None]


async def relay_worker_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`python -m relay_worker dlq <args>` with `env`: its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay_worker",
        "dlq",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, output.decode()


def kill9(service: Service) -> int | None:
    service.kill()
    assert service.process is not None
    return service.process.returncode


def scrape(service: Service) -> dict[str, float]:
    """The service's Prometheus samples, `name{labels}` -> value."""
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return samples.get(f"{name}{{{wanted}}}" if labels else name, 0.0)


async def readiness(service: Service) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            return (await http.get(f"{service.url}/readyz")).status_code
        except httpx.HTTPError:
            return 0


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -------------------------------------------------------------------- private Redis


class PrivateRedis:
    """A redis-server of the test's own, on its own port, that the test may kill and
    restart. Append-only file with fsync on every write: the guarantee through a Redis
    restart needs persistence (docs/delivery.md)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: the Redis restart test needs it"
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.process = self._spawn(binary, log)
        deadline = time.monotonic() + 20
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return self
                time.sleep(0.05)
        finally:
            client.close()
        raise TimeoutError("the private redis-server did not answer")

    def _spawn(self, binary: str, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """kill -9: whatever it acknowledged is in the fsynced append-only file."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def listen(
    ledger: Ledger, ingress: Service | list[Service], gateway: Service, boards: list[str]
) -> list[asyncio.Task[None]]:
    """A WebSocket and an SSE listener per board, and one on /sse/activity. Given several
    ingress replicas, board i's WebSocket listener goes to replica i modulo their number."""
    replicas = ingress if isinstance(ingress, list) else [ingress]
    tasks = [
        asyncio.create_task(
            ws_subscriber(ledger, f"ws:{b}", ws_url(replicas[i % len(replicas)], b), b)
        )
        for i, b in enumerate(boards)
    ]
    tasks += [
        asyncio.create_task(
            sse_subscriber(ledger, f"sse:{b}", sse_board_url(gateway, b), frozenset({b}))
        )
        for b in boards
    ]
    tasks.append(
        asyncio.create_task(sse_subscriber(ledger, "sse:activity", sse_activity_url(gateway), None))
    )
    return tasks


def close_with_rabbitmqctl(ports: list[int], rabbit_port: int = 5672) -> int:
    """Close our own connections from the broker's side (connection.close, 320), found by
    the local ports of the proxy's upstream sockets; returns how many were closed."""
    binary = shutil.which("rabbitmqctl")
    assert binary, "rabbitmqctl is not installed"
    listing = subprocess.run(
        [binary, "list_connections", "pid", "name", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    wanted = {f"127.0.0.1:{port} -> 127.0.0.1:{rabbit_port}" for port in ports}
    closed = 0
    for line in listing.splitlines():
        pid, _, name = line.partition("\t")
        if name.strip() in wanted:
            result = subprocess.run(
                [binary, "close_connection", pid.strip(), "chaos test: broker-side close"],
                capture_output=True,
                timeout=60,
            )
            closed += result.returncode == 0
    return closed


class EdgeSuite:
    """The processes of a module's shared suite, by kind."""

    def __init__(self, suite: Suite, names: Names, brokers: Brokers) -> None:
        self.suite = suite
        self.names = names
        self.brokers = brokers

    def service(self, kind: str) -> Service:
        return next(s for s in self.suite.services if s.kind == kind)

    @property
    def worker(self) -> Service:
        return self.service("worker")

    @property
    def ingress(self) -> Service:
        return self.service("ingress")

    @property
    def gateway(self) -> Service:
        return self.service("gateway")

    @property
    def env(self) -> dict[str, str]:
        return dict(self.suite.env)


def ws_url(service: Service, board: str, **query: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{service.ws_url}/ws/boards/{board}?token={TOKEN}{extra}"


def sse_board_url(service: Service, board: str) -> str:
    return f"{service.url}/sse/boards/{board}?token={TOKEN}"


def sse_activity_url(service: Service) -> str:
    return f"{service.url}/sse/activity?token={TOKEN}"
