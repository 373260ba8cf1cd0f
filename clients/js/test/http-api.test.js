// The client's HTTP calls against the real suite: publish (contract section 10) and history
// (section 11). Run by tests/e2e/test_js_client.py once the ingress has those routes.

import assert from "node:assert/strict";
import { test } from "node:test";

import { PublishError } from "../realtime.js";
import { TOKEN, freshBoard, oneTo, recordingClient, sleep, until } from "./suite.js";

test("an HTTP publish, resent with its Idempotency-Key, is delivered once on both transports", async () => {
  const board = freshBoard();
  const { client, wire, delivered } = recordingClient({ board, token: TOKEN });
  try {
    await client.connect();
    const first = await client.publishHttp("note.created", { n: 1 }, { id: "http-once" });
    const again = await client.publishHttp("note.created", { n: 1 }, { id: "http-once" });
    assert.equal(first.correlation_id, "http-once");
    assert.equal(again.correlation_id, "http-once");
    await client.publishHttp("note.created", { n: 2 });
    await until(() => wire.ws.length >= 2 && wire.sse.length >= 2, "both events on both transports");
    await sleep(1000);
    assert.deepEqual(wire.ws, oneTo(2));
    assert.deepEqual(wire.sse, oneTo(2));
    assert.deepEqual(
      delivered.map((event) => event.payload.n),
      [1, 2],
    );
    await assert.rejects(client.publishHttp("Not A Type", {}), (error) => {
      assert.ok(error instanceof PublishError);
      assert.equal(error.status, 400);
      assert.equal(error.code, "invalid_message");
      return true;
    });
  } finally {
    client.close();
  }
});

test("history pages through the board's retained events in sequence order", async () => {
  const board = freshBoard();
  const { client } = recordingClient({ board, token: TOKEN, transports: ["ws"], sseUrl: null });
  try {
    await client.connect();
    for (const n of [0, 1, 2, 3, 4]) await client.publish("note.created", { n });
    let page;
    const seen = [];
    let after = 0;
    for (let round = 0; round < 20 && seen.length < 5; round++) {
      page = await client.history({ after, limit: 3 });
      seen.push(...page.events.map((event) => event.sequence));
      after = page.next_after ?? seen.at(-1) ?? 0;
      if (page.events.length === 0) await sleep(200); // not relayed yet
    }
    assert.deepEqual(seen, oneTo(5));
  } finally {
    client.close();
  }
});
