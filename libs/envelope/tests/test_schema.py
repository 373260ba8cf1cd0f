from __future__ import annotations

from pathlib import Path

from envelope.schema import render, schemas

SCHEMA_DIR = Path(__file__).parents[1] / "schema"


def test_the_committed_json_schema_matches_the_models() -> None:
    for name, schema in schemas().items():
        committed = SCHEMA_DIR / f"{name}.schema.json"
        assert committed.exists(), f"{committed} is missing: run `just schema`"
        assert committed.read_bytes() == render(schema), f"{committed} is stale: run `just schema`"


def test_no_stray_schema_files() -> None:
    assert {p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.json")} == set(
        schemas()
    )
