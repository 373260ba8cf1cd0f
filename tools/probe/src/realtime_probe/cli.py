"""`realtime-probe`: a synthetic check of the whole pipeline, for a terminal, cron or a CronJob.

Exit codes (`realtime_probe.report`): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. The credential
is read from ADVANCED_REALTIME_TOKEN (or the variable --token-env names), never from the
command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
from envelope.models import is_board_id
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from realtime_runtime.settings import DEFAULT_TOKEN

from realtime_probe.report import EXIT_OK, EXIT_UNKNOWN, ProbeError, ProbeOptions, render_text
from realtime_probe.rounds import run_probe

DEFAULT_TOKEN_ENV = "ADVANCED_REALTIME_TOKEN"  # noqa: S105 - a variable's name, not a secret


class ProbeSettings(BaseSettings):
    """The few `ADVANCED_*` variables the probe reads; unrelated ones are never validated.

    The ports' defaults are the ingress's and the gateway's own: a tool may not import the
    services, and `services/ingress-ws/tests/test_ports.py` with `tools/probe/tests` keep the
    page and the probe following the same variables.
    """

    model_config = SettingsConfigDict(env_prefix="ADVANCED_", env_file=".env", extra="ignore")

    realtime_token: SecretStr = SecretStr(DEFAULT_TOKEN)
    ingress_port: int = 8004
    sse_port: int = 8005
    sse_public_url: str | None = None  # empty: the SSE routes are on the ingress's port


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
