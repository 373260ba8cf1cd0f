// The playground: connects one board over both transports and shows what each delivers.
// Served as static modules with no inline script, so it runs under the suite's CSP.

import { Backoff, SocketTransport, StreamTransport, socketUrl, streamUrl } from "./transports.js";
import { EventLog } from "./eventlog.js";

const BOARD_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const TOKEN_KEY = "playground.token"; // sessionStorage: this tab (and windows it opens) only
const BOARD_KEY = "playground.board";
const DEFAULTS = {
  sse_public_url: "",
  reconnect_initial_ms: 500,
  reconnect_max_ms: 15000,
  development_token: null,
};

const $ = (id) => document.getElementById(id);
const NO_CURSOR = { after: 0, epoch: null };

/** `/playground/config.json` from the ingress; the page still works if it cannot be read. */
async function loadConfig() {
  try {
    const response = await fetch("/playground/config.json", { cache: "no-store" });
    if (response.ok) return { ...DEFAULTS, ...(await response.json()) };
  } catch {
    // fall through to the defaults: the gateway is then looked for on this page's origin
  }
  return { ...DEFAULTS };
}

/** The gateway's base URL: ADVANCED_SSE_PUBLIC_URL, or this page's origin when it is empty
 *  (the one-process dev suite serves `/sse/` itself). A path prefix is kept. */
function gatewayBase(publicUrl) {
  const base = new URL(publicUrl || "/", location.href);
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  return base;
}

/** Trade the token for the ingress's HttpOnly session cookie (`POST /session`), so that it
 *  stays out of URLs, which proxies and ingress controllers log. Returns the session's expiry
 *  (seconds since the epoch), `null` where no session route answers (the page then falls
 *  back to `?token=`), or throws `SessionRefused` for a token the server refused. */
