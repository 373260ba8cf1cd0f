"""Broker faults mid-stream: Redis killed and restarted, RabbitMQ connections cut.

Redis is a private redis-server (append-only file, fsync always) behind a TCP proxy: the
test resets and silences its connections, kills it with kill -9 and starts it again on the
same port; the shared Redis is never touched. RabbitMQ
connections go through a TCP proxy the test resets, and are also closed from the broker's
side with `rabbitmqctl close_connection` (only ours, found by the proxy's local ports); then
one of two ingress replicas is killed with kill -9 and its clients fail over to the other.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from chaos.harness import (
    Ledger,
    PrivateRedis,
    Sender,
    close_with_rabbitmqctl,
    kill9,
    listen,
    metric,
    readiness,
    report,
    scrape,
    start_all,
    stop_tasks,
    wait_for,
    ws_url,
)
from support.brokers import Brokers
from support.processes import Suite
from support.proxy import TcpProxy

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]


async def until_sent(ledger: Ledger, count: int) -> None:
    while len(ledger.sent) < count:
        await asyncio.sleep(0.05)


@pytest.mark.timeout(300)
async def test_redis_cut_silenced_killed_and_restarted_mid_stream_loses_nothing(
    suite: Suite, tmp_path: Path
) -> None:
    """Three Redis faults while events flow, through a proxy to a private redis-server:
    every connection reset (redis-py reconnects and resubscribes by itself: the hubs must
    notice and catch up); connections that stay open but carry nothing (the hubs' liveness
    pings must notice); and Redis killed with kill -9 and started again (AOF, fsync always).
    """
    private = PrivateRedis(tmp_path / "redis").start()
    proxy = await TcpProxy("127.0.0.1", private.port).start()
    overrides = {
        "ADVANCED_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
        "ADVANCED_WEBSOCKET_RATE_LIMIT": "1000/second",
    }
    boards = [f"redis-{n}" for n in range(4)]
    faults: list[str] = []
    try:
        worker = suite.start("worker", wait=False, **overrides)
        ingress = suite.start("ingress", wait=False, **overrides)
        gateway = suite.start("gateway", wait=False, **overrides)
        services = [worker, ingress, gateway]
        await start_all(services)

        ledger = Ledger()
        listeners = listen(ledger, ingress, gateway, boards)
        senders = [Sender(ledger, ws_url(ingress, b), b) for b in boards]
        for sender in senders:
            await sender.__aenter__()
        await asyncio.sleep(1.0)
        sending = [asyncio.create_task(s.send_many(250, rate=10.0)) for s in senders]

        # 1. Every Redis connection reset at once.
        await until_sent(ledger, 100)
        faults.append(f"reset {proxy.cut()} Redis connections at {len(ledger.sent)} sent")

        # 2. Silence: the connections stay open and carry nothing, as when a peer vanishes
        # without a reset. The edges' subscriptions must notice by their liveness pings.
        await until_sent(ledger, 200)
        proxy.blackhole()
        silenced_at, silenced_sent = time.monotonic(), len(ledger.sent)

        async def edges_noticed() -> bool:
            return await readiness(gateway) == 503 and await readiness(ingress) == 503

        await wait_for(edges_noticed, 30, "the edges to notice a silent Redis connection")
        noticed_after = time.monotonic() - silenced_at
        faults.append(
            f"silenced Redis at {silenced_sent} sent; both edges noticed after "
            f"{noticed_after:.1f}s; reset {proxy.cut()} connections to end it"
        )

        # 3. kill -9 and a restart on the same port, from the append-only file.
        private.kill()
        down_at = time.monotonic()
        seen_not_ready: dict[str, bool] = {s.kind: False for s in services}
        while time.monotonic() - down_at < 4.0 or not all(seen_not_ready.values()):
            for service in services:
                if await readiness(service) == 503:
                    seen_not_ready[service.kind] = True
            if time.monotonic() - down_at > 20:
                break
            await asyncio.sleep(0.2)
        private.start()
        faults.append(
            f"killed Redis at {len(ledger.sent)} sent, restarted after "
            f"{time.monotonic() - down_at:.1f}s"
        )

        await asyncio.gather(*sending)
        for sender in senders:
            await sender.wait_acked(60)
        await ledger.wait_complete(90)

        async def all_ready() -> bool:
            return all([await readiness(s) == 200 for s in services])

        await wait_for(all_ready, 30, "every service ready again")
        samples = scrape(worker)
        failed = await stop_tasks(listeners)
        for sender in senders:
            await sender.__aexit__(None, None, None)
    finally:
        suite.stop_all()
        await proxy.stop()
        private.stop()

    # Redis away is an infrastructure fault: the partitions pause with their messages held,
    # in order, instead of sending them round the retry ladder (docs/delivery.md).
    verdicts = ledger.verdicts()
    retried = metric(samples, "advanced_worker_events_total", outcome="retried")
    held = metric(samples, "advanced_worker_infrastructure_faults_total", source="redis")
    report(
        "Redis connections reset, silenced, Redis killed and restarted (AOF, fsync always)",
        ledger,
        verdicts,
        faults="; ".join(faults),
        not_ready_seen_while_redis_was_down=seen_not_ready,
        worker_retried=retried,
        worker_infrastructure_faults=held,
        worker_dead_lettered=metric(
            samples, "advanced_worker_events_total", outcome="dead_lettered"
        ),
    )
    assert not failed, failed
    assert all(seen_not_ready.values()), seen_not_ready
    assert held >= 1, "no relay step met the outages: the test did not test it"
    assert retried == 0
    assert metric(samples, "advanced_worker_events_total", outcome="dead_lettered") == 0
    for verdict in verdicts:
        assert not (verdict.lost or verdict.duplicated or verdict.unexpected), verdict.line()
        assert not verdict.sequence_faults and verdict.seen == verdict.expected, verdict.line()
        assert not verdict.order_faults, verdict.line()


@pytest.mark.timeout(240)
async def test_rabbitmq_connections_cut_and_an_ingress_killed_lose_nothing(
    suite: Suite, brokers: Brokers
) -> None:
    rabbit = urlsplit(brokers.rabbitmq_url)
    # Not listening yet: RabbitMQ is "down" when the services start.
    proxy = TcpProxy(rabbit.hostname or "127.0.0.1", rabbit.port or 5672)
    overrides = {
        "ADVANCED_RABBITMQ_URL": f"amqp://{rabbit.username}:{rabbit.password}@127.0.0.1:{proxy.port}/",
        "ADVANCED_WEBSOCKET_RATE_LIMIT": "1000/second",
    }
    boards = [f"amqp-{n}" for n in range(4)]
    # Broker-side closes need rabbitmqctl on this host's broker; with a broker in a container
    # the second fault is another reset, and the report says which ran.
    broker_side = shutil.which("rabbitmqctl") is not None and brokers.mode.startswith("configured")
    try:
        worker = suite.start("worker", wait=False, **overrides)
        ingress = suite.start("ingress", wait=False, **overrides)  # the senders'
        replica = suite.start("ingress", wait=False, **overrides)  # the WebSocket listeners'
        gateway = suite.start("gateway", wait=False)
        services = [worker, ingress, replica, gateway]
        # Both start without RabbitMQ: alive, not ready, and they keep trying.
        await asyncio.to_thread(lambda: [s.wait_live(90) for s in (worker, ingress)])
        started_without = {s.kind: await readiness(s) for s in (worker, ingress)}
        assert started_without == {"worker": 503, "ingress": 503}, started_without
        await proxy.start()
        await start_all(services)

        ledger = Ledger()
        listeners = listen(ledger, replica, gateway, boards)
        # When their ingress dies, the senders reconnect to the replica and resend.
        senders = [
            Sender(ledger, ws_url(ingress, b), b, failover_url=ws_url(replica, b)) for b in boards
        ]
        for sender in senders:
            await sender.__aenter__()
        await asyncio.sleep(1.0)
        sending = [asyncio.create_task(s.send_many(300, rate=15.0)) for s in senders]

        faults: list[str] = []
        while len(ledger.sent) < 150:
            await asyncio.sleep(0.05)
        faults.append(f"reset {proxy.cut()} connections at {len(ledger.sent)} sent")

        while len(ledger.sent) < 300:
            await asyncio.sleep(0.05)
        if broker_side:
            ports = proxy.upstream_ports()
            closed = await asyncio.to_thread(close_with_rabbitmqctl, ports, rabbit.port or 5672)
            assert closed >= 1, f"rabbitmqctl closed none of our connections {ports}"
            faults.append(
                f"rabbitmqctl closed {closed}/{len(ports)} connections at {len(ledger.sent)} sent"
            )
        else:
            faults.append(f"reset {proxy.cut()} connections at {len(ledger.sent)} sent")

        # The senders' ingress replica is killed: what it acked is in RabbitMQ; what it had
        # not acked yet is resent through the other replica, where the senders reconnect.
        samples = scrape(ingress)
        kill9(ingress)
        pending = sum(sender.outstanding for sender in senders)
        faults.append(
            f"ingress replica killed (kill -9) at {len(ledger.sent)} sent, "
            f"{pending} of them not acked yet"
        )
        services.remove(ingress)

        # RabbitMQ away: the ingress answers `unavailable` (the sender resends the same id)
        # and /readyz says 503. A few events are sent during the outage on purpose.
        await proxy.stop()
        down_at = time.monotonic()
        extra = senders[0]
        for n in range(5):
            await extra.send(10_000 + n)
        not_ready = False
        while time.monotonic() - down_at < 3.0:
            not_ready = not_ready or await readiness(replica) == 503
            await asyncio.sleep(0.2)
        unavailable_during_outage = ledger.unavailable
        await proxy.start()
        faults.append(
            f"RabbitMQ unreachable for {time.monotonic() - down_at:.1f}s at {len(ledger.sent)} sent"
        )

        async def all_ready() -> bool:
            return all([await readiness(s) == 200 for s in services])

        # aio-pika's robust connection retries every 5 s: allow a few attempts.
        await wait_for(all_ready, 30, "every service ready again")

        await asyncio.gather(*sending)
        for sender in senders:
            await sender.wait_acked(60)
        await ledger.wait_complete(90)
        ready_again = {s.kind: await readiness(s) for s in services}
        failovers = sum(s.failovers for s in senders)
        failed = await stop_tasks(listeners)
        for sender in senders:
            await sender.__aexit__(None, None, None)
    finally:
        suite.stop_all()
        await proxy.stop()

    verdicts = ledger.verdicts(check_order=False)  # a resent event comes after later ones
    report(
        "RabbitMQ connections cut mid-stream (resets, broker-side close, outage), ingress kill -9",
        ledger,
        verdicts,
        started_without_rabbitmq=started_without,
        faults="; ".join(faults),
        publish_errors_before_the_kill=metric(
            samples, "advanced_board_events_published_total", status="error"
        ),
        ready_after=ready_again,
        senders_failed_over=failovers,
    )
    assert not failed, failed
    assert failovers == len(boards)
    assert not_ready, "/readyz of the ingress never said 503 while RabbitMQ was unreachable"
    assert set(ready_again.values()) == {200}, ready_again
    assert unavailable_during_outage >= 5, "publishes were not refused while RabbitMQ was away"
    for verdict in verdicts:
        assert verdict.clean and verdict.seen == verdict.expected, verdict.line()
