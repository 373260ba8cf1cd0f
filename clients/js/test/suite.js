// What the tests against the real suite share: its addresses (from the pytest test that
// starts it, tests/e2e/test_js_client.py), JWTs signed with its secret, waits, and clients
// whose WebSocket and event stream record every event frame as it came off the wire.

import { createHmac, randomUUID } from "node:crypto";

import { FetchEventSource, RealtimeClient } from "../realtime.js";

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: these tests run through pytest tests/e2e/test_js_client.py`);
  }
  return value;
}

export const INGRESS = required("REALTIME_INGRESS_URL");
export const SSE = required("REALTIME_SSE_URL");
export const TOKEN = required("REALTIME_TOKEN");
const SECRET = required("REALTIME_JWT_SECRET");
const CONTROL = required("REALTIME_CONTROL_URL");
/** ADVANCED_AUTH_REFRESH_WARNING_SECONDS of the ingress, in ms. */
export const WARNING_MS = Number(required("REALTIME_REFRESH_WARNING_SECONDS")) * 1000;

/** An HS256 JWT for `boards`, expiring in `ttlSeconds`. */
export function jwt(boards, ttlSeconds, claims = {}) {
  const now = Math.floor(Date.now() / 1000);
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: "js-client", boards, iat: now, exp: now + ttlSeconds, ...claims })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export const freshBoard = () => `js-${randomUUID().slice(0, 12)}`;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Wait for `check()` to be true; fails with `what` after `timeoutMs` (a loaded machine). */
export async function until(check, what, timeoutMs = 45_000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** `until` for an async check; a check that throws fails at once. */
export async function eventually(check, what, timeoutMs = 45_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** Stop or start the gateway or the ingress (same port), through the pytest test. */
export async function control(action, service) {
  const response = await fetch(`${CONTROL}/${action}/${service}`, { method: "POST" });
  if (!response.ok) throw new Error(`${action} ${service}: ${response.status} ${await response.text()}`);
}

/**
 * A RealtimeClient on the suite whose transports record the `sequence` of every event frame
 * they receive, before any deduplication: `wire.ws`, `wire.sse`. `delivered` holds what the
 * client passed on, `states` every state change, `notices` its notices.
 */
export function recordingClient(options) {
  const wire = { ws: [], sse: [] };
  class RecordingSocket extends globalThis.WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("message", (message) => {
        const frame = JSON.parse(message.data);
        if (frame.kind === "event") wire.ws.push(frame.sequence);
      });
    }
  }
  class RecordingStream extends FetchEventSource {
    constructor(url, init) {
      super(url, init);
      this.addEventListener("activity", (message) => wire.sse.push(JSON.parse(message.data).sequence));
    }
  }
  const client = new RealtimeClient({
    url: INGRESS,
    sseUrl: SSE,
    WebSocket: RecordingSocket,
    EventSource: RecordingStream,
    reconnectInitialMs: 200,
    reconnectMaxMs: 1000,
    ...options,
  });
  const delivered = [];
  const states = { ws: [], sse: [] };
  const notices = [];
  client.on("event", (event, info) => delivered.push({ ...event, via: info.transport }));
  client.on("state", (state) => {
    const list = states[state.transport];
    if (list.at(-1) !== state.state) list.push(state.state);
  });
  client.on("notice", (text) => notices.push(text));
  return { client, wire, delivered, states, notices };
}

/** 1, 2, …, n: what each transport must have received, exactly (no loss, no duplicate). */
export const oneTo = (n) => Array.from({ length: n }, (_, i) => i + 1);
