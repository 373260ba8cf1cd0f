"""The light stand-ins the hardened uvicorn protocols put in place of uvicorn's per-connection
asyncio.Event, asyncio.Queue and deque: the same behaviour where uvicorn relies on it."""

from __future__ import annotations

import asyncio

import pytest
from realtime_runtime.uvicorn_limits import _Flag, _Pipeline, _ReceiveQueue


async def test_a_flag_wakes_every_waiter_and_survives_one_cancelled() -> None:
    flag = _Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert not flag.is_set() and not any(w.done() for w in waiters[1:])
    flag.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1) == [True, True]
    assert waiters[0].cancelled()


async def test_a_flag_set_returns_at_once_and_clear_makes_it_wait_again() -> None:
    flag = _Flag(True)
    assert await asyncio.wait_for(flag.wait(), 1)
    flag.clear()
    waiting = asyncio.create_task(flag.wait())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    flag.set()
    assert await asyncio.wait_for(waiting, 1)


async def test_the_receive_queue_hands_out_in_order_and_waits_when_empty() -> None:
    queue = _ReceiveQueue()
    assert queue.empty()
    getting = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)
    assert not getting.done()
    queue.put_nowait({"n": 1})
    queue.put_nowait({"n": 2})
    assert await asyncio.wait_for(getting, 1) == {"n": 1}
    assert not queue.empty()
    assert await queue.get() == {"n": 2}
    cancelled = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    queue.put_nowait({"n": 3})  # a cancelled reader leaves nothing behind
    assert await asyncio.wait_for(queue.get(), 1) == {"n": 3}


def test_the_pipeline_is_first_in_first_out_like_uvicorns_deque() -> None:
    pipeline = _Pipeline()
    assert not pipeline
    pipeline.appendleft("first")
    pipeline.appendleft("second")
    assert pipeline.pop() == "first" and pipeline.pop() == "second"
