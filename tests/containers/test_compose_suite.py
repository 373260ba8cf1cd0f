"""The built images and the whole suite under `docker compose`, used through its published
ports: what a user with Docker gets (scripts/containers/ci.sh starts it; docs/deploy.md).

In file order: the images' own properties, then the running suite (probe, page, readiness,
Prometheus), then three workers and 2,000 events through a `docker kill` of a worker and of
the ingress: every acked event is seen once, in gapless sequence, on every SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets
from chaos.harness import Ledger, Sender, report, sse_subscriber, stop_tasks

from containers.conftest import Stack

pytestmark = [pytest.mark.containers]

INGRESS = "http://127.0.0.1:8004"
GATEWAY = "http://127.0.0.1:8005"
PROMETHEUS = "http://127.0.0.1:9090"
SERVICES = {"ingress-ws": 8004, "sse-gateway": 8005, "relay-worker": 8006}


def wait_until(what: str, check: object, timeout: float) -> None:
    """Polls `check()` until it is truthy; fails with `what` after `timeout` seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})")


# ------------------------------------------------------------------------------ images

INSPECT = """
import json, os, shutil
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "tools": {t: shutil.which(t) for t in ("gcc", "cc", "c++", "clang", "make", "uv", "uvx", "pip")},
    "uv_binaries": [p for p in ("/bin/uv", "/usr/bin/uv", "/usr/local/bin/uv") if os.path.exists(p)],
    "src": os.path.exists("/src"),
    "app": sorted(os.listdir("/app")),
    "pth": sorted(f for f in os.listdir(next(
        os.path.join(r, d) for r, ds, _ in os.walk("/app/.venv/lib") for d in ds
        if d == "site-packages")) if f.endswith(".pth")),
}))
"""


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_image_is_non_root_without_compiler_uv_or_sources(stack: Stack, service: str) -> None:
    image = f"realtime/{service}:local"
    user = stack.docker_run("image", "inspect", "--format", "{{.Config.User}}", image)
    assert user == "10001:10001", f"{image}: USER is {user!r}, want a numeric non-root id"
    found = json.loads(
        stack.docker_run(
            "run",
            "--rm",
            "--read-only",
            "--network",
            "none",
            "--entrypoint",
            "python",
            image,
            "-c",
            INSPECT,
        )
    )
    assert (found["uid"], found["gid"]) == (10001, 10001), found
    assert not any(found["tools"].values()), f"{image} holds build tools: {found['tools']}"
    assert not found["uv_binaries"] and not found["src"], found
    assert found["app"] == [".venv"], f"{image}: /app holds {found['app']}, want the venv only"
    # An editable install would leave a .pth pointing at sources that are not there.
    assert not [p for p in found["pth"] if "editable" in p or p.startswith("__")], found["pth"]


def test_images_start_read_only_and_their_healthcheck_turns_healthy(stack: Stack) -> None:
    """Each image alone, as compose runs it (read-only root, no capabilities), next to the
    suite's brokers: its own HEALTHCHECK (not compose's) reports healthy."""
    env = {
        "ADVANCED_ENVIRONMENT": "production",
        "ADVANCED_REALTIME_TOKEN": stack.token,
        "ADVANCED_REDIS_URL": "redis://:realtime@redis:6379/0",
        "ADVANCED_RABBITMQ_URL": "amqp://realtime:realtime@rabbitmq:5672/",
        "ADVANCED_TELEMETRY_ENABLED": "false",
    }
    flags = [f"--env={k}={v}" for k, v in env.items()]
    started = [
        stack.docker_run(
            "run",
            "--detach",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges:true",
            "--network",
            stack.network,
            *flags,
            f"realtime/{service}:local",
        )
        for service in sorted(SERVICES)
    ]
    try:

        def statuses() -> dict[str, str]:
            return {
                c[:12]: stack.docker_run(
                    "inspect", "--format", "{{.State.Status}}/{{.State.Health.Status}}", c
                )
                for c in started
            }

        # The images check every 10 s after a 15 s start period: healthy within about 25 s.
        wait_until(
            "every image's HEALTHCHECK healthy",
            lambda: all(s == "running/healthy" for s in statuses().values()) or None,
            timeout=60,
        )
    finally:
        stack.docker_run("rm", "--force", *started, check=False)


# ------------------------------------------------------------------------- the suite up


def test_probe_delivers_through_the_whole_pipeline(stack: Stack) -> None:
    stack.probe(count=3)


def test_playground_page_is_served() -> None:
    page = httpx.get(f"{INGRESS}/", timeout=10)
    assert page.status_code == 200, page.status_code
    assert page.headers["content-type"].startswith("text/html"), page.headers
    assert "<html" in page.text.lower()


def test_readyz_on_all_three(stack: Stack) -> None:
    for url in (INGRESS, GATEWAY):
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, (url, ready.status_code, ready.text)
    # The worker publishes no host port: ask from inside its container.
    for container in stack.containers("relay-worker"):
        stack.docker_run(
            "exec", container, "python", "-c",
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8006/readyz', timeout=5)",
        )  # fmt: skip


def scraped_up(jobs: set[str]) -> dict[str, list[str]]:
    targets = httpx.get(f"{PROMETHEUS}/api/v1/targets", timeout=10).json()["data"]
    health: dict[str, list[str]] = {}
    for target in targets["activeTargets"]:
        health.setdefault(target["labels"]["job"], []).append(target["health"])
    return {job: health.get(job, []) for job in jobs}


