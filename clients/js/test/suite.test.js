// The client against the real suite (ingress, relay-worker, SSE gateway, RabbitMQ, Redis):
// publish and receive on both transports, each event once; reconnects through a gateway and
// an ingress restart without loss or duplicate; credential refresh before and after expiry.
// Run by tests/e2e/test_js_client.py, which starts the suite and restarts its services.

import assert from "node:assert/strict";
import { test } from "node:test";

import { PublishError } from "../realtime.js";
import { TOKEN, WARNING_MS, control, freshBoard, jwt, oneTo, recordingClient, sleep, until } from "./suite.js";

const numbers = (delivered) => delivered.map((event) => event.payload.n);

test("events published over the WebSocket arrive on both transports and are passed on once", async () => {
  const board = freshBoard();
  const { client, wire, delivered } = recordingClient({ board, token: TOKEN });
  try {
    await client.connect();
    const acks = await Promise.all([0, 1, 2, 3, 4].map((n) => client.publish("note.created", { n })));
    await until(() => wire.ws.length >= 5 && wire.sse.length >= 5, "five events on each transport");
    assert.deepEqual(wire.ws, oneTo(5));
    assert.deepEqual(wire.sse, oneTo(5));
    assert.equal(delivered.length, 5);
    assert.equal(client.duplicates, 5); // each event came twice, once per transport
    assert.deepEqual(
      new Set(delivered.map((event) => event.correlation_id)),
      new Set(acks.map((ack) => ack.correlation_id)),
    );
    assert.deepEqual(numbers([...delivered].sort((a, b) => a.sequence - b.sequence)), [0, 1, 2, 3, 4]);
  } finally {
    client.close();
  }
});

test("an id sent twice is delivered once; a refused frame rejects its publish", async () => {
  const board = freshBoard();
  const { client, wire, delivered } = recordingClient({ board, token: TOKEN, transports: ["ws"], sseUrl: null });
  try {
    await client.connect();
    const first = await client.publish("note.created", { n: 1 }, { id: "same-id" });
    const again = await client.publish("note.created", { n: 1 }, { id: "same-id" });
    assert.equal(first.correlation_id, again.correlation_id);
    await client.publish("note.created", { n: 2 });
    await until(() => wire.ws.length >= 2, "the second event");
    await sleep(1000); // a second delivery of "same-id" would have come by now
    assert.deepEqual(wire.ws, [1, 2]);
    assert.deepEqual(numbers(delivered), [1, 2]);
    await assert.rejects(client.publish("Not A Type", {}), (error) => {
      assert.ok(error instanceof PublishError);
      assert.equal(error.code, "invalid_message");
      return true;
    });
  } finally {
    client.close();
  }
});

test("a gateway restart: the stream resumes after its cursor, without loss or duplicate", async () => {
  const board = freshBoard();
  const { client, wire, delivered, states } = recordingClient({ board, token: TOKEN });
  try {
    await client.connect();
    for (const n of [0, 1, 2]) await client.publish("note.created", { n });
    await until(() => wire.sse.length >= 3, "three events on SSE");
    await control("stop", "gateway");
    for (const n of [3, 4, 5]) await client.publish("note.created", { n }); // the WebSocket is up
    await until(() => states.sse.includes("waiting"), "the stream to notice the gateway gone");
    await control("start", "gateway");
    await client.publish("note.created", { n: 6 });
    await until(() => wire.sse.length >= 7, "the stream to catch up");
    await sleep(1000);
    assert.deepEqual(wire.sse, oneTo(7));
    assert.deepEqual(wire.ws, oneTo(7));
    assert.deepEqual(numbers(delivered), [0, 1, 2, 3, 4, 5, 6]);
  } finally {
    client.close();
  }
});

