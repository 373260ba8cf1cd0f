"""The ingress's memory while RabbitMQ stops confirming, at the socket cap.

`uv run --group bench python -m bench.blackhole_memory [--sockets 128] [--seconds 14]
[--bound BYTES]`: one ingress-ws process whose RabbitMQ link goes through a loopback TCP
proxy (tests/support/proxy.py). Once the ingress is ready the proxy is blackholed (the link
stays open, nothing is forwarded: a broker that stopped confirming), then `--sockets` sockets
(the ingress's cap, `ADVANCED_WEBSOCKET_MAX_CONNECTIONS`) each send full-size frames as fast as
the ingress reads them. The ingress's RSS is sampled every 0.5 s; the peak over `--seconds`
(less than the 15 s confirm timeout, after which held publishes are answered `unavailable` and
let go) is what a pod's memory limit has to hold.

`--bound` sets `ADVANCED_WEBSOCKET_UNCONFIRMED_MAX_BYTES` (default: the service's default);
`--bound 0` lifts it (10^12 bytes), which is the behaviour without a process-wide bound: only
the per-socket window of 256 unconfirmed publishes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import orjson
import redis
import websockets

from bench.launcher import RABBITMQ_URL, REDIS_URL, TOKEN, UNLIMITED, ServerProcess

# The fault tests' proxy, reused rather than written twice.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.proxy import TcpProxy

MAX_PAYLOAD = 16_384
CONFIRM_TIMEOUT = 15.0  # ingress_ws.adapters.rabbitmq.CONFIRM_TIMEOUT_SECONDS


def full_size_frame(n: int) -> str:
    text = "y" * (MAX_PAYLOAD - len('{"t":""}'))  # the payload at the limit, serialised
    return orjson.dumps({"type": "bench.fill", "payload": {"t": text}, "id": f"f-{n}"}).decode()


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.acks = 0
        self.unavailable = 0


async def fill(url: str, tally: Tally, stop: asyncio.Event) -> None:
    """Send full-size frames as fast as the ingress takes them; count the answers."""
    with contextlib.suppress(websockets.ConnectionClosed, OSError):
        async with websockets.connect(url, max_size=None, open_timeout=30) as ws:

            async def read() -> None:
                async for message in ws:
                    kind = orjson.loads(message).get("kind")
                    if kind == "ack":
                        tally.acks += 1
                    elif kind == "error":
                        tally.unavailable += 1

            reader = asyncio.create_task(read())
            try:
                while not stop.is_set():
                    await ws.send(full_size_frame(tally.sent))
                    tally.sent += 1
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


async def measure(sockets: int, seconds: float, bound: int | None) -> dict[str, float]:
    tag = "bh" + uuid.uuid4().hex[:10]
    target = urlsplit(RABBITMQ_URL)
    proxy = await TcpProxy(target.hostname or "127.0.0.1", target.port or 5672).start()
    proxied = RABBITMQ_URL.replace(target.netloc.rsplit("@", 1)[-1], f"127.0.0.1:{proxy.port}")
    env = {
        "ADVANCED_ENVIRONMENT": "test",
        "ADVANCED_REALTIME_TOKEN": TOKEN,
        "ADVANCED_EVENT_TRANSPORT": "rabbitmq",
        "ADVANCED_RABBITMQ_URL": proxied,
        "ADVANCED_REDIS_URL": REDIS_URL,
        "ADVANCED_RABBITMQ_EXCHANGE": f"{tag}.events",
        "ADVANCED_RABBITMQ_QUEUE": f"{tag}.events",
        "ADVANCED_RABBITMQ_RETRY_QUEUE": f"{tag}.events.retry",
        "ADVANCED_RABBITMQ_DLQ_QUEUE": f"{tag}.events.dlq",
        "ADVANCED_RABBITMQ_PARTITIONS": "2",
        "ADVANCED_ACTIVITY_CHANNEL": f"{tag}:activity",
        "ADVANCED_REDIS_KEY_PREFIX": f"{tag}:",
        "ADVANCED_LOG_LEVEL": "warning",
        "ADVANCED_WEBSOCKET_MAX_CONNECTIONS": str(sockets),
        "ADVANCED_WEBSOCKET_MAX_CONNECTIONS_PER_CREDENTIAL": str(sockets),
        "ADVANCED_WEBSOCKET_HANDSHAKE_RATE_LIMIT": UNLIMITED,
        "ADVANCED_WEBSOCKET_RATE_LIMIT": UNLIMITED,
        "ADVANCED_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
    }
    if bound is not None:
        env["ADVANCED_WEBSOCKET_UNCONFIRMED_MAX_BYTES"] = str(bound or 10**12)
    ingress = ServerProcess("ingress-ws", [sys.executable, "-m", "ingress_ws"], env)
    env["ADVANCED_INGRESS_PORT"] = str(ingress.port)
    ingress.start(tag)
    stop = asyncio.Event()
    tallies = [Tally() for _ in range(sockets)]
    try:
        await asyncio.to_thread(ingress.wait_ready, "/readyz")
        idle = ingress.rss_bytes()
        proxy.blackhole()
        url = f"ws://127.0.0.1:{ingress.port}/ws/boards/{tag}-{{}}?token={TOKEN}"
        senders = [
            asyncio.create_task(fill(url.format(n % 16), tallies[n], stop)) for n in range(sockets)
        ]
        started = time.monotonic()
        peak = idle
        while time.monotonic() - started < min(seconds, CONFIRM_TIMEOUT - 1):
            await asyncio.sleep(0.5)
            peak = max(peak, ingress.rss_bytes())
        acks_blackholed = sum(t.acks for t in tallies)
        refused_blackholed = sum(t.unavailable for t in tallies)
        sent_blackholed = sum(t.sent for t in tallies)
        stop.set()
        proxy.cut()  # the held publishes fail now: every sender's last send returns
        await asyncio.wait(senders, timeout=30)
        for task in senders:
            task.cancel()
    finally:
        ingress.stop()
        await proxy.stop()
        await cleanup(tag)
    return {
        "sockets": sockets,
        "idle_rss_mib": idle / 2**20,
        "peak_rss_mib": peak / 2**20,
        "frames_sent": sent_blackholed,
        "refused_unavailable": refused_blackholed,
        "acks": acks_blackholed,
    }


async def cleanup(tag: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        for queue in [f"{tag}.events.{p}" for p in range(2)] + [
            f"{tag}.events.retry",
            f"{tag}.events.dlq",
        ]:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue)
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await channel.exchange_delete(f"{tag}.events")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{tag}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=128, help="the socket cap (default 128)")
    parser.add_argument("--seconds", type=float, default=14.0)
    parser.add_argument(
        "--bound", type=int, default=None, help="unconfirmed bytes; 0 lifts the bound"
    )
    args = parser.parse_args()
    result = asyncio.run(measure(args.sockets, args.seconds, args.bound))
    bound = "service default" if args.bound is None else ("none" if args.bound == 0 else args.bound)
    print(f"bound on unconfirmed bytes: {bound}")
    print(
        f"{result['sockets']} sockets, RabbitMQ blackholed: ingress RSS "
        f"{result['idle_rss_mib']:.0f} MiB idle -> {result['peak_rss_mib']:.0f} MiB peak "
        f"(+{(result['peak_rss_mib'] - result['idle_rss_mib']) / result['sockets']:.2f} MiB "
        f"per socket); {result['frames_sent']} frames sent, "
        f"{result['refused_unavailable']} refused unavailable, {result['acks']} acked"
    )


if __name__ == "__main__":
    main()
