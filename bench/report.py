"""The results of one run: a JSON file, a Markdown table and a latency plot, side by side."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

Result = dict[str, Any]


def targets(results: Result) -> list[Result]:
    """Issue 7's targets, each with the measured figures and whether it holds."""
    scenarios = results["scenarios"]
    rows: list[Result] = []

    def add(name: str, goal: str, baseline: Any, suite: Any, holds: bool | None) -> None:
        rows.append(
            {"target": name, "goal": goal, "baseline": baseline, "suite": suite, "holds": holds}
        )

    if "max_rate" in scenarios and {"suite", "baseline"} <= set(scenarios["max_rate"]):
        base = scenarios["max_rate"]["baseline"]["median_max_sustainable"]
        ours = scenarios["max_rate"]["suite"]["median_max_sustainable"]
        add(
            "max sustainable rate (msg/s, 1 WS + 1 SSE)",
            ">= 1.0x baseline",
            base,
            f"{ours} ({ours / base:.2f}x)" if base else ours,
            ours >= base,
        )
    if "latency" in scenarios and "suite" in scenarios["latency"]:
        p99 = scenarios["latency"]["suite"]["median"]["all"]["p99_ms"]
        base_p99 = scenarios["latency"].get("baseline", {}).get("median", {}).get("all", {})
        lost = scenarios["latency"]["suite"]["median"]["lost"]
        add(
            "p99 at 200 msg/s, 10 WS + 10 SSE (ms)",
            "<= 5 ms, no loss",
            base_p99.get("p99_ms"),
            p99,
            p99 is not None and p99 <= 5 and not lost,
        )
    if "fanout" in scenarios and {"suite", "baseline"} <= set(scenarios["fanout"]):
        base_f = scenarios["fanout"]["baseline"]
        ours_f = scenarios["fanout"]["suite"]
        ratio = (
            ours_f["median_deliveries_per_s"] / base_f["median_deliveries_per_s"]
            if base_f["median_deliveries_per_s"]
            else float("inf")
        )
        add(
            "fan-out at 50 msg/s: SSE subscribers held (deliveries/s)",
            ">= 2x baseline deliveries/s, >= 600 subscribers, no loss",
            f"{base_f['median_max_subscribers']:.0f} ({base_f['median_deliveries_per_s']:.0f}/s)",
            f"{ours_f['median_max_subscribers']:.0f} ({ours_f['median_deliveries_per_s']:.0f}/s, "
            f"{ratio:.2f}x)",
            ratio >= 2 and ours_f["median_max_subscribers"] >= 600,
        )
    if "idle" in scenarios and "suite" in scenarios["idle"]:
        base_i = scenarios["idle"].get("baseline", {})
        ours_i = scenarios["idle"]["suite"]
        for transport, limit in (("sse", 26), ("ws", 32)):
            if transport not in ours_i:
                continue
            entry = ours_i[transport]
            add(
                f"idle {transport.upper()} RSS per connection (KiB), {entry['requested']} held",
                f"<= {limit} KiB, all held",
                base_i.get(transport, {}).get("kib_per_connection"),
                f"{entry['kib_per_connection']} ({entry['held']} held)",
                entry["kib_per_connection"] <= limit
                and entry["held"] == entry["requested"]
                and entry["requested"] >= 10_000,
            )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _step_rows(kind: str, sweep_index: int, steps: list[Result], key: str) -> list[list[Any]]:
    rows = []
    for step in steps:
        lat = step["latency"]["all"]
        x = step["rate_target"] if key == "rate" else step["subscribers"]["sse"]
        cpu = ", ".join(
            f"{name} {s['cpu_us_per_event']:.0f}"
            for name, s in step["servers"].items()
            if s["cpu_us_per_event"] is not None
        )
        rows.append(
            [
                kind,
                sweep_index + 1,
                x,
                step["rate_achieved"],
                step["deliveries_per_s"],
                lat.get("p50_ms"),
                lat.get("p99_ms"),
                lat.get("max_ms"),
                step["lost"],
                step["duplicated"],
                cpu,
                step["load"]["others_cores"],
                "ok" if step["passed"] else "; ".join(step["why_not"]),
            ]
        )
    return rows


