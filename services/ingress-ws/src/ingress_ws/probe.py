"""`realtime-probe`: a synthetic check of the whole pipeline, for a terminal, cron or a CronJob.

Each round sends one event over the WebSocket and waits for that same event (matched by its
correlation id) on the board's SSE stream, so it crosses the ingress, RabbitMQ, the relay
worker, Redis and the gateway. The exit code follows the monitoring-plugin convention, so any
scheduler can alert on it:

    0  OK        every round was delivered within --threshold-ms
    1  WARNING   every round was delivered, at least one slower than --threshold-ms
    2  CRITICAL  a round was not delivered, or the ingress or gateway could not be reached
    3  UNKNOWN   the probe could not judge: bad arguments, or its credential was refused

The credential is read from ADVANCED_REALTIME_TOKEN (or the variable --token-env names), never
from the command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets
from envelope.models import is_board_id
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from realtime_runtime.settings import DEFAULT_TOKEN
from websockets.asyncio.client import ClientConnection, connect

EXIT_OK, EXIT_SLOW, EXIT_FAILED, EXIT_UNKNOWN = 0, 1, 2, 3
STATUS_BY_EXIT = {EXIT_OK: "ok", EXIT_SLOW: "slow", EXIT_FAILED: "failed", EXIT_UNKNOWN: "unknown"}
LABEL_BY_EXIT = {
    EXIT_OK: "OK",
    EXIT_SLOW: "WARNING",
    EXIT_FAILED: "CRITICAL",
    EXIT_UNKNOWN: "UNKNOWN",
}
EVENT_TYPE = "probe.ping"
DEFAULT_TOKEN_ENV = "ADVANCED_REALTIME_TOKEN"  # noqa: S105 - a variable's name, not a secret


class ProbeSettings(BaseSettings):
    """The few `ADVANCED_*` variables the probe reads; unrelated ones are never validated."""

    model_config = SettingsConfigDict(env_prefix="ADVANCED_", env_file=".env", extra="ignore")

    realtime_token: SecretStr = SecretStr(DEFAULT_TOKEN)
    ingress_port: int = 8004
    sse_port: int = 8005
    sse_public_url: str | None = None  # empty: the SSE routes are on the ingress's port


class ProbeError(Exception):
    """Ends the run: nothing further can be measured. `code` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.result: RoundResult | None = None  # the round it ended, if any


@dataclass
class ProbeOptions:
    ws_url: str
    sse_url: str
    board: str
    token: str
    count: int = 1
    interval: float = 1.0
    threshold_ms: float = 1000.0
    timeout: float = 10.0

    @property
    def socket_url(self) -> str:
        return f"{self.ws_url}/ws/boards/{self.board}"

    @property
    def stream_url(self) -> str:
        return f"{self.sse_url}/sse/boards/{self.board}"


@dataclass
class RoundResult:
    round: int
    correlation_id: str
    status: Literal["ok", "slow", "failed"] = "failed"
    sequence: int | None = None
    ack_ms: float | None = None
    echo_ms: float | None = None
    sse_ms: float | None = None
    error: str | None = None


@dataclass
class ProbeReport:
    options: ProbeOptions
    rounds: list[RoundResult] = field(default_factory=list)
    exit_code: int = EXIT_OK
    message: str = ""

    def as_json(self) -> dict[str, Any]:
        delivered = [r.sse_ms for r in self.rounds if r.sse_ms is not None]
        return {
            "status": STATUS_BY_EXIT[self.exit_code],
            "exit_code": self.exit_code,
            "message": self.message,
            "board": self.options.board,
            "ws_url": self.options.socket_url,
            "sse_url": self.options.stream_url,
            "threshold_ms": self.options.threshold_ms,
            "rounds": [asdict(r) for r in self.rounds],
            "latency_ms": latency_summary(delivered),
        }


def latency_summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


@dataclass(frozen=True)
class Closed:
    """The end of a feed: the WebSocket's close code, or the SSE stream's end."""

    code: int | None
    reason: str


# ---- the two feeds --------------------------------------------------------------------------


class SocketFeed:
    """The board's WebSocket; a background task queues every frame, then a `Closed`."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: asyncio.Queue[dict[str, Any] | Closed] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for raw in self.connection:
                with contextlib.suppress(ValueError):
                    frame = json.loads(raw)
                    if isinstance(frame, dict):
                        await self.frames.put(frame)
        except websockets.ConnectionClosed:
            pass
        await self.frames.put(
            Closed(self.connection.close_code, self.connection.close_reason or "")
        )

    async def send(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.connection.send(json.dumps(frame))

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.connection.close()


class StreamFeed:
    """The board's SSE stream; a background task queues each `activity` event, then a `Closed`."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: asyncio.Queue[dict[str, Any] | Closed] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        kind, data = "message", list[str]()
        reason = "the gateway ended the stream"
        try:
            async for line in self.response.aiter_lines():
                if line == "":
                    if kind == "activity" and data:
                        with contextlib.suppress(ValueError):
                            event = json.loads("\n".join(data))
                            if isinstance(event, dict):
                                await self.events.put(event)
                    elif kind == "close":
                        reason = "the gateway cut the stream as a slow consumer"
                    kind, data = "message", []
                elif line.startswith(":"):
                    continue  # heartbeat comment
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        kind = value
                    elif name == "data":
                        data.append(value)
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
async def open_socket(options: ProbeOptions) -> AsyncIterator[SocketFeed]:
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
    feed = SocketFeed(connection)
    try:
        yield feed
    finally:
        await feed.close()


