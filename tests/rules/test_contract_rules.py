"""Each contract rule has one implementation: the sources never spell the board-id rule again,
and the README and the docs name only close codes the contract has (`envelope.codes.CloseCode`,
the one table), so a code renamed or removed there fails here until the prose follows. (The
client module's copies are checked in services/ingress-ws/tests/test_client_module.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from envelope.codes import CloseCode

REPO = Path(__file__).parents[2]
CODES = {int(code) for code in CloseCode}
PROSE = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Four-digit numbers in the application close-code range that are not close codes.
NOT_CLOSE_CODES = {
    4096: "the frame header allowance in bytes (docs/security.md)",
    4317: "the OTLP collector's gRPC port",
    4318: "the OTLP collector's HTTP port",
}


def test_the_docs_name_only_the_contracts_close_codes() -> None:
    unknown = {
        f"{path.relative_to(REPO)}: {number}"
        for path in PROSE
        for number in map(int, re.findall(r"\b4\d{3}\b", path.read_text()))
        if number not in CODES and number not in NOT_CLOSE_CODES
    }
    assert not unknown, f"close codes the contract does not have: {sorted(unknown)}"


def test_only_the_envelope_spells_the_board_id_rule() -> None:
    # `.match` in one edge and `.fullmatch` in another was a live bug: every edge calls
    # `envelope.models.is_board_id` instead of compiling a pattern of its own.
    sources = [
        path
        for pattern in ("libs/*/src/**/*.py", "services/*/src/**/*.py", "tools/*/src/**/*.py")
        for path in REPO.glob(pattern)
    ]
    assert sources
    spelled = [
        str(path.relative_to(REPO))
        for path in sources
        if "[A-Za-z0-9_.-]{1,64}" in path.read_text()
    ]
    assert spelled == ["libs/envelope/src/envelope/models.py"]


def test_the_readme_points_at_the_one_table() -> None:
    assert "libs/envelope/src/envelope/codes.py" in (REPO / "README.md").read_text()
