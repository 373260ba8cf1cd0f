"""The README and the docs name only close codes the contract has (`envelope.codes.CloseCode`,
the one table): a code renamed or removed there fails here until the prose follows."""

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


def test_the_readme_points_at_the_one_table() -> None:
    assert "libs/envelope/src/envelope/codes.py" in (REPO / "README.md").read_text()
