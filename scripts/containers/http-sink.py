"""CI stand-in for Grafana and Jaeger (no Debian package): answers 200 to every request.

It gives the compose file's health checks and the services' OTLP exporter a peer; it proves
nothing about dashboards or traces.  Usage: http-sink PORT [PORT...]
"""

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # a sink: nothing to say per request


def main() -> None:
    # PID 1 ignores SIGTERM unless it handles it: exit at once on `docker stop`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    servers = [ThreadingHTTPServer(("0.0.0.0", int(port)), Sink) for port in sys.argv[1:]]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
