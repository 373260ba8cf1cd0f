"""Baseline ingress: WebSocket frame -> pydantic -> Redis PUBLISH; Redis -> every board socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as redis
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field, ValidationError

REDIS_URL = os.environ.get("BASELINE_REDIS_URL", "redis://127.0.0.1:6379/2")
CHANNEL = os.environ.get("BASELINE_CHANNEL", "baseline:activity")
TOKEN = os.environ.get("BASELINE_TOKEN", "change-me-realtime")


class BoardMessage(BaseModel):
    type: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    payload: dict[str, Any]
    id: str | None = Field(default=None, max_length=128)


class ActivityEvent(BaseModel):
    event_id: str
    correlation_id: str
    board_id: str
    type: str
    payload: dict[str, Any]
    sender: str
    occurred_at: datetime


connections: dict[str, set[WebSocket]] = defaultdict(set)
state: dict[str, redis.Redis] = {}


async def broadcast_from_redis(client: redis.Redis) -> None:
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        event = ActivityEvent.model_validate_json(message["data"])
        frame = '{"kind":"event",' + message["data"].decode()[1:]
        for websocket in list(connections.get(event.board_id, ())):
            try:
                await websocket.send_text(frame)
            except Exception:
                connections[event.board_id].discard(websocket)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = redis.from_url(REDIS_URL)
    state["redis"] = client
    task = asyncio.create_task(broadcast_from_redis(client))
    yield
    task.cancel()
    await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/ws/boards/{board_id}")
async def board(websocket: WebSocket, board_id: str, token: str = "") -> None:
    await websocket.accept()
    if not secrets.compare_digest(token, TOKEN):
        await websocket.close(4401)
        return
    sender = uuid.uuid4().hex
    connections[board_id].add(websocket)
    try:
        while True:
            raw = await websocket.receive_text()
            try:
                message = BoardMessage.model_validate_json(raw)
            except ValidationError as exc:
                await websocket.send_json(
                    {"kind": "error", "code": "invalid_message", "message": str(exc)[:200]}
                )
                continue
            event = ActivityEvent(
                event_id=str(uuid.uuid4()),
                correlation_id=message.id or uuid.uuid4().hex,
                board_id=board_id,
                type=message.type,
                payload=message.payload,
                sender=sender,
                occurred_at=datetime.now(UTC),
            )
            await state["redis"].publish(CHANNEL, event.model_dump_json())
            await websocket.send_json(
                {"kind": "ack", "correlation_id": event.correlation_id, "event_id": event.event_id}
            )
    except WebSocketDisconnect:
        pass
    finally:
        connections[board_id].discard(websocket)
