// A minimal EventSource over fetch(), for runtimes without one (Node) and for callers that
// want the credential in an `Authorization` header rather than in the URL (a native
// EventSource cannot send headers). It keeps to the part of the EventSource interface the
// transports use: `addEventListener` for "open", "error" and named events, `close()`,
// `readyState`. It never reconnects on its own: the transport owns the retries and the cursor.

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 2;

/** A `MessageEvent`-like object: `data`, `lastEventId`, `type`. */
class StreamMessage {
  constructor(type, data, lastEventId) {
    this.type = type;
    this.data = data;
    this.lastEventId = lastEventId;
  }
}

export class FetchEventSource {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSED = CLOSED;

  /**
   * @param {string} url
   * @param {{headers?: Record<string, string>, withCredentials?: boolean, fetch?: typeof fetch}} [init]
   */
  constructor(url, init = {}) {
    this.url = url;
    this.readyState = CONNECTING;
    /** The HTTP status of the response, once known (a native EventSource hides it). */
    this.status = 0;
    this.withCredentials = Boolean(init.withCredentials);
    this._listeners = new Map();
    this._abort = new AbortController();
    const fetchImpl = init.fetch ?? globalThis.fetch;
    this._run(fetchImpl, init.headers ?? {});
  }

  addEventListener(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
  }

  removeEventListener(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  close() {
    this.readyState = CLOSED;
    this._abort.abort();
  }

  _emit(type, event) {
    for (const listener of this._listeners.get(type) ?? []) listener(event);
  }

  _fail() {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    this._abort.abort();
    this._emit("error", { type: "error", status: this.status });
  }

  async _run(fetchImpl, headers) {
    let response;
    try {
      response = await fetchImpl(this.url, {
        headers: { Accept: "text/event-stream", ...headers },
        cache: "no-store",
        credentials: this.withCredentials ? "include" : "same-origin",
        signal: this._abort.signal,
      });
    } catch {
      this._fail();
      return;
    }
    this.status = response.status;
    const type = response.headers.get("content-type") ?? "";
    if (!response.ok || !type.startsWith("text/event-stream") || !response.body) {
      response.body?.cancel().catch(() => {});
      this._fail();
      return;
    }
    if (this.readyState === CLOSED) return;
    this.readyState = OPEN;
    this._emit("open", { type: "open" });
    try {
      await this._read(response.body);
    } catch {
      // a cut connection or close(): reported below
    }
    this._fail(); // the stream ended: EventSource says so with "error"
  }

  /** The event-stream format (WHATWG HTML, 9.2.6): lines, fields, a blank line dispatches. */
  async _read(body) {
    const decoder = new TextDecoder();
    const reader = body.getReader();
    let buffer = "";
    let event = "message";
    let data = [];
    let id = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
        if (buffer[end] === "\r" && end === buffer.length - 1) break; // maybe "\r\n" split
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === "") {
          if (data.length > 0) this._emit(event, new StreamMessage(event, data.join("\n"), id));
          event = "message";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: the heartbeat
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value_ = colon < 0 ? "" : line.slice(colon + 1);
        if (value_.startsWith(" ")) value_ = value_.slice(1);
        if (field === "event") event = value_;
        else if (field === "data") data.push(value_);
        else if (field === "id" && !value_.includes("\0")) id = value_;
      }
    }
  }
}