test("an ingress restart: publishes wait, the socket resumes after its cursor, nothing is lost or doubled", async () => {
  const board = freshBoard();
  const { client, wire, delivered, states } = recordingClient({ board, token: TOKEN });
  try {
    await client.connect();
    for (const n of [0, 1]) await client.publish("note.created", { n });
    await until(() => wire.ws.length >= 2, "two events on the WebSocket");
    await control("stop", "ingress");
    await until(() => states.ws.includes("waiting"), "the socket to notice the ingress gone");
    // Sent while the ingress is down: they wait, and go out after the reconnect.
    const waiting = [2, 3].map((n) => client.publish("note.created", { n }));
    await control("start", "ingress");
    await Promise.all(waiting);
    await client.publish("note.created", { n: 4 });
    await until(() => wire.ws.length >= 5 && wire.sse.length >= 5, "both transports to catch up");
    await sleep(1000);
    assert.deepEqual(wire.ws, oneTo(5));
    assert.deepEqual(wire.sse, oneTo(5));
    assert.deepEqual(numbers([...delivered].sort((a, b) => a.sequence - b.sequence)), [0, 1, 2, 3, 4]);
  } finally {
    client.close();
  }
});

test("refresh before expiry: the socket never drops, the stream comes back with new tokens, nothing lost", async () => {
  const board = freshBoard();
  const ttl = WARNING_MS / 1000 + 3;
  let issued = 0;
  const { client, wire, delivered, states, notices } = recordingClient({
    board,
    getToken: () => {
      issued += 1;
      return jwt([board], ttl);
    },
    refreshBeforeMs: WARNING_MS,
  });
  const refreshed = [];
  client.on("refreshed", (frame) => refreshed.push(frame));
  try {
    await client.connect();
    const started = Date.now();
    let n = 0;
    // Three credential lifetimes, an event every 400 ms.
    while (Date.now() - started < ttl * 3000) {
      await client.publish("note.created", { n: n++ });
      await sleep(400);
    }
    await until(() => wire.ws.length >= n && wire.sse.length >= n, "every event on both transports");
    await sleep(1000);
    assert.ok(refreshed.length >= 2, `refreshed ${refreshed.length} times`);
    assert.ok(refreshed.every((frame) => Date.parse(frame.expires_at) > started));
    assert.deepEqual(states.ws, ["connecting", "open"]); // refreshed in place, never reconnected
    const streamOpens = states.sse.filter((state) => state === "open").length;
    assert.ok(streamOpens >= 3, `the stream opened ${streamOpens} times`);
    assert.ok(!notices.some((text) => text.includes("token_expired")), notices.join("\n"));
    assert.ok(issued >= 3);
    assert.deepEqual(wire.ws, oneTo(n));
    assert.deepEqual(wire.sse, oneTo(n));
    assert.equal(delivered.length, n);
  } finally {
    client.close();
  }
});

test("refresh after expiry: both transports are cut, come back with a new token and resume", async () => {
  const board = freshBoard();
  const ttl = WARNING_MS / 1000 + 2;
  let calls = 0;
  const { client, wire, delivered, states, notices } = recordingClient({
    board,
    getToken: async () => {
      calls += 1;
      // The renewal asked for by the warning answers only after the credential expired.
      if (calls === 2) await sleep(WARNING_MS + 2000);
      return jwt([board], calls === 1 ? ttl : 120);
    },
    refreshBeforeMs: 0, // no early renewal of the stream: it ends at expiry
  });
  const other = recordingClient({ board, token: TOKEN, transports: ["ws"], sseUrl: null });
  try {
    await client.connect();
    await other.client.connect();
    let n = 0;
    const started = Date.now();
    // Published by another client through the expiry and the reconnects.
    while (Date.now() - started < (ttl + 4) * 1000) {
      await other.client.publish("note.created", { n: n++ });
      await sleep(300);
    }
    await until(() => wire.ws.length >= n && wire.sse.length >= n, "every event on both transports");
    await sleep(1000);
    assert.ok(states.ws.filter((state) => state === "open").length >= 2, states.ws.join(","));
    assert.ok(notices.some((text) => text.includes("token_expired")), notices.join("\n"));
    assert.deepEqual(wire.ws, oneTo(n));
    assert.deepEqual(wire.sse, oneTo(n));
    assert.equal(delivered.length, n);
  } finally {
    client.close();
    other.client.close();
  }
});
