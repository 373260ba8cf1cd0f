// The client's parts that need no suite: the fetch-based event stream reader against a local
// HTTP server, JWT expiry, and deduplication across the two transports.

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import { FetchEventSource, RealtimeClient, tokenExpiry } from "../realtime.js";

let server;
let base;

before(async () => {
  server = createServer((request, response) => {
    if (request.url === "/refused") {
      response.writeHead(401, { "content-type": "application/json" });
      response.end('{"detail":"no"}');
      return;
    }
    response.writeHead(200, { "content-type": "text/event-stream" });
    response.write(`: seen ${request.headers.authorization ?? "none"}\n\n`);
    // An event split across writes, CRLF line ends, two data lines, an id, a comment.
    response.write("id: 7.1\r\nevent: activity\r");
    setTimeout(() => {
      response.write('\ndata: {"a":\r\ndata: 1}\r\n\r\n: heartbeat\n\n');
      response.end('event: close\ndata: {"reason":"token_expired"}\n\n');
    }, 50);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => server.close());

function collect(source, types) {
  const seen = [];
  for (const type of types) source.addEventListener(type, (event) => seen.push([type, event]));
  return seen;
}

describe("FetchEventSource", () => {
  test("parses events split across chunks and line ends, then reports the end", async () => {
    const source = new FetchEventSource(`${base}/stream`, { headers: { Authorization: "Bearer t" } });
    const seen = collect(source, ["open", "activity", "close", "error"]);
    await new Promise((resolve) => source.addEventListener("error", resolve));
    assert.deepEqual(
      seen.map(([type]) => type),
      ["open", "activity", "close", "error"],
    );
    assert.equal(seen[1][1].data, '{"a":\n1}');
    assert.equal(seen[1][1].lastEventId, "7.1");
    assert.deepEqual(JSON.parse(seen[2][1].data), { reason: "token_expired" });
    assert.equal(source.readyState, FetchEventSource.CLOSED);
  });

  test("a refused stream never opens and keeps its status", async () => {
    const source = new FetchEventSource(`${base}/refused`);
    const seen = collect(source, ["open", "error"]);
    await new Promise((resolve) => source.addEventListener("error", resolve));
    assert.deepEqual(
      seen.map(([type]) => type),
      ["error"],
    );
    assert.equal(source.status, 401);
  });
});

test("tokenExpiry reads a JWT's exp and nothing else", () => {
  const body = Buffer.from(JSON.stringify({ sub: "a", exp: 2_000_000_000 })).toString("base64url");
  assert.equal(tokenExpiry(`e30.${body}.sig`), 2_000_000_000_000);
  assert.equal(tokenExpiry("the-shared-token"), null);
  assert.equal(tokenExpiry("a.%%%.c"), null);
  assert.equal(tokenExpiry(null), null);
});

test("an event arriving on both transports is delivered once, by correlation_id", () => {
  class NeverOpens {
    constructor() {
      this.readyState = 0;
    }
    addEventListener() {}
    close() {}
  }
  const client = new RealtimeClient({
    url: "http://127.0.0.1:9",
    sseUrl: "http://127.0.0.1:9",
    board: "unit",
    token: "t",
    WebSocket: NeverOpens,
    EventSource: NeverOpens,
  });
  const delivered = [];
  client.on("event", (event, info) => delivered.push([event.correlation_id, info.transport]));
  const event = (sequence, id) => ({ kind: "event", sequence, epoch: "1", correlation_id: id, published_at: new Date().toISOString() });
  client.socket.receive(JSON.stringify(event(1, "a")));
  client.stream.deliver(event(1, "a"));
  client.stream.deliver(event(2, "b"));
  client.socket.receive(JSON.stringify(event(2, "b")));
  client.socket.receive(JSON.stringify(event(3, "c")));
  assert.deepEqual(delivered, [
    ["a", "ws"],
    ["b", "sse"],
    ["c", "ws"],
  ]);
  assert.equal(client.duplicates, 2);
  assert.deepEqual(client.cursors, { ws: { after: 3, epoch: "1" }, sse: { after: 2, epoch: "1" } });
});

test("a client with nothing to open a WebSocket with says what to do", () => {
  const saved = globalThis.WebSocket;
  try {
    globalThis.WebSocket = undefined;
    assert.throws(
      () => new RealtimeClient({ url: "http://127.0.0.1:9", board: "unit", token: "t" }),
      /pass `WebSocket`/,
    );
  } finally {
    globalThis.WebSocket = saved;
  }
});
