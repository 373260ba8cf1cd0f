from __future__ import annotations

from realtime_runtime.observability import configure_logging, configure_tracing
from realtime_runtime.service import serve
from realtime_runtime.settings import load_settings

from sse_gateway.app import create_app
from sse_gateway.settings import GatewaySettings


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging("sse-gateway", settings.log_level, settings.log_format)
    configure_tracing(settings, "sse-gateway")
    app = create_app(settings)
    serve(
        app,
        settings,
        settings.sse_port,
        drain=app.state.drain,
        ready="ready: sse-gateway on {url} (/sse/activity, /sse/boards/{{board_id}})",
    )


if __name__ == "__main__":
    main()
