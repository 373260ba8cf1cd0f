// The event list: one row per event, keyed by correlation id, with what each transport saw.
// A message sent from this window gets its row at once (queued, sent, acked), and the row
// fills in as the event comes back over the WebSocket and the SSE stream.

import { parseTime } from "./transports.js";

const MAX_ROWS = 500; // older rows are dropped so that a long session stays light
const TRANSPORTS = [
  ["ws", "WS"],
  ["sse", "SSE"],
];

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatLatency(ms) {
  if (!Number.isFinite(ms)) return "";
  if (ms < 1) return "<1 ms";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

function clockTime(epochMs) {
  const date = Number.isFinite(epochMs) ? new Date(epochMs) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** What the row says about the event's content: the text of a note, else compact JSON. */
function summary(payload) {
  if (payload && typeof payload.text === "string") return payload.text;
  const json = JSON.stringify(payload ?? {});
  return json.length > 200 ? `${json.slice(0, 199)}…` : json;
}

export class EventLog {
  constructor(list, scroller, empty) {
    this.list = list;
    this.scroller = scroller;
    this.empty = empty;
    this.rows = new Map(); // correlation id -> row
  }

  clear() {
    this.rows.clear();
    this.list.replaceChildren();
    this.refreshEmpty();
  }

  /** A message this window is sending: its row exists before the server has seen it. */
  sending(correlationId, text, queued) {
    const row = this.row(correlationId);
    row.node.dataset.mine = "true";
    row.text.textContent = text;
    row.type.textContent = "note.created";
    row.who.textContent = "you";
    this.setStatus(row, queued ? "queued" : "sent", queued ? "queued until reconnected" : "sent");
    this.place(row);
  }

  acked(correlationId) {
    const row = this.rows.get(correlationId);
    if (row && row.node.dataset.status !== "failed") this.setStatus(row, "acked", "acked");
  }

  failed(correlationId, message) {
    const row = this.rows.get(correlationId);
    if (row) this.setStatus(row, "failed", message);
  }

  /** The event arrived over `transport` ("ws" or "sse"). */
  received(transport, event, info) {
    const row = this.row(event.correlation_id);
    const node = row.node;
    if (node.dataset.sequence === undefined) {
      node.dataset.sequence = String(event.sequence);
      node.dataset.eventId = event.event_id;
      row.seq.textContent = `#${event.sequence}`;
      row.text.textContent = summary(event.payload);
      row.type.textContent = event.type;
      const occurred = parseTime(event.occurred_at);
      row.time.dateTime = event.occurred_at;
      row.time.textContent = clockTime(occurred);
      if (node.dataset.mine !== "true") row.who.textContent = `from ${event.sender.slice(0, 6)}`;
      this.place(row);
    }
    const latency = info.receivedAt - parseTime(event.occurred_at);
    const chip = row.chips[transport];
    const label = transport === "ws" ? "WS" : "SSE";
    chip.dataset.state = info.replayed ? "replayed" : "received";
    chip.textContent = info.replayed
      ? `${label} ${formatLatency(latency)} · resumed`
      : `${label} ${formatLatency(latency)}`;
    chip.title = info.replayed
      ? `Missed while ${label} was disconnected; delivered on resume.`
      : `${formatLatency(latency)} from the ingress receiving the event to this window.`;
    node.dataset[transport] = chip.dataset.state;
    node.dataset[`${transport}LatencyMs`] = String(Math.round(latency));
  }

  /** A line about the connections themselves; returns a handle to reword it later. */
  notice(text, tone = "info") {
    const node = element("li", "log-notice");
    node.dataset.tone = tone;
    const body = element("span", "notice-text", text);
    const time = element("time", "time", clockTime(Date.now()));
    node.append(body, time);
    this.list.append(node);
    this.trim();
    this.refreshEmpty();
    this.follow();
    return {
      update: (next) => {
        body.textContent = next;
      },
    };
  }

  row(correlationId) {
    const existing = this.rows.get(correlationId);
    if (existing) return existing;
    const node = element("li", "event");
    node.dataset.correlationId = correlationId;
    const head = element("div", "event-head");
    const seq = element("span", "seq", "…");
    const text = element("span", "event-text");
    const who = element("span", "who");
    head.append(seq, text, who);
    const meta = element("div", "event-meta");
    const type = element("span", "type");
    const chips = {};
    for (const [key, label] of TRANSPORTS) {
      const chip = element("span", "chip", `${label} …`);
      chip.dataset.transport = key;
      chip.dataset.state = "waiting";
      chip.title = `Not received over ${label} yet.`;
      node.dataset[key] = "waiting";
      chips[key] = chip;
    }
    const status = element("span", "status");
    const time = element("time", "time");
    meta.append(type, chips.ws, chips.sse, status, time);
    node.append(head, meta);
    const row = { node, seq, text, who, type, chips, status, time };
    this.rows.set(correlationId, row);
    return row;
  }

  setStatus(row, status, label) {
    row.node.dataset.status = status;
    row.status.dataset.status = status;
    row.status.textContent = label;
  }

  /** Rows stay in sequence order; rows still waiting for their sequence go last. */
  place(row) {
    const sequence = Number(row.node.dataset.sequence ?? Number.POSITIVE_INFINITY);
    let before = null;
    if (Number.isFinite(sequence)) {
      for (const candidate of this.list.children) {
        if (candidate === row.node || !candidate.classList.contains("event")) continue;
        const other = Number(candidate.dataset.sequence ?? Number.POSITIVE_INFINITY);
        if (other > sequence) {
          before = candidate;
          break;
        }
      }
    }
    if (before) {
      this.list.insertBefore(row.node, before);
    } else if (row.node.parentNode !== this.list || Number.isFinite(sequence)) {
      this.list.append(row.node);
    }
    this.trim();
    this.refreshEmpty();
    this.follow();
  }

  trim() {
    while (this.list.children.length > MAX_ROWS) {
      const oldest = this.list.firstElementChild;
      if (oldest.dataset.correlationId) this.rows.delete(oldest.dataset.correlationId);
      oldest.remove();
    }
  }

  refreshEmpty() {
    this.empty.hidden = this.list.children.length > 0;
  }

  /** Keep the newest row in view, unless the reader has scrolled up to look at older ones. */
  follow() {
    const scroller = this.scroller;
    const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
    if (nearBottom || this.list.children.length < 3) scroller.scrollTop = scroller.scrollHeight;
  }
}
