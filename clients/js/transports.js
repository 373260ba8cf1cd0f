// The two transports of one board: a WebSocket to the ingress and an event stream from the
// SSE gateway. Each keeps its own cursor (the last `sequence` it delivered), reconnects with
// exponential back-off and resumes after that cursor, so a reconnect never loses or repeats
// an event. They run in browsers and in Node: the WebSocket and EventSource constructors can
// be injected, and without an EventSource the stream is read with fetch() (event-source.js).
// The playground uses these classes directly; `RealtimeClient` (realtime.js) builds on them.

import { FetchEventSource } from "./event-source.js";
import { Backoff, BoardTransport, parseTime, socketUrl, streamUrl } from "./transport-base.js";

export { Backoff, parseTime, socketUrl, streamUrl };

const WS_OPEN = 1; // WebSocket.OPEN, also for an injected constructor without the constants
const ERROR_WITHOUT_CLOSE_MS = 1000;

/** Close codes that no retry can fix: the user has to change the token or the board. */

const WS_FATAL = {
  4401: "The token was refused",
  4403: "Access denied",
  4400: "The board id was refused",
};

const WS_CLOSE_REASONS = {
  1000: "closed",
  1001: "the server is shutting down",
  1006: "the connection was lost",
  1008: "closed for breaking the message rate limit",
  1009: "a frame was over the size limit",
  1011: "server error",
  1012: "the server is restarting",
  1013: "the server is busy (connection limit or too many attempts)",
  4401: "the credential expired",
  4408: "this window fell behind (slow consumer)",
};

/**
 * The WebSocket to the ingress: sends the board's messages, receives every event.
 * `handlers` also takes onAck(frame), onError(frame), onExpiring(frame), onRefreshed(frame),
 * onPresence(frame). `options.WebSocket`: the constructor (default: the global one).
 */
export class SocketTransport extends BoardTransport {
  constructor(urlFor, backoff, handlers, { WebSocket: WebSocketImpl } = {}) {
    super("WebSocket", backoff, handlers);
    this.urlFor = urlFor;
    this.socket = null;
    this.WebSocketImpl = WebSocketImpl ?? globalThis.WebSocket;
  }

  get isOpen() {
    return this.socket !== null && this.socket.readyState === WS_OPEN;
  }

  connect() {
    this.report("connecting", { attempt: this.backoff.attempt });
    const socket = new this.WebSocketImpl(this.urlFor(this.cursor));
    this.socket = socket;
    socket.addEventListener("open", () => {
      if (this.socket !== socket) return;
      this.opened();
      this.handlers.onOpen?.();
    });
    socket.addEventListener("message", (message) => {
      if (this.socket === socket) this.receive(message.data);
    });
    const onClose = (closed) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.stopped) return;
      // The credential the socket was opened with ran out ("token expired"): a session is
      // renewed before then, so reconnect with the current cookie; a credential that is
      // really gone is refused again at the handshake, with another reason, and stops there.
      const expired = closed.code === 4401 && closed.reason === "token expired";
      const fatal = expired ? undefined : WS_FATAL[closed.code];
      if (fatal) {
        const reason = closed.reason ? `: ${closed.reason}` : "";
        this.fatal(`${fatal} (WebSocket close ${closed.code}${reason})`);
        return;
      }
      const why = WS_CLOSE_REASONS[closed.code] ?? `closed with code ${closed.code}`;
      this.retry(why);
    };
    socket.addEventListener("close", onClose);
    socket.addEventListener("error", () => {
      // Browsers follow "error" with "close". Node 20's WebSocket (undici) reports a refused
      // connection with "error" alone and stays CONNECTING for ever: when no "close" came,
      // take it as the 1006 it should have been.
      setTimeout(() => {
        if (socket.readyState !== WS_OPEN) onClose({ code: 1006, reason: "" });
      }, ERROR_WITHOUT_CLOSE_MS);
    });
  }

  disconnect() {
    const socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState <= WS_OPEN) socket.close(1000, "client disconnect");
  }

  send(frame) {
    if (!this.isOpen) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  /** Replace the open socket's credential (contract 13); answered by a `refreshed` frame, or
   *  the socket is closed (4401, 4403). False when the socket is not open. */
  refresh(token) {
    return this.send({ kind: "refresh", token });
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this.handlers.onNotice("WebSocket: the server sent a frame that is not JSON.", "warning");
      return;
    }
    switch (frame.kind) {
      case "event":
        this.deliver(frame, { activeConnections: frame.active_connections });
        break;
      case "ack":
        this.handlers.onAck?.(frame);
        break;
      case "error":
        this.handlers.onError?.(frame);
        break;
      case "reset":
        this.resetReceived(frame);
        break;
      case "expiring":
        this.handlers.onExpiring?.(frame);
        break;
      case "refreshed":
        this.handlers.onRefreshed?.(frame);
        break;
      case "presence":
        this.handlers.onPresence?.(frame);
        break;
      default:
        break; // a newer server's frame kind: ignored, as the contract asks of readers
    }
  }
}

