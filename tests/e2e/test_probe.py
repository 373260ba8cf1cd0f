"""`realtime-probe` against the real suite: the exit codes a cron job or a CronJob alerts on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, suite_env
from support.brokers import Brokers, Names
from support.processes import Service, Suite, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

PROBE = Path(sys.executable).parent / "realtime-probe"
PIPELINE_DEMO = Path(__file__).parents[2] / "scripts" / "pipeline_demo.py"
# Three interpreters importing at once on a busy 2-core runner can take this long together.
STARTUP_SECONDS = 90


def probe(
    *args: str, token: str = TOKEN, command: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ADVANCED_REALTIME_TOKEN": token}
    return subprocess.run(
        [*(command or [str(PROBE)]), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def urls(ingress: Service, gateway: Service) -> list[str]:
    return ["--ws-url", ingress.url, "--sse-url", gateway.url]


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.count("\n") == 1, (result.stdout, result.stderr)  # one JSON line
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def running(brokers: Brokers) -> Iterator[tuple[Service, Service]]:
    """One suite for the tests that only read it (each uses its own board): the processes
    take long enough to start on a busy runner that starting them once per test hurts."""
    names = Names.fresh()
    suite = Suite("probe-shared", {**suite_env(brokers), **names.env()})
    try:
        started = [suite.start(kind, wait=False) for kind in ("worker", "ingress", "gateway")]
        for service in started:
            service.wait_ready(timeout=STARTUP_SECONDS)
        yield started[1], started[2]
    finally:
        suite.stop_all()
        asyncio.run(names.cleanup(brokers))


def test_the_probe_measures_each_round_through_the_whole_pipeline(
    running: tuple[Service, Service],
) -> None:
    result = probe(
        *urls(*running), "--board", "measured", "--count", "3", "--interval", "0.2", "--json"
    )

    assert result.returncode == 0, (result.stdout, result.stderr)
    found = report(result)
    assert found["status"] == "ok" and found["exit_code"] == 0
    assert found["ws_url"].endswith("/ws/boards/measured")
    assert TOKEN not in result.stdout
    rounds = found["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["sequence"] for r in rounds] == [1, 2, 3]  # a fresh board: numbered from 1
    assert len({r["correlation_id"] for r in rounds}) == 3
    for r in rounds:
        assert r["status"] == "ok" and r["error"] is None
        assert 0 < r["ack_ms"] < 10_000 and 0 < r["echo_ms"] < 10_000 and 0 < r["sse_ms"] < 10_000
    latency = found["latency_ms"]
    assert latency["min"] <= latency["median"] <= latency["max"]
    assert latency["max"] == max(r["sse_ms"] for r in rounds)


def test_the_seed_script_runs_the_probe_and_prints_the_latency(
    running: tuple[Service, Service],
) -> None:
    result = probe(*urls(*running), command=[sys.executable, str(PIPELINE_DEMO)])

    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("realtime-probe: board 'synthetic-probe'")
    assert lines[1].startswith("round 1/1  OK") and " sse " in lines[1] and "ms" in lines[1]
    assert lines[-1].startswith("OK: 1/1 delivered over SSE; latency min ")
    assert result.stderr == ""


def test_a_round_slower_than_the_threshold_exits_1(running: tuple[Service, Service]) -> None:
    result = probe(*urls(*running), "--threshold-ms", "0.001")

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "round 1/1  SLOW" in result.stdout
    assert result.stderr.startswith("WARNING: 1/1 delivered, 1 slower than the threshold 0.001 ms")


def test_a_stopped_worker_exits_2_and_names_the_stage_that_failed(suite: Suite) -> None:
    # The worker runs once (declaring its queues), then stops: the ingress still acks.
    worker = suite.start("worker", wait=False)
    ingress, gateway = suite.start("ingress", wait=False), suite.start("gateway", wait=False)
    for service in (worker, ingress, gateway):
        service.wait_ready(timeout=STARTUP_SECONDS)
    assert worker.stop() == 0

    text = probe(*urls(ingress, gateway), "--timeout", "3")
    as_json = probe(*urls(ingress, gateway), "--timeout", "3", "--json")

    assert text.returncode == 2, (text.stdout, text.stderr)
    assert "round 1/1  FAILED" in text.stdout
    assert text.stderr.startswith("CRITICAL: Round 1: The event was acknowledged")
    assert "is relay-worker running" in text.stderr
    assert as_json.returncode == 2
    found = report(as_json)
    assert found["status"] == "failed"
    (only,) = found["rounds"]
    assert only["ack_ms"] is not None and only["echo_ms"] is None and only["sse_ms"] is None
    assert "relay-worker" in only["error"] and found["latency_ms"] is None


def test_a_refused_credential_exits_3(running: tuple[Service, Service]) -> None:
    result = probe(*urls(*running), token="not-the-token")

    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stderr.startswith("UNKNOWN: The SSE gateway refused the credential (401")
    assert "ADVANCED_REALTIME_TOKEN" in result.stderr
    assert "not-the-token" not in result.stdout + result.stderr


def test_an_unreachable_gateway_or_ingress_exits_2(running: tuple[Service, Service]) -> None:
    ingress, gateway = running
    nowhere = f"http://127.0.0.1:{free_port()}"

    no_gateway = probe("--ws-url", ingress.url, "--sse-url", nowhere, "--timeout", "3")
    no_ingress = probe("--ws-url", nowhere, "--sse-url", gateway.url, "--timeout", "3")

    assert no_gateway.returncode == 2, (no_gateway.stdout, no_gateway.stderr)
    assert no_gateway.stderr.startswith(f"CRITICAL: Cannot reach the SSE gateway at {nowhere}")
    assert no_ingress.returncode == 2, (no_ingress.stdout, no_ingress.stderr)
    assert "CRITICAL: Cannot reach the ingress at ws://127.0.0.1:" in no_ingress.stderr


def test_bad_arguments_exit_3_not_2() -> None:
    for args in (["--count", "0"], ["--board", "no spaces"], ["--sse-url", "ftp://x"]):
        result = probe(*args)
        assert result.returncode == 3, (args, result.stderr)
        assert "error" in result.stderr.lower() or result.stderr.startswith("UNKNOWN:")
