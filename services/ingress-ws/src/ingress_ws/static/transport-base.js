// What both transports of a board share (transports.js): the back-off, the cursor, ordering
// checks, state reports and the retry timer; and the URLs of the board on each edge.

/** Exponential back-off with jitter (ADVANCED_RECONNECT_INITIAL_MS .. _MAX_MS). */
export class Backoff {
  constructor(initialMs, maxMs) {
    this.initialMs = Math.max(1, initialMs);
    this.maxMs = Math.max(this.initialMs, maxMs);
    this.attempt = 0;
  }

  /** The delay before the next attempt. Half is fixed and half random, so that many
   *  clients cut off together (a restart) do not all come back in the same instant. */
  next() {
    const ceiling = Math.min(this.maxMs, this.initialMs * 2 ** this.attempt);
    this.attempt += 1;
    return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  reset() {
    this.attempt = 0;
  }
}

// A connection must stay up this long before the back-off starts again from the beginning:
// a server that accepts and then closes at once (1013, at capacity) must not be hammered.
const STABLE_AFTER_MS = 5000;

// A resume replays the missed events at once, before any live one. Events are called
// "resumed" only within this burst: the test compares the server's clock (published_at) with
// the browser's, so it must not run for the whole life of the connection.
const REPLAY_WINDOW_MS = 3000;

/**
 * The board's WebSocket URL on the ingress at `base` (http(s) or ws(s)). `token` null: no
 * `?token=` (the session cookie is the credential). `after`/`epoch`: the cursor to resume
 * after, the last event's `sequence` and the board's `epoch` it counts in.
 */
export function socketUrl(base, board, token, { after, epoch }) {
  const url = new URL(`ws/boards/${encodeURIComponent(board)}`, withSlash(base));
  url.protocol = url.protocol === "https:" || url.protocol === "wss:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  if (after > 0) {
    url.searchParams.set("after", String(after));
    if (epoch) url.searchParams.set("epoch", epoch);
  }
  return url.toString();
}

/** The board's stream URL on the gateway at `base`; its `Last-Event-ID` form is
 *  `<sequence>.<epoch>`, sent as `?last_event_id=` (an EventSource cannot set the header). */
export function streamUrl(base, board, token, { after, epoch }) {
  const url = new URL(`sse/boards/${encodeURIComponent(board)}`, withSlash(base));
  if (token) url.searchParams.set("token", token);
  if (after > 0) url.searchParams.set("last_event_id", epoch ? `${after}.${epoch}` : String(after));
  return url.toString();
}

/** `base` as a URL whose path ends in "/", so a path prefix (a proxy's) is kept. */
function withSlash(base) {
  const url = new URL(base);
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  return url;
}

/** Milliseconds since the epoch of an RFC 3339 time; tolerant of microseconds. */
export function parseTime(value) {
  if (typeof value !== "string") return Number.NaN;
  return Date.parse(value.replace(/(\.\d{3})\d+/, "$1"));
}

/**
 * What both transports share: state reporting, the cursor, ordering checks and the retry timer.
 * `handlers`: onState(state), onEvent(event, info), onNotice(text, tone), onFatal(message),
 * onOpen().
 */
export class BoardTransport {
  constructor(name, backoff, handlers) {
    this.name = name;
    this.backoff = backoff;
    this.handlers = handlers;
    this.lastSequence = 0;
    this.lastEpoch = null; // the board's epoch that `lastSequence` counts in
    this.received = 0;
    this.stopped = true;
    this.retryTimer = null;
    this.stableTimer = null;
    this.openedAt = 0;
    this.resumedFrom = null;
    this.replayed = 0;
    this.resumeNotice = null;
    this.replaying = false;
    this.resumeAttempts = 0;
    this.everOpened = false;
    this.expectGap = false;
  }

  start() {
    this.stopped = false;
    this.backoff.reset();
    this.open();
  }

  /** Connect, after `handlers.beforeConnect()` (which may fetch a fresh credential) settles. */
  open() {
    const prepare = this.handlers.beforeConnect;
    if (!prepare) {
      this.connect();
      return;
    }
    Promise.resolve()
      .then(() => prepare(this))
      .then(
        () => {
          if (!this.stopped) this.connect();
        },
        (error) => this.retry(`no credential to connect with (${error?.message ?? error})`),
      );
  }

  /** Close and connect again at once (no back-off), resuming after the cursor: for a new
   *  credential on a transport that cannot change it in place. */
  reconnect() {
    if (this.stopped) return;
    clearTimeout(this.retryTimer);
    this.disconnect();
    this.open();
  }

