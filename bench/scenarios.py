"""The four scenarios of issue 7, each run against the suite and the baseline in turn."""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from bench.launcher import (
    PUBLISHER_MAX_RATE,
    RABBITMQ_URL,
    REDIS_URL,
    Deployment,
    deployment,
    listening_process,
)
from bench.loadgen import Sample, StepPlan, Subscribers, latencies, run_step

P99_LIMIT_MS = 250.0
Result = dict[str, Any]


@dataclass(frozen=True)
class Profile:
    """How long and how often: `full` is issue 7's definition, `quick` a smoke run."""

    name: str
    latency_seconds: float
    latency_repeats: int
    step_seconds: float
    sweep_repeats: int
    rates: tuple[int, ...]
    fanout: tuple[int, ...]
    idle_connections: int
    grace: float
    targets: tuple[str, ...] = ("baseline", "suite")
    scenarios: tuple[str, ...] = ("latency", "max_rate", "fanout", "idle")


FULL = Profile(
    name="full",
    latency_seconds=20,
    latency_repeats=3,
    step_seconds=10,
    sweep_repeats=2,
    rates=(100, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000),
    fanout=(100, 200, 300, 400, 600, 800, 1000, 1200, 1500, 2000),
    idle_connections=10_000,
    grace=5,
)
QUICK = Profile(
    name="quick",
    latency_seconds=3,
    latency_repeats=1,
    step_seconds=2,
    sweep_repeats=1,
    rates=(200, 500),
    fanout=(20, 50),
    idle_connections=100,
    grace=3,
)


def _brokers() -> dict[str, psutil.Process]:
    """The shared RabbitMQ and Redis: their CPU is the suite's (and, alas, everyone's). Found
    by the ports they listen on: other RabbitMQ nodes may run beside the shared one."""
    found = {"rabbitmq": listening_process(RABBITMQ_URL), "redis": listening_process(REDIS_URL)}
    return {name: process for name, process in found.items() if process is not None}


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _cpu_sample(target: Deployment) -> Callable[[], Sample]:
    brokers = target.broker_processes() or _brokers()

    def sample() -> Sample:
        values = {name: p.cpu_seconds() for name, p in target.processes.items()}
        for name, process in brokers.items():
            values[f"broker:{name}"] = _cpu_seconds(process)
        times = psutil.cpu_times()
        values["_machine_busy"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        values["_wall"] = time.monotonic()
        return values

    return sample


def _percentiles(samples_ns: Any) -> Result:
    if len(samples_ns) == 0:
        return {"count": 0}
    values = np.frombuffer(samples_ns, dtype=np.int64) / 1e6
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "count": int(values.size),
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(values.max()), 3),
    }


def measure(
    target: Deployment, plan: StepPlan, on_start: Callable[[], None] | None = None
) -> Result:
    """Run one step and turn its tallies into the figures of the report.

    `on_start` runs once the subscribers are connected, just before publishing starts.
    """
    load_before = os.getloadavg()[0]
    sample = _cpu_sample(target)
    calls: list[int] = []

    def sample_and_start() -> Sample:
        values = sample()
        if on_start is not None and not calls:
            on_start()
        calls.append(1)
        return values

    outcome, before, after = run_step(plan, sample_and_start)
    publish = outcome.publish
    accepted = publish.sent - publish.refused
    per_connection = [u for t in outcome.tallies for u in t.unique]
    subscribers = len(per_connection)
    delivered = sum(per_connection)
    lost = sum(max(0, accepted - u) for u in per_connection)
    duplicated = sum(t.duplicates for t in outcome.tallies)
    cut = sum(t.cut for t in outcome.tallies)
    connect_failures = publish.connect_failures + sum(t.connect_failures for t in outcome.tallies)
    wall = after["_wall"] - before["_wall"]
    servers: Result = {}
    for name, process in target.processes.items():
        cpu = after[name] - before[name]
        servers[name] = {
            "cpu_seconds": round(cpu, 3),
            "cpu_us_per_event": round(cpu / accepted * 1e6, 1) if accepted else None,
            "rss_mib": round(process.rss_bytes() / 2**20, 1),
        }
    brokers = {
        name.partition(":")[2]: round(after[name] - before[name], 3)
        for name in after
        if name.startswith("broker:")
    }
    ours = (
        sum(after[n] - before[n] for n in target.processes)
        + sum(c.cpu_seconds for c in outcome.clients)
        + sum(brokers.values())
    )
    machine_busy = (after["_machine_busy"] - before["_machine_busy"]) / wall
    by_transport = {
        transport: _percentiles(latencies(outcome.tallies, transport))
        for transport in ("ws", "sse")
    }
    overall = _percentiles(latencies(outcome.tallies))
    achieved = publish.sent / publish.seconds if publish.seconds else 0.0
    reasons = []
    if overall.get("p99_ms", 0.0) > P99_LIMIT_MS:
        reasons.append(f"p99 {overall['p99_ms']:.0f} ms > {P99_LIMIT_MS:.0f} ms")
    if lost:
        reasons.append(f"{lost} lost")
    if connect_failures:
        reasons.append(f"{connect_failures} connect failures")
    if cut:
        reasons.append(f"{cut} streams cut")
    if publish.refused:
        reasons.append(f"{publish.refused} refused {publish.errors}")
    if achieved < plan.rate * 0.95:
        reasons.append(f"publisher reached only {achieved:.0f}/s (client-bound)")
    return {
        "rate_target": plan.rate,
        "rate_achieved": round(achieved, 1),
        "seconds": plan.duration,
        "publishers": len(plan.publish_urls),
        "subscribers": {"ws": len(plan.ws_urls), "sse": len(plan.sse_urls)},
        "sent": publish.sent,
        "acked": publish.acked,
        "refused": publish.refused,
        "expected": accepted * subscribers,
        "delivered": delivered,
        "lost": lost,
        "duplicated": duplicated,
        "streams_cut": cut,
        "deliveries_per_s": round(delivered / publish.seconds, 1) if publish.seconds else 0.0,
        "latency": {**by_transport, "all": overall},
        "connect_failures": connect_failures,
        "publisher_max_lag_ms": round(publish.max_lag_ms, 1),
        "servers": servers,
        "client": {
            "processes": len(outcome.clients),
            "cpu_seconds": round(sum(c.cpu_seconds for c in outcome.clients), 3),
            "rss_mib": round(sum(c.rss_bytes for c in outcome.clients) / 2**20, 1),
        },
        "brokers_cpu_seconds": brokers,
        "load": {
            "loadavg_1m_before": round(load_before, 2),
            "machine_busy_cores": round(machine_busy, 2),
            "our_cores": round(ours / wall, 2),
            "others_cores": round(max(0.0, machine_busy - ours / wall), 2),
        },
        "passed": not reasons,
        "why_not": reasons,
    }


