"""The load generator: open-loop WebSocket publishers and WebSocket/SSE subscribers.

A step runs in client processes (spawned, uvloop), so that the clients are not bounded by one
core: subscriber processes connect first and report ready, then one publisher process sends
`bench.ping` frames paced open-loop at the target rate (each frame carries its send time and
sequence; its `id` becomes the event's `correlation_id`). Subscribers match every delivery to
its `correlation_id`, so losses and duplicates are counted per connection, and latency is the
wall-clock time from the publisher's send to the subscriber's read.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import resource
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson
import psutil
import uvloop
import websockets

CONNECT_TIMEOUT = 60.0
MP = mp.get_context("spawn")


@dataclass
class StepPlan:
    """One measured step: who publishes how fast for how long, and who listens."""

    run_id: str
    publish_urls: list[str]  # one WebSocket per publisher, messages spread round-robin
    rate: float  # messages per second, all publishers together
    duration: float
    ws_urls: list[str]
    sse_urls: list[str]
    grace: float = 5.0  # how long after the last send a delivery still counts (else lost)
    per_process: int = 250  # subscriber connections per client process
    connect_concurrency: int = 64


@dataclass
class Tally:
    """One client process's subscribers: what arrived, and how late."""

    transport: str
    connections: int = 0
    connect_failures: int = 0
    cut: int = 0  # streams the server closed before the end (e.g. slow consumer)
    unique: list[int] = field(default_factory=list)  # per connection
    duplicates: int = 0
    latencies_ns: bytes = b""
    cpu_seconds: float = 0.0  # the whole process's, from the start of publishing


@dataclass
class PublishReport:
    sent: int = 0
    acked: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    seconds: float = 0.0
    max_lag_ms: float = 0.0
    connect_failures: int = 0
    cpu_start: float = 0.0


@dataclass
class ClientUsage:
    cpu_seconds: float = 0.0
    rss_bytes: int = 0


@dataclass
class StepOutcome:
    publish: PublishReport
    tallies: list[Tally]
    clients: list[ClientUsage]


def _usage(cpu_seconds: float) -> ClientUsage:
    return ClientUsage(cpu_seconds, psutil.Process().memory_info().rss)


def _cpu_now() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


class _Receiver:
    """Per-connection bookkeeping: a seen-bitmap by sequence, and the latency samples."""

    __slots__ = ("latencies", "prefix", "seen", "tally", "unique")

    def __init__(self, tally: Tally, prefix: bytes, latencies: array[int]) -> None:
        self.tally = tally
        self.prefix = prefix
        self.seen = bytearray(1024)
        self.unique = 0
        self.latencies = latencies

    def record(self, event: bytes, now_ns: int) -> None:
        data = orjson.loads(event)
        correlation = data.get("correlation_id", "").encode()
        if not correlation.startswith(self.prefix):
            return  # another step's straggler or someone else's event
        seq = int(correlation[len(self.prefix) :])
        if seq >= len(self.seen):
            self.seen.extend(bytes(max(seq + 1 - len(self.seen), len(self.seen))))
        if self.seen[seq]:
            self.tally.duplicates += 1
            return
        self.seen[seq] = 1
        self.unique += 1
        self.latencies.append(now_ns - data["payload"]["t_ns"])


class _SseStream(asyncio.Protocol):
    """One SSE subscriber as a protocol: no task, no stream reader, a callback per TCP read.

    With aiohttp (a response, its stream reader and a task per connection) the subscriber
    processes needed more CPU per delivery than the gateway itself, on the same 2 cores, and
    were what bounded the fan-out scenario. httptools (uvicorn's own parser) takes the status
    line and undoes the chunked encoding; the body is split into events here, keeping only what
    an EventSource does that we need: blocks end at a blank line, `data:` holds the event,
    `event: close` is the server cutting a slow consumer.
    """

    def __init__(self, request: bytes, receiver: _Receiver) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.receiver = receiver
        self.opened: asyncio.Future[int] = loop.create_future()  # the status code
        self.closed: asyncio.Future[None] = loop.create_future()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.now = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.now = time.time_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed before the headers"))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_headers_complete(self) -> None:
        self.opened.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        *blocks, self.buffer = (self.buffer + body).replace(b"\r\n", b"\n").split(b"\n\n")
        for block in blocks:
            kind = b"message"
            data = b""
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].lstrip(b" ")
                elif line.startswith(b"event:"):
                    kind = line[6:].strip()
            if kind == b"activity" and data:
                self.receiver.record(data, self.now)
            elif kind == b"close":
                self.receiver.tally.cut += 1
                self.close()
                return

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _get_request(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    )
    return parts.hostname or "127.0.0.1", parts.port or 80, request.encode()


async def _open_sse(url: str, receiver: _Receiver) -> _SseStream | None:
    """The stream once the server answered 200; None when it could not be opened."""
    host, port, request = _get_request(url)
    loop = asyncio.get_running_loop()
    stream = _SseStream(request, receiver)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await loop.create_connection(lambda: stream, host, port)
            status = await stream.opened
    except (OSError, TimeoutError):
        stream.close()
        return None
    if status != 200:
        stream.close()
        return None
    return stream