def _socket_closed(closed: Closed) -> ProbeError:
    reason = f": {closed.reason}" if closed.reason else ""
    if closed.code == 4401:
        return ProbeError(
            EXIT_UNKNOWN,
            f"The ingress refused the credential (close 4401{reason}): set "
            "ADVANCED_REALTIME_TOKEN to the suite's token.",
        )
    if closed.code == 4403:
        return ProbeError(
            EXIT_UNKNOWN,
            f"The ingress denied the board (close 4403{reason}): use a token that grants it.",
        )
    if closed.code == 1013:
        return ProbeError(
            EXIT_FAILED, "The ingress is at its connection limit (close 1013): try again later."
        )
    if closed.code == 1001:
        return ProbeError(EXIT_FAILED, "The ingress is shutting down (close 1001).")
    code = "without a close code" if closed.code is None else f"with code {closed.code}"
    return ProbeError(EXIT_FAILED, f"The ingress closed the WebSocket {code}{reason}.")


# ---- one round --------------------------------------------------------------------------------


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


async def probe_round(
    index: int, socket: SocketFeed, stream: StreamFeed, options: ProbeOptions
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
    result: RoundResult, socket: SocketFeed, stream: StreamFeed, options: ProbeOptions
) -> None:
    frame = {
        "type": EVENT_TYPE,
        "payload": {"probe": "realtime-probe", "round": result.round, "sent_at": _now()},
        "id": result.correlation_id,
    }
    started = time.perf_counter()
    await socket.send(frame)

    waiting: dict[str, asyncio.Task[dict[str, Any] | Closed]] = {}
    try:
        async with asyncio.timeout(options.timeout):
            while result.ack_ms is None or result.echo_ms is None or result.sse_ms is None:
                if "ws" not in waiting and (result.ack_ms is None or result.echo_ms is None):
                    waiting["ws"] = asyncio.create_task(socket.frames.get())
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
            raise _socket_closed(item)
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
        if code == "unavailable":
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


# ---- the run ----------------------------------------------------------------------------------


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
    return _conclude(report)


def _conclude(report: ProbeReport) -> ProbeReport:
    rounds, options = report.rounds, report.options
    failed = next((r for r in rounds if r.status == "failed"), None)
    delivered = [r.sse_ms for r in rounds if r.sse_ms is not None]
    summary = latency_summary(delivered)
    spread = (
        f"latency min {summary['min']:.1f} / median {summary['median']:.1f} / max "
        f"{summary['max']:.1f} ms"
        if summary
        else "no latency measured"
    )
    threshold = f"threshold {options.threshold_ms:g} ms"
    if failed is not None:
        report.exit_code = EXIT_FAILED
        report.message = f"Round {failed.round}: {failed.error}"
    elif any(r.status == "slow" for r in rounds):
        slow = sum(r.status == "slow" for r in rounds)
        report.exit_code = EXIT_SLOW
        report.message = (
            f"{len(rounds)}/{options.count} delivered, {slow} slower than the {threshold}; "
            f"{spread}."
        )
    else:
        report.exit_code = EXIT_OK
        report.message = (
            f"{len(rounds)}/{options.count} delivered over SSE; {spread} ({threshold})."
        )
    return report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render_text(report: ProbeReport) -> str:
    options = report.options
    lines = [
        f"realtime-probe: board {options.board!r}, {options.ws_url} -> {options.sse_url}",
    ]
    for r in report.rounds:
        sequence = f"seq {r.sequence}" if r.sequence is not None else "seq -"
        lines.append(
            f"round {r.round}/{options.count}  {r.status.upper():<6}  {sequence:<9}  "
            f"ack {_ms(r.ack_ms)}  ws echo {_ms(r.echo_ms)}  sse {_ms(r.sse_ms)}"
        )
    lines.append(f"{LABEL_BY_EXIT[report.exit_code]}: {report.message}")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Exit 3 (UNKNOWN) rather than argparse's 2, which here means CRITICAL.
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNKNOWN, f"{self.prog}: error: {message}\n")


def _positive(kind: type[float] | type[int], allow_zero: bool = False) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}")
        return value

    return parse


