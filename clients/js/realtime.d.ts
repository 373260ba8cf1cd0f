// Type declarations for realtime.js (and the transports it re-exports).

/** An event of the board (contract section 4), as WebSocket `event` frames and SSE carry it. */
export interface ActivityEvent {
  schema_version: string;
  event_id: string;
  correlation_id: string;
  board_id: string;
  type: string;
  payload: Record<string, unknown>;
  sender: string;
  sequence: number;
  epoch?: string | null;
  occurred_at: string;
  published_at: string;
  /** WebSocket only: the board's WebSocket connections across every ingress replica. */
  active_connections?: number;
  [field: string]: unknown;
}

export interface AckFrame {
  kind: "ack";
  correlation_id: string;
  event_id: string;
}

export interface ErrorFrame {
  kind: "error";
  code: "invalid_message" | "payload_too_large" | "rate_limited" | "unavailable" | "forbidden";
  message: string;
  correlation_id: string | null;
}

/** Contract 13: the server's warning, at least ADVANCED_AUTH_REFRESH_WARNING_SECONDS ahead. */
export interface ExpiringFrame {
  kind: "expiring";
  expires_at: string;
}

/** Contract 13: the answer to a `refresh` frame. */
export interface RefreshedFrame {
  kind: "refreshed";
  expires_at: string | null;
}

/** Contract 12: a member joined (its first connection) or left (its last). */
export interface PresenceChange {
  kind?: "presence";
  board_id: string;
  action: "join" | "leave";
  member: { id: string; name: string | null };
  count: number;
}

/** Contract 12: `GET /api/boards/{board}/presence`. */
export interface PresenceSnapshot {
  board_id: string;
  count: number;
  members: { id: string; name: string | null; connections: number }[];
}

/** Contract 11: `GET /api/boards/{board}/events`. */
export interface HistoryPage {
  events: ActivityEvent[];
  next_after: number | null;
  reset?: { reason: "cursor_expired"; oldest_cursor: string | null };
}

/** Contract 10: the 202 of `POST /api/boards/{board}/events`. */
export interface PublishAccepted {
  correlation_id: string;
  event_id: string;
}

/** Where a transport resumes: the last delivered `sequence` and the board's `epoch`. */
export interface Cursor {
  after: number;
  epoch: string | null;
}

export type TransportName = "ws" | "sse";

export interface TransportState {
  state: "idle" | "connecting" | "open" | "waiting" | "refused";
  lastSequence: number;
  received: number;
  reason?: string;
  retryAt?: number;
  attempt?: number;
  resumedFrom?: number | null;
  detail?: string;
}

type Constructor<T> = new (...args: any[]) => T;

export interface RealtimeOptions {
  /** The ingress, e.g. `http://localhost:8004` (default in a browser: the page's origin). */
  url?: string;
  /** The SSE gateway, e.g. `http://localhost:8005`; needed for the `sse` transport. */
  sseUrl?: string | null;
  board: string;
  /** The credential: the shared token, a JWT or a session value. */
  token?: string | null;
  /** Called for a new credential: on the `expiring` warning, before a reconnect when the
   *  current one is gone or about to go, and before the SSE stream's renewal. */
  getToken?: (() => string | Promise<string>) | null;
  /** Default: `["ws", "sse"]` with `sseUrl`, else `["ws"]`. */
  transports?: TransportName[];
  /** A WebSocket constructor (default: the global one; Node 20.10+ needs --experimental-websocket). */
  WebSocket?: Constructor<WebSocket>;
  /** An EventSource constructor (default: the global one, else `FetchEventSource`). */
  EventSource?: Constructor<unknown>;
  fetch?: typeof fetch;
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  /** How long before a JWT's `exp` a new one is fetched (default 30 000). */
  refreshBeforeMs?: number;
  /** Cursors from an earlier client's `cursors`, to carry on after them. */
  resumeFrom?: { ws?: Cursor | null; sse?: Cursor | null };
}

export interface RealtimeEvents {
  event: (event: ActivityEvent, info: { transport: TransportName }) => void;
  presence: (change: PresenceChange, transport: TransportName) => void;
  state: (state: TransportState & { transport: TransportName }) => void;
  notice: (text: string, tone: "info" | "warning", transport: TransportName) => void;
  expiring: (frame: ExpiringFrame) => void;
  refreshed: (frame: RefreshedFrame) => void;
  fatal: (message: string) => void;
}

