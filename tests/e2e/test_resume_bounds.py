"""Resumes on the real edges and real Redis: a stalled resume holds a page, not the history;
a cursor Redis would refuse is a reset, never a cut stream or a traceback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis
from chaos.harness import metric, scrape, wait_for
from conftest import TOKEN
from envelope import codec
from envelope.topology import ACTIVITY_PARTS, RedisKeys
from relay_worker.adapters.redis import RedisRelayStore
from support.brokers import Brokers, Names
from support.clients import board, sse, stalled_sse, stalled_websocket
from support.envelopes import board_event
from support.processes import Service, Suite

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

HISTORY = 6000
PAD = 2000  # bytes of payload per event: 12 MB of retained history on the board


@pytest.fixture
def keys(names: Names) -> RedisKeys:
    env = names.env()
    return RedisKeys(env["ADVANCED_REDIS_KEY_PREFIX"], env["ADVANCED_ACTIVITY_CHANNEL"])


@pytest.fixture
async def relay(brokers: Brokers, keys: RedisKeys) -> AsyncIterator[RedisRelayStore]:
    """The worker's own relay step on the suite's keys: events land as the pipeline writes them."""
    client = redis.from_url(brokers.redis_url)
    try:
        yield RedisRelayStore(client, keys, 10_000)
    finally:
        await client.aclose()


async def write(relay: RedisRelayStore, board_id: str, count: int, pad: int = 0) -> None:
    async def one() -> None:
        envelope = board_event(board_id, uuid.uuid4().hex)
        if pad:
            envelope = envelope.model_copy(update={"payload": {"pad": "x" * pad}})
        await relay.relay(
            board_id, envelope.correlation_id, codec.activity_body(envelope, datetime.now(UTC)), 60
        )

    for start in range(0, count, 100):
        await asyncio.gather(*(one() for _ in range(min(100, count - start))))


async def test_a_stalled_resume_makes_neither_edge_read_the_history(
    suite: Suite, relay: RedisRelayStore
) -> None:
    gateway = suite.start("gateway", ADVANCED_SSE_SEND_TIMEOUT_SECONDS="1")
    ingress = suite.start("ingress", ADVANCED_WEBSOCKET_WRITE_STALL_SECONDS="1")
    await write(relay, "big", HISTORY, PAD)
    sse_client = await stalled_sse(gateway.port, "big", TOKEN, last_event_id="0")
    ws_client = await stalled_websocket(ingress.port, f"/ws/boards/big?token={TOKEN}&after=0")
    try:
        # Both cut by their send timeouts: by then they have read all they will.
        await wait_for(lambda: _gone(gateway, 'advanced_sse_connections{route="board"}'), 20, "cut")
        await wait_for(lambda: _gone(ingress, "advanced_websocket_connections"), 20, "ws cut")
        replayed_sse = metric(scrape(gateway), "advanced_sse_replayed_events_total")
        replayed_ws = metric(scrape(ingress), "advanced_websocket_replayed_events_total")
    finally:
        sse_client.close()
        ws_client.close()
    # Events handed to the socket (what its buffers took, in pages): not the 6000 retained.
    assert 0 < replayed_sse < HISTORY // 2, replayed_sse
    assert 0 < replayed_ws < HISTORY // 2, replayed_ws


async def _gone(service: Service, gauge: str) -> bool:
    return metric(await asyncio.to_thread(scrape, service), gauge) == 0


async def test_an_activity_cursor_past_64_bits_is_a_reset_and_the_stream_goes_on(
    suite: Suite, relay: RedisRelayStore
) -> None:
    gateway = suite.start("gateway")
    assert gateway.log_path is not None
    logged_before = gateway.log_path.stat().st_size  # the log file is appended to across runs
    await write(relay, "far", 3)
    # A part's entry past 64 bits, and single stream ids (the cursor before the activity
    # stream was split in parts): every one a reset, never an error.
    rest = ",0" * (ACTIVITY_PARTS - 1)
    cursors = [f"0-99999999999999999999{rest}", f"99999999999999999999-0{rest}"]
    cursors += [f"0-18446744073709551616{rest}", "0-99999999999999999999", "1700000000000-0"]
    for cursor in cursors:
        for headers, query in (({"Last-Event-ID": cursor}, ""), ({}, f"&last_event_id={cursor}")):
            url = f"{gateway.url}/sse/activity?token={TOKEN}{query}"
            async with sse(url, headers) as stream:
                reset = await stream.next(kind="reset")
                outcome = await relay.relay("far", uuid.uuid4().hex, _body("far"), 60)
                while (await stream.next()).json()["sequence"] != outcome.sequence:
                    pass  # the retained events, then the live one: the stream goes on
            assert reset.json()["reason"] == "cursor_expired", cursor
    with gateway.log_path.open("rb") as log:
        log.seek(logged_before)
        assert b"Traceback" not in log.read()


def _body(board_id: str) -> bytes:
    return codec.activity_body(board_event(board_id, uuid.uuid4().hex), datetime.now(UTC))


async def test_a_board_expired_and_written_again_resets_old_cursors_on_both_edges(
    suite: Suite, relay: RedisRelayStore, keys: RedisKeys, brokers: Brokers
) -> None:
    gateway = suite.start("gateway")
    ingress = suite.start("ingress")
    await write(relay, "idle", 5)
    async with sse(f"{gateway.url}/sse/boards/idle?token={TOKEN}&last_event_id=2") as before:
        cursor = (await before.next()).id  # "3.<epoch>"
    sequence, _, old = (cursor or "").partition(".")
    assert sequence == "3" and old.isdigit()

    live_url = f"{ingress.ws_url}/ws/boards/idle?token={TOKEN}"
    async with board(f"{live_url}&after=5") as live:  # 6 is replayed or live: no race
        await write(relay, "idle", 1)
        assert (await live.next("event"))["sequence"] == 6  # this socket holds numbers of `old`
        # What ADVANCED_BOARD_IDLE_TTL_SECONDS does to an idle board: all its keys go.
        client = redis.from_url(brokers.redis_url)
        try:
            await client.delete(
                keys.sequence("idle"), keys.epoch("idle"), keys.board_stream("idle")
            )
        finally:
            await client.aclose()
        await write(relay, "idle", 2)  # sequences 1 and 2 again, under a new epoch
        reset_live = await live.next("reset")
        restarted = [await live.next("event") for _ in range(2)]
    new = restarted[0]["epoch"]
    assert reset_live["reason"] == "history_lost" and new != old
    assert [(e["sequence"], e["epoch"]) for e in restarted] == [(1, new), (2, new)]

    # Resuming with the old cursor: a reset, then the new epoch's events, never `2` as if new.
    async with sse(f"{gateway.url}/sse/boards/idle?token={TOKEN}", {"Last-Event-ID": cursor}) as s:
        reset_sse = (await s.next(kind="reset")).json()
        ids = [(await s.next()).id for _ in range(2)]
    assert reset_sse["reason"] == "history_lost" and ids == [f"1.{new}", f"2.{new}"]
    async with board(f"{live_url}&after=1&epoch={old}") as resumed:
        reset_ws = await resumed.next("reset")
        again = [(await resumed.next("event"))["sequence"] for _ in range(2)]
    assert reset_ws["reason"] == "history_lost" and again == [1, 2]