  stop(state = "idle", detail = "") {
    if (this.stopped && this.state === "refused") return; // keeps its own reason on screen
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.stableTimer);
    this.disconnect();
    this.report(state, { detail });
  }

  /** Where a reconnect resumes: `{after, epoch}`. */
  get cursor() {
    return { after: this.lastSequence, epoch: this.lastEpoch };
  }

  resumeFrom({ after, epoch }) {
    this.lastSequence = after;
    this.lastEpoch = epoch;
  }

  report(state, extra = {}) {
    this.state = state;
    this.handlers.onState({
      state,
      lastSequence: this.lastSequence,
      received: this.received,
      ...extra,
    });
  }

  opened() {
    this.openedAt = Date.now();
    this.resumedFrom = this.lastSequence > 0 ? this.lastSequence : null;
    this.replayed = 0;
    this.resumeNotice = null;
    this.replaying = this.resumedFrom !== null;
    this.everOpened = true;
    this.resumeAttempts = this.backoff.attempt;
    clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => this.backoff.reset(), STABLE_AFTER_MS);
    if (this.resumedFrom !== null) {
      this.resumeNotice = this.handlers.onNotice(
        `${this.reconnected()}: resuming after #${this.resumedFrom}.`,
        "info",
      );
    }
    this.report("open", { resumedFrom: this.resumedFrom });
  }

  reconnected() {
    const attempts = this.resumeAttempts;
    const after = attempts > 0 ? ` after ${attempts} attempt${attempts === 1 ? "" : "s"}` : "";
    return `${this.name} reconnected${after}`;
  }

  /** Schedules the next attempt; `why` is shown to the user while waiting. */
  retry(why) {
    clearTimeout(this.stableTimer);
    if (this.stopped) return;
    const delay = this.backoff.next();
    this.report("waiting", {
      reason: why,
      retryAt: Date.now() + delay,
      attempt: this.backoff.attempt,
    });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      if (!this.stopped) this.open();
    }, delay);
  }

  fatal(message) {
    this.stop("refused", message);
    this.handlers.onFatal(message);
  }

  deliver(event, extra = {}) {
    if (typeof event.sequence !== "number") return;
    if (event.epoch && this.lastEpoch && event.epoch !== this.lastEpoch) {
      this.historyLost(); // the board started again: its numbers start again too
    }
    if (event.sequence <= this.lastSequence) return; // seen already (a resume overlaps)
    if (this.lastSequence > 0 && event.sequence > this.lastSequence + 1 && !this.expectGap) {
      this.handlers.onNotice(
        `${this.name}: events #${this.lastSequence + 1}–#${event.sequence - 1} never arrived.`,
        "warning",
      );
    }
    this.expectGap = false;
    this.lastSequence = event.sequence;
    if (event.epoch) this.lastEpoch = event.epoch;
    this.received += 1;
    // Published before this connection opened: it can only have come from the resume.
    let replayed = false;
    if (this.replaying) {
      const published = parseTime(event.published_at);
      replayed = published < this.openedAt && Date.now() - this.openedAt < REPLAY_WINDOW_MS;
      this.replaying = replayed; // the first live event ends the replay
    }
    if (replayed) {
      this.replayed += 1;
      this.resumeNotice?.update?.(
        `${this.reconnected()}: resumed after #${this.resumedFrom}, ` +
          `${this.replayed} missed event${this.replayed === 1 ? "" : "s"} delivered.`,
      );
    }
    this.handlers.onEvent(event, { replayed, receivedAt: Date.now(), ...extra });
    this.report(this.state, { resumedFrom: this.resumedFrom });
  }

  /** A `reset`: `history_lost` (the board's history started again), else `cursor_expired`. */
  resetReceived(reset) {
    if (reset.reason === "history_lost") this.historyLost();
    else this.cursorExpired(reset.oldest_cursor);
  }

  /** The board's history is gone (expired while idle, or lost by Redis): it counts from 1
   *  again, so the old cursor is dropped rather than hiding the new events as seen. */
  historyLost() {
    const had = this.lastSequence;
    this.lastSequence = 0;
    this.lastEpoch = null;
    this.expectGap = true;
    if (had > 0) {
      this.handlers.onNotice(
        `${this.name}: the board's history started again; events count from #1 anew.`,
        "warning",
      );
    }
  }

  /** The server no longer retains the cursor: some events are gone for good. */
  cursorExpired(oldest) {
    this.expectGap = true;
    const first = oldest ? ` The oldest retained event is #${oldest}.` : "";
    this.handlers.onNotice(
      `${this.name}: events after #${this.lastSequence} are no longer retained and were missed.${first}`,
      "warning",
    );
  }
}
