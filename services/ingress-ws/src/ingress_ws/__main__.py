from __future__ import annotations

from envelope.observability import configure_logging, configure_tracing
from envelope.service import serve

from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings


def main() -> None:
    settings = IngressSettings()
    configure_logging("ingress-ws", settings.log_level)
    configure_tracing(settings, "ingress-ws")
    app = create_app(settings)
    serve(
        app,
        settings,
        settings.ingress_port,
        drain=app.state.drain,
        # A frame over the payload limit plus envelope overhead is cut with 1009.
        ws_max_size=settings.max_payload_bytes + 4096,
        ws_per_message_deflate=False,
        ws_ping_interval=20,
        ws_ping_timeout=20,
    )


if __name__ == "__main__":
    main()
