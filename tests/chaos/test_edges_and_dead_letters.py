"""The edges under stress: resuming after missed events, resuming too late, stalled clients.

One worker, ingress and gateway shared by the module (see `edge_suite`): retention 300
events, send queues of 128, an SSE send timeout of 2 s, 2 retries 1.5 s apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
import zlib
from typing import Any

import aio_pika
import orjson
import psutil
import pytest
import redis.asyncio as redis
import websockets
from chaos.harness import (
    EdgeSuite,
    Ledger,
    Sender,
    metric,
    relay_worker_cli,
    report,
    scrape,
    sse_activity_url,
    sse_board_url,
    sse_events,
    sse_subscriber,
    stop_tasks,
    wait_for,
    ws_url,
)
from conftest import TOKEN
from envelope.topology import RedisKeys
from support.clients import stalled_sse

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

STALL_EVENTS_AT_MOST = 800
RETENTION = 300  # ADVANCED_REPLAY_RETENTION of the edge suite
TRIMMED_TOTAL = 500


async def collect_sse(
    url: str, want: int, headers: dict[str, str] | None = None, timeout: float = 60
) -> list[tuple[str, str | None, Any]]:
    """The first `want` activity events (and any reset before them) of an SSE stream."""
    got: list[tuple[str, str | None, Any]] = []

    async def read() -> None:
        async for kind, ident, data in sse_events(url, headers):
            got.append((kind, ident, orjson.loads(data)))
            if sum(k == "activity" for k, _, _ in got) >= want:
                return

    await asyncio.wait_for(read(), timeout)
    return got


async def collect_ws(url: str, want: int, first: dict[str, Any] | None = None) -> list[Any]:
    frames: list[Any] = []
    async with websockets.connect(url, max_size=None) as connection:
        if first is not None:
            await connection.send(orjson.dumps(first).decode())
        async with asyncio.timeout(60):
            while sum(f["kind"] == "event" for f in frames) < want:
                frames.append(orjson.loads(await connection.recv()))
    return frames


def sequences(items: list[Any]) -> list[int]:
    return [item["sequence"] for item in items]


@pytest.mark.timeout(150)
async def test_resume_after_missing_100_events_on_every_route(edge_suite: EdgeSuite) -> None:
    ingress, gateway = edge_suite.ingress, edge_suite.gateway
    board = "resume-100"
    ledger = Ledger()
    async with Sender(ledger, ws_url(ingress, board), board) as sender:
        # Readers that see the first 20 and go away, keeping their cursors.
        first_board = asyncio.create_task(collect_sse(sse_board_url(gateway, board), 20))
        first_all = asyncio.create_task(collect_sse(sse_activity_url(gateway), 20))
        await asyncio.sleep(1.0)
        await sender.send_many(20, rate=50)
        board_seen, all_seen = await first_board, await first_all
        board_cursor = board_seen[-1][1]
        activity_cursor = all_seen[-1][1]
        # A board cursor is `<sequence>.<epoch>`.
        assert board_cursor and board_cursor.split(".")[0] == "20"
        assert activity_cursor and "-" in activity_cursor

        # 100 events happen while they are away.
        await sender.send_many(100, rate=50, start=20)
        await sender.wait_acked(60)

        resumed = [
            asyncio.create_task(
                collect_sse(
                    sse_board_url(gateway, board), 110, headers={"Last-Event-ID": board_cursor}
                )
            ),
            asyncio.create_task(
                collect_sse(f"{sse_activity_url(gateway)}&last_event_id={activity_cursor}", 110)
            ),
            asyncio.create_task(collect_ws(ws_url(ingress, board, after="20"), 110)),
            asyncio.create_task(
                collect_ws(ws_url(ingress, board), 110, first={"kind": "resume", "after": 20})
            ),
        ]

        async def replayed() -> bool:
            return ledger.count_for(f"ws-sender:{board}") >= 120

        await wait_for(replayed, 30, "the first 120 events")
        await asyncio.sleep(1.0)  # the resumed readers are at the seam, now live
        await sender.send_many(10, rate=50, start=120)
        sse_board, sse_all, ws_after, ws_frame = await asyncio.gather(*resumed)

    routes = {
        "sse board, Last-Event-ID header": [e for k, _, e in sse_board if k == "activity"],
        "sse activity, ?last_event_id=": [e for k, _, e in sse_all if k == "activity"],
        "ws ?after=20": [f for f in ws_after if f["kind"] == "event"],
        "ws resume frame": [f for f in ws_frame if f["kind"] == "event"],
    }
    print()
    for route, events in routes.items():
        span = f"{events[0]['sequence']}..{events[-1]['sequence']}"
        print(f"{route}: {len(events)} events, sequences {span}")
        assert sequences(events) == list(range(21, 131)), route
        assert [e["payload"]["i"] for e in events] == list(range(20, 130)), route
    resets = [k for k, _, _ in sse_board + sse_all if k == "reset"]
    resets += [f for f in ws_after + ws_frame if f["kind"] == "reset"]
    assert not resets, resets


@pytest.mark.timeout(150)
async def test_resume_with_an_expired_cursor_gets_a_reset(edge_suite: EdgeSuite) -> None:
    ingress, gateway = edge_suite.ingress, edge_suite.gateway
    board = "resume-expired"
    ledger = Ledger()
    first = asyncio.create_task(collect_sse(sse_activity_url(gateway), 5))
    await asyncio.sleep(1.0)
    async with Sender(ledger, ws_url(ingress, board), board) as sender:
        await sender.send_many(5, rate=50)
        activity_cursor = (await first)[-1][1]
        assert activity_cursor is not None
        # Far more than the 300 retained: the early events are trimmed from the streams.
        await sender.send_many(TRIMMED_TOTAL - 5, rate=100, start=5)
        await sender.wait_acked(90)

        async def all_relayed() -> bool:
            return ledger.count_for(f"ws-sender:{board}") >= TRIMMED_TOTAL

        await wait_for(all_relayed, 60, "every event relayed")

    sse_board = await collect_sse(sse_board_url(gateway, board), 1, headers={"Last-Event-ID": "5"})
    sse_all = await collect_sse(f"{sse_activity_url(gateway)}&last_event_id={activity_cursor}", 1)
    ws_frames = await collect_ws(ws_url(ingress, board, after="5"), 1)

    kind, _, reset = sse_board[0]
    assert kind == "reset", sse_board[:2]
    assert reset["reason"] == "cursor_expired" and reset["board_id"] == board
    oldest = int(reset["oldest_cursor"])
    assert 6 < oldest <= TRIMMED_TOTAL - RETENTION + 1, reset
    assert sse_board[1][2]["sequence"] == oldest  # then everything still retained, in order

    kind, _, reset = sse_all[0]
    assert kind == "reset" and reset["reason"] == "cursor_expired", sse_all[:2]

    assert ws_frames[0]["kind"] == "reset" and ws_frames[0]["reason"] == "cursor_expired"
    assert ws_frames[1]["kind"] == "event" and ws_frames[1]["sequence"] == oldest
    print(f"\nexpired cursor 5 -> reset, oldest retained sequence {oldest}")


async def drain_socket(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read what the server left, until it closed the connection (True) or `timeout`."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
    except TimeoutError:
        return bytes(data), False
    except ConnectionResetError:
        return bytes(data), True
    return bytes(data), True


@pytest.mark.timeout(200)
async def test_a_stalled_client_is_cut_off_while_others_keep_their_latency(
    edge_suite: EdgeSuite,
) -> None:
    ingress, gateway = edge_suite.ingress, edge_suite.gateway
    board = "stall"
    ledger = Ledger()
    received_at: dict[str, list[float]] = {}
    sent_at: dict[str, float] = {}

    async def timed(name: str, url: str, kind: str) -> None:
        stamps = received_at.setdefault(name, [])
        ledger.subscriber(name, frozenset({board}))
        if kind == "sse":
            async for event, _, data in sse_events(url):
                if event == "activity":
                    ledger.record(name, orjson.loads(data))
                    stamps.append(time.monotonic())
        else:
            async with websockets.connect(url, max_size=None) as connection:
                async for raw in connection:
                    frame = orjson.loads(raw)
                    if frame["kind"] == "event":
                        ledger.record(name, frame)
                        stamps.append(time.monotonic())

    def latencies(name: str, indices: range) -> list[float]:
        seen = {s.index: t for s, t in zip(ledger.seen[name], received_at[name], strict=True)}
        return [seen[i] - sent_at[f"{board}-{i}"] for i in indices if i in seen]

    fast = [
        asyncio.create_task(timed("sse:fast", sse_board_url(gateway, board), "sse")),
        asyncio.create_task(timed("ws:fast", ws_url(ingress, board), "ws")),
    ]
    gateway_process = psutil.Process(gateway.process.pid)  # type: ignore[union-attr]
    rss_before = gateway_process.memory_info().rss
    async with Sender(ledger, ws_url(ingress, board), board, pad=15000) as sender:
        await asyncio.sleep(1.0)

        async def send(count: int, start: int) -> None:
            for n in range(start, start + count):
                sent_at[f"{board}-{n}"] = time.monotonic()
                await sender.send(n)
                await asyncio.sleep(1 / 40)
                while sender.outstanding >= 32:
                    await asyncio.sleep(0.01)

        # A baseline with nobody stalled.
        await send(80, 0)
        await sender.wait_acked(60)
        await asyncio.sleep(1.0)

        # Two clients stop reading: an SSE stream and a WebSocket (the websockets library
        # stops reading the socket once `max_queue` frames wait unread).
        stalled_stream = await stalled_sse(gateway.port, board, TOKEN)
        stalled_ws = await websockets.connect(
            ws_url(ingress, board), max_size=None, max_queue=1, ping_interval=None
        )
        cuts = {"sse": 0.0, "ws": 0.0}

        async def both_cut() -> bool:
            cuts["sse"] = metric(scrape(gateway), "advanced_sse_slow_consumers_total")
            cuts["ws"] = metric(scrape(ingress), "advanced_websocket_closes_total", code="4408")
            return cuts["sse"] >= 1 and cuts["ws"] >= 1

        # Events until the server has cut both (their buffers fill within a few hundred
        # 15 KB events), then a few more: the cut clients resume within the retention.
        total = 80
        while total < 80 + STALL_EVENTS_AT_MOST and not await both_cut():
            await send(20, total)
            total += 20
        await send(20, total)
        total += 20
        await sender.wait_acked(90)
        try:
            await wait_for(both_cut, 30, "the server to cut both stalled clients", every=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: slow-consumer counts {cuts}") from None
        await ledger.wait_complete(60)
        rss_after = gateway_process.memory_info().rss

        # The stalled SSE client reads again: what was buffered, then the end of the stream.
        leftover, ended = await drain_socket(stalled_stream, 15)
        stalled_stream.close()
        # The WebSocket likewise ends (close 4408, or the transport aborted).
        ws_received = 0
        ws_close: str = "not closed"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                try:
                    async for raw in stalled_ws:
                        ws_received += orjson.loads(raw)["kind"] == "event"
                except websockets.ConnectionClosed as exc:
                    ws_close = f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}"
                else:
                    ws_close = f"closed {stalled_ws.close_code}"
        await stalled_ws.close()

        # And it can resume from the last event it did get.
        ids = [
            line[3:].strip()
            for line in leftover.decode(errors="replace").splitlines()
            if line.startswith("id:")
        ]
        last_id = ids[-2] if len(ids) >= 2 else "0"  # the last one may be cut mid-event
        print(f"\nstalled SSE: {len(leftover)} bytes, ended={ended}, ids {ids[:2]}..{ids[-2:]}")
        print(f"stalled WS: {ws_received} events, {ws_close}; cuts {cuts}")
        last_sequence = int(last_id.split(".")[0])  # a board cursor is `<sequence>.<epoch>`
        rest = await collect_sse(
            sse_board_url(gateway, board),
            total - last_sequence,
            headers={"Last-Event-ID": last_id},
        )

    failed = await stop_tasks(fast)
    before = {n: sorted(latencies(n, range(10, 80))) for n in ("sse:fast", "ws:fast")}
    during = {n: sorted(latencies(n, range(80, total))) for n in ("sse:fast", "ws:fast")}

    def p95(values: list[float]) -> float:
        return statistics.quantiles(values, n=20)[-1]

    verdicts = ledger.verdicts()
    report(
        "stalled clients (SSE and WebSocket) on a board with 15 KB events",
        ledger,
        verdicts,
        p95_latency_before_ms={n: round(p95(v) * 1000) for n, v in before.items()},
        p95_latency_while_stalled_ms={n: round(p95(v) * 1000) for n, v in during.items()},
        stalled_sse_bytes_then_end=(len(leftover), ended),
        stalled_ws_events_then=(ws_received, ws_close),
        gateway_rss_growth_mb=round((rss_after - rss_before) / 2**20, 1),
        resumed_from=last_id,
    )
    assert not failed, failed
    for verdict in verdicts:
        assert verdict.clean and verdict.seen == verdict.expected, verdict.line()
    for name in before:
        assert p95(during[name]) <= max(4 * p95(before[name]), 1.0), (name, before, during)
    assert ended, "the stalled SSE stream was never closed by the server"
    assert leftover.count(b"\nid: ") < total - 80, "the stalled SSE client got everything"
    assert ws_close != "not closed" and ws_received < total, (ws_received, ws_close)
    assert not [k for k, _, _ in rest if k == "reset"], "the cut client could not resume"
    resumed = [e for k, _, e in rest if k == "activity"]
    assert sequences(resumed) == list(range(last_sequence + 1, total + 1))
    assert rss_after - rss_before < 100 * 2**20


def boards_in_one_partition(prefix: str, count: int, partitions: int = 4) -> list[str]:
    """Board ids that share one partition queue (crc32 % partitions, as the ingress routes)."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        board = f"{prefix}-{n}"
        if zlib.crc32(board.encode()) % partitions == 0:
            found.append(board)
        n += 1
    return found


