"""Workers killed with kill -9 while events flow: nothing acked is lost, nothing is doubled.

10,000 events over 8 boards (4 partitions) through two workers; a worker is killed three
times (and restarted, so two keep running), and one is stopped with SIGTERM. Every subscriber that stayed connected, on
SSE (each board and /sse/activity) and WebSocket (a listener and the sender of each board),
must see every acked event of its boards exactly once, in sequence order, gapless from 1,
and in the order the board's sender sent them.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from chaos.harness import (
    Ledger,
    Sender,
    kill9,
    listen,
    metric,
    report,
    scrape,
    start_all,
    stop_tasks,
    ws_url,
)
from support.processes import Service, Suite

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

TOTAL = 10_000
BOARDS = [f"kill-{n}" for n in range(8)]
RATE_PER_BOARD = 50.0  # 400 events/s in all: about 25 s of traffic
KILLS_AT = (0.2, 0.45, 0.7)  # fractions of the events sent
SIGTERM_AT = 0.85


def duplicates_seen_by(worker: Service) -> float:
    """The worker's `duplicate` count so far (0 if it is still booting: it relayed nothing)."""
    try:
        return metric(scrape(worker), "advanced_worker_events_total", outcome="duplicate")
    except httpx.HTTPError:
        return 0.0


@pytest.mark.timeout(420)
async def test_three_worker_kills_lose_and_duplicate_nothing(suite: Suite) -> None:
    env = {"ADVANCED_WEBSOCKET_RATE_LIMIT": "1000/second"}
    workers = [suite.start("worker", wait=False, **env) for _ in range(2)]
    ingress = suite.start("ingress", wait=False, **env)
    gateway = suite.start("gateway", wait=False, **env)
    await start_all([*workers, ingress, gateway])

    ledger = Ledger()
    listeners = listen(ledger, ingress, gateway, BOARDS)
    senders = [Sender(ledger, ws_url(ingress, b), b) for b in BOARDS]
    for sender in senders:
        await sender.__aenter__()
    try:
        await asyncio.sleep(1.0)  # every subscription registered before the first event
        per_board = TOTAL // len(BOARDS)
        started = time.monotonic()
        sending = [
            asyncio.create_task(s.send_many(per_board, rate=RATE_PER_BOARD)) for s in senders
        ]
        kills: list[str] = []
        duplicates = 0.0  # skipped by the worker relay steps, over every worker process
        for fraction in KILLS_AT:
            while len(ledger.sent) < TOTAL * fraction:
                await asyncio.sleep(0.05)
            victim = len(kills) % 2
            duplicates += duplicates_seen_by(workers[victim])
            code = kill9(workers[victim])
            kills.append(f"worker {victim} killed at {len(ledger.sent)} sent (exit {code})")
            # Restart it, so that two workers share the partitions again.
            workers[victim] = suite.start("worker", wait=False, **env)
        # And a graceful stop (SIGTERM) of the other one: it finishes the message in hand,
        # hands the rest back and exits 0 within the contract's 10 s.
        while len(ledger.sent) < TOTAL * SIGTERM_AT:
            await asyncio.sleep(0.05)
        duplicates += duplicates_seen_by(workers[1])
        stopping, stopping_at = time.monotonic(), len(ledger.sent)
        stop_code = await asyncio.to_thread(workers[1].stop)
        stop_seconds = time.monotonic() - stopping
        kills.append(
            f"worker 1 stopped with SIGTERM at {stopping_at} sent "
            f"(exit {stop_code} after {stop_seconds:.1f}s)"
        )
        workers[1] = suite.start("worker", wait=False, **env)
        await asyncio.gather(*sending)
        for sender in senders:
            await sender.wait_acked(60)
        sent_for = time.monotonic() - started
        await ledger.wait_complete(90)
        drained_for = time.monotonic() - started
    finally:
        failed = await stop_tasks(listeners)
        for sender in senders:
            await sender.__aexit__(None, None, None)

    await start_all(workers)  # the restarted workers came up (the last may still be booting)
    duplicates += sum(duplicates_seen_by(w) for w in workers)
    verdicts = ledger.verdicts()
    report(
        "kill -9 a worker three times and SIGTERM one, 10,000 events, two workers",
        ledger,
        verdicts,
        kills="; ".join(kills),
        seconds_to_send=round(sent_for, 1),
        seconds_to_deliver_all=round(drained_for, 1),
        redeliveries_skipped_as_duplicates=duplicates,
    )
    assert not failed, failed
    assert stop_code == 0 and stop_seconds < 10, (stop_code, stop_seconds)
    assert len(ledger.acked) == TOTAL and not ledger.refused
    assert len(verdicts) == 2 * len(BOARDS) + 1 + len(BOARDS)
    for verdict in verdicts:
        assert verdict.clean, verdict.line()
        assert verdict.seen == verdict.expected
