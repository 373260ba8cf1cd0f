"""What a probe run finds: its options, each round's result, the verdict and how it is told.

The exit code follows the monitoring-plugin convention, so any scheduler can alert on it:
0 OK, 1 WARNING (slower than the threshold), 2 CRITICAL (not delivered, or unreachable),
3 UNKNOWN (the probe could not judge: bad arguments, or its credential was refused).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

EXIT_OK, EXIT_SLOW, EXIT_FAILED, EXIT_UNKNOWN = 0, 1, 2, 3
STATUS_BY_EXIT = {EXIT_OK: "ok", EXIT_SLOW: "slow", EXIT_FAILED: "failed", EXIT_UNKNOWN: "unknown"}
LABEL_BY_EXIT = {
    EXIT_OK: "OK",
    EXIT_SLOW: "WARNING",
    EXIT_FAILED: "CRITICAL",
    EXIT_UNKNOWN: "UNKNOWN",
}


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


def conclude(report: ProbeReport) -> ProbeReport:
    """The verdict of a run whose every round ended (delivered, slow or timed out)."""
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
