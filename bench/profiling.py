"""Where each service's CPU goes: py-spy samples every process during one steady step."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.launcher import SuiteDeployment
from bench.loadgen import StepPlan
from bench.scenarios import _warm_up, measure

Result = dict[str, Any]


def _package(frame: str) -> str:
    """`func (aio_pika/channel.py)` -> `aio_pika`; own code, libraries and stdlib alike."""
    _, _, where = frame.rpartition(" (")
    path = where.rstrip(")")
    if not path or path.startswith("<"):
        return "interpreter"
    head = path.split("/", 1)[0]
    return head.removesuffix(".py")


def summarise(collapsed: Path, events: int, cpu_seconds: float) -> Result:
    """Self time by package and the hottest functions, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # The first frame names the thread ("process 123:..." or "thread (0x..)"): skip it.
        frames = [f for f in frames if " (" in f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    top = [
        {
            "function": function,
            "self_pct": round(100 * samples / total, 1),
            "inclusive_pct": round(100 * inclusive[function] / total, 1),
        }
        for function, samples in own.most_common(25)
    ]
    return {
        "samples": total,
        "cpu_seconds": round(cpu_seconds, 2),
        "cpu_us_per_event": round(cpu_seconds / events * 1e6, 1) if events else None,
        "by_package": {
            name: round(100 * samples / total, 1) for name, samples in packages.most_common()
        }
        if total
        else {},
        "top": top,
        "inclusive_top": [
            {"function": f, "inclusive_pct": round(100 * n / total, 1)}
            for f, n in inclusive.most_common(40)
        ]
        if total
        else [],
    }


def profile_suite(
    directory: Path, rate: float, seconds: float, *, ws: int = 1, sse: int = 1
) -> Result:
    """Run the suite at `rate` msg/s for `seconds` with py-spy on each of its processes."""
    directory.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    recorders: list[subprocess.Popen[bytes]] = []
    with SuiteDeployment() as target:
        _warm_up(target)
        outputs = {name: directory / f"{name}.collapsed.txt" for name in target.processes}

        def start_recording() -> None:
            for name, process in target.processes.items():
                recorders.append(
                    subprocess.Popen(  # py-spy from this environment, fixed arguments
                        [
                            spy,
                            "record",
                            "--pid",
                            str(process.pid),
                            "--duration",
                            str(int(seconds)),
                            "--rate",
                            "200",
                            "--format",
                            "raw",
                            "--nolineno",
                            "--nonblocking",
                            "--output",
                            str(outputs[name]),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )

        plan = StepPlan(
            run_id=uuid.uuid4().hex[:10],
            publish_urls=[target.ws_url("profile")],
            rate=rate,
            duration=seconds,
            ws_urls=[target.ws_url("profile")] * ws,
            sse_urls=[target.sse_url("profile")] * sse,
        )
        step = measure(target, plan, on_start=start_recording)
        for recorder in recorders:
            recorder.wait(seconds + 30)
    events = step["sent"] - step["refused"]
    services = {
        name: summarise(path, events, step["servers"][name]["cpu_seconds"])
        for name, path in outputs.items()
        if path.exists()
    }
    return {
        "description": (
            f"The suite at {rate:.0f} msg/s for {seconds:.0f} s, 1 board, {ws} WebSocket + "
            f"{sse} SSE subscribers, py-spy at 200 Hz on every process"
        ),
        "directory": str(directory),
        "step": step,
        "services": services,
    }
