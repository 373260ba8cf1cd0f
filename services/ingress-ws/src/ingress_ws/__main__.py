from __future__ import annotations

from realtime_runtime.observability import configure_logging, configure_tracing
from realtime_runtime.security import hardened_websocket_protocol
from realtime_runtime.service import serve
from realtime_runtime.settings import load_settings

from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings


def main() -> None:
    settings = load_settings(IngressSettings)
    configure_logging("ingress-ws", settings.log_level, settings.log_format)
    configure_tracing(settings, "ingress-ws")
    app = create_app(settings)
    serve(
        app,
        settings,
        settings.ingress_port,
        drain=app.state.drain,
        ready="ready: open {url} (the playground; WebSocket at /ws/boards/{{board_id}})",
        # A frame over the payload limit plus envelope overhead is cut with 1009.
        ws_max_size=settings.max_payload_bytes + 4096,
        # Off: compression lets a small frame inflate past the size limit's intent, costs CPU
        # per socket, and mixing secrets with attacker text in one compressor invites CRIME.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.websocket_ping_interval_seconds,
        ws_ping_timeout=settings.websocket_ping_timeout_seconds,
        ws=hardened_websocket_protocol(
            write_stall_seconds=settings.websocket_write_stall_seconds,
            idle_seconds=settings.websocket_idle_timeout_seconds,
            max_pings=settings.websocket_max_pings,
        ),
    )


if __name__ == "__main__":
    main()
