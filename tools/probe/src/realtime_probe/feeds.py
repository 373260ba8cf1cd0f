"""The probe's two feeds, the board's WebSocket and its SSE stream, and what each refusal means
for the person reading the verdict. Close and error codes are the contract's enums."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets
from envelope.codes import CloseCode
from websockets.asyncio.client import connect

from realtime_probe.report import EXIT_FAILED, EXIT_UNKNOWN, ProbeError, ProbeOptions
from realtime_probe.sse import SseParser
from realtime_probe.websocket import BoardSocket, Closed


class StreamFeed:
    """The board's SSE stream; a background task queues each `activity` event, then a `Closed`."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: asyncio.Queue[dict[str, Any] | Closed] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        reason = "the gateway ended the stream"
        try:
            async for sse in SseParser().events(self.response.aiter_lines()):
                if sse.event == "activity" and sse.data_lines:
                    with contextlib.suppress(ValueError):
                        event = json.loads(sse.data)
                        if isinstance(event, dict):
                            await self.events.put(event)
                elif sse.event == "close":
                    reason = "the gateway cut the stream as a slow consumer"
        except httpx.HTTPError as exc:
            reason = f"the stream broke: {exc}"
        await self.events.put(Closed(None, reason))

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.response.aclose()


def _auth(token: str) -> dict[str, str]:
    # A header rather than ?token=, so the credential stays out of proxies' access logs.
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def open_stream(http: httpx.AsyncClient, options: ProbeOptions) -> AsyncIterator[StreamFeed]:
    url = options.stream_url
    request = http.build_request("GET", url, headers=_auth(options.token))
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise ProbeError(
            EXIT_FAILED,
            f"Cannot reach the SSE gateway at {url} ({exc.__class__.__name__}: {exc}): "
            "check that sse-gateway runs and that --sse-url points at it.",
        ) from None
    if response.status_code != 200:
        await response.aread()
        await response.aclose()
        raise _refused_stream(url, response)
    feed = StreamFeed(response)
    try:
        yield feed
    finally:
        await feed.close()


def _refused_stream(url: str, response: httpx.Response) -> ProbeError:
    status = response.status_code
    detail = ""
    with contextlib.suppress(ValueError, AttributeError):
        detail = str(response.json().get("detail", ""))
    said = f": {detail.rstrip('.')}" if detail else ""
    if status == 401:
        return ProbeError(
            EXIT_UNKNOWN,
            f"The SSE gateway refused the credential (401{said}): set ADVANCED_REALTIME_TOKEN "
            "to the suite's token.",
        )
    if status == 403:
        return ProbeError(
            EXIT_UNKNOWN,
            f"The SSE gateway denied the board (403{said}): use a token that grants the "
            "probe's board, or pick another with --board.",
        )
    if status == 429:
        return ProbeError(
            EXIT_UNKNOWN,
            "The SSE gateway rate-limited the probe (429): run it less often, or raise "
            "ADVANCED_ACTIVITY_STREAM_RATE_LIMIT.",
        )
    if status == 404:
        return ProbeError(EXIT_UNKNOWN, f"No SSE gateway route at {url} (404): check --sse-url.")
    if status == 503:
        return ProbeError(
            EXIT_FAILED,
            f"The SSE gateway is not ready (503{said}): its Redis connection is down, or it is "
            "at its connection limit.",
        )
    return ProbeError(EXIT_FAILED, f"The SSE gateway answered {status}{said} at {url}.")


@contextlib.asynccontextmanager
async def open_socket(options: ProbeOptions) -> AsyncIterator[BoardSocket]:
    url = options.socket_url
    try:
        connection = await connect(
            url,
            additional_headers=_auth(options.token),
            open_timeout=options.timeout,
            close_timeout=2,
            compression=None,
        )
    except websockets.InvalidStatus as exc:
        raise ProbeError(
            EXIT_FAILED,
            f"The ingress refused the WebSocket handshake at {url} "
            f"(HTTP {exc.response.status_code}): check --ws-url.",
        ) from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        raise ProbeError(
            EXIT_FAILED,
            f"Cannot reach the ingress at {url} ({exc.__class__.__name__}: {exc}): "
            "check that ingress-ws runs and that --ws-url points at it.",
        ) from None
    feed = BoardSocket(connection)
    try:
        yield feed
    finally:
        await feed.close()


def socket_closed(closed: Closed) -> ProbeError:
    """The verdict when the ingress closes the probe's WebSocket mid-round."""
    reason = f": {closed.reason}" if closed.reason else ""
    if closed.code == CloseCode.UNAUTHORISED:
        return ProbeError(
            EXIT_UNKNOWN,
            f"The ingress refused the credential (close {int(CloseCode.UNAUTHORISED)}{reason}): "
            "set ADVANCED_REALTIME_TOKEN to the suite's token.",
        )
    if closed.code == CloseCode.FORBIDDEN:
        return ProbeError(
            EXIT_UNKNOWN,
            f"The ingress denied the board (close {int(CloseCode.FORBIDDEN)}{reason}): use a "
            "token that grants it.",
        )
    if closed.code == CloseCode.TRY_AGAIN:
        return ProbeError(
            EXIT_FAILED,
            f"The ingress is at its connection limit (close {int(CloseCode.TRY_AGAIN)}): try "
            "again later.",
        )
    if closed.code == CloseCode.GOING_AWAY:
        return ProbeError(
            EXIT_FAILED, f"The ingress is shutting down (close {int(CloseCode.GOING_AWAY)})."
        )
    code = "without a close code" if closed.code is None else f"with code {closed.code}"
    return ProbeError(EXIT_FAILED, f"The ingress closed the WebSocket {code}{reason}.")