def markdown(results: Result) -> str:
    meta = results["meta"]
    out = [
        f"# Benchmark {meta['date']} ({meta['profile']})",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['cpus']} cores, {meta['memory_gib']} GiB, "
        f"Python {meta['python']}; load average {meta['loadavg_start']} at the start, "
        f"{meta.get('loadavg_end', '-')} at the end; {meta['duration_minutes']} minutes.",
        "Every figure is the median of the runs listed below; `others` is the CPU (in cores) "
        "that processes outside the benchmark used during the step.",
        "",
        "## Targets",
        "",
    ]
    out += _table(
        ["target", "goal", "baseline", "suite", "holds"],
        [
            [
                t["target"],
                t["goal"],
                t["baseline"],
                t["suite"],
                "yes" if t["holds"] else "no" if t["holds"] is not None else "-",
            ]
            for t in results["targets"]
        ],
    )
    scenarios = results["scenarios"]
    if "latency" in scenarios:
        out += ["", "## (a) Latency: 1 board, 200 msg/s, 10 WebSocket + 10 SSE subscribers", ""]
        rows = []
        for kind, entry in scenarios["latency"].items():
            median = entry["median"]
            for transport in ("ws", "sse"):
                lat = median[transport]
                rows.append(
                    [
                        kind,
                        transport,
                        lat["p50_ms"],
                        lat["p90_ms"],
                        lat["p99_ms"],
                        lat["max_ms"],
                        median["lost"],
                        median["duplicated"],
                        median["runs"],
                    ]
                )
        out += _table(
            ["target", "transport", "p50 ms", "p90 ms", "p99 ms", "max ms", "lost", "dup", "runs"],
            rows,
        )
        out += ["", "CPU per event (µs, median over the runs) and RSS after the run:", ""]
        rows = [
            [kind, name, s["cpu_us_per_event"], s["rss_mib"]]
            for kind, entry in scenarios["latency"].items()
            for name, s in entry["median"]["servers"].items()
        ]
        out += _table(["target", "process", "CPU µs/event", "RSS MiB"], rows)
    header = [
        "target",
        "run",
        "",
        "achieved msg/s",
        "deliveries/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "lost",
        "dup",
        "CPU µs/event",
        "others",
        "verdict",
    ]
    if "max_rate" in scenarios:
        out += ["", "## (b) Maximum sustainable rate: 1 board, 1 WebSocket + 1 SSE subscriber", ""]
        for kind, entry in scenarios["max_rate"].items():
            out.append(
                f"- {kind}: {entry['median_max_sustainable']:.0f} msg/s (median of "
                f"{[r['max_sustainable'] for r in entry['runs']]})"
            )
        out.append("")
        rows = [
            row
            for kind, entry in scenarios["max_rate"].items()
            for i, sweep in enumerate(entry["runs"])
            for row in _step_rows(kind, i, sweep["steps"], "rate")
        ]
        out += _table([*header[:2], "msg/s", *header[3:]], rows)
    if "fanout" in scenarios:
        out += ["", "## (c) Fan-out: 1 board at 50 msg/s, SSE subscribers stepped", ""]
        for kind, entry in scenarios["fanout"].items():
            out.append(
                f"- {kind}: {entry['median_max_subscribers']:.0f} subscribers, "
                f"{entry['median_deliveries_per_s']:.0f} deliveries/s (median of "
                f"{[r['max_subscribers'] for r in entry['runs']]})"
            )
        out.append("")
        rows = [
            row
            for kind, entry in scenarios["fanout"].items()
            for i, sweep in enumerate(entry["runs"])
            for row in _step_rows(kind, i, sweep["steps"], "subscribers")
        ]
        out += _table([*header[:2], "SSE subs", *header[3:]], rows)
    if "idle" in scenarios:
        out += ["", "## (d) Idle connections, RSS per connection", ""]
        rows = [
            [
                kind,
                transport,
                e["process"],
                e["requested"],
                e["held"],
                e["connect_failures"],
                e["connect_seconds"],
                e["rss_before_mib"],
                e["rss_after_mib"],
                e["kib_per_connection"],
            ]
            for kind, entry in scenarios["idle"].items()
            for transport, e in entry.items()
        ]
        out += _table(
            [
                "target",
                "transport",
                "process",
                "requested",
                "held",
                "failures",
                "connect s",
                "RSS before MiB",
                "RSS after MiB",
                "KiB/conn",
            ],
            rows,
        )
    if "profile" in results:
        out += ["", "## CPU profile (py-spy)", ""]
        out += profile_markdown(results["profile"])
    return "\n".join(out) + "\n"


def profile_markdown(profile: Result) -> list[str]:
    out = [
        f"{profile['description']}. Raw stacks: `{profile['directory']}` "
        "(collapsed format; speedscope.app opens them).",
        "",
    ]
    rows = [
        [
            name,
            s["cpu_us_per_event"],
            s["samples"],
            ", ".join(f"{k} {v:.0f}%" for k, v in list(s["by_package"].items())[:8]),
        ]
        for name, s in profile["services"].items()
    ]
    out += _table(["process", "CPU µs/event", "samples", "self time by package"], rows)
    for name, s in profile["services"].items():
        out += ["", f"Hottest functions in {name} (self time):", ""]
        out += _table(
            ["function", "self %", "inclusive %"],
            [[f["function"], f["self_pct"], f["inclusive_pct"]] for f in s["top"][:12]],
        )
    return out


def plot(results: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = {
        "suite": "tab:blue",
        "baseline": "tab:orange",
        "suite-quorum": "tab:green",
        "suite-redis-cluster": "tab:red",
    }
    panels = (
        ("max_rate", "rate_target", "publish rate (msg/s), 1 WS + 1 SSE"),
        ("fanout", "sse_subscribers", "SSE subscribers at 50 msg/s"),
    )
    for axis, (scenario, x_key, label) in zip(axes, panels, strict=True):
        for kind, entry in scenarios.get(scenario, {}).items():
            points: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for sweep in entry["runs"]:
                for step in sweep["steps"]:
                    lat = step["latency"]["all"]
                    if lat.get("count"):
                        for key in ("p50_ms", "p90_ms", "p99_ms"):
                            x = step["rate_target"] if x_key == "rate_target" else None
                            x = x if x is not None else step["subscribers"]["sse"]
                            points[x][key].append(lat[key])
            xs = sorted(points)
            for key, style in (("p50_ms", ":"), ("p90_ms", "--"), ("p99_ms", "-")):
                ys = [float(np.median(points[x][key])) for x in xs]
                axis.plot(
                    xs,
                    ys,
                    style,
                    marker="o",
                    color=colours.get(kind),
                    label=f"{kind} {key[:-3]}",
                )
        axis.axhline(250, color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("latency (ms, median of runs)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_title("Latency against publish rate")
    axes[1].set_title("Latency against SSE subscribers")
    figure.suptitle(f"suite vs textbook baseline, {results['meta']['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
