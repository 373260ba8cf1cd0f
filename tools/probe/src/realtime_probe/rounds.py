"""A probe run: each round sends one event over the WebSocket and waits for that same event
(matched by its correlation id) on the board's SSE stream, so it crosses the ingress,
RabbitMQ, the relay worker, Redis and the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import websockets
from envelope.codes import ErrorCode

from realtime_probe.feeds import StreamFeed, open_socket, open_stream, socket_closed
from realtime_probe.report import (
    EXIT_FAILED,
    ProbeError,
    ProbeOptions,
    ProbeReport,
    RoundResult,
    conclude,
)
from realtime_probe.websocket import BoardSocket, Closed

EVENT_TYPE = "probe.ping"


async def run_probe(options: ProbeOptions) -> ProbeReport:
    report = ProbeReport(options)
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(options.timeout, read=None)) as http,
            # The stream is open before the first event is sent, so the event arrives live:
            # the gateway subscribes as it starts the response, well before the WebSocket
            # below has even finished its handshake.
            open_stream(http, options) as stream,
            open_socket(options) as socket,
        ):
            for index in range(1, options.count + 1):
                result = await probe_round(index, socket, stream, options)
                report.rounds.append(result)
                if result.status == "failed":
                    break  # the next rounds would wait out the same timeout for nothing
                if index < options.count:
                    await asyncio.sleep(options.interval)
    except ProbeError as exc:
        if exc.result is not None:
            report.rounds.append(exc.result)
        report.exit_code, report.message = exc.code, exc.message
        return report
    return conclude(report)


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


async def probe_round(
    index: int, socket: BoardSocket, stream: StreamFeed, options: ProbeOptions
) -> RoundResult:
    """Send one event; wait for its ack and echo on the WebSocket and its copy on SSE."""
    result = RoundResult(round=index, correlation_id=f"probe-{uuid.uuid4().hex}")
    try:
        await _measure(result, socket, stream, options)
    except ProbeError as exc:
        result.error = exc.message
        exc.result = result
        raise
    if result.error is None:
        slow = result.sse_ms is not None and result.sse_ms > options.threshold_ms
        result.status = "slow" if slow else "ok"
    return result


async def _measure(
    result: RoundResult, socket: BoardSocket, stream: StreamFeed, options: ProbeOptions
) -> None:
    frame = {
        "type": EVENT_TYPE,
        "payload": {"probe": "realtime-probe", "round": result.round, "sent_at": _now()},
        "id": result.correlation_id,
    }
    started = time.perf_counter()
    # A socket that closed under the probe says why in its `Closed`, read below.
    with contextlib.suppress(websockets.ConnectionClosed):
        await socket.send(frame)

    waiting: dict[str, asyncio.Task[dict[str, Any] | Closed]] = {}
    try:
        async with asyncio.timeout(options.timeout):
            while result.ack_ms is None or result.echo_ms is None or result.sse_ms is None:
                if "ws" not in waiting and (result.ack_ms is None or result.echo_ms is None):
                    waiting["ws"] = asyncio.create_task(socket.received.get())
                if "sse" not in waiting and result.sse_ms is None:
                    waiting["sse"] = asyncio.create_task(stream.events.get())
                done, _ = await asyncio.wait(waiting.values(), return_when=asyncio.FIRST_COMPLETED)
                for source in [s for s, task in waiting.items() if task in done]:
                    item = waiting.pop(source).result()
                    _take(source, item, result, started)
    except TimeoutError:
        result.error = _diagnose(result, options.timeout)
    finally:
        for task in waiting.values():
            task.cancel()


def _take(source: str, item: dict[str, Any] | Closed, result: RoundResult, started: float) -> None:
    if isinstance(item, Closed):
        if source == "ws":
            raise socket_closed(item)
        raise ProbeError(EXIT_FAILED, f"The SSE stream ended mid-round: {item.reason}.")
    if item.get("correlation_id") != result.correlation_id:
        return  # another client's event, or a late copy of an earlier round's
    if source == "sse":
        result.sse_ms = _elapsed_ms(started)
        result.sequence = result.sequence or item.get("sequence")
        return
    kind = item.get("kind")
    if kind == "ack":
        result.ack_ms = _elapsed_ms(started)
    elif kind == "event":
        result.echo_ms = _elapsed_ms(started)
        result.sequence = item.get("sequence")
    elif kind == "error":
        code, message = item.get("code"), item.get("message")
        if code == ErrorCode.UNAVAILABLE:
            raise ProbeError(
                EXIT_FAILED,
                f"The ingress could not store the event ({code}: {message}): RabbitMQ is not "
                "reachable from ingress-ws.",
            )
        raise ProbeError(EXIT_FAILED, f"The ingress refused the probe's event ({code}: {message}).")


def _diagnose(result: RoundResult, timeout: float) -> str:
    """Which stage the event stopped at, from what did and did not come back."""
    within = f"within {timeout:g} s"
    if result.ack_ms is None and result.echo_ms is None and result.sse_ms is None:
        return (
            f"The ingress did not acknowledge the event {within}: RabbitMQ is slow or "
            "unreachable, or ingress-ws is overloaded."
        )
    if result.sse_ms is None and result.echo_ms is None:
        return (
            f"The event was acknowledged (durable in RabbitMQ) but came back on neither the "
            f"WebSocket nor the SSE stream {within}: is relay-worker running and connected to "
            "RabbitMQ and Redis?"
        )
    if result.sse_ms is None:
        return (
            f"The event came back on the WebSocket but not on the SSE stream {within}: check "
            "sse-gateway and its Redis connection."
        )
    if result.echo_ms is None:
        return (
            f"The event arrived over SSE but its WebSocket echo did not {within}: check "
            "ingress-ws's Redis subscription."
        )
    return f"The event was delivered but never acknowledged {within}: check ingress-ws."


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