async function openSession(token) {
  let response;
  try {
    response = await fetch("/session", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    return null;
  }
  if (response.status === 401) throw new SessionRefused("The token was refused");
  if (!response.ok) return null;
  try {
    return Number((await response.json()).expires_at) || null;
  } catch {
    return null;
  }
}

class SessionRefused extends Error {}

/** The session cookie has no Domain, so the browser sends it only to this page's host (any
 *  port): a gateway elsewhere still needs the token in its URL (EventSource sends no headers). */
function cookieReaches(base) {
  return base.hostname === location.hostname;
}

function newCorrelationId() {
  if (crypto.randomUUID) return `pg-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `pg-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function readStorage(storage, key) {
  try {
    return storage.getItem(key);
  } catch {
    return null; // storage disabled (private mode, policies): the fields start empty
  }
}

function writeStorage(storage, key, value) {
  try {
    storage.setItem(key, value);
  } catch {
    // not remembering is harmless
  }
}

const STATE_LABELS = {
  idle: "not connected",
  connecting: "connecting…",
  open: "open",
  waiting: "reconnecting",
  refused: "refused",
};

/** One transport's status line in the sidebar, with a live reconnect countdown. */
class TransportStatus {
  constructor(item, stateLabel, detail, idleText) {
    this.item = item;
    this.stateLabel = stateLabel;
    this.detail = detail;
    this.idleText = idleText;
    this.timer = null;
  }

  /** Back to "not connected", dropping what an earlier attempt said (a refused token). */
  reset() {
    this.show({ state: "idle", lastSequence: 0, detail: "" });
  }

  show(status) {
    clearInterval(this.timer);
    this.item.dataset.state = status.state;
    this.item.dataset.lastSequence = String(status.lastSequence);
    this.stateLabel.textContent = STATE_LABELS[status.state] ?? status.state;
    if (status.state === "waiting") {
      const render = () => {
        const left = Math.max(0, status.retryAt - Date.now());
        this.stateLabel.textContent = `reconnecting in ${(left / 1000).toFixed(1)} s`;
      };
      render();
      this.timer = setInterval(render, 100);
      this.detail.textContent = `Attempt ${status.attempt}: ${status.reason}.${this.cursor(status)}`;
    } else if (status.state === "open") {
      const resumed = status.resumedFrom ? ` Resumed after #${status.resumedFrom}.` : "";
      this.detail.textContent = `${status.received} event${status.received === 1 ? "" : "s"} received.${this.cursor(status)}${resumed}`;
    } else if (status.state === "connecting") {
      this.detail.textContent = status.lastSequence
        ? `Will resume after #${status.lastSequence}.`
        : "Opening…";
    } else if (status.state === "refused") {
      this.detail.textContent = status.detail || "Refused by the server.";
    } else {
      this.detail.textContent = status.detail || this.idleText;
    }
  }

  cursor(status) {
    return status.lastSequence ? ` Last #${status.lastSequence}.` : "";
  }
}

class Playground {
  constructor(config) {
    this.config = config;
    this.gateway = gatewayBase(config.sse_public_url);
    this.log = new EventLog($("log"), $("log-scroll"), $("empty"));
    this.socket = null;
    this.stream = null;
    this.board = null;
    this.outbox = new Map(); // correlation id -> frame, until acked
    this.cursors = { ws: NO_CURSOR, sse: NO_CURSOR }; // where a reconnect to the same board resumes
    this.sessionTimer = null;
    this.wsStatus = new TransportStatus(
      $("ws-status"),
      $("ws-state"),
      $("ws-detail"),
      $("ws-detail").textContent,
    );
    this.sseStatus = new TransportStatus(
      $("sse-status"),
      $("sse-state"),
      $("sse-detail"),
      $("sse-detail").textContent,
    );
  }

  init() {
    const params = new URLSearchParams(location.search);
    const board = params.get("board") || readStorage(localStorage, BOARD_KEY);
    if (board) $("board").value = board;
    const token = readStorage(sessionStorage, TOKEN_KEY);
    if (token) $("token").value = token;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    $("ws-endpoint").textContent = `${scheme}://${location.host}/ws/boards/{board}`;
    $("sse-endpoint").textContent = `${this.gateway.href}sse/boards/{board}`;
    if (this.config.development_token) {
      $("token-hint").textContent =
        `Development default: ${this.config.development_token}. Kept in this tab only (session storage).`;
    }

    $("connect-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.connect();
    });
    $("leave").addEventListener("click", () => this.disconnect());
    $("send-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("clear").addEventListener("click", () => this.log.clear());
    $("second-window").addEventListener("click", () => this.openSecondWindow());
    this.updateSendState();
    if (params.get("connect") === "1" && $("token").value) this.connect();
  }

  async connect() {
    const token = $("token").value.trim();
    const board = $("board").value.trim();
    this.hideNotice();
    if (!this.socket) {
      // A new attempt: what the last one said (a refused token) no longer applies.
      this.wsStatus.reset();
      this.sseStatus.reset();
    }
    if (!token) {
      this.showNotice("Paste the realtime token (ADVANCED_REALTIME_TOKEN) into Token first.");
      $("token").focus();
      return;
    }
    if (!BOARD_ID.test(board)) {
      this.showNotice("A board id is 1 to 64 letters, digits, dots, dashes or underscores.");
      $("board").focus();
      return;
    }
    writeStorage(sessionStorage, TOKEN_KEY, token);
    writeStorage(localStorage, BOARD_KEY, board);
    this.stopTransports();
    let session;
    try {
      session = await this.startSession(token);
    } catch (error) {
      if (!(error instanceof SessionRefused)) throw error;
      const detail = `Stopped: ${error.message}.`;
      for (const status of [this.wsStatus, this.sseStatus]) {
        status.show({ state: "refused", lastSequence: 0, detail });
      }
      this.fail(error.message);
      return;
    }
    // With a session the cookie carries the credential and the URLs carry no token.
    const cookie = { ws: session, sse: session && cookieReaches(this.gateway) };
    const refused = (which, transport) => (message) => {
      // A browser that did not keep the cookie (storage blocked, an old browser refusing a
      // Secure cookie over http): the first attempt is refused, so use the token instead.
      const current = transport();
      if (current && cookie[which] && !current.everOpened && /\b4?401\b/.test(message)) {
        cookie[which] = false;
        this.log.notice(
          `${which.toUpperCase()}: the session cookie was not sent; using the token in the URL.`,
          "warning",
        );
        current.start();
        return;
      }
      this.fail(message);
    };
    if (board !== this.board) {
      this.log.clear();
      this.outbox.clear();
      this.setPresence(null);
      this.cursors = { ws: NO_CURSOR, sse: NO_CURSOR };
    }
    this.board = board;
    document.title = `${board} · Realtime playground`;

    const { reconnect_initial_ms: initial, reconnect_max_ms: max } = this.config;
    this.socket = new SocketTransport(
      // `token` null: the session cookie is the credential, and no token goes into the URL.
      (cursor) => socketUrl(location.origin, board, cookie.ws ? null : token, cursor),
      new Backoff(initial, max),
      this.handlers("ws", this.wsStatus, {
        onFatal: refused("ws", () => this.socket),
        onOpen: () => this.flushOutbox(),
        onAck: (ack) => {
          this.outbox.delete(ack.correlation_id);
          this.log.acked(ack.correlation_id);
        },
        onError: (error) => {
          if (error.correlation_id) {
            this.outbox.delete(error.correlation_id);
            this.log.failed(error.correlation_id, `${error.code}: ${error.message}`);
          } else {
            this.log.notice(`The ingress refused a frame (${error.code}): ${error.message}`, "warning");
          }
        },
      }),
    );
    this.stream = new StreamTransport(
      (cursor) => streamUrl(this.gateway.href, board, cookie.sse ? null : token, cursor),
      new Backoff(initial, max),
      this.handlers("sse", this.sseStatus, { onFatal: refused("sse", () => this.stream) }),
      { withCredentials: cookie.sse },
    );
    // Back on the same board (after Leave, or a refused token): resume where each one stopped.
    this.socket.resumeFrom(this.cursors.ws);
    this.stream.resumeFrom(this.cursors.sse);
    this.socket.start();
    this.stream.start();
    $("leave").hidden = false;
    this.updateSendState();
  }

  /** A session for the token, renewed a minute before it expires while the page stays
   *  connected (sockets opened with it keep working; reconnects need a live cookie). */
  async startSession(token) {
    clearTimeout(this.sessionTimer);
    const expiresAt = await openSession(token);
    if (expiresAt === null) return false;
    const renewIn = Math.max(expiresAt * 1000 - Date.now() - 60_000, 10_000);
    this.sessionTimer = setTimeout(() => {
      if (this.socket || this.stream) this.startSession(token).catch(() => {});
    }, renewIn);
    return true;
  }

  handlers(transport, status, extra) {
    return {
      onState: (state) => {
        status.show(state);
        this.updateSendState();
      },
      onEvent: (event, info) => {
        this.log.received(transport, event, info);
        if (info.activeConnections !== undefined) this.setPresence(info.activeConnections);
      },
      onNotice: (text, tone) => this.log.notice(text, tone),
      onFatal: (message) => this.fail(message),
      ...extra,
    };
  }

  /** A refusal no retry can fix: stop both transports and say what to change. */
  fail(message) {
    // The transport that was refused already shows why; the other one stops with it.
    this.stopTransports("refused", `Stopped: ${message}.`);
    const hint = /token/i.test(message)
      ? " Paste the value of ADVANCED_REALTIME_TOKEN into Token, then press Connect."
      : /board id/i.test(message)
        ? " Fix the board id, then press Connect."
        : " Check the token's boards and the page's origin, then press Connect.";
    this.showNotice(`${message}.${hint}`);
  }

  disconnect() {
    this.stopTransports();
    this.log.notice("Left the board: both connections closed.", "info");
  }

  stopTransports(state = "idle", detail = "") {
    if (this.socket) this.cursors.ws = this.socket.cursor;
    if (this.stream) this.cursors.sse = this.stream.cursor;
    this.socket?.stop(state, detail);
    this.stream?.stop(state, detail);
    this.socket = null;
    this.stream = null;
    $("leave").hidden = true;
    this.updateSendState();
  }

  send() {
    const input = $("message");
    const text = input.value.trim();
    if (!text) {
      input.focus();
      return;
    }
    if (!this.socket) {
      this.showNotice("Connect to a board before sending.");
      return;
    }
    const id = newCorrelationId();
    const frame = { type: "note.created", payload: { text }, id };
    this.outbox.set(id, frame);
    const sent = this.socket.send(frame);
    this.log.sending(id, text, !sent);
    input.value = "";
    input.focus();
  }

  /** Messages not yet acked are sent again after a reconnect, with the same id: the suite
   *  delivers an id once, so a message whose first attempt did get through is not doubled. */
  flushOutbox() {
    for (const [id, frame] of this.outbox) {
      if (this.socket?.send(frame)) this.log.sending(id, frame.payload.text, false);
    }
  }

  updateSendState() {
    const connected = this.socket !== null;
    $("send").disabled = !connected;
    $("message").placeholder = connected
      ? this.socket.isOpen
        ? "Say something to the board"
        : "Queued until the WebSocket reconnects"
      : "Connect first";
  }

  setPresence(count) {
    $("active-connections").textContent = count === null ? "–" : String(count);
    $("active-connections-label").textContent =
      count === null
        ? "WebSocket connections on this board (shown with each event)"
        : `WebSocket connection${count === 1 ? "" : "s"} on ${this.board}, as of the last event`;
  }

  showNotice(text) {
    const notice = $("notice");
    notice.textContent = text;
    notice.hidden = false;
  }

  hideNotice() {
    $("notice").hidden = true;
    $("notice").textContent = "";
  }

  openSecondWindow() {
    const board = $("board").value.trim() || "demo";
    const url = new URL(location.pathname, location.href);
    url.searchParams.set("board", board);
    if ($("token").value.trim()) {
      writeStorage(sessionStorage, TOKEN_KEY, $("token").value.trim());
      url.searchParams.set("connect", "1");
    }
    // The new window inherits this tab's session storage (the token), never the URL.
    window.open(url.toString(), "_blank", "width=720,height=900");
  }
}

const playground = new Playground(await loadConfig());
playground.init();
// For people poking at it from the browser console.
window.playground = playground;
