"""`just dev`: the three real services when RabbitMQ and Redis answer, else the in-memory suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit

from ingress_ws.settings import IngressSettings


def answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "localhost", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def main() -> int:
    settings = IngressSettings()
    brokers = answers(settings.rabbitmq_url.get_secret_value(), 5672) and answers(
        settings.redis_url.get_secret_value(), 6379
    )
    if settings.event_transport == "memory" or not brokers:
        print("dev: RabbitMQ or Redis not reachable: running the in-memory suite on one port")
        return subprocess.call(["realtime-dev"])  # noqa: S607 - our own console script

    print("dev: RabbitMQ and Redis answer: starting relay-worker, ingress-ws and sse-gateway")
    env = dict(os.environ)
    page = f"http://localhost:{settings.ingress_port},http://127.0.0.1:{settings.ingress_port}"
    env.setdefault("ADVANCED_ALLOWED_ORIGINS", ",".join([*settings.allowed_origins, page]))
    names = ("relay-worker", "ingress-ws", "sse-gateway")
    processes = [subprocess.Popen([name], env=env) for name in names]  # noqa: S603

    def stop(*_: object) -> None:
        for process in processes:
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [process.wait() for process in processes]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
