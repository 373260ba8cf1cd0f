// Presence through the client against the real suite (contract section 12): `presence`
// frames on the WebSocket, `event: presence` on SSE, and the snapshot. Run by
// tests/e2e/test_js_client.py once the ingress has the presence route.

import assert from "node:assert/strict";
import { test } from "node:test";

import { eventually, freshBoard, jwt, recordingClient, until } from "./suite.js";

test("members join and leave, on both transports and in the snapshot", async () => {
  const board = freshBoard();
  const alice = recordingClient({ board, token: jwt([board], 300, { sub: "alice", name: "Alice" }), transports: ["ws"], sseUrl: null });
  const watcher = recordingClient({ board, token: jwt([board], 300, { sub: "watcher" }), transports: ["sse"] });
  const seenByAlice = [];
  const seenOnStream = [];
  alice.client.on("presence", (change) => seenByAlice.push(change));
  watcher.client.on("presence", (change) => seenOnStream.push(change));
  try {
    await alice.client.connect();
    // Asked first: an ingress without the route (404) fails here at once.
    await eventually(async () => (await alice.client.presence()).count === 1, "alice in the snapshot");
    await watcher.client.connect();
    const bob = recordingClient({ board, token: jwt([board], 300, { sub: "bob" }), transports: ["ws"], sseUrl: null });
    await bob.client.connect();
    const joined = (list) => list.some((c) => c.action === "join" && c.member.id === "bob");
    await until(() => joined(seenByAlice) && joined(seenOnStream), "bob's join on both transports");
    const snapshot = await alice.client.presence();
    assert.equal(snapshot.board_id, board);
    assert.equal(snapshot.count, 2);
    const members = Object.fromEntries(snapshot.members.map((m) => [m.id, m]));
    assert.equal(members.alice.name, "Alice");
    assert.equal(members.bob.connections, 1);
    bob.client.close();
    const left = (list) => list.some((c) => c.action === "leave" && c.member.id === "bob");
    await until(() => left(seenByAlice) && left(seenOnStream), "bob's leave on both transports");
  } finally {
    alice.client.close();
    watcher.client.close();
  }
});