async def dlq_depth(edge_suite: EdgeSuite) -> int:
    connection = await aio_pika.connect(edge_suite.brokers.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            edge_suite.env["ADVANCED_RABBITMQ_DLQ_QUEUE"], passive=True
        )
        return queue.declaration_result.message_count or 0


@pytest.mark.timeout(150)
async def test_poison_and_unknown_versions_go_to_the_dlq_and_replay_redrives(
    edge_suite: EdgeSuite,
) -> None:
    ingress, gateway, worker, env = (
        edge_suite.ingress,
        edge_suite.gateway,
        edge_suite.worker,
        edge_suite.env,
    )
    max_retries = int(env["ADVANCED_RABBITMQ_MAX_RETRIES"])
    poison, healthy = boards_in_one_partition("dlq", 2)
    # A board whose sequence key holds garbage: every relay step of it fails in Redis.
    store = redis.Redis.from_url(edge_suite.brokers.redis_url)
    sequence_key = RedisKeys(env["ADVANCED_REDIS_KEY_PREFIX"], "").sequence(poison)
    await store.set(sequence_key, "not-a-number")

    ledger = Ledger()
    listeners = [
        asyncio.create_task(
            sse_subscriber(ledger, f"sse:{b}", sse_board_url(gateway, b), frozenset({b}))
        )
        for b in (poison, healthy)
    ]
    try:
        await asyncio.sleep(1.0)
        async with (
            Sender(ledger, ws_url(ingress, poison), poison) as poisoned,
            Sender(ledger, ws_url(ingress, healthy), healthy) as fine,
        ):
            await poisoned.send(1)
            await poisoned.wait_acked(30)
            await fine.send_many(10, rate=50)
            await fine.wait_acked(30)

            # Straight to the exchange, as only a broken or future producer would publish.
            connection = await aio_pika.connect(edge_suite.brokers.rabbitmq_url)
            async with connection:
                channel = await connection.channel()
                exchange = await channel.get_exchange(env["ADVANCED_RABBITMQ_EXCHANGE"])
                future = {
                    "schema_version": "2.0",
                    "event_id": "00000000-0000-4000-8000-000000000002",
                    "correlation_id": "from-the-future",
                    "board_id": healthy,
                }
                for message_id, body in (
                    ("future-envelope", orjson.dumps(future)),
                    ("garbage-body", b"{not json"),
                ):
                    await exchange.publish(
                        aio_pika.Message(body, message_id=message_id, delivery_mode=2),
                        routing_key="board.0",
                        mandatory=True,
                    )

            # The poison goes round the retry ladder (MAX_RETRIES x RETRY_DELAY_MS) while the
            # healthy board behind it in the same partition flows.
            healthy_done_at: float | None = None
            poison_parked_at: float | None = None
            started = time.monotonic()
            while time.monotonic() - started < 60 and (
                healthy_done_at is None or poison_parked_at is None
            ):
                if healthy_done_at is None and ledger.count_for(f"sse:{healthy}") >= 10:
                    healthy_done_at = time.monotonic()
                if poison_parked_at is None and await dlq_depth(edge_suite) >= 3:
                    poison_parked_at = time.monotonic()
                await asyncio.sleep(0.1)
            assert healthy_done_at is not None and poison_parked_at is not None
            assert healthy_done_at < poison_parked_at, "the poison message held up its partition"

            code, listing = await relay_worker_cli(env, "list")
            assert code == 0, listing
            letters = [orjson.loads(line) for line in listing.splitlines() if line.startswith("{")]
            by_id = {letter["id"]: letter for letter in letters}
            poisoned_letter = next(letter for letter in letters if poison in letter["body"])
            assert set(by_id) == {"future-envelope", "garbage-body", poisoned_letter["id"]}
            assert poisoned_letter["attempts"] == max_retries + 1
            assert "does not hold a sequence" in poisoned_letter["reason"]
            assert by_id["future-envelope"]["attempts"] == 1
            assert "schema_version" in by_id["future-envelope"]["reason"]
            assert by_id["garbage-body"]["attempts"] == 1
            assert "not JSON" in by_id["garbage-body"]["reason"]

            async def dlq_metric_moved() -> bool:
                depth = metric(
                    scrape(worker),
                    "advanced_worker_queue_depth",
                    queue=env["ADVANCED_RABBITMQ_DLQ_QUEUE"],
                )
                return depth == 3

            await wait_for(dlq_metric_moved, 20, "the DLQ depth metric to show 3")
            samples = scrape(worker)
            assert metric(samples, "advanced_worker_events_total", outcome="retried") >= max_retries

            # The operator fixes the cause and re-drives that one message.
            await store.delete(sequence_key)
            code, output = await relay_worker_cli(env, "replay", "--id", poisoned_letter["id"])
            assert code == 0 and "replayed 1" in output, output

            async def redriven() -> bool:
                return ledger.count_for(f"sse:{poison}") >= 1

            await wait_for(redriven, 30, "the re-driven message on its board")
            _code, listing = await relay_worker_cli(env, "list")
            remaining = {
                orjson.loads(line)["id"] for line in listing.splitlines() if line.startswith("{")
            }
    finally:
        failed = await stop_tasks(listeners)
        await store.aclose()

    verdicts = ledger.verdicts()
    report(
        "poison and unknown-version messages, DLQ and replay",
        ledger,
        verdicts,
        healthy_delivered_before_poison_parked_by_s=round(poison_parked_at - healthy_done_at, 2),
        dead_letters={i: (x["attempts"], x["reason"][:60]) for i, x in by_id.items()},
        remaining_after_replay=sorted(remaining),
    )
    assert not failed, failed
    assert remaining == {"future-envelope", "garbage-body"}
    redelivered = ledger.seen[f"sse:{poison}"]
    assert [(s.correlation_id, s.sequence) for s in redelivered] == [(f"{poison}-1", 1)]
    for verdict in verdicts:
        assert verdict.clean and verdict.seen == verdict.expected, verdict.line()
