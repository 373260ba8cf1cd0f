"""Baseline SSE: one Redis subscription per process, a bounded queue per EventSource client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator

import orjson
import redis.asyncio as redis
from fastapi import FastAPI, HTTPException, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

REDIS_URL = os.environ.get("BASELINE_REDIS_URL", "redis://127.0.0.1:6379/2")
CHANNEL = os.environ.get("BASELINE_CHANNEL", "baseline:activity")
TOKEN = os.environ.get("BASELINE_TOKEN", "change-me-realtime")
QUEUE_SIZE = 1000  # the suite's ADVANCED_SSE_SEND_QUEUE default, for a like-for-like bound

listeners: dict[str, set[asyncio.Queue[str]]] = defaultdict(set)


async def fan_out_from_redis(client: redis.Redis) -> None:
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        data = message["data"].decode()
        board_id = orjson.loads(data)["board_id"]
        for queue in list(listeners.get(board_id, ())):
            with contextlib.suppress(asyncio.QueueFull):  # a slow client misses events
                queue.put_nowait(data)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = redis.from_url(REDIS_URL)
    task = asyncio.create_task(fan_out_from_redis(client))
    yield
    task.cancel()
    await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/sse/boards/{board_id}")
async def board_events(request: Request, board_id: str, token: str = "") -> EventSourceResponse:
    if not secrets.compare_digest(token, TOKEN):
        raise HTTPException(401, "missing or wrong token")
    queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
    listeners[board_id].add(queue)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            while True:
                yield ServerSentEvent(await queue.get(), event="activity")
        finally:
            listeners[board_id].discard(queue)

    return EventSourceResponse(events(), ping=15)