async def _read_ws(connection: websockets.ClientConnection, receiver: _Receiver) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in connection:
            now = time.time_ns()
            if isinstance(message, str) and message.startswith('{"kind":"event"'):
                receiver.record(message.encode(), now)


async def _close_all(
    connections: list[websockets.ClientConnection], readers: Sequence[asyncio.Future[None]]
) -> None:
    """Close every WebSocket at once, its reader still running, then stop the readers.

    A connection whose reader is gone stops reading once its queue of unread frames is full
    (websockets' `max_queue`), so it never reads the server's closing frame either: closed one
    by one, each socket that received the others' presence `leave` frames waited out its close
    timeout, and 2,000 idle sockets took longer to close than the run's whole budget.
    """

    async def close(connection: websockets.ClientConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 2)

    await asyncio.gather(*(close(c) for c in connections))
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


async def _subscribe(
    plan: StepPlan,
    ws_urls: list[str],
    sse_urls: list[str],
    hold: bool,
    ready: Any,
    go: MpEvent,
    expected: Any,
) -> list[Tally]:
    prefix = f"{plan.run_id}-".encode()
    ws_tally, sse_tally = Tally("ws"), Tally("sse")
    started_cpu = [0.0]
    ws_lat: array[int] = array("q")
    sse_lat: array[int] = array("q")
    gate = asyncio.Semaphore(plan.connect_concurrency)
    receivers: list[_Receiver] = []
    readers: list[asyncio.Future[None]] = []  # a task per WebSocket, `closed` per SSE stream
    sockets: list[websockets.ClientConnection] = []
    streams: list[_SseStream] = []

    async def open_ws(url: str) -> None:
        async with gate:
            try:
                connection = await websockets.connect(
                    url, max_size=None, ping_interval=None, open_timeout=CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                ws_tally.connect_failures += 1
                return
        ws_tally.connections += 1
        sockets.append(connection)
        receiver = _Receiver(ws_tally, prefix, ws_lat)
        receivers.append(receiver)
        readers.append(asyncio.create_task(_read_ws(connection, receiver)))

    async def open_sse(url: str) -> None:
        receiver = _Receiver(sse_tally, prefix, sse_lat)
        async with gate:
            stream = await _open_sse(url, receiver)
        if stream is None:
            sse_tally.connect_failures += 1
            return
        sse_tally.connections += 1
        streams.append(stream)
        receivers.append(receiver)
        readers.append(stream.closed)

    await asyncio.gather(*(open_ws(u) for u in ws_urls), *(open_sse(u) for u in sse_urls))
    ready.put(("ready", ws_tally.connect_failures + sse_tally.connect_failures))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    started_cpu[0] = _cpu_now()
    if not hold:
        deadline: float | None = None
        while True:
            await asyncio.sleep(0.05)
            want = expected.value
            if want < 0:
                continue
            if deadline is None:
                deadline = time.monotonic() + plan.grace
            finished = all(r.unique >= want for r in receivers)
            if finished or time.monotonic() > deadline or all(r.done() for r in readers):
                break
    for stream in streams:
        stream.close()
    await _close_all(sockets, readers)
    for receiver in receivers:
        receiver.tally.unique.append(receiver.unique)
    ws_tally.latencies_ns = ws_lat.tobytes()
    sse_tally.latencies_ns = sse_lat.tobytes()
    ws_tally.cpu_seconds = sse_tally.cpu_seconds = _cpu_now() - started_cpu[0]
    return [t for t in (ws_tally, sse_tally) if t.connections or t.connect_failures]


def _subscriber_process(
    plan: StepPlan,
    ws_urls: list[str],
    sse_urls: list[str],
    hold: bool,
    ready: Any,
    go: MpEvent,
    expected: Any,
    results: Any,
) -> None:
    _raise_open_files()
    tallies = uvloop.run(_subscribe(plan, ws_urls, sse_urls, hold, ready, go, expected))
    # CPU from the start of publishing: start-up and connecting are not the step's load.
    results.put(("subscribers", tallies, _usage(tallies[0].cpu_seconds if tallies else 0.0)))


async def _publish(plan: StepPlan, sent_signal: Any) -> PublishReport:
    report = PublishReport()
    errors: Counter[str] = Counter()
    connections: list[websockets.ClientConnection] = []
    for url in plan.publish_urls:
        try:
            connections.append(
                await websockets.connect(
                    url, max_size=None, ping_interval=None, open_timeout=CONNECT_TIMEOUT
                )
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake):
            report.connect_failures += 1
    if not connections:
        sent_signal.put(("sent", 0))
        return report

    async def read_replies(connection: websockets.ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in connection:
                if isinstance(message, str) and message.startswith('{"kind":"ack"'):
                    report.acked += 1
                elif isinstance(message, str) and message.startswith('{"kind":"error"'):
                    errors[str(orjson.loads(message).get("code"))] += 1

    readers = [asyncio.create_task(read_replies(c)) for c in connections]
    total = int(plan.rate * plan.duration)
    template = '{"type":"bench.ping","payload":{"t_ns":%d,"seq":%d},"id":"' + plan.run_id + '-%d"}'
    report.cpu_start = _cpu_now()
    start = time.perf_counter()
    sent = 0
    while sent < total:
        elapsed = time.perf_counter() - start
        due = min(total, int(elapsed * plan.rate) + 1)
        if due - sent > 1:
            report.max_lag_ms = max(report.max_lag_ms, (due - sent - 1) / plan.rate * 1000)
        while sent < due:
            frame = template % (time.time_ns(), sent, sent)
            await connections[sent % len(connections)].send(frame)
            sent += 1
        wait = sent / plan.rate - (time.perf_counter() - start)
        await asyncio.sleep(max(wait, 0))
    report.seconds = time.perf_counter() - start
    report.sent = sent
    sent_signal.put(("sent", sent))
    deadline = time.monotonic() + plan.grace
    while report.acked + sum(errors.values()) < sent and time.monotonic() < deadline:  # noqa: ASYNC110 - polling counters two reader tasks bump
        await asyncio.sleep(0.05)
    report.errors = dict(errors)
    report.refused = sum(errors.values())
    await _close_all(connections, readers)
    return report


def _publisher_process(plan: StepPlan, results: Any) -> None:
    report = uvloop.run(_publish(plan, results))
    results.put(("publisher", report, _usage(_cpu_now() - report.cpu_start)))


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _chunks(
    ws_urls: list[str], sse_urls: list[str], size: int
) -> list[tuple[list[str], list[str]]]:
    tagged = [("ws", u) for u in ws_urls] + [("sse", u) for u in sse_urls]
    count = max(1, -(-len(tagged) // size))
    parts: list[tuple[list[str], list[str]]] = [([], []) for _ in range(count)]
    for index, (kind, url) in enumerate(tagged):
        parts[index % count][0 if kind == "ws" else 1].append(url)
    return parts


class Subscribers:
    """Subscriber processes for one step; `hold` keeps idle connections open until `release`."""

    def __init__(self, plan: StepPlan, *, hold: bool = False) -> None:
        self.plan = plan
        self.ready = MP.Queue()
        self.results = MP.Queue()
        self.go = MP.Event()
        self.expected = MP.Value("q", -1)
        self.processes = [
            MP.Process(
                target=_subscriber_process,
                args=(plan, ws, sse, hold, self.ready, self.go, self.expected, self.results),
                daemon=True,
            )
            for ws, sse in _chunks(plan.ws_urls, plan.sse_urls, plan.per_process)
        ]

    def connect(self, timeout: float = 300.0) -> int:
        """Start the processes and wait until each has opened its connections."""
        for process in self.processes:
            process.start()
        failures = 0
        for _ in self.processes:
            _, failed = self.ready.get(timeout=timeout)
            failures += failed
        return int(failures)

    def release(self) -> None:
        self.go.set()

    def collect(self, timeout: float = 120.0) -> tuple[list[Tally], list[ClientUsage]]:
        tallies: list[Tally] = []
        usage: list[ClientUsage] = []
        for _ in self.processes:
            _, part, used = self.results.get(timeout=timeout)
            tallies.extend(part)
            usage.append(used)
        for process in self.processes:
            process.join(10)
        return tallies, usage

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


Sample = dict[str, float]


def run_step(plan: StepPlan, sample: Callable[[], Sample]) -> tuple[StepOutcome, Sample, Sample]:
    """Connect the subscribers, publish open-loop, wait for deliveries (or the grace), tally.

    `sample` is called once the subscribers are connected and once the step is over, so that
    what it reads (CPU seconds) covers publishing and delivery but not connecting.
    """
    subscribers = Subscribers(plan)
    publisher: mp.process.BaseProcess | None = None
    try:
        subscribers.connect()
        before = sample()
        subscribers.release()
        results = MP.Queue()
        publisher = MP.Process(target=_publisher_process, args=(plan, results), daemon=True)
        publisher.start()
        timeout = plan.duration + plan.grace + 120
        _, sent = results.get(timeout=timeout)
        subscribers.expected.value = sent
        _, report, publisher_usage = results.get(timeout=timeout)
        tallies, usage = subscribers.collect(timeout)
        after = sample()
        publisher.join(10)
        return StepOutcome(report, tallies, [publisher_usage, *usage]), before, after
    finally:
        subscribers.kill()
        if publisher is not None and publisher.is_alive():
            publisher.kill()


def latencies(tallies: list[Tally], transport: str | None = None) -> array[int]:
    merged: array[int] = array("q")
    for tally in tallies:
        if transport is None or tally.transport == transport:
            merged.frombytes(tally.latencies_ns)
    return merged