def _plan(
    target: Deployment,
    board: str,
    rate: float,
    seconds: float,
    *,
    ws: int,
    sse: int,
    grace: float,
    publishers: int = 1,
) -> StepPlan:
    return StepPlan(
        run_id=uuid.uuid4().hex[:10],
        publish_urls=[target.ws_url(board)] * publishers,
        rate=rate,
        duration=seconds,
        ws_urls=[target.ws_url(board)] * ws,
        sse_urls=[target.sse_url(board)] * sse,
        grace=grace,
    )


def _warm_up(target: Deployment) -> None:
    """First requests pay for imports, JIT-less caches and connection set-up: not measured."""
    measure(target, _plan(target, "warmup", 100, 2, ws=1, sse=1, grace=3))


def _settle(target: Deployment, timeout: float = 60.0) -> None:
    """Wait until the target is idle again (e.g. a worker draining a backlog)."""
    processes = [psutil.Process(p.pid) for p in target.processes.values()]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(sum(p.cpu_times()[:2]) for p in processes)
        time.sleep(1.0)
        if sum(sum(p.cpu_times()[:2]) for p in processes) - before < 0.05:
            return


def _targets(profile: Profile, repeat: int) -> list[str]:
    # Alternate who goes first, so that drift in the machine's load does not favour one side.
    order = list(profile.targets)
    return order if repeat % 2 == 0 else order[::-1]


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _runs(profile: Profile, repeats: int) -> Iterator[tuple[int, str, Deployment]]:
    for repeat in range(repeats):
        for kind in _targets(profile, repeat):
            with deployment(kind) as target:
                _warm_up(target)
                yield repeat, kind, target


def latency(profile: Profile) -> Result:
    """(a) 1 board, 1 publisher, 10 WebSocket + 10 SSE subscribers, 200 msg/s."""
    runs: dict[str, list[Result]] = {k: [] for k in profile.targets}
    for repeat, kind, target in _runs(profile, profile.latency_repeats):
        step = measure(
            target,
            _plan(
                target, "latency", 200, profile.latency_seconds, ws=10, sse=10, grace=profile.grace
            ),
        )
        _log(f"latency {kind} #{repeat + 1}: {_line(step)}")
        runs[kind].append(step)
    return {kind: {"runs": steps, "median": _median_step(steps)} for kind, steps in runs.items()}


def max_rate(profile: Profile) -> Result:
    """(b) 1 board, 1 WebSocket + 1 SSE subscriber; raise the rate until p99 > 250 ms or a loss."""
    runs: dict[str, list[Result]] = {k: [] for k in profile.targets}
    for repeat, kind, target in _runs(profile, profile.sweep_repeats):
        steps = []
        for rate in profile.rates:
            publishers = max(1, math.ceil(rate / PUBLISHER_MAX_RATE))
            step = measure(
                target,
                _plan(
                    target,
                    f"rate{rate}",
                    rate,
                    profile.step_seconds,
                    ws=1,
                    sse=1,
                    grace=profile.grace,
                    publishers=publishers,
                ),
            )
            _log(f"max-rate {kind} #{repeat + 1} {rate}/s: {_line(step)}")
            steps.append(step)
            if not step["passed"]:
                break
            _settle(target)
        held = [s["rate_target"] for s in steps if s["passed"]]
        runs[kind].append({"steps": steps, "max_sustainable": max(held) if held else 0})
    return {
        kind: {
            "runs": sweeps,
            "median_max_sustainable": float(np.median([s["max_sustainable"] for s in sweeps])),
        }
        for kind, sweeps in runs.items()
    }


