"""Which Python allocations an idle SSE stream holds in the gateway, by file (tracemalloc).

`uv run --group bench python -m bench.idle_memory [streams]`: the gateway on the memory
transport, served by uvicorn in this process (asyncio loop), read by aiohttp in this process;
only the server's allocations are counted. tracemalloc adds its own overhead, so the absolute
figure is higher than RSS per connection; the split is what it is for.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tracemalloc

import aiohttp
import uvicorn

from bench.launcher import free_port

CLIENT_SIDE = ("aiohttp", "yarl", "multidict", "tracemalloc", "bench/idle_memory")


async def measure(streams: int) -> None:
    token = "idle-memory-token-0123456789"
    os.environ |= {
        "ADVANCED_EVENT_TRANSPORT": "memory",
        "ADVANCED_REALTIME_TOKEN": token,
        "ADVANCED_ACTIVITY_STREAM_RATE_LIMIT": "1000000/second",
        "ADVANCED_RATE_LIMIT_DEFAULT": "1000000/second",
    }
    from realtime_runtime.memory import MemoryTransport
    from realtime_runtime.security import hardened_http_protocol
    from sse_gateway.app import create_app
    from sse_gateway.settings import GatewaySettings

    port = free_port()
    app = create_app(GatewaySettings(), memory=MemoryTransport())
    config = uvicorn.Config(
        app,
        port=port,
        log_config=None,
        log_level="error",
        http=hardened_http_protocol(30.0),  # as the service runs it
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{port}/sse/boards/idle-{{}}?token={token}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # First uses fill caches: not per stream.
        warm = [await session.get(url.format(f"w{i}")) for i in range(20)]
        await asyncio.sleep(0.5)
        gc.collect()
        tracemalloc.start(10)
        before = tracemalloc.take_snapshot()
        held = [await session.get(url.format(i % 50)) for i in range(streams)]
        await asyncio.sleep(1)
        gc.collect()
        after = tracemalloc.take_snapshot()
        stats = [
            s
            for s in after.compare_to(before, "filename")
            if not any(part in s.traceback[0].filename for part in CLIENT_SIDE)
        ]
        total = sum(s.size_diff for s in stats)
        print(
            f"{streams} idle streams: {total / streams / 1024:.1f} KiB of Python allocations each"
        )
        for stat in stats[:15]:
            where = stat.traceback[0].filename.split("site-packages/")[-1]
            print(f"  {stat.size_diff / streams / 1024:6.2f} KiB  {where}")
        for response in held + warm:
            response.close()
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
