"""The client module the ingress serves (`/static/realtime.js` and the modules it imports) is
the one kept in clients/js: the wheel and the image carry a copy, which must not drift."""

from __future__ import annotations

from pathlib import Path

import ingress_ws
from ingress_ws.app import create_app
from ingress_ws.settings import IngressSettings
from starlette.testclient import TestClient

CLIENT = Path(__file__).parents[3] / "clients" / "js"
STATIC = Path(ingress_ws.__file__).parent / "static"
MODULES = ("realtime.js", "transports.js", "transport-base.js", "event-source.js")


def test_the_served_modules_are_the_client_modules() -> None:
    for name in MODULES:
        assert (STATIC / name).read_bytes() == (CLIENT / name).read_bytes(), (
            f"{STATIC / name} differs from {CLIENT / name}: run `just client-copy`"
        )


def test_every_module_the_client_imports_is_served() -> None:
    settings = IngressSettings(
        _env_file=None, event_transport="memory", realtime_token="unit", environment="test"
    )
    with TestClient(create_app(settings)) as client:
        for name in MODULES:
            response = client.get(f"/static/{name}")
            assert response.status_code == 200, name
            assert "javascript" in response.headers["content-type"]
            assert response.content == (CLIENT / name).read_bytes()
