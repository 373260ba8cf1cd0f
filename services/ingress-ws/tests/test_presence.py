"""Presence on the memory transport: one member per identity however many sockets on however
many instances, a dead instance's members reaped, the frames on the socket and the snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import orjson
import pytest
from envelope.models import PresenceFrame, PresenceMember
from ingress_ws.app import create_app
from ingress_ws.presence import BoardPresence, is_client_id, member_of
from ingress_ws.settings import IngressSettings
from realtime_runtime.auth import Principal
from realtime_runtime.memory import MemoryPresence, MemoryTransport
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

TOKEN = "unit-test-token"
SECRET = "unit-test-jwt-secret-of-at-least-32-bytes"
ALICE = PresenceMember(id="alice", name="Alice")


@contextlib.asynccontextmanager
async def running(presence: BoardPresence) -> AsyncIterator[BoardPresence]:
    task = asyncio.create_task(presence.run())
    try:
        yield presence
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def frames(store: MemoryPresence, want: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next `want` changes on the presence channel, then a moment more for any extra."""
    got: list[dict[str, Any]] = []
    async with store.changes() as changes:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for message in changes:
                    got.append(orjson.loads(message.partition(b"\n")[2]))
                    if len(got) >= want:
                        break
    return got


async def settled(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "presence did not settle"
        await asyncio.sleep(0.02)


async def test_one_member_joins_once_and_leaves_once_across_instances() -> None:
    store = MemoryPresence()
    one, two = BoardPresence(store, "one", ttl=30), BoardPresence(store, "two", ttl=30)
    async with store.changes() as changes, running(one), running(two):
        heard: list[dict[str, Any]] = []

        async def listen() -> None:
            async for message in changes:
                heard.append(orjson.loads(message.partition(b"\n")[2]))

        listener = asyncio.create_task(listen())
        for presence in (one, one, two):
            presence.join("b", ALICE)
        one.join("b", PresenceMember(id="bob", name=None))

        async def three_sockets() -> bool:
            return sum(m.connections for m in await store.members("b")) == 4

        await settled(three_sockets)
        for presence in (one, two, one):  # all but alice's last socket, then bob
            presence.leave("b", ALICE)
            await asyncio.sleep(0.05)
        one.leave("b", PresenceMember(id="bob", name=None))

        async def empty() -> bool:
            return await store.members("b") == []

        await settled(empty)
        await asyncio.sleep(0.1)
        listener.cancel()
    frames_seen = [PresenceFrame.model_validate(f) for f in heard]
    assert [(f.action, f.member.id, f.count) for f in frames_seen] == [
        ("join", "alice", 1),
        ("join", "bob", 2),
        ("leave", "alice", 1),
        ("leave", "bob", 0),
    ]
    assert frames_seen[0].member.name == "Alice" and frames_seen[0].board_id == "b"


async def test_members_count_their_sockets_on_every_instance() -> None:
    store = MemoryPresence()
    one, two = BoardPresence(store, "one", ttl=30), BoardPresence(store, "two", ttl=30)
    async with running(one), running(two):
        one.join("b", ALICE)
        two.join("b", ALICE)
        two.join("b", PresenceMember(id="carol", name=None))

        async def both() -> bool:
            return len(await store.members("b")) == 2

        await settled(both)
        members = {m.id: (m.name, m.connections) for m in await store.members("b")}
        assert members == {"alice": ("Alice", 2), "carol": (None, 1)}


async def test_a_dead_instance_s_members_leave_within_the_ttl() -> None:
    store = MemoryPresence()
    survivor = BoardPresence(store, "survivor", ttl=1)
    doomed = BoardPresence(store, "doomed", ttl=1)
    async with running(survivor):
        async with running(doomed):
            doomed.join("b", ALICE)
            survivor.join("b", PresenceMember(id="bob", name=None))

            async def both() -> bool:
                return len(await store.members("b")) == 2

            await settled(both)
        # The doomed instance stops beating without a word (a kill -9): no leave of its own.
        started = time.monotonic()
        heard = await frames(store, 1, timeout=5)
        assert [(f["action"], f["member"]["id"], f["count"]) for f in heard] == [
            ("leave", "alice", 1)
        ]
        assert time.monotonic() - started < 1.5
        assert [m.id for m in await store.members("b")] == ["bob"]


class CountingPresence(MemoryPresence):
    """The memory store, counting the calls a writer makes (a beat must be one)."""

    def __init__(self) -> None:
        super().__init__()
        self.beats = self.set_members = 0

    async def beat(self, *args: Any) -> None:
        self.beats += 1
        await super().beat(*args)

    async def set_member(self, *args: Any) -> None:
        self.set_members += 1
        await super().set_member(*args)


async def test_a_beat_writes_every_member_again_in_one_call() -> None:
    store = MemoryPresence()
    presence = BoardPresence(store, "one", ttl=0.4)  # beats every 0.1 s
    async with running(presence):
        for board in ("a", "b"):
            presence.join(board, ALICE)
            presence.join(board, PresenceMember(id="bob", name=None))
        presence.join("a", ALICE)

        async def written() -> bool:
            return sum(m.connections for m in await store.members("a")) == 3

        await settled(written)
        # A store that lost its data (a Redis restart): the next beat has everyone back.
        lost = presence.store = CountingPresence()

        async def back() -> bool:
            return len(await lost.members("a")) == 2 and len(await lost.members("b")) == 2

        await settled(back)
        assert lost.set_members == 0 and lost.beats >= 1
        assert {m.id: m.connections for m in await lost.members("a")} == {"alice": 2, "bob": 1}


async def test_a_clean_stop_sends_its_members_leaves_at_once() -> None:
    store = MemoryPresence()
    presence = BoardPresence(store, "one", ttl=30)
    async with running(presence):
        presence.join("b", ALICE)

        async def joined() -> bool:
            return len(await store.members("b")) == 1

        await settled(joined)
        listening = asyncio.create_task(frames(store, 1))
        await asyncio.sleep(0.05)
        await presence.clear()
        assert [(f["action"], f["count"]) for f in await listening] == [("leave", 0)]


def test_identity_comes_from_the_credential() -> None:
    jwt_user = Principal(subject="alice", boards=None, kind="jwt", name="Alice")
    assert member_of(jwt_user, "ignored", "conn") == ALICE
    session = Principal(subject="alice", boards=None, kind="session", name="Alice")
    assert member_of(session, None, "conn") == ALICE
    shared = Principal(subject="token", boards=None, kind="token")
    assert member_of(shared, "tab-1", "conn") == PresenceMember(id="tab-1", name=None)
    assert member_of(shared, None, "conn") == PresenceMember(id="conn", name=None)
    shared_session = Principal(subject="token", boards=None, kind="session")
    assert member_of(shared_session, None, "conn").id == "conn"
    assert is_client_id("a" * 64) and is_client_id("tab:1.x_y-z")
    assert not any(map(is_client_id, ["", "a" * 65, "tab 1", "tab/1", "tab\n", "ü"]))


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = IngressSettings(
        _env_file=None,
        event_transport="memory",
        realtime_token=TOKEN,
        environment="test",
        auth_jwt_secret=SECRET,
    )
    with TestClient(create_app(settings, memory=MemoryTransport())) as test_client:
        yield test_client


def token(sub: str, name: str | None = None, boards: list[str] | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "boards": boards or ["*"], "exp": time.time() + 600}
    if name is not None:
        claims["name"] = name
    return jwt.encode(claims, SECRET, algorithm="HS256")


def next_presence(ws: WebSocketTestSession) -> dict[str, Any]:
    while True:
        frame = orjson.loads(ws.receive_text())
        if frame["kind"] == "presence":
            return frame  # type: ignore[no-any-return]


def snapshot(client: TestClient, board: str, sockets: int) -> dict[str, Any]:
    """The board's snapshot once it counts `sockets` (written by the instance's writer)."""
    deadline = time.monotonic() + 5
    while True:
        body = client.get(f"/api/boards/{board}/presence?token={TOKEN}").json()
        if sum(m["connections"] for m in body["members"]) == sockets:
            return body  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


@contextlib.contextmanager
def on_board(client: TestClient, url: str, sockets_after: int) -> Iterator[WebSocketTestSession]:
    """A socket on board `p`, closed before the block exits and gone from the snapshot (the
    test client cancels the app's task on exit: a handler still running would race it)."""
    with client.websocket_connect(url) as ws:
        yield ws
        ws.close(1000)
        snapshot(client, "p", sockets_after)


def test_peers_hear_joins_and_leaves_and_the_snapshot_counts_sockets(client: TestClient) -> None:
    alice = f"/ws/boards/p?token={token('alice', 'Alice')}"
    with on_board(client, f"/ws/boards/p?token={TOKEN}&client_id=watcher", 0) as watcher:
        with on_board(client, alice, 1):
            joined = next_presence(watcher)
            assert joined == {
                "kind": "presence",
                "board_id": "p",
                "action": "join",
                "member": {"id": "alice", "name": "Alice"},
                "count": 2,
            }
            with on_board(client, alice, 2):
                assert snapshot(client, "p", 3) == {
                    "board_id": "p",
                    "count": 2,
                    "members": [
                        {"id": "alice", "name": "Alice", "connections": 2},
                        {"id": "watcher", "name": None, "connections": 1},
                    ],
                }
            # One of alice's two sockets left: she is still there, and nothing is said.
        left = next_presence(watcher)  # the first presence frame since her join
        assert (left["action"], left["member"]["id"], left["count"]) == ("leave", "alice", 1)
    assert snapshot(client, "p", 0) == {"board_id": "p", "count": 0, "members": []}


def test_the_snapshot_refuses_as_the_other_routes_do(client: TestClient) -> None:
    assert client.get("/api/boards/p/presence").status_code == 401
    assert client.get("/api/boards/p/presence?token=wrong").status_code == 401
    other = token("alice", boards=["elsewhere"])
    refused = client.get("/api/boards/p/presence", headers={"Authorization": f"Bearer {other}"})
    assert refused.status_code == 403
    assert client.get(f"/api/boards/{'x' * 65}/presence?token={TOKEN}").status_code == 422


@pytest.mark.parametrize("client_id", ["a" * 65, "tab 1", "tab%2F1"])
def test_a_bad_client_id_is_closed_with_4400(client: TestClient, client_id: str) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect(f"/ws/boards/p?token={TOKEN}&client_id={client_id}") as ws,
    ):
        ws.receive_text()
    assert closed.value.code == 4400
