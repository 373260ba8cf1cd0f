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
