"""`python -m bench`: run the scenarios against the suite and the baseline, write the results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.scenarios import FULL, QUICK, SCENARIOS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds each")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--targets",
        default="baseline,suite",
        help="comma-separated: baseline, suite, suite-quorum (the suite on a private "
        "three-node RabbitMQ cluster with quorum queues), suite-redis-cluster (the suite on a "
        "private six-node Redis Cluster, ADVANCED_REDIS_MIN_REPLICAS=1)",
    )
    parser.add_argument("--repeats", type=int, help="override the repeats of every scenario")
    parser.add_argument("--idle-connections", type=int, help="override the idle scenario's N")
    parser.add_argument("--latency-seconds", type=float, help="override scenario (a)'s length")
    parser.add_argument("--step-seconds", type=float, help="override each sweep step's length")
    parser.add_argument("--rates", help="override scenario (b)'s steps, e.g. 500,1000,2000")
    parser.add_argument("--fanout", help="override scenario (c)'s steps, e.g. 100,200")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the suite (py-spy) at --profile-rate for --profile-seconds",
    )
    parser.add_argument("--profile-rate", type=float, default=1000)
    parser.add_argument("--profile-seconds", type=float, default=10)
    parser.add_argument("--profile-ws", type=int, default=1, help="WebSocket subscribers")
    parser.add_argument("--profile-sse", type=int, default=1, help="SSE subscribers")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", help="file name stem (default: the date, -quick when quick)")
    args = parser.parse_args(argv)

    profile = QUICK if args.quick else FULL
    changes: dict[str, Any] = {
        "targets": tuple(args.targets.split(",")),
        "scenarios": tuple(s for s in args.scenarios.split(",") if s),
    }
    if args.repeats:
        changes |= {"latency_repeats": args.repeats, "sweep_repeats": args.repeats}
    if args.idle_connections:
        changes["idle_connections"] = args.idle_connections
    if args.latency_seconds:
        changes["latency_seconds"] = args.latency_seconds
    if args.step_seconds:
        changes["step_seconds"] = args.step_seconds
    if args.rates:
        changes["rates"] = tuple(int(r) for r in args.rates.split(","))
    if args.fanout:
        changes["fanout"] = tuple(int(n) for n in args.fanout.split(","))
    profile = dataclasses.replace(profile, **changes)
    unknown = set(profile.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}: choose among {sorted(SCENARIOS)}")

    # 10,000 idle connections need as many descriptors in the servers (which inherit this
    # limit) and in the client processes.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < profile.idle_connections + 1000 and "idle" in profile.scenarios:
        print(
            f"warning: the open-file limit is {hard}; the idle scenario needs "
            f"{profile.idle_connections + 1000}: raise it (ulimit -Hn) or lower --idle-connections",
            file=sys.stderr,
        )

    started = time.monotonic()
    date = time.strftime("%Y-%m-%d")
    results: dict[str, Any] = {
        "meta": {
            "date": date,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "profile": profile.name,
            "settings": dataclasses.asdict(profile),
            "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "loadavg_start": round(os.getloadavg()[0], 2),
        },
        "scenarios": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or (date + ("-quick" if args.quick else ""))
    for name in profile.scenarios:
        results["scenarios"][name] = SCENARIOS[name](profile)
        _write(results, args.out, stem, started)  # keep what is done if a later one fails
    if args.profile:
        from bench.profiling import profile_suite

        results["profile"] = profile_suite(
            args.out / "profiles" / stem,
            args.profile_rate,
            args.profile_seconds,
            ws=args.profile_ws,
            sse=args.profile_sse,
        )
    _write(results, args.out, stem, started)
    print(report.markdown(results))
    print(f"wrote {args.out / stem}.json, .md and .png")


def _write(results: dict[str, Any], out: Path, stem: str, started: float) -> None:
    results["meta"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    results["meta"]["duration_minutes"] = round((time.monotonic() - started) / 60, 1)
    results["targets"] = report.targets(results)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(results))
    if {"max_rate", "fanout"} & set(results["scenarios"]):
        report.plot(results, out / f"{stem}.png")


if __name__ == "__main__":
    main()
