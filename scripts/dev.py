"""`just dev`: the three real services when RabbitMQ and Redis answer, else the in-memory suite.

The in-memory suite replaces this process (exec), so a signal to `just dev` reaches the server
itself and nothing is left listening. The three services run as children under a small
supervisor: a signal to it drains all three; one of them dying stops the others and makes
`just dev` exit non-zero, saying which one and how it ended.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from urllib.parse import urlsplit

from ingress_ws.settings import IngressSettings
from realtime_runtime.service import local_url
from realtime_runtime.settings import load_settings
from relay_worker.settings import WorkerSettings
from sse_gateway.settings import GatewaySettings


def say(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


def answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "localhost", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def where(url: str, default_port: int) -> str:
    parts = urlsplit(url)  # host and port only: the URL may carry a password
    return f"{parts.hostname or 'localhost'}:{parts.port or default_port}"


def run_in_memory(reason: str) -> None:
    say(f"{reason}: running the in-memory suite, everything on one port")
    os.execv(sys.executable, [sys.executable, "-m", "dev_suite"])  # noqa: S606 - our own module


@dataclass
class Child:
    name: str
    module: str
    url: str
    process: subprocess.Popen[bytes] | None = None


def how_it_ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    """A child's return code as a shell would report it: 128 + N for death by signal N."""
    return 128 - code if code < 0 else code


class Supervisor:
    """Starts the services, forwards SIGTERM/SIGINT/SIGHUP as SIGTERM (each drains), and ends
    all of them when one ends."""

    def __init__(self, children: list[Child], env: dict[str, str]) -> None:
        self.children, self.env = children, env
        self.stopping = False
        self.failure = 0

    def start(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        for child in self.children:
            # A process group of its own: a terminal's Ctrl-C reaches the supervisor only,
            # which then stops every service the same way (SIGTERM: drain, then exit).
            child.process = subprocess.Popen(  # noqa: S603 - our own modules
                [sys.executable, "-m", child.module], env=self.env, process_group=0
            )

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            say(f"{signal.Signals(signum).name}: stopping the services")
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """Until every child has ended; the exit status of `just dev`."""
        running = {child.process.pid: child for child in self.children if child.process}
        while running:
            pid, status = os.wait()  # retried after a signal handler runs (PEP 475)
            child = running.pop(pid, None)
            if child is None or child.process is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.process.returncode = code  # os.wait reaped it: tell Popen
            if not self.stopping:
                say(
                    f"{child.name} {how_it_ended(code)}; stopping the others "
                    "(its last log lines above say why)"
                )
                self.failure = exit_status(code) or 1  # a service never ends on its own
                self.stop()
            elif code != 0:
                say(f"{child.name} {how_it_ended(code)} while stopping")
                self.failure = self.failure or exit_status(code)
        return self.failure


def announce_when_listening(children: list[Child], supervisor: Supervisor, page: str) -> None:
    """One line once every service accepts connections: where to go next."""
    pending = list(children)
    while pending and not supervisor.stopping:
        for child in list(pending):
            parts = urlsplit(child.url)
            try:
                with socket.create_connection((parts.hostname, parts.port), 0.5):
                    pending.remove(child)
            except OSError:
                pass
        time.sleep(0.2)
    if not supervisor.stopping:
        listing = ", ".join(f"{child.name} {child.url}" for child in children)
        say(f"ready: open {page} ({listing}); Ctrl-C stops all three")


def main() -> int:
    settings = load_settings(IngressSettings)
    rabbitmq = settings.rabbitmq_urls[0]
    # One node or a cluster's seeds: any one that answers will do (the client finds the rest).
    redis = settings.redis_nodes
    if settings.event_transport == "memory":
        run_in_memory("ADVANCED_EVENT_TRANSPORT=memory")
    if not answers(rabbitmq, 5672) or not any(answers(node, 6379) for node in redis):
        redis_at = ", ".join(where(node, 6379) for node in redis)
        run_in_memory(f"RabbitMQ at {where(rabbitmq, 5672)} or Redis at {redis_at} not reachable")

    say("RabbitMQ and Redis answer: starting relay-worker, ingress-ws and sse-gateway")
    env = dict(os.environ)
    page = f"http://localhost:{settings.ingress_port},http://127.0.0.1:{settings.ingress_port}"
    env.setdefault("ADVANCED_ALLOWED_ORIGINS", ",".join([*settings.allowed_origins, page]))
    worker, gateway = load_settings(WorkerSettings), load_settings(GatewaySettings)
    children = [
        Child("relay-worker", "relay_worker", local_url(worker, worker.worker_port)),
        Child("ingress-ws", "ingress_ws", local_url(settings, settings.ingress_port)),
        Child("sse-gateway", "sse_gateway", local_url(gateway, gateway.sse_port)),
    ]
    supervisor = Supervisor(children, env)
    supervisor.start()
    threading.Thread(
        target=announce_when_listening, args=(children, supervisor, children[1].url), daemon=True
    ).start()
    return supervisor.wait()


if __name__ == "__main__":
    sys.exit(main())