export class RealtimeClient {
  constructor(options: RealtimeOptions);
  readonly url: string;
  readonly sseUrl: string | null;
  readonly board: string;
  /** The credential in use (replaced by `getToken()`). */
  token: string | null;
  /** Events dropped because their `correlation_id` was seen already. */
  readonly duplicates: number;
  readonly socket: SocketTransport | null;
  readonly stream: StreamTransport | null;
  readonly cursors: { ws: Cursor | null; sse: Cursor | null };
  on<K extends keyof RealtimeEvents>(type: K, listener: RealtimeEvents[K]): () => void;
  connect(): Promise<void>;
  close(): void;
  publish(type: string, payload: Record<string, unknown>, options?: { id?: string }): Promise<AckFrame | PublishAccepted>;
  publishHttp(type: string, payload: Record<string, unknown>, options?: { id?: string }): Promise<PublishAccepted>;
  presence(): Promise<PresenceSnapshot>;
  history(options?: { after?: number; limit?: number }): Promise<HistoryPage>;
}

export class PublishError extends Error {
  readonly code: ErrorFrame["code"] | "closed";
  readonly correlationId: string | null;
  readonly status: number | null;
  readonly retryAfter: number | null;
}

export class RequestError extends Error {
  readonly status: number;
  readonly body: unknown;
}

/** A JWT's `exp` in milliseconds (unverified), or null. */
export function tokenExpiry(token: string | null | undefined): number | null;

/** Milliseconds since the epoch of an RFC 3339 time (NaN when it is not one). */
export function parseTime(value: unknown): number;

export function socketUrl(base: string, board: string, token: string | null, cursor: Cursor): string;
export function streamUrl(base: string, board: string, token: string | null, cursor: Cursor): string;

export class Backoff {
  constructor(initialMs: number, maxMs: number);
  attempt: number;
  next(): number;
  reset(): void;
}

export interface TransportHandlers {
  onState(state: TransportState): void;
  onEvent(event: ActivityEvent, info: { replayed: boolean; receivedAt: number; activeConnections?: number }): void;
  onNotice(text: string, tone: "info" | "warning"): { update(text: string): void } | void;
  onFatal(message: string): void;
  onOpen?(): void;
  beforeConnect?(transport: BoardTransport): unknown;
}

declare class BoardTransport {
  readonly name: string;
  readonly cursor: Cursor;
  lastSequence: number;
  received: number;
  everOpened: boolean;
  start(): void;
  stop(state?: string, detail?: string): void;
  reconnect(): void;
  resumeFrom(cursor: Cursor): void;
}

export class SocketTransport extends BoardTransport {
  constructor(
    urlFor: (cursor: Cursor) => string,
    backoff: Backoff,
    handlers: TransportHandlers & {
      onAck?(frame: AckFrame): void;
      onError?(frame: ErrorFrame): void;
      onExpiring?(frame: ExpiringFrame): void;
      onRefreshed?(frame: RefreshedFrame): void;
      onPresence?(frame: PresenceChange): void;
    },
    options?: { WebSocket?: Constructor<WebSocket> },
  );
  readonly isOpen: boolean;
  send(frame: object): boolean;
  refresh(token: string): boolean;
}

export class StreamTransport extends BoardTransport {
  constructor(
    urlFor: (cursor: Cursor) => string,
    backoff: Backoff,
    handlers: TransportHandlers & {
      onPresence?(change: PresenceChange): void;
      onClose?(reason: string): void;
    },
    options?: {
      withCredentials?: boolean;
      EventSource?: Constructor<unknown>;
      headersFor?: () => Record<string, string>;
    },
  );
}

/** EventSource over fetch(): for Node, and to send the credential as a header. */
export class FetchEventSource {
  static readonly CONNECTING: 0;
  static readonly OPEN: 1;
  static readonly CLOSED: 2;
  constructor(
    url: string,
    init?: { headers?: Record<string, string>; withCredentials?: boolean; fetch?: typeof fetch },
  );
  readonly url: string;
  readonly readyState: 0 | 1 | 2;
  /** The response's HTTP status once known (0 before, or when it could not connect). */
  readonly status: number;
  addEventListener(type: string, listener: (event: { type: string; data?: string; lastEventId?: string; status?: number }) => void): void;
  removeEventListener(type: string, listener: (event: unknown) => void): void;
  close(): void;
}
