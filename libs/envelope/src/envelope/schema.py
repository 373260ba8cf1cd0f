"""Generates the envelope's JSON Schema files: `python -m envelope.schema <directory>`.

The files are committed; a test regenerates them in memory and fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from envelope.api import HistoryPage, PublishAccepted, PublishBatchReply, PublishBatchRequest
from envelope.models import (
    AckFrame,
    ActivityEvent,
    BoardEventEnvelope,
    BoardMessage,
    ErrorFrame,
    EventFrame,
    ExpiringFrame,
    PresenceFrame,
    PresenceSnapshot,
    RefreshedFrame,
    RefreshRequest,
    ResetFrame,
    ResumeRequest,
)

MODELS: dict[str, type[BaseModel]] = {
    "board-message": BoardMessage,
    "resume-request": ResumeRequest,
    "board-event-envelope": BoardEventEnvelope,
    "activity-event": ActivityEvent,
    "ack-frame": AckFrame,
    "event-frame": EventFrame,
    "error-frame": ErrorFrame,
    "reset-frame": ResetFrame,
    "refresh-request": RefreshRequest,
    "refreshed-frame": RefreshedFrame,
    "expiring-frame": ExpiringFrame,
    # The HTTP API's bodies (a refusal's body is the error frame).
    "publish-accepted": PublishAccepted,
    "publish-batch-request": PublishBatchRequest,
    "publish-batch-reply": PublishBatchReply,
    "history-page": HistoryPage,
    "presence-frame": PresenceFrame,
    "presence-snapshot": PresenceSnapshot,
}


def schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in MODELS.items()}


def render(schema: dict[str, Any]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "libs/envelope/schema")
    target.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas().items():
        (target / f"{name}.schema.json").write_bytes(render(schema))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
