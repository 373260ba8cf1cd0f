"""The client module the ingress serves (`/static/realtime.js` and the modules it imports) is
the one kept in clients/js: the wheel and the image carry a copy, which must not drift."""

from __future__ import annotations

import re
from pathlib import Path

import ingress_ws
from envelope.codes import CloseCode
from envelope.models import BOARD_ID_PATTERN
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


# --- the contract's rules, as the client module and the page write them ---------------------

# A regex literal `const NAME = /source/flags;` and the keys of an object literal's block.
_REGEX_LITERAL = r"const {name} = /(?P<source>.+)/(?P<flags>[a-z]*);"
_CODE_KEY = re.compile(r"^\s*(\d{4}):", re.MULTILINE)


def _object_keys(source: str, name: str) -> set[int]:
    block = re.search(rf"const {name} = \{{(?P<body>.*?)\n\}};", source, re.DOTALL)
    assert block, f"no `const {name} = {{…}};` in the client module"
    return {int(code) for code in _CODE_KEY.findall(block["body"])}


def test_the_client_modules_board_id_rule_is_the_envelopes() -> None:
    # The same pattern text, and no flag: with `m` a JS `$` would match before a newline,
    # the `.match` drift the envelope's `is_board_id` (a fullmatch) exists to prevent.
    for path in (CLIENT / "realtime.js", STATIC / "playground.js"):
        found = re.search(_REGEX_LITERAL.format(name="BOARD_ID"), path.read_text())
        assert found, f"no BOARD_ID regex literal in {path}"
        assert (found["source"], found["flags"]) == (BOARD_ID_PATTERN, ""), path


def test_the_client_modules_close_codes_are_the_envelopes() -> None:
    source = (CLIENT / "transports.js").read_text()
    fatal, reasons = _object_keys(source, "WS_FATAL"), _object_keys(source, "WS_CLOSE_REASONS")
    told = fatal | reasons
    # Every code the contract closes with has a message for the user...
    assert set(CloseCode) <= told, sorted(set(CloseCode) - told)
    # ...and every application code (4000-4999) the client knows is one the contract has; the
    # others (1000-1015) are RFC 6455's, which browsers and the WebSocket library also send.
    assert {code for code in told if 4000 <= code <= 4999} <= set(CloseCode)
    assert all(1000 <= code <= 1015 for code in told if code < 4000)
    # No retry fixes a refused credential, board or origin: those stop the reconnect loop.
    assert fatal == {CloseCode.UNAUTHORISED, CloseCode.FORBIDDEN, CloseCode.BAD_BOARD}
