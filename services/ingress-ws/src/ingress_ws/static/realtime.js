// The suite's client: one board over a WebSocket to the ingress and/or an event stream from
// the SSE gateway, in browsers and in Node 20+. It publishes (over the WebSocket, or HTTP),
// delivers every event of the board once (each transport resumes after its own cursor on a
// reconnect, and events are deduplicated by `correlation_id` across transports), renews its
// credential before it expires, and exposes presence. No dependencies. See README.md.

import { FetchEventSource } from "./event-source.js";
import { Backoff, SocketTransport, StreamTransport, parseTime, socketUrl, streamUrl } from "./transports.js";

export { Backoff, FetchEventSource, SocketTransport, StreamTransport, parseTime, socketUrl, streamUrl };

const BOARD_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const DEDUPE_WINDOW = 10_000; // correlation ids remembered, the oldest forgotten first
const NO_CURSOR = { after: 0, epoch: null };

/** A refused publish: `code` is the contract's error code (`unavailable`, `rate_limited`,
 *  `invalid_message`, `payload_too_large`, `forbidden`), or `closed` when the client closed. */
export class PublishError extends Error {
  constructor(code, message, { correlationId = null, status = null, retryAfter = null } = {}) {
    super(message);
    this.name = "PublishError";
    this.code = code;
    this.correlationId = correlationId;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

/** A request refused by the ingress: `status` is the HTTP status, `body` its JSON (or null). */
export class RequestError extends Error {
  constructor(status, body) {
    super(body?.message ?? body?.detail ?? `the server answered ${status}`);
    this.name = "RequestError";
    this.status = status;
    this.body = body;
  }
}

/** A JWT's `exp` in milliseconds since the epoch, read without checking the signature (the
 *  server checks it); null for the shared token or anything that is not a JWT with `exp`. */
export function tokenExpiry(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

function newCorrelationId() {
  return `rc-${globalThis.crypto.randomUUID()}`;
}

export class RealtimeClient {
  /** @param {import("./realtime.js").RealtimeOptions} options */
  constructor(options) {
    const {
      url = globalThis.location?.origin,
      sseUrl = null,
      board,
      token = null,
      getToken = null,
      transports = sseUrl ? ["ws", "sse"] : ["ws"],
      WebSocket: WebSocketImpl,
      EventSource: EventSourceImpl,
      fetch: fetchImpl,
      reconnectInitialMs = 500,
      reconnectMaxMs = 15_000,
      refreshBeforeMs = 30_000,
      resumeFrom = {},
    } = options ?? {};
    if (!url) throw new TypeError("RealtimeClient: `url` (the ingress, e.g. http://localhost:8004) is required");
    if (!BOARD_ID.test(board ?? "")) throw new TypeError("RealtimeClient: `board` must be 1-64 of [A-Za-z0-9_.-]");
    if (!token && !getToken) throw new TypeError("RealtimeClient: give `token` or `getToken`");
    if (transports.includes("sse") && !sseUrl) throw new TypeError("RealtimeClient: SSE needs `sseUrl`");
    if (transports.includes("ws") && !(WebSocketImpl ?? globalThis.WebSocket)) {
      throw new TypeError(
        "RealtimeClient: no WebSocket here: pass `WebSocket` (such as the ws package's), " +
          "or run Node 22+ (Node 20.10+: node --experimental-websocket)",
      );
    }
    this.url = url;
    this.sseUrl = sseUrl;
    this.board = board;
    this.token = token;
    this.getToken = getToken;
    this.refreshBeforeMs = refreshBeforeMs;
    this.fetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
    /** Events dropped as duplicates (the same `correlation_id` seen already). */
    this.duplicates = 0;
    this._listeners = new Map();
    this._seen = new Map();
    this._pending = new Map(); // correlation id -> { frame, resolve, reject }
    this._renewing = null;
    this._sseTimer = null;
    this._opened = new Set();
    this._states = {};
    this._connected = null;

    const backoff = () => new Backoff(reconnectInitialMs, reconnectMaxMs);
    const common = (name) => ({
      onState: (state) => this._state(name, state),
      onEvent: (event) => this._event(name, event),
      onNotice: (text, tone) => this._emit("notice", text, tone, name),
      onFatal: (message) => this._fatal(message),
      beforeConnect: () => this._freshToken(),
    });
    this.socket = null;
    this.stream = null;
    if (transports.includes("ws")) {
      this.socket = new SocketTransport(
        (cursor) => socketUrl(this.url, this.board, this.token, cursor),
        backoff(),
        {
          ...common("ws"),
          onOpen: () => this._flush(),
          onAck: (ack) => this._settle(ack.correlation_id, (p) => p.resolve(ack)),
          onError: (error) => this._refused(error),
          onExpiring: (frame) => this._expiring(frame),
          onRefreshed: (frame) => this._emit("refreshed", frame),
          onPresence: (frame) => this._emit("presence", frame, "ws"),
        },
        { WebSocket: WebSocketImpl },
      );
      this.socket.resumeFrom(resumeFrom.ws ?? NO_CURSOR);
    }
    if (transports.includes("sse")) {
      const Impl = EventSourceImpl ?? globalThis.EventSource ?? FetchEventSource;
      // FetchEventSource sends the credential as a header; a native EventSource cannot.
      const viaHeader = Impl === FetchEventSource || Impl.prototype instanceof FetchEventSource;
      this.stream = new StreamTransport(
        (cursor) => streamUrl(this.sseUrl, this.board, viaHeader ? null : this.token, cursor),
        backoff(),
        {
          ...common("sse"),
          // With a WebSocket open too, its presence frames are the ones passed on.
          onPresence: (frame) => this.socket === null && this._emit("presence", frame, "sse"),
          onClose: (reason) => this._emit("notice", `SSE stream closed: ${reason}`, "info", "sse"),
        },
        {
          EventSource: Impl,
          headersFor: viaHeader ? () => ({ Authorization: `Bearer ${this.token}` }) : undefined,
        },
      );
      this.stream.resumeFrom(resumeFrom.sse ?? NO_CURSOR);
    }
  }

  /** Listen to "event", "presence", "state", "notice", "refreshed", "expiring", "fatal";
   *  returns a function that stops listening. */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this._listeners.get(type)?.delete(listener);
  }

  /** Open the transports; resolves once each has opened, rejects on a refusal no retry can
   *  fix (a bad token or board). Reconnects go on by themselves until `close()`. */
  connect() {
    this._connected ??= new Promise((resolve, reject) => {
      this._connectedSettle = { resolve, reject };
    });
    this.socket?.start();
    this.stream?.start();
    return this._connected;
  }

  /** Stop both transports; publishes still waiting are rejected with code `closed`. */
  close() {
    clearTimeout(this._sseTimer);
    this.socket?.stop();
    this.stream?.stop();
    for (const [id, pending] of this._pending) {
      pending.reject(new PublishError("closed", "The client was closed.", { correlationId: id }));
    }
    this._pending.clear();
  }

  /** Where each transport would resume: `{ws: {after, epoch}, sse: {after, epoch}}`. Pass it
   *  as `resumeFrom` to a new client to carry on without loss. */
  get cursors() {
    return { ws: this.socket?.cursor ?? null, sse: this.stream?.cursor ?? null };
  }

  /**
   * Publish over the WebSocket: resolves with the `ack` once the event is durable, rejects
   * with a `PublishError`. While the socket is down the frame waits, and it is sent again
   * after each reconnect with the same `id` until answered (the suite delivers an id once).
   * Without a WebSocket transport it goes over HTTP (`publishHttp`).
   */
  publish(type, payload, { id } = {}) {
    if (this.socket === null) return this.publishHttp(type, payload, { id });
    const frame = { type, payload, id: id ?? newCorrelationId() };
    return new Promise((resolve, reject) => {
      this._pending.set(frame.id, { frame, resolve, reject });
      this.socket.send(frame);
    });
  }

  /** Publish with `POST /api/boards/{board}/events` (contract 10), the id as
   *  `Idempotency-Key`: resolves with `{correlation_id, event_id}` on 202. */
  async publishHttp(type, payload, { id } = {}) {
    const key = id ?? newCorrelationId();
    await this._freshToken();
    const response = await this.fetch(this._api("events"), {
      method: "POST",
      headers: { ...this._auth(), "Content-Type": "application/json", "Idempotency-Key": key },
      body: JSON.stringify({ type, payload, id: key }),
    });
    const body = await response.json().catch(() => null);
    if (response.status === 202) return body;
    throw new PublishError(body?.code ?? "unavailable", body?.message ?? `HTTP ${response.status}`, {
      correlationId: key,
      status: response.status,
      retryAfter: Number(response.headers.get("retry-after")) || null,
    });
  }

  /** Who is on the board now (contract 12): `{board_id, count, members: [{id, name, connections}]}`. */
  presence() {
    return this._get(this._api("presence"));
  }

  /** A page of the board's retained events (contract 11): `{events, next_after, reset?}`. */
  history({ after = 0, limit = 100 } = {}) {
    const url = new URL(this._api("events"));
    url.searchParams.set("after", String(after));
    url.searchParams.set("limit", String(limit));
    return this._get(url.toString());
  }

  // --- internals ---------------------------------------------------------------------------

  _emit(type, ...args) {
    let result;
    for (const listener of this._listeners.get(type) ?? []) result = listener(...args) ?? result;
    return result;
  }

  _api(path) {
    const base = new URL(this.url);
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    return new URL(`api/boards/${encodeURIComponent(this.board)}/${path}`, base).toString();
  }

  _auth() {
    return { Authorization: `Bearer ${this.token}` };
  }

  async _get(url) {
    await this._freshToken();
    const response = await this.fetch(url, { headers: this._auth(), cache: "no-store" });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new RequestError(response.status, body);
    return body;
  }

  _state(name, state) {
    if (state.state === "open" && !this._opened.has(name)) {
      this._opened.add(name);
      if (this._opened.size === (this.socket ? 1 : 0) + (this.stream ? 1 : 0)) {
        this._connectedSettle?.resolve();
      }
    }
    const was = this._states[name];
    this._states[name] = state.state;
    if (name === "sse" && state.state === "open" && was !== "open") this._scheduleStreamRenewal();
    this._emit("state", { transport: name, ...state });
  }

  /** Each event once, whichever transport brings it first. */
  _event(name, event) {
    const key = event.correlation_id;
    if (this._seen.has(key)) {
      this.duplicates += 1;
      return;
    }
    this._seen.set(key, true);
    if (this._seen.size > DEDUPE_WINDOW) this._seen.delete(this._seen.keys().next().value);
    this._emit("event", event, { transport: name });
  }

  _fatal(message) {
    this.close();
    this._connectedSettle?.reject(new Error(message));
    this._emit("fatal", message);
  }

  _flush() {
    for (const { frame } of this._pending.values()) this.socket?.send(frame);
  }

  _settle(id, how) {
    const pending = this._pending.get(id);
    if (pending === undefined) return;
    this._pending.delete(id);
    how(pending);
  }

  _refused(error) {
    if (!error.correlation_id || !this._pending.has(error.correlation_id)) {
      this._emit("notice", `The ingress refused a frame (${error.code}): ${error.message}`, "warning", "ws");
      return;
    }
    this._settle(error.correlation_id, (p) =>
      p.reject(new PublishError(error.code, error.message, { correlationId: error.correlation_id })),
    );
  }

  /** The server's warning: get a new credential and hand it to the open socket. */
  async _expiring(frame) {
    this._emit("expiring", frame);
    if (!this.getToken) return; // the socket closes with 4401 at `expires_at`
    try {
      await this._renew();
      this.socket?.refresh(this.token);
    } catch (error) {
      this._emit("notice", `Could not renew the credential: ${error?.message ?? error}`, "warning", "ws");
    }
  }

  /** Before each connect: a new credential when this one is gone or about to go. */
  async _freshToken() {
    const expiry = tokenExpiry(this.token);
    const stale = !this.token || (expiry !== null && expiry - Date.now() < this.refreshBeforeMs);
    if (stale && this.getToken) await this._renew();
  }

  /** One `getToken()` call at a time, shared by whoever needs it. */
  _renew() {
    this._renewing ??= Promise.resolve()
      .then(() => this.getToken())
      .then((token) => {
        if (typeof token !== "string" || token === "") throw new Error("getToken() gave no token");
        this.token = token;
      })
      .finally(() => {
        this._renewing = null;
      });
    return this._renewing;
  }

  /** The stream's credential cannot be changed in place: reconnect with a new one (resuming
   *  after the cursor, so nothing is lost) `refreshBeforeMs` before it expires, or halfway
   *  through a shorter life, so that a short-lived credential does not reconnect at once.
   *  `refreshBeforeMs` 0: none; the stream ends at expiry and comes back with a new one. */
  _scheduleStreamRenewal() {
    clearTimeout(this._sseTimer);
    const expiry = tokenExpiry(this.token);
    if (expiry === null || !this.getToken || this.refreshBeforeMs <= 0) return;
    const left = expiry - Date.now();
    const delay = Math.max(0, left - Math.min(this.refreshBeforeMs, left / 2));
    this._sseTimer = setTimeout(() => this.stream?.reconnect(), delay);
  }
}
