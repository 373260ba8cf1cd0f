"""Presence on the real processes and Redis: two ingress replicas and a gateway.

One member per identity (JWT `sub` and `name`, or the shared token's `client_id` or
connection), joined once and left once however many sockets it has on either replica; the
same frames as `event: presence` on the gateway's board stream; the snapshot across replicas;
and a replica killed with SIGKILL, whose members leave within ADVANCED_PRESENCE_TTL_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from chaos.harness import wait_for
from conftest import TOKEN
from security.edge_client import JWT_SECRET, hs256
from support.clients import BoardClient, SseStream, board, sse
from support.processes import Service, Suite

pytestmark = [pytest.mark.e2e, pytest.mark.brokers]

TTL = 6  # seconds: beats every 1.5 s, an instance expires 3 s after its last beat
BOARD = "presence-e2e"
QUIET = 1.5  # seconds in which no further presence frame may arrive


def replicas(suite: Suite, count: int) -> list[Service]:
    env = {"ADVANCED_AUTH_JWT_SECRET": JWT_SECRET, "ADVANCED_PRESENCE_TTL_SECONDS": str(TTL)}
    started = [suite.start("ingress", wait=False, **env) for _ in range(count)]
    for service in started:
        service.wait_ready()
    return started


def jwt_url(service: Service, sub: str, name: str | None = None) -> str:
    claims = {"sub": sub} if name is None else {"sub": sub, "name": name}
    return f"{service.ws_url}/ws/boards/{BOARD}?token={hs256([BOARD], **claims)}"


def shared_url(service: Service, client_id: str | None = None) -> str:
    suffix = "" if client_id is None else f"&client_id={client_id}"
    return f"{service.ws_url}/ws/boards/{BOARD}?token={TOKEN}{suffix}"


@contextlib.asynccontextmanager
async def sockets(*urls: str) -> AsyncIterator[list[BoardClient]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(board(url)) for url in urls]


async def snapshot(service: Service) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{service.url}/api/boards/{BOARD}/presence",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def connections(service: Service) -> dict[str, int]:
    return {m["id"]: m["connections"] for m in (await snapshot(service))["members"]}


async def settled(service: Service, want: dict[str, int], timeout: float = 20) -> None:
    async def holds() -> bool:
        return await connections(service) == want

    await wait_for(holds, timeout, f"the snapshot to be {want}")


def about(frame: dict[str, Any]) -> tuple[str, str, str | None, int]:
    member = frame["member"]
    return frame["action"], member["id"], member["name"], frame["count"]


async def presence_frames(client: BoardClient, count: int) -> list[dict[str, Any]]:
    return [await client.next("presence", timeout=20) for _ in range(count)]


async def sse_presence(stream: SseStream, count: int) -> list[dict[str, Any]]:
    return [(await stream.next(timeout=20, kind="presence")).json() for _ in range(count)]


def queued(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def nothing_more(client: BoardClient, stream: SseStream) -> None:
    """No presence frame on either transport for a while (heartbeats aside)."""
    await asyncio.sleep(QUIET)
    assert queued(client.frames["presence"]) == []
    assert [e for e in queued(stream.events) if e.event == "presence"] == []


@contextlib.asynccontextmanager
async def watched(suite: Suite) -> AsyncIterator[tuple[Service, Service, BoardClient, SseStream]]:
    """Two ingress replicas and a gateway; a watcher socket on the first (the shared token's
    `client_id=watcher`) and the gateway's board stream, which has heard the watcher join."""
    first, second = replicas(suite, 2)
    gateway = suite.start("gateway")
    async with (
        sse(f"{gateway.url}/sse/boards/{BOARD}?token={TOKEN}") as stream,
        board(shared_url(first, "watcher")) as watcher,
    ):
        (joined,) = await sse_presence(stream, 1)
        assert about(joined) == ("join", "watcher", None, 1)
        yield first, second, watcher, stream


async def test_members_join_once_and_leave_once_across_two_replicas(suite: Suite) -> None:
    async with watched(suite) as (one, two, watcher, stream):
        await settled(two, {"watcher": 1})
        # Alice: four sockets over both replicas; one shared-token socket without a client_id.
        alice = [jwt_url(one, "alice", "Alice"), jwt_url(two, "alice", "Alice")] * 2
        async with sockets(*alice, shared_url(two)) as opened:
            ws_joins = await presence_frames(watcher, 2)
            sse_joins = await sse_presence(stream, 2)
            assert ws_joins == sse_joins
            anonymous = next(f["member"]["id"] for f in ws_joins if f["member"]["id"] != "alice")
            assert len(anonymous) == 32  # the connection's id: its events' `sender`
            assert sorted(about(f)[:3] for f in ws_joins) == sorted(
                [("join", "alice", "Alice"), ("join", anonymous, None)]
            )
            assert [f["count"] for f in ws_joins] == [2, 3]
            want = {"watcher": 1, "alice": 4, anonymous: 1}
            await settled(one, want)
            assert await snapshot(one) == await snapshot(two)
            body = await snapshot(two)
            assert body["count"] == 3 and body["board_id"] == BOARD
            assert {m["id"]: m["name"] for m in body["members"]}["alice"] == "Alice"
            await nothing_more(watcher, stream)  # four sockets, one join

            for left, client in enumerate(opened[:3], start=1):
                await client.close()
                await settled(two, {**want, "alice": 4 - left})
            await nothing_more(watcher, stream)  # alice still has a socket: no leave yet
            await opened[3].close()
            (ws_leave,) = await presence_frames(watcher, 1)
            (sse_leave,) = await sse_presence(stream, 1)
            assert ws_leave == sse_leave and about(ws_leave) == ("leave", "alice", "Alice", 2)
        (gone,) = await presence_frames(watcher, 1)
        assert about(gone) == ("leave", anonymous, None, 1)
        assert await sse_presence(stream, 1) == [gone]
        await settled(one, {"watcher": 1})
        await nothing_more(watcher, stream)


async def test_a_killed_replica_s_members_leave_within_the_ttl(suite: Suite) -> None:
    async with (
        watched(suite) as (survivor, doomed, watcher, stream),
        sockets(
            jwt_url(doomed, "carol", "Carol"),
            jwt_url(doomed, "carol", "Carol"),
            jwt_url(doomed, "dave"),
            jwt_url(survivor, "dave"),
        ),
    ):
        joins = await presence_frames(watcher, 2)
        assert sorted(f["member"]["id"] for f in joins) == ["carol", "dave"]
        await sse_presence(stream, 2)
        await settled(survivor, {"watcher": 1, "carol": 2, "dave": 2})

        doomed.kill()  # kill -9: no drain, no leave of its own
        killed_at = time.monotonic()
        (leave,) = await presence_frames(watcher, 1)
        took = time.monotonic() - killed_at
        (sse_leave,) = await sse_presence(stream, 1)
        assert leave == sse_leave and about(leave) == ("leave", "carol", "Carol", 2)
        assert took <= TTL, f"carol left {took:.1f} s after the kill, past the {TTL} s TTL"
        print(f"[presence] the killed replica's member left {took:.2f} s after SIGKILL")
        assert await connections(survivor) == {"watcher": 1, "dave": 1}
        await nothing_more(watcher, stream)  # dave keeps his socket on the survivor