/**
 * The event stream from the SSE gateway: a read-only stream of the same board.
 * `handlers` also takes onPresence(presence) and onClose(reason).
 * Options: `withCredentials` sends the session cookie (also to a gateway on another port);
 * `EventSource`, the constructor (default: the global one, else `FetchEventSource`);
 * `headersFor()`, request headers for each attempt (only `FetchEventSource` can send them).
 */
export class StreamTransport extends BoardTransport {
  constructor(
    urlFor,
    backoff,
    handlers,
    { withCredentials = false, EventSource: EventSourceImpl, headersFor } = {},
  ) {
    super("SSE", backoff, handlers);
    this.urlFor = urlFor;
    this.withCredentials = withCredentials;
    this.EventSourceImpl = EventSourceImpl ?? globalThis.EventSource ?? FetchEventSource;
    this.headersFor = headersFor;
    this.source = null;
  }

  connect() {
    this.report("connecting", { attempt: this.backoff.attempt });
    const url = this.urlFor(this.cursor);
    const init = { withCredentials: this.withCredentials };
    if (this.headersFor) init.headers = this.headersFor();
    const source = new this.EventSourceImpl(url, init);
    this.source = source;
    let opened = false;
    source.addEventListener("open", () => {
      opened = true;
      this.opened();
    });
    source.addEventListener("activity", (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      this.deliver(event);
    });
    source.addEventListener("reset", (message) => {
      let reset = {};
      try {
        reset = JSON.parse(message.data);
      } catch {
        // keep the defaults: the warning is still worth showing
      }
      this.resetReceived(reset);
    });
    source.addEventListener("presence", (message) => {
      try {
        this.handlers.onPresence?.(JSON.parse(message.data));
      } catch {
        // not JSON: nothing to show
      }
    });
    source.addEventListener("close", (message) => {
      let reason = "slow_consumer";
      try {
        reason = JSON.parse(message.data).reason ?? reason;
      } catch {
        // an older gateway's close carries no reason: it was a slow consumer
      }
      this.handlers.onClose?.(reason);
      const why =
        reason === "token_expired"
          ? "the stream's credential expired"
          : "the gateway cut this stream (slow consumer)";
      this.handlers.onNotice(`SSE: ${why}; resuming.`, "info");
    });
    source.addEventListener("error", () => {
      if (this.source !== source) return;
      // EventSource would retry on its own, but with a fixed delay and without telling us
      // why: take over, so both transports follow the same back-off and report the cause.
      source.close();
      this.source = null;
      if (this.stopped) return;
      if (opened) {
        this.retry("the stream ended");
      } else if (source.status) {
        this.refused(source.status, url); // FetchEventSource knows the status already
      } else {
        this.diagnose(url);
      }
    });
  }

  disconnect() {
    const source = this.source;
    this.source = null;
    source?.close();
  }

  /** EventSource hides the HTTP status of a refused stream: ask once with fetch(). */
  async diagnose(url) {
    const abort = new AbortController();
    let status = 0;
    try {
      const response = await fetch(url, {
        cache: "no-store",
        signal: abort.signal,
        credentials: this.withCredentials ? "include" : "same-origin",
      });
      status = response.status;
    } catch {
      status = 0;
    } finally {
      abort.abort(); // a 200 would otherwise stay open as a second stream
    }
    this.refused(status, url);
  }

  /** What the status of a stream that did not open means: stop, or retry and say why. */
  refused(status, url) {
    if (this.stopped) return;
    const origin = new URL(url).origin;
    const page = globalThis.location?.origin ?? "this origin";
    switch (status) {
      case 401:
        this.fatal("The token was refused (SSE gateway answered 401)");
        return;
      case 403:
        this.fatal("Access denied: this token does not grant the board (SSE gateway answered 403)");
        return;
      case 422:
        this.fatal("The board id was refused (SSE gateway answered 422)");
        return;
      case 0:
        // A stream that worked before is most likely restarting; a first connection that
        // fails is most likely configuration, so say what to check.
        this.retry(
          this.everOpened
            ? `cannot reach ${origin}`
            : `cannot reach ${origin}: check that the gateway runs, that ` +
                `ADVANCED_SSE_PUBLIC_URL points at it and that its ADVANCED_ALLOWED_ORIGINS ` +
                `lists ${page}`,
        );
        return;
      case 429:
        this.retry("too many stream connections from this address (429)");
        return;
      case 503:
        this.retry("the gateway is not ready (503)");
        return;
      default:
        this.retry(`the gateway answered ${status}`);
    }
  }
}
