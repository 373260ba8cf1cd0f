"""The ingress's drain: every step of a stop, in order, in one place (as uvicorn's
`Server.shutdown` orders its own)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from envelope.codes import CloseCode

from ingress_ws.state import IngressRuntime

log = structlog.get_logger("ingress_ws")


async def drain(runtime: IngressRuntime) -> None:
    """Steps 1 to 3. Run on SIGTERM while uvicorn still serves (`app.state.drain`), so the
    sockets get 1001 rather than uvicorn's own 1012, and again when the lifespan ends."""
    deadline = asyncio.get_running_loop().time() + runtime.settings.drain_timeout_seconds
    # 1. Stop accepting: a handshake from now on is closed with 1001, as the open ones are.
    runtime.accepting = False
    # 2. Tell every open socket to close (1001): its client reconnects, to another replica.
    await asyncio.gather(
        *(sock.close(CloseCode.GOING_AWAY, "server shutting down") for sock in runtime.sockets)
    )
    # 3. Wait for the sockets to end, which answers the publishes still awaiting a confirm;
    # the whole drain keeps within ADVANCED_DRAIN_TIMEOUT_SECONDS.
    try:
        async with asyncio.timeout_at(deadline):
            await runtime.sockets.wait_closed()
    except TimeoutError:
        log.warning("sockets still open after the drain's wait", open=len(runtime.sockets))


async def shut_down(runtime: IngressRuntime) -> None:
    """The whole drain, at the lifespan's end; its exit stack closes the clients after it."""
    await drain(runtime)
    # 4. Cancel what is left: the background loops.
    for task in runtime.tasks:
        task.cancel()
    await asyncio.gather(*runtime.tasks, return_exceptions=True)
    # 5. Close clients: this instance's members leave now, not when its beat expires; the
    # lifespan's exit stack then closes the publisher and the Redis client.
    with contextlib.suppress(Exception):
        await runtime.presence.clear()
