"""A worker that dies between the Redis step and the RabbitMQ ack: one delivery, not two.

The fault hook ADVANCED_WORKER_FAULT_EXIT_AFTER_RELAY=N makes the worker exit abruptly right
after the N-th relay step, before acking. RabbitMQ redelivers that message to the next
worker, whose relay step finds the correlation id already marked and skips it. The first
events are sent before any worker ever ran: the ingress declared the durable queues, so they
are acked and wait there.
"""

from __future__ import annotations

import asyncio

import pytest
from chaos.harness import (
    Ledger,
    Sender,
    metric,
    report,
    scrape,
    sse_board_url,
    sse_subscriber,
    start_all,
    stop_tasks,
    wait_for,
    ws_url,
)
from support.processes import Suite

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

BOARD = "crash-before-ack"
COUNT = 20
EARLY = 3  # sent before any worker runs
CRASH_AFTER = 7


@pytest.mark.timeout(150)
async def test_a_crash_between_the_redis_step_and_the_ack_delivers_once(suite: Suite) -> None:
    ingress = suite.start("ingress", wait=False)
    gateway = suite.start("gateway", wait=False)
    await start_all([ingress, gateway])

    ledger = Ledger()
    listener = asyncio.create_task(
        sse_subscriber(ledger, "sse", sse_board_url(gateway, BOARD), frozenset({BOARD}))
    )
    async with Sender(ledger, ws_url(ingress, BOARD), BOARD) as sender:
        # No worker has ever run: the ingress declared the durable queues itself, so these
        # are acked (stored), not refused as unroutable, and wait for a worker.
        for index in range(EARLY):
            await sender.send(index)
        await sender.wait_acked(30)

        doomed = suite.start(
            "worker", wait=False, ADVANCED_WORKER_FAULT_EXIT_AFTER_RELAY=str(CRASH_AFTER)
        )

        async def relayed(count: int) -> bool:
            return ledger.count_for("sse") >= count

        await wait_for(lambda: relayed(EARLY), 60, "the events queued before any worker")
        # Then one at a time, each relayed before the next is sent: the worker relays them
        # one by one (no batch), so the crash comes right after the 7th relay step.
        for index in range(EARLY, CRASH_AFTER):
            await sender.send(index)
            await wait_for(lambda n=index + 1: relayed(n), 30, f"event #{index} relayed")
        assert doomed.process is not None
        assert await asyncio.to_thread(doomed.process.wait, 30) == 137, "no fault hook exit"
        await sender.wait_acked(30)
        # The 7th was published before the crash but never acked: RabbitMQ still holds it.
        assert ledger.count_for("sse") == CRASH_AFTER
        for index in range(CRASH_AFTER, COUNT):
            await sender.send(index)
        await sender.wait_acked(30)

        successor = suite.start("worker")
        await ledger.wait_complete(60)
        samples = scrape(successor)
    failed = await stop_tasks([listener])
    assert not failed, failed

    verdicts = ledger.verdicts()
    report(
        "crash between the Redis step and the ack (fault hook)",
        ledger,
        verdicts,
        crashed_after_relay=CRASH_AFTER,
        successor_duplicates_skipped=metric(
            samples, "advanced_worker_events_total", outcome="duplicate"
        ),
        successor_delivered=metric(samples, "advanced_worker_events_total", outcome="delivered"),
    )
    for verdict in verdicts:
        assert verdict.clean and verdict.seen == COUNT, verdict.line()
    # The redelivered 7th was recognised, not relayed again.
    assert metric(samples, "advanced_worker_events_total", outcome="duplicate") == 1
    assert (
        metric(samples, "advanced_worker_events_total", outcome="delivered") == COUNT - CRASH_AFTER
    )
