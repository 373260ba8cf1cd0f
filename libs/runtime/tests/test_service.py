"""The process wrapper every service runs in."""

from __future__ import annotations

import asyncio
import gc

import uvicorn
from fastapi import FastAPI
from realtime_runtime.service import DrainingServer
from support.processes import free_port


async def test_start_up_objects_are_frozen_out_of_the_collector() -> None:
    gc.unfreeze()
    config = uvicorn.Config(FastAPI(), port=free_port(), log_config=None, lifespan="on")
    server = DrainingServer(config, drain=None)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 10_000
    finally:
        server.should_exit = True
        await serving
        gc.unfreeze()


async def test_an_exit_without_a_signal_drains_first() -> None:
    drained = asyncio.Event()

    async def drain() -> None:
        drained.set()

    config = uvicorn.Config(FastAPI(), port=free_port(), log_config=None, lifespan="on")
    server = DrainingServer(config, drain=drain, drain_timeout=1)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    server.should_exit = True
    await serving
    gc.unfreeze()
    assert drained.is_set()


async def test_a_drain_that_outlasts_its_timeout_is_cancelled() -> None:
    async def drain() -> None:
        await asyncio.sleep(60)

    config = uvicorn.Config(FastAPI(), port=free_port(), log_config=None, lifespan="on")
    server = DrainingServer(config, drain=drain, drain_timeout=0.2)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    server.should_exit = True
    async with asyncio.timeout(5):
        await serving
    gc.unfreeze()