def fanout(profile: Profile) -> Result:
    """(c) 1 board at 50 msg/s; add SSE subscribers until p99 > 250 ms or a loss."""
    runs: dict[str, list[Result]] = {k: [] for k in profile.targets}
    for repeat, kind, target in _runs(profile, profile.sweep_repeats):
        steps = []
        for count in profile.fanout:
            step = measure(
                target,
                _plan(
                    target,
                    f"fanout{count}",
                    50,
                    profile.step_seconds,
                    ws=0,
                    sse=count,
                    grace=profile.grace,
                ),
            )
            _log(f"fan-out {kind} #{repeat + 1} {count} SSE: {_line(step)}")
            steps.append(step)
            if not step["passed"]:
                break
            _settle(target)
        held = [s for s in steps if s["passed"]]
        best = max(held, key=lambda s: s["subscribers"]["sse"]) if held else None
        runs[kind].append(
            {
                "steps": steps,
                "max_subscribers": best["subscribers"]["sse"] if best else 0,
                "deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
            }
        )
    return {
        kind: {
            "runs": sweeps,
            "median_max_subscribers": float(np.median([s["max_subscribers"] for s in sweeps])),
            "median_deliveries_per_s": float(np.median([s["deliveries_per_s"] for s in sweeps])),
        }
        for kind, sweeps in runs.items()
    }


def idle(profile: Profile) -> Result:
    """(d) N idle SSE streams on one gateway process and N idle WebSockets on one ingress."""
    count = profile.idle_connections
    result: Result = {}
    for kind in profile.targets:
        with deployment(kind) as target:
            _warm_up(target)
            entry: Result = {}
            for transport, process_name in (("sse", target.gateway), ("ws", target.ingress)):
                process = target.processes[process_name]
                urls = [
                    (target.sse_url if transport == "sse" else target.ws_url)(f"idle-{i % 100}")
                    for i in range(count)
                ]
                plan = StepPlan(
                    run_id="idle",
                    publish_urls=[],
                    rate=0,
                    duration=0,
                    ws_urls=urls if transport == "ws" else [],
                    sse_urls=urls if transport == "sse" else [],
                    per_process=2500,
                    connect_concurrency=100,
                )
                time.sleep(1)
                rss_before = process.rss_bytes()
                started = time.monotonic()
                subscribers = Subscribers(plan, hold=True)
                try:
                    failures = subscribers.connect(timeout=600)
                    connect_seconds = time.monotonic() - started
                    time.sleep(3)  # let the event loop settle before reading memory
                    rss_after = process.rss_bytes()
                    subscribers.release()
                    tallies, _usage = subscribers.collect(timeout=300)
                finally:
                    subscribers.kill()
                held = sum(t.connections for t in tallies)
                cut = sum(t.cut for t in tallies)
                entry[transport] = {
                    "process": process_name,
                    "requested": count,
                    "held": held,
                    "connect_failures": failures,
                    "streams_cut": cut,
                    "connect_seconds": round(connect_seconds, 1),
                    "rss_before_mib": round(rss_before / 2**20, 1),
                    "rss_after_mib": round(rss_after / 2**20, 1),
                    "kib_per_connection": round((rss_after - rss_before) / 1024 / max(held, 1), 1),
                }
                _log(f"idle {kind} {transport}: {entry[transport]}")
                _settle(target)
            result[kind] = entry
    return result


def _line(step: Result) -> str:
    lat = step["latency"]["all"]
    verdict = "ok" if step["passed"] else "FAIL " + "; ".join(step["why_not"])
    return (
        f"sent {step['sent']} delivered {step['delivered']}/{step['expected']} "
        f"lost {step['lost']} dup {step['duplicated']} p50 {lat.get('p50_ms')} "
        f"p99 {lat.get('p99_ms')} ms, {step['deliveries_per_s']:.0f} deliveries/s, "
        f"others {step['load']['others_cores']} cores: {verdict}"
    )


def _median_step(steps: list[Result]) -> Result:
    """The median of each headline figure over repeated runs of the same step."""

    def med(values: list[float]) -> float | None:
        present = [v for v in values if v is not None]
        return round(float(np.median(present)), 3) if present else None

    median: Result = {"runs": len(steps)}
    for transport in ("ws", "sse", "all"):
        median[transport] = {
            key: med([s["latency"][transport].get(key) for s in steps])
            for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
    for key in ("lost", "duplicated", "deliveries_per_s", "connect_failures"):
        median[key] = med([s[key] for s in steps])
    median["servers"] = {
        name: {
            "cpu_us_per_event": med([s["servers"][name]["cpu_us_per_event"] for s in steps]),
            "rss_mib": med([s["servers"][name]["rss_mib"] for s in steps]),
        }
        for name in steps[0]["servers"]
    }
    return median


SCENARIOS: dict[str, Callable[[Profile], Result]] = {
    "latency": latency,
    "max_rate": max_rate,
    "fanout": fanout,
    "idle": idle,
}
