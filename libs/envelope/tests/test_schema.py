from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from envelope.codec import dumps
from envelope.models import ExpiringFrame, RefreshedFrame
from envelope.schema import render, schemas
from pydantic import BaseModel

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


@pytest.mark.parametrize(
    ("name", "frame", "valid"),
    [
        ("refresh-request", {"kind": "refresh", "token": "a.b.c"}, True),
        ("refresh-request", {"kind": "refresh", "token": ""}, False),
        ("refresh-request", {"kind": "refresh"}, False),
        ("refreshed-frame", RefreshedFrame(expires_at=None), True),
        ("refreshed-frame", RefreshedFrame(expires_at=datetime.now(UTC)), True),
        ("refreshed-frame", {"kind": "refreshed", "expires_at": 5}, False),
        ("expiring-frame", ExpiringFrame(expires_at=datetime.now(UTC)), True),
        ("expiring-frame", {"kind": "expiring", "expires_at": None}, False),
        ("expiring-frame", {"kind": "refreshed", "expires_at": "2026-01-01T00:00:00Z"}, False),
    ],
)
def test_the_refresh_frames_follow_their_schema(
    name: str, frame: dict[str, object] | BaseModel, valid: bool
) -> None:
    """The frames of live credential refresh (contract section 13), as the server writes them
    and as a client would send them, against the committed schema files."""
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_bytes())
    body = json.loads(dumps(frame)) if isinstance(frame, BaseModel) else frame
    checker = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    assert checker.is_valid(body) is valid