def test_prometheus_scrapes_all_three_services() -> None:
    jobs = set(SERVICES)
    wait_until(
        "Prometheus targets up for ingress-ws, sse-gateway and relay-worker",
        lambda: all(h and set(h) == {"up"} for h in scraped_up(jobs).values()) or None,
        timeout=90,  # a scrape every 10 s, DNS discovery every 15 s
    )


# --------------------------------------------------------------------- faults at scale

TOTAL = 2_000
BOARDS = [f"containers-{n}" for n in range(4)]
RATE_PER_BOARD = 50.0  # 200 events/s in all, under the default 100/s per connection
KILL_WORKER_AT, KILL_INGRESS_AT = 0.3, 0.6


class ReconnectingSender(Sender):
    """The harness's sender, for an ingress that comes back at the same address: it retries
    the connection until the ingress answers again, then resends every unacked id."""

    async def _fail_over(self, dead: websockets.ClientConnection) -> None:
        async with self._switching:
            if self._connection is not dead:
                return
            self.failovers += 1
            # Its echo is no longer a subscriber that stayed connected: not checked.
            self._recording = False
            self.ledger.seen.pop(self.name, None)
            self.ledger.scopes.pop(self.name, None)
            deadline = time.monotonic() + 90
            while True:
                try:
                    self._connection = await websockets.connect(
                        self.url, max_size=None, open_timeout=10
                    )
                    break
                except (OSError, websockets.InvalidHandshake, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            self._reader = asyncio.create_task(self._read())
            self._readers.append(self._reader)
            for body in list(self._pending.values()):
                await self._connection.send(body.decode())


@pytest.mark.timeout(300)
async def test_three_workers_and_kills_lose_and_duplicate_nothing(stack: Stack) -> None:
    began = time.monotonic()
    await asyncio.to_thread(
        stack.run, "up", "--detach", "--wait", "--no-build", "--scale", "relay-worker=3",
        timeout=180,
    )  # fmt: skip
    workers = stack.containers("relay-worker")
    assert len(workers) == 3, workers
    print(f"\nscaled to 3 workers in {time.monotonic() - began:.1f} s")
    (ingress,) = stack.containers("ingress-ws")

    ledger = Ledger()
    listeners = [
        asyncio.create_task(
            sse_subscriber(
                ledger,
                f"sse:{b}",
                f"{GATEWAY}/sse/boards/{b}?token={stack.token}",
                frozenset({b}),
            )
        )
        for b in BOARDS
    ]
    senders = [
        ReconnectingSender(
            ledger,
            f"ws://127.0.0.1:8004/ws/boards/{b}?token={stack.token}",
            b,
            failover_url=f"ws://127.0.0.1:8004/ws/boards/{b}?token={stack.token}",
        )
        for b in BOARDS
    ]
    faults: list[str] = []
    try:
        for sender in senders:
            await sender.__aenter__()
        await asyncio.sleep(1.0)  # every SSE subscription registered before the first event
        started = time.monotonic()
        per_board = TOTAL // len(BOARDS)
        sending = [
            asyncio.create_task(s.send_many(per_board, rate=RATE_PER_BOARD)) for s in senders
        ]
        for fraction, victim in ((KILL_WORKER_AT, workers[0]), (KILL_INGRESS_AT, ingress)):
            while len(ledger.sent) < TOTAL * fraction:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(stack.docker_run, "kill", victim)
            faults.append(f"docker kill {victim[:12]} at {len(ledger.sent)} sent")
        # The ingress has the suite's only published WebSocket port: start it again (its
        # restart policy may already have); the senders reconnect and resend.
        if stack.docker_run("inspect", "--format", "{{.State.Running}}", ingress) != "true":
            await asyncio.to_thread(stack.docker_run, "start", ingress)
        await asyncio.gather(*sending)
        for sender in senders:
            await sender.wait_acked(90)
        sent_for = time.monotonic() - started
        await ledger.wait_complete(90)
        delivered_for = time.monotonic() - started
    finally:
        failed = await stop_tasks(listeners)
        for sender in senders:
            await sender.__aexit__(None, None, None)

    # Sequences are checked, not the order against the sender's: the ingress, back before its
    # RabbitMQ connection is, refuses some frames `unavailable` (not published, as the contract
    # says) while it accepts later ones of the same window, and the sender resends the refused
    # ones after them. A board's sequence follows the order the ingress published in.
    verdicts = ledger.verdicts(check_order=False)
    report(
        "compose: 3 workers, docker kill of a worker and of the ingress, 2,000 events",
        ledger,
        verdicts,
        faults="; ".join(faults),
        reconnects=sum(s.failovers for s in senders),
        seconds_to_send=round(sent_for, 1),
        seconds_to_deliver_all=round(delivered_for, 1),
    )
    assert not failed, failed
    assert len(ledger.acked) == TOTAL and not ledger.refused, ledger.refused[:5]
    assert sum(s.failovers for s in senders) >= len(BOARDS), "the ingress kill cut no sender"
    assert len(verdicts) == len(BOARDS)
    for verdict in verdicts:
        assert verdict.clean, verdict.line()
        assert verdict.seen == verdict.expected == TOTAL // len(BOARDS)