def _base_url(text: str, schemes: dict[str, str], what: str) -> str:
    parts = urlsplit(text.strip())
    scheme = schemes.get(parts.scheme)
    if scheme is None or not parts.netloc:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ProbeError(EXIT_UNKNOWN, f"{what} must be an absolute {allowed} URL, got {text!r}.")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def sse_default(settings: ProbeSettings, ws_url: str, timeout: float) -> str:
    """`--sse-url` unless given: ADVANCED_SSE_PUBLIC_URL, else where the ingress's own page
    looks for the gateway (so the in-memory suite, which serves `/sse/` on the ingress's port,
    needs no flag), else http://localhost:ADVANCED_SSE_PORT."""
    if settings.sse_public_url is not None:
        return settings.sse_public_url or http_base(ws_url)
    fallback = f"http://localhost:{settings.sse_port}"
    try:
        answer = httpx.get(f"{http_base(ws_url)}/playground/config.json", timeout=min(timeout, 3))
        configured = answer.json().get("sse_public_url") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return fallback  # the probe then reports the ingress or the gateway as unreachable
    if not isinstance(configured, str):
        return fallback
    return configured or http_base(ws_url)


def http_base(ws_url: str) -> str:
    """The ingress's HTTP base URL for its WebSocket base URL (already checked)."""
    parts = urlsplit(ws_url)
    return urlunsplit(
        ({"ws": "http", "wss": "https"}[parts.scheme], parts.netloc, parts.path, "", "")
    )


def build_parser(settings: ProbeSettings) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="realtime-probe",
        description=(
            "Send one event per round over the WebSocket and wait for it on the SSE stream; "
            "print the latency. Exit 0 ok, 1 slower than --threshold-ms, 2 not delivered or "
            "unreachable, 3 could not judge (bad arguments, credential refused)."
        ),
    )
    parser.add_argument(
        "--ws-url",
        default=f"ws://localhost:{settings.ingress_port}",
        help="the ingress's base URL, ws(s):// or http(s):// (default: %(default)s)",
    )
    parser.add_argument(
        "--sse-url",
        default=None,
        help="the SSE gateway's base URL (default: ADVANCED_SSE_PUBLIC_URL, else where the "
        "ingress's page finds it, else http://localhost:ADVANCED_SSE_PORT)",
    )
    parser.add_argument(
        "--board",
        default="synthetic-probe",
        help="the board the probe writes to; keep it apart from people's boards "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--count", type=_positive(int), default=1, help="rounds to run (default: %(default)s)"
    )
    parser.add_argument(
        "--interval",
        type=_positive(float, allow_zero=True),
        default=1.0,
        help="seconds between rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--threshold-ms",
        type=_positive(float),
        default=1000.0,
        help="a round slower than this, send to SSE delivery, makes the exit code 1 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=10.0,
        help="seconds to wait for each connection and each round (default: %(default)s)",
    )
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        metavar="NAME",
        help="the environment variable holding the credential (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def parse_options(argv: Sequence[str] | None) -> tuple[ProbeOptions, bool]:
    settings = ProbeSettings()
    args = build_parser(settings).parse_args(argv)
    if not is_board_id(args.board):
        raise ProbeError(
            EXIT_UNKNOWN, f"--board {args.board!r} is not a board id: 1-64 of [A-Za-z0-9_.-]."
        )
    if args.token_env == DEFAULT_TOKEN_ENV:
        token = settings.realtime_token.get_secret_value()
    else:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise ProbeError(EXIT_UNKNOWN, f"--token-env names {args.token_env}, which is not set.")
    ws_url = _base_url(
        args.ws_url, {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}, "--ws-url"
    )
    sse_url = args.sse_url or sse_default(settings, ws_url, args.timeout)
    options = ProbeOptions(
        ws_url=ws_url,
        sse_url=_base_url(sse_url, {"http": "http", "https": "https"}, "--sse-url"),
        board=args.board,
        token=token,
        count=args.count,
        interval=args.interval,
        threshold_ms=args.threshold_ms,
        timeout=args.timeout,
    )
    return options, args.json


def _write(text: str, stream: Any) -> None:
    stream.write(text + "\n")
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        options, as_json = parse_options(argv)
    except ProbeError as exc:
        if as_json:
            refusal = {"status": "unknown", "exit_code": exc.code, "message": exc.message}
            _write(json.dumps(refusal), sys.stdout)
        else:
            _write(f"UNKNOWN: {exc.message}", sys.stderr)
        return exc.code
    report = asyncio.run(run_probe(options))
    if as_json:
        _write(json.dumps(report.as_json()), sys.stdout)
        return report.exit_code
    *rounds, verdict = render_text(report).splitlines()
    _write("\n".join(rounds), sys.stdout)
    # The verdict of a failed check goes to stderr, which cron mails and schedulers keep.
    _write(verdict, sys.stdout if report.exit_code == EXIT_OK else sys.stderr)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
