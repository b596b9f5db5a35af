import { codecFor, jwtClaims, SUBPROTOCOL, type Codec, type Encoding } from "./codec.js";
import { ChorusError, type ErrorBody } from "./errors.js";
import { Emitter } from "./emitter.js";
import { Messages, Notifications, PresenceApi, Rooms, Topics } from "./api.js";
import type {
  ArgsOf,
  Entry,
  NotificationsPush,
  NotificationsRead,
  Op,
  Presence,
  PresenceSetArgs,
  PresenceWatchArgs,
  PushFrame,
  ReceiptPush,
  ResultOf,
  Subscribed,
  TypingPush,
} from "./types.js";

// ---------------------------------------------------------------- options

/** The part of the WebSocket API the client uses (the browser's, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: any;
  send(data: any): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ReconnectOptions {
  /** Base of the exponential backoff (ms). Default 500. */
  initialDelayMs: number;
  /** Largest delay between two attempts (ms). Default 30000. */
  maxDelayMs: number;
  /** Growth per failed attempt. Default 2. */
  factor: number;
  /** Least delay after close code 4003 (rate limit exceeded repeatedly) (ms). Default 30000. */
  rateLimitedDelayMs: number;
  /** Consecutive failed attempts before giving up (state `closed`). Default Infinity. */
  maxAttempts: number;
}

export interface QueueOptions {
  /** Most requests waiting for a connection. Default 100. */
  max: number;
  /** How long a request made while disconnected may wait for its reply, in total (ms). Default 30000. */
  timeoutMs: number;
}

export interface ChorusClientOptions {
  /** `ws://host:7600/ws`, or several nodes: the client moves to the next on close code 1001 or a failed handshake. */
  url: string | string[];
  /** A token (JWT). Give `getToken` instead to have tokens refreshed. */
  token?: string;
  /** Returns a fresh token: called on connect when the last one is (nearly) expired or was refused, and before `exp` (then sent with `auth.refresh`). */
  getToken?: () => string | Promise<string>;
  /** Wire encoding. Default `json`. */
  encoding?: Encoding;
  /** WebSocket constructor: `globalThis.WebSocket` by default; in Node pass `WebSocket` from the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** Backoff settings, or `false` to never reconnect. */
  reconnect?: Partial<ReconnectOptions> | false;
  /** Offline queue settings, or `false` to reject requests made while disconnected. */
  queue?: Partial<QueueOptions> | false;
  /** A request sent on an open connection fails with `timeout` after this long (ms). Default 10000. */
  requestTimeoutMs?: number;
  /** Refresh the token this long before `exp` (at most a quarter of its remaining life) (ms). Default 60000. */
  refreshBeforeExpiryMs?: number;
  /** `room.typing` is repeated this often while the user keeps typing (ms). Default 3000. */
  typingIntervalMs?: number;
  /** After `recovered: false` with `too_far_behind`, page the gap with `history` instead of reporting it. Default true. */
  autoCatchUp?: boolean;
  /** In browsers: reconnect at once when the `online` event fires. Default true. */
  reconnectOnOnline?: boolean;
}

export type ConnectionState = "connecting" | "connected" | "disconnected" | "closed";

export interface DisconnectInfo {
  /** WebSocket close code (1006 when the connection failed or the handshake was refused). */
  code: number;
  reason: string;
  willReconnect: boolean;
  /** Delay before the next attempt (ms). */
  delayMs: number;
  /** HTTP status of a refused handshake, when the WebSocket implementation reports it (the `ws` package does, browsers do not). */
  httpStatus?: number;
}

export interface UnrecoveredInfo {
  channel: string;
  /** `epoch_changed`, `offset_ahead`, `too_far_behind`, `history_trimmed` (the first word of the server's reason). */
  reason: string;
  /** The server's explanation (`reason: detail`), for logs. */
  message: string;
  /** The channel's epoch and head now: live entries continue after `offset`. */
  epoch: string;
  offset: number;
  /** What the subscription had before. */
  previousEpoch?: string;
  previousOffset?: number;
}

export interface ClientEvents {
  state: (state: ConnectionState, previous: ConnectionState) => void;
  connected: (info: { url: string; reconnected: boolean }) => void;
  disconnected: (info: DisconnectInfo) => void;
  closed: (error?: ChorusError) => void;
  /** Anything that went wrong outside a request's promise (a failed refresh, a failed resubscribe, an id-0 error reply). */
  error: (error: ChorusError) => void;
  /** Every entry any subscription delivers, after ordering and deduplication. */
  entry: (channel: string, entry: Entry) => void;
  typing: (data: TypingPush) => void;
  receipt: (data: ReceiptPush) => void;
  presence: (data: Presence) => void;
  notifications: (data: NotificationsPush) => void;
  "notifications.read": (data: NotificationsRead) => void;
  /** Every push as received (raw, before any processing). */
  push: (frame: PushFrame) => void;
  /** The token was replaced (`auth.refresh` succeeded). */
  token: (info: { expiresAt: number }) => void;
}

export interface RequestOptions {
  /** Overrides the default timeout (`requestTimeoutMs` when connected, `queue.timeoutMs` when not). */
  timeoutMs?: number;
}

// ---------------------------------------------------------------- internals

interface Req {
  id: number;
  /** Creation order: the queue is kept in it, so a client's sends keep their order across reconnects. */
  order: number;
  op: string;
  args: unknown;
  /** Safe to send again after the connection dropped with it in flight. */
  resend: boolean;
  /** Sent by the client itself (resubscribe, refresh): never queued, fails on disconnect. */
  internal: boolean;
  createdAt: number;
  timeoutMs: number;
  timer?: ReturnType<typeof setTimeout>;
  clientId?: string;
  done: boolean;
  onOk: (v: any) => void;
  onErr: (e: ChorusError) => void;
}

interface Reply {
  id: number;
  ok?: unknown;
  error?: ErrorBody;
}

/** Ops that may be sent twice with the same effect (sends carry a `client_id`). */
const RESENDABLE = new Set<string>([
  "ping",
  "room.direct",
  "room.members",
  "rooms.list",
  "room.send",
  "history",
  "room.typing",
  "room.read",
  "topic.publish",
  "notifications.list",
  "notifications.unread",
  "notifications.read",
  "notifications.prefs.get",
  "notifications.prefs.set",
  "presence.set",
  "presence.query",
  "presence.watch",
  "presence.unwatch",
]);

const MAX_TIMER = 2 ** 31 - 1;
const STABLE_AFTER_MS = 5000;

function randomId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
}

/** A fresh `client_id` for an idempotent send. */
export function newClientId(): string {
  return `c-${randomId()}`;
}

// ---------------------------------------------------------------- subscription

export interface SubscriptionEvents {
  /** An entry, in offset order, exactly once (missed ones first after a reconnect). */
  entry: (entry: Entry, sub: Subscription) => void;
  /** The server could not resume (`recovered: false`): reload with `history`. */
  unrecovered: (info: UnrecoveredInfo) => void;
  /** Each (re)subscription's reply. */
  subscribed: (result: Subscribed) => void;
  /** A resubscribe failed (for example `not_member` after a kick); non-retryable errors end the subscription. */
  error: (error: ChorusError) => void;
  /** The subscription is over (unsubscribed, left or removed from the room, or refused). */
  ended: (error?: ChorusError) => void;
}

export interface SubscribeOptions {
  /** The last offset the app already has (with `epoch`): entries after it come first. */
  offset?: number;
  epoch?: string;
  onEntry?: SubscriptionEvents["entry"];
  onUnrecovered?: SubscriptionEvents["unrecovered"];
  onError?: SubscriptionEvents["error"];
  timeoutMs?: number;
}

/**
 * A live subscription to a channel (`room:<id>`, `topic:<name>`, `feed:<user>`).
 * It survives reconnects: it resubscribes with the last (offset, epoch) it
 * delivered, delivers the missed entries before live ones, and never one twice.
 */
export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  /** The channel's epoch as last seen. */
  epoch: string | undefined;
  /** The last offset delivered (or the head when the subscription began). */
  offset: number | undefined;
  state: "pending" | "active" | "ended" = "pending";

  /** @internal */ _via: "subscribe" | "join";
  /** @internal */ _established = false;
  /** @internal */ _inflight = false;
  /** @internal */ _catchingUp = false;
  /** @internal */ _gen = 0;
  /** @internal */ _buffer: Entry[] = [];
  /** @internal */ _ready: Promise<Subscription>;
  /** @internal */ _resolve!: (s: Subscription) => void;
  /** @internal */ _reject!: (e: ChorusError) => void;
  /** @internal */ _retryTimer: ReturnType<typeof setTimeout> | undefined;
  private client: ChorusClient;

  /** @internal */
  constructor(client: ChorusClient, channel: string, via: "subscribe" | "join", opts: SubscribeOptions) {
    super();
    this.client = client;
    this.channel = channel;
    this._via = via;
    this.offset = opts.offset;
    this.epoch = opts.epoch;
    if (opts.onEntry) this.on("entry", opts.onEntry);
    if (opts.onUnrecovered) this.on("unrecovered", opts.onUnrecovered);
    if (opts.onError) this.on("error", opts.onError);
    this._ready = new Promise((res, rej) => {
      this._resolve = res;
      this._reject = rej;
    });
    this._ready.catch(() => {});
  }

  /** Resolves once the first subscribe reply arrived. */
  ready(): Promise<Subscription> {
    return this._ready;
  }

  /** Stops the subscription (and tells the server, when connected). */
  async unsubscribe(): Promise<void> {
    if (this.state === "ended") return;
    const wasEstablished = this._established;
    this.client._dropSubscription(this);
    this._end(undefined);
    if (wasEstablished && this.client.state === "connected") {
      try {
        await this.client.request("unsubscribe", { channel: this.channel });
      } catch (e) {
        if (!(e instanceof ChorusError && e.name === "not_subscribed")) throw e;
      }
    }
  }

  /** @internal */
  _end(error: ChorusError | undefined): void {
    if (this.state === "ended") return;
    this.state = "ended";
    this._gen++;
    this._buffer = [];
    if (this._retryTimer) clearTimeout(this._retryTimer);
    if (!this._established) this._reject(error ?? ChorusError.client("closed", `subscription to ${this.channel} ended`));
    this.emit("ended", error);
  }

  /** @internal a live `entry` push */
  _onPush(entry: Entry): void {
    if (this.state === "ended") return;
    if (this._inflight || this._catchingUp || !this._established) {
      this._buffer.push(entry);
      return;
    }
    this._live(entry);
  }

  private _live(entry: Entry): void {
    const last = this.offset ?? 0;
    if (entry.offset <= last) return; // already delivered
    if (this.offset !== undefined && entry.offset > last + 1) {
      // A gap: fetch what is missing before this one.
      this._buffer.push(entry);
      void this._catchUp(entry.offset - 1);
      return;
    }
    this._deliver(entry);
  }

  private _deliver(entry: Entry): void {
    this.offset = entry.offset;
    this.emit("entry", entry, this);
    this.client._delivered(this, entry);
  }

  private _flush(): void {
    const buf = this._buffer.sort((a, b) => a.offset - b.offset);
    this._buffer = [];
    for (let i = 0; i < buf.length; i++) {
      if (this.state === "ended") return;
      if (this._catchingUp) {
        // a gap started a catch-up: keep the rest for after it
        this._buffer.push(...buf.slice(i));
        return;
      }
      this._live(buf[i]!);
    }
  }

  /** @internal sending the (re)subscribe request */
  _subscribing(): number {
    this._inflight = true;
    this._catchingUp = false;
    return ++this._gen;
  }

  /** @internal the subscribe (or room.join) reply */
  _onSubscribed(gen: number, res: Subscribed, autoCatchUp: boolean): void {
    if (gen !== this._gen || this.state === "ended") return;
    this._inflight = false;
    const prevEpoch = this.epoch;
    const prevOffset = this.offset;
    const first = !this._established;
    this._established = true;
    this.state = "active";
    this.epoch = res.epoch;
    let catchUpTo: number | undefined;
    let unrecovered: UnrecoveredInfo | undefined;
    if (res.recovered) {
      if (this.offset === undefined) {
        this.offset = res.offset;
      } else {
        const missed = [...(res.missed ?? [])].sort((a, b) => a.offset - b.offset);
        for (const e of missed) {
          if (this.state !== "active") return;
          if (e.offset > (this.offset ?? 0)) this._deliver(e);
        }
        if ((this.offset ?? 0) < res.offset) catchUpTo = res.offset;
      }
    } else {
      // `reason` is the token; nodes before `detail` existed sent "token: explanation".
      const reason = (res.reason ?? "unknown").split(":")[0]!.trim();
      const message = res.detail ? `${reason}: ${res.detail}` : (res.reason ?? "not recovered");
      const sameEpoch = prevEpoch === undefined || prevEpoch === res.epoch;
      if (reason === "too_far_behind" && autoCatchUp && sameEpoch && prevOffset !== undefined) {
        catchUpTo = res.offset;
      } else {
        this.offset = res.offset;
        unrecovered = {
          channel: this.channel,
          reason,
          message,
          epoch: res.epoch,
          offset: res.offset,
          ...(prevEpoch !== undefined ? { previousEpoch: prevEpoch } : {}),
          ...(prevOffset !== undefined ? { previousOffset: prevOffset } : {}),
        };
      }
    }
    this.emit("subscribed", res);
    if (first) this._resolve(this);
    if (unrecovered) this.emit("unrecovered", unrecovered);
    if (catchUpTo !== undefined) void this._catchUp(catchUpTo);
    else this._flush();
  }

  /** @internal the subscribe request failed */
  _onSubscribeError(gen: number, err: ChorusError): void {
    if (gen !== this._gen || this.state === "ended") return;
    this._inflight = false;
    if (!this._established) {
      this.client._dropSubscription(this);
      this._end(err);
      return;
    }
    this.emit("error", err);
    if (err.retryable) {
      this._retryTimer = setTimeout(() => this.client._resubscribe(this), 1000);
    } else {
      this.client._dropSubscription(this);
      this._end(err);
    }
  }

  /** @internal the connection dropped */
  _onDisconnect(): void {
    this._gen++;
    this._inflight = false;
    this._catchingUp = false;
    this._buffer = [];
  }

  /** Pages forward with `history {after}` until `target`, buffering live entries meanwhile. */
  private async _catchUp(target: number): Promise<void> {
    if (this._catchingUp) return;
    this._catchingUp = true;
    const gen = this._gen;
    try {
      while ((this.offset ?? 0) < target) {
        const page = await this.client._internal("history", { channel: this.channel, after: this.offset ?? 0, limit: 999 });
        if (gen !== this._gen || this.state !== "active") return;
        if (page.head.epoch !== this.epoch) {
          const info: UnrecoveredInfo = {
            channel: this.channel,
            reason: "epoch_changed",
            message: "epoch_changed: the channel's history was reset during catch-up",
            epoch: page.head.epoch,
            offset: page.head.offset,
            ...(this.epoch !== undefined ? { previousEpoch: this.epoch } : {}),
            ...(this.offset !== undefined ? { previousOffset: this.offset } : {}),
          };
          this.epoch = page.head.epoch;
          this.offset = page.head.offset;
          this.emit("unrecovered", info);
          break;
        }
        let progressed = false;
        for (const e of page.entries) {
          if (e.offset > (this.offset ?? 0) && e.offset <= target) {
            this._deliver(e);
            progressed = true;
          }
        }
        if (!progressed) {
          // The history has a hole (trimmed): say so and go on from the target.
          const info: UnrecoveredInfo = {
            channel: this.channel,
            reason: "history_trimmed",
            message: "history_trimmed: entries are missing from the history",
            epoch: this.epoch ?? page.head.epoch,
            offset: target,
            ...(this.epoch !== undefined ? { previousEpoch: this.epoch } : {}),
            ...(this.offset !== undefined ? { previousOffset: this.offset } : {}),
          };
          this.offset = target;
          this.emit("unrecovered", info);
          break;
        }
      }
    } catch (e) {
      if (gen !== this._gen) return; // the connection dropped: the resubscribe takes over
      this.emit("error", e instanceof ChorusError ? e : ChorusError.client("protocol_error", String(e)));
      this._catchingUp = false;
      return;
    }
    if (gen !== this._gen) return;
    this._catchingUp = false;
    this._flush();
  }
}

// ---------------------------------------------------------------- client

/**
 * A Chorus connection: one WebSocket, requests matched to replies, pushes as
 * events, subscriptions and presence watches that survive reconnects, and an
 * offline queue.
 */
export class ChorusClient extends Emitter<ClientEvents> {
  readonly rooms: Rooms;
  readonly messages: Messages;
  readonly topics: Topics;
  readonly notifications: Notifications;
  readonly presence: PresenceApi;

  state: ConnectionState = "disconnected";
  /** The user id (the token's `sub`). */
  user: string | undefined;

  private urls: string[];
  private urlIndex = 0;
  private codec: Codec;
  private WS: WebSocketConstructor;
  private reconnectOpts: ReconnectOptions | false;
  private queueOpts: QueueOptions | false;
  private requestTimeoutMs: number;
  private refreshBeforeExpiryMs: number;
  /** @internal */ readonly typingIntervalMs: number;
  private autoCatchUp: boolean;
  private reconnectOnOnline: boolean;
  private getToken: (() => string | Promise<string>) | undefined;
  private token: string | undefined;
  private needFreshToken = false;

  private ws: WebSocketLike | undefined;
  private socketGen = 0;
  private seq = 0;
  private orderSeq = 0;
  private pending = new Map<number, Req>();
  private queue: Req[] = [];
  private subs = new Map<string, Subscription>();
  private watches: PresenceWatchArgs[] = [];
  private presenceState: PresenceSetArgs | undefined;
  private attempt = 0;
  private everConnected = false;
  private openedAt = 0;
  private started = false;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private lastError: string | undefined;
  private connectWaiters: { resolve: () => void; reject: (e: ChorusError) => void }[] = [];
  private onlineHandler: (() => void) | undefined;

  constructor(opts: ChorusClientOptions) {
    super();
    this.urls = Array.isArray(opts.url) ? [...opts.url] : [opts.url];
    if (this.urls.length === 0) throw new TypeError("ChorusClient: `url` is empty");
    if (!opts.token && !opts.getToken) throw new TypeError("ChorusClient: give `token` or `getToken`");
    this.token = opts.token;
    this.getToken = opts.getToken;
    this.codec = codecFor(opts.encoding ?? "json");
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError("ChorusClient: no global WebSocket; pass `WebSocket` (e.g. from the `ws` package)");
    this.WS = WS;
    this.reconnectOpts =
      opts.reconnect === false
        ? false
        : { initialDelayMs: 500, maxDelayMs: 30000, factor: 2, rateLimitedDelayMs: 30000, maxAttempts: Infinity, ...opts.reconnect };
    this.queueOpts = opts.queue === false ? false : { max: 100, timeoutMs: 30000, ...opts.queue };
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 10000;
    this.refreshBeforeExpiryMs = opts.refreshBeforeExpiryMs ?? 60000;
    this.typingIntervalMs = opts.typingIntervalMs ?? 3000;
    this.autoCatchUp = opts.autoCatchUp ?? true;
    this.reconnectOnOnline = opts.reconnectOnOnline ?? true;
    if (this.token) this.user = jwtClaims(this.token)?.sub;
    this.rooms = new Rooms(this);
    this.messages = new Messages(this);
    this.topics = new Topics(this);
    this.notifications = new Notifications(this);
    this.presence = new PresenceApi(this);
  }

  /** Number of requests waiting for a connection. */
  get queued(): number {
    return this.queue.length;
  }

  /** The subscription of a channel, if any. */
  subscription(channel: string): Subscription | undefined {
    return this.subs.get(channel);
  }

  /**
   * Connects (and keeps reconnecting). Resolves once connected; rejects only
   * when the client gives up (a refused static token, `maxAttempts`, `close()`).
   */
  connect(): Promise<void> {
    if (this.state === "connected") return Promise.resolve();
    const p = new Promise<void>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (!this.started) {
      this.started = true;
      this.attempt = 0;
      this.installOnline();
      void this.open();
    }
    return p;
  }

  /** Closes the connection for good: pending and queued requests reject with `closed`. */
  close(): void {
    this.shutdown(undefined);
  }

  /** Sends any request of docs/protocol.md and resolves with its `ok` result. */
  request<K extends Op>(op: K, args: ArgsOf<K>, opts: RequestOptions & { clientId?: string } = {}): Promise<ResultOf<K>> {
    return new Promise((resolve, reject) => {
      const req: Req = {
        id: 0,
        order: ++this.orderSeq,
        op,
        args,
        resend: RESENDABLE.has(op),
        internal: false,
        createdAt: Date.now(),
        timeoutMs: 0,
        done: false,
        onOk: resolve,
        onErr: reject,
        ...(opts.clientId !== undefined ? { clientId: opts.clientId } : {}),
      };
      if (this.state === "closed") {
        return this.fail(req, ChorusError.client("closed", `${op}: the client is closed`, { op }));
      }
      if (this.state === "connected") {
        req.timeoutMs = opts.timeoutMs ?? this.requestTimeoutMs;
        this.arm(req);
        this.sendNow(req);
        return;
      }
      if (this.queueOpts === false) {
        return this.fail(req, ChorusError.client("not_connected", `${op}: not connected (the offline queue is disabled)`, { op }));
      }
      if (this.queue.length >= this.queueOpts.max) {
        return this.fail(
          req,
          ChorusError.client("queue_full", `${op}: the offline queue is full (${this.queueOpts.max} requests waiting for a connection)`, { op }),
        );
      }
      req.timeoutMs = opts.timeoutMs ?? this.queueOpts.timeoutMs;
      this.arm(req);
      this.queue.push(req);
    });
  }

  /** `ping`: a round trip (counts as activity for presence). */
  ping(): Promise<{ pong: number }> {
    return this.request("ping", {});
  }

  /** Replaces the connection's token with `auth.refresh` (with `getToken()`'s result when no token is given). */
  async refreshToken(token?: string): Promise<{ expires_at: number }> {
    const t = token ?? (this.getToken ? await this.getToken() : undefined);
    if (!t) throw ChorusError.client("token_unavailable", "refreshToken: no token given and no getToken");
    if (this.state !== "connected") {
      this.token = t;
      return { expires_at: (jwtClaims(t)?.exp ?? 0) * 1000 };
    }
    const res = await this._internal("auth.refresh", { token: t });
    this.token = t;
    this.scheduleRefresh();
    this.emit("token", { expiresAt: res.expires_at });
    return res;
  }

  /**
   * Subscribes to a channel (`room:<id>`, `topic:<name>`, `feed:<user>`).
   * Resolves after the first reply; missed entries (when `offset`/`epoch` are
   * given) reach `onEntry` before it resolves.
   */
  subscribe(channel: string, opts: SubscribeOptions = {}): Promise<Subscription> {
    return this.addSubscription(channel, "subscribe", opts);
  }

  /** A page of a channel's history (oldest first). */
  history(channel: string, opts: { before?: number; after?: number; limit?: number } = {}, ro: RequestOptions = {}) {
    return this.request("history", { channel, ...opts }, ro);
  }

  // ------------------------------------------------------------ internal API for the namespaces

  /** @internal */
  addSubscription(channel: string, via: "subscribe" | "join", opts: SubscribeOptions): Promise<Subscription> {
    const existing = this.subs.get(channel);
    if (existing) {
      if (opts.onEntry) existing.on("entry", opts.onEntry);
      if (opts.onUnrecovered) existing.on("unrecovered", opts.onUnrecovered);
      if (opts.onError) existing.on("error", opts.onError);
      if (via === "join" && existing._via !== "join") {
        existing._via = "join";
        if (this.state === "connected" && existing._established) {
          // Become a member too; the reply is handled like a resubscribe.
          this.sendSubscribe(existing, "room.join");
        }
      }
      return existing.ready();
    }
    const sub = new Subscription(this, channel, via, opts);
    this.subs.set(channel, sub);
    const timeoutMs = opts.timeoutMs ?? (this.state === "connected" || this.queueOpts === false ? this.requestTimeoutMs : this.queueOpts.timeoutMs);
    const timer = setTimeout(() => {
      if (!sub._established && sub.state !== "ended") {
        this._dropSubscription(sub);
        sub._end(ChorusError.client("timeout", `subscribe ${channel}: no reply within ${timeoutMs} ms`, { op: via === "join" ? "room.join" : "subscribe" }));
      }
    }, Math.min(timeoutMs, MAX_TIMER));
    sub.ready().then(
      () => clearTimeout(timer),
      () => clearTimeout(timer),
    );
    if (this.state === "connected") this.sendSubscribe(sub);
    else if (this.queueOpts === false) {
      this._dropSubscription(sub);
      sub._end(ChorusError.client("not_connected", `subscribe ${channel}: not connected (the offline queue is disabled)`));
    }
    return sub.ready();
  }

  /** @internal */
  _dropSubscription(sub: Subscription): void {
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
  }

  /** @internal */
  _resubscribe(sub: Subscription): void {
    if (this.state === "connected" && this.subs.get(sub.channel) === sub && !sub._inflight) this.sendSubscribe(sub);
  }

  /** @internal an entry left a subscription */
  _delivered(sub: Subscription, entry: Entry): void {
    this.emit("entry", sub.channel, entry);
    // Left or removed from a room: the server stops sending it.
    if (entry.kind === "left" && entry.sender === this.user && sub.channel.startsWith("room:")) {
      const by = (entry.data as { by?: string } | undefined)?.by;
      this._dropSubscription(sub);
      sub._end(
        by && by !== this.user
          ? new ChorusError({ code: 3003, name: "not_member", message: `removed from ${sub.channel} by ${by}`, retryable: false })
          : undefined,
      );
    }
  }

  /** @internal a request sent by the client itself: never queued, fails on disconnect */
  _internal<K extends Op>(op: K, args: ArgsOf<K>, timeoutMs?: number): Promise<ResultOf<K>> {
    return new Promise((resolve, reject) => {
      const req: Req = {
        id: 0,
        order: ++this.orderSeq,
        op,
        args,
        resend: false,
        internal: true,
        createdAt: Date.now(),
        timeoutMs: timeoutMs ?? this.requestTimeoutMs,
        done: false,
        onOk: resolve,
        onErr: reject,
      };
      if (this.state !== "connected") {
        return this.fail(req, ChorusError.client("not_connected", `${op}: not connected`, { op }));
      }
      this.arm(req);
      this.sendNow(req);
    });
  }

  /** @internal presence watches and state, restored after a reconnect */
  _rememberWatch(args: PresenceWatchArgs): void {
    const key = watchKey(args);
    if (!this.watches.some((w) => watchKey(w) === key)) this.watches.push(args);
  }
  /** @internal */
  _forgetWatch(args: PresenceWatchArgs): void {
    const key = watchKey(args);
    this.watches = this.watches.filter((w) => watchKey(w) !== key);
  }
  /** @internal */
  _rememberPresence(args: PresenceSetArgs): void {
    this.presenceState = { ...this.presenceState, ...args };
  }

  // ------------------------------------------------------------ requests

  private arm(req: Req): void {
    if (req.timer) clearTimeout(req.timer);
    const left = req.createdAt + req.timeoutMs - Date.now();
    req.timer = setTimeout(() => this.expire(req), Math.max(0, Math.min(left, MAX_TIMER)));
  }

  private expire(req: Req): void {
    if (req.done) return;
    const wasQueued = this.queue.includes(req);
    this.queue = this.queue.filter((r) => r !== req);
    if (req.id) this.pending.delete(req.id);
    const where = wasQueued ? "while waiting for a connection" : "after it was sent";
    const hint = req.clientId ? `; retry with the same client_id (${req.clientId}) to store it once` : "";
    this.fail(
      req,
      ChorusError.client("timeout", `${req.op}: no reply within ${req.timeoutMs} ms (timed out ${where})${hint}`, {
        op: req.op,
        ...(req.clientId ? { clientId: req.clientId } : {}),
      }),
    );
  }

  /** Puts requests back in the queue, in creation order. */
  private requeue(reqs: Req[]): void {
    if (reqs.length === 0) return;
    this.queue = [...this.queue, ...reqs].sort((a, b) => a.order - b.order);
  }

  private fail(req: Req, err: ChorusError): void {
    if (req.done) return;
    req.done = true;
    if (req.timer) clearTimeout(req.timer);
    req.onErr(err);
  }

  private sendNow(req: Req): void {
    req.id = ++this.seq;
    this.pending.set(req.id, req);
    let bytes: string | Uint8Array;
    try {
      bytes = this.codec.encode({ id: req.id, op: req.op, args: req.args ?? {} });
    } catch (e) {
      this.pending.delete(req.id);
      this.fail(req, ChorusError.client("protocol_error", `${req.op}: cannot encode the request: ${String(e)}`, { op: req.op, cause: e }));
      return;
    }
    try {
      this.ws!.send(bytes);
    } catch {
      // The socket is closing: its close event moves the request back to the queue (or fails it).
    }
  }

  private onReply(frame: Reply): void {
    if (frame.id === 0) {
      if (frame.error) this.emit("error", new ChorusError(frame.error));
      return;
    }
    const req = this.pending.get(frame.id);
    if (!req) return; // timed out already
    this.pending.delete(frame.id);
    if (req.done) return;
    if (frame.error) {
      // The node is draining: a request that is safe to resend goes out again after the reconnect.
      if (frame.error.code === 5005 && req.resend && !req.internal && this.queueOpts !== false) {
        req.id = 0;
        req.timeoutMs = Math.max(req.timeoutMs, this.queueOpts.timeoutMs);
        this.arm(req);
        this.requeue([req]);
        return;
      }
      const extra = { op: req.op, ...(req.clientId ? { clientId: req.clientId } : {}) };
      this.fail(req, new ChorusError(frame.error, extra));
      return;
    }
    req.done = true;
    if (req.timer) clearTimeout(req.timer);
    req.onOk(frame.ok);
  }

  // ------------------------------------------------------------ connection

  private setState(s: ConnectionState): void {
    if (s === this.state) return;
    const prev = this.state;
    this.state = s;
    this.emit("state", s, prev);
  }

  private async currentToken(): Promise<string> {
    if (this.getToken) {
      const claims = this.token ? jwtClaims(this.token) : undefined;
      const expMs = claims?.exp !== undefined ? claims.exp * 1000 : Infinity;
      const stale = expMs - Date.now() < Math.min(this.refreshBeforeExpiryMs, 5000);
      if (!this.token || this.needFreshToken || stale) {
        let t: string;
        try {
          t = await this.getToken();
        } catch (e) {
          throw ChorusError.client("token_unavailable", `getToken() failed: ${String(e)}`, { cause: e });
        }
        if (!t || typeof t !== "string") throw ChorusError.client("token_unavailable", "getToken() returned no token");
        this.token = t;
        this.needFreshToken = false;
      }
      return this.token!;
    }
    const t = this.token!;
    const exp = jwtClaims(t)?.exp;
    if (exp !== undefined && exp * 1000 <= Date.now()) {
      throw new ChorusError({ code: 2004, name: "token_expired", message: "the token has expired and there is no getToken to get another", retryable: false });
    }
    return t;
  }

  private async open(): Promise<void> {
    this.reconnectTimer = undefined;
    if (!this.started) return;
    const gen = ++this.socketGen;
    this.setState("connecting");
    let token: string;
    try {
      token = await this.currentToken();
    } catch (e) {
      if (gen !== this.socketGen || !this.started) return;
      const err = e as ChorusError;
      if (!err.retryable) return this.shutdown(err);
      this.emit("error", err);
      return this.afterClose(gen, 1006, err.message, false, undefined);
    }
    if (gen !== this.socketGen || !this.started) return;
    this.user = jwtClaims(token)?.sub ?? this.user;
    const base = this.urls[this.urlIndex % this.urls.length]!;
    let url: string;
    try {
      const u = new URL(base);
      u.searchParams.set("token", token);
      url = u.toString();
    } catch {
      return this.shutdown(ChorusError.client("protocol_error", `invalid url ${base}`));
    }
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url, [SUBPROTOCOL[this.codec.encoding]]);
    } catch (e) {
      this.emit("error", ChorusError.client("protocol_error", `cannot open ${base}: ${String(e)}`, { cause: e }));
      return this.afterClose(gen, 1006, String(e), false, undefined);
    }
    this.ws = ws;
    this.lastError = undefined;
    let opened = false;
    try {
      ws.binaryType = "arraybuffer";
    } catch {
      /* not settable */
    }
    ws.onopen = () => {
      if (gen !== this.socketGen) return;
      opened = true;
      const proto = ws.protocol;
      const want = SUBPROTOCOL[this.codec.encoding];
      if ((proto && proto !== want) || (!proto && this.codec.encoding === "msgpack")) {
        this.shutdown(ChorusError.client("protocol_error", `the server chose subprotocol "${proto}", not ${want}`));
        return;
      }
      this.onOpen(base);
    };
    ws.onmessage = (ev: { data: unknown }) => {
      if (gen !== this.socketGen) return;
      this.onFrame(ev.data);
    };
    ws.onerror = (ev: { message?: string; error?: unknown }) => {
      if (gen !== this.socketGen) return;
      this.lastError = ev?.message ?? (ev?.error ? String(ev.error) : undefined);
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (gen !== this.socketGen) return;
      const m = /Unexpected server response: (\d+)/.exec(this.lastError ?? "");
      const status = m ? Number(m[1]) : undefined;
      this.afterClose(gen, ev?.code ?? 1006, ev?.reason || this.lastError || "", opened, status);
    };
  }

  private onOpen(url: string): void {
    const reconnected = this.everConnected;
    this.everConnected = true;
    this.openedAt = Date.now();
    this.setState("connected");
    this.scheduleRefresh();
    // Resubscribe first, so catch-up replies come before anything the queue causes.
    for (const sub of this.subs.values()) this.sendSubscribe(sub);
    this.restorePresence();
    const queued = this.queue;
    this.queue = [];
    for (const req of queued) {
      if (!req.done) this.sendNow(req);
    }
    this.emit("connected", { url, reconnected });
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.resolve();
  }

  private sendSubscribe(sub: Subscription, forceOp?: "room.join"): void {
    if (sub._retryTimer) {
      clearTimeout(sub._retryTimer);
      sub._retryTimer = undefined;
    }
    const gen = sub._subscribing();
    const useJoin = forceOp === "room.join" || (!sub._established && sub._via === "join");
    const p = useJoin
      ? this._internal("room.join", { room: sub.channel.slice("room:".length) })
      : this._internal("subscribe", {
          channel: sub.channel,
          ...(sub.offset !== undefined ? { offset: sub.offset } : {}),
          ...(sub.epoch !== undefined && sub.offset !== undefined ? { epoch: sub.epoch } : {}),
        });
    p.then(
      (res) => sub._onSubscribed(gen, res, this.autoCatchUp),
      (err: ChorusError) => {
        if (err.name === "connection_lost" || err.name === "not_connected" || err.name === "closed") return; // redone on reconnect
        if (err.name === "timeout" && sub._established) {
          // A node that does not answer a subscribe is unwell: reconnect and resubscribe everything.
          this.emit("error", err);
          this.ws?.close(4000, "subscribe timed out");
          return;
        }
        sub._onSubscribeError(gen, err);
      },
    );
  }

  private restorePresence(): void {
    if (this.presenceState) {
      this._internal("presence.set", this.presenceState).catch((e) => this.emitErr(e));
    }
    for (const w of this.watches) {
      this._internal("presence.watch", w).then(
        (res) => {
          for (const p of res.users) this.emit("presence", p);
        },
        (e) => this.emitErr(e),
      );
    }
  }

  private emitErr(e: unknown): void {
    if (e instanceof ChorusError && (e.name === "connection_lost" || e.name === "not_connected" || e.name === "closed")) return;
    this.emit("error", e instanceof ChorusError ? e : ChorusError.client("protocol_error", String(e)));
  }

  private onFrame(data: unknown): void {
    let frame: any;
    try {
      frame = this.codec.decode(data);
    } catch (e) {
      this.emit("error", ChorusError.client("protocol_error", `undecodable frame: ${String(e)}`, { cause: e }));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (typeof frame.push === "string") {
      this.onPush(frame as PushFrame);
    } else if (typeof frame.id === "number") {
      this.onReply(frame as Reply);
    }
  }

  private onPush(p: PushFrame): void {
    this.emit("push", p);
    switch (p.push) {
      case "entry": {
        const sub = p.channel ? this.subs.get(p.channel) : undefined;
        if (sub && p.data && typeof p.data === "object") sub._onPush(p.data as Entry);
        break;
      }
      case "typing":
        this.emit("typing", p.data as TypingPush);
        break;
      case "receipt":
        this.emit("receipt", p.data as ReceiptPush);
        break;
      case "presence":
        this.emit("presence", p.data as Presence);
        break;
      case "resubscribe": {
        // The server ended this subscription (a new owner could not continue
        // it without a gap): subscribe again from the last (offset, epoch).
        const sub = p.channel ? this.subs.get(p.channel) : undefined;
        if (sub) this._resubscribe(sub);
        break;
      }
      case "notifications":
        this.emit("notifications", p.data as NotificationsPush);
        break;
      case "notifications.read":
        this.emit("notifications.read", p.data as NotificationsRead);
        break;
    }
  }

  private afterClose(gen: number, code: number, reason: string, opened: boolean, httpStatus: number | undefined): void {
    if (gen !== this.socketGen) return;
    this.socketGen++; // ignore anything more from this socket
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close();
      } catch {
        /* already closed */
      }
    }
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    // Requests in flight: resend the safe ones after the reconnect, fail the others.
    const inflight = [...this.pending.values()].sort((a, b) => a.id - b.id);
    this.pending.clear();
    const requeue: Req[] = [];
    for (const r of inflight) {
      if (r.done) continue;
      if (!r.internal && r.resend && this.queueOpts !== false && this.started) {
        r.id = 0;
        // It may wait for the reconnect as long as a queued request would.
        r.timeoutMs = Math.max(r.timeoutMs, this.queueOpts.timeoutMs);
        this.arm(r);
        requeue.push(r);
      } else {
        this.fail(
          r,
          ChorusError.client("connection_lost", `${r.op}: the connection dropped before the reply; it may or may not have been applied`, {
            op: r.op,
            ...(r.clientId ? { clientId: r.clientId } : {}),
          }),
        );
      }
    }
    this.requeue(requeue);
    if (this.queueOpts === false) {
      for (const r of this.queue) this.fail(r, ChorusError.client("not_connected", `${r.op}: not connected`, { op: r.op }));
      this.queue = [];
    }
    for (const sub of this.subs.values()) sub._onDisconnect();
    this.stopAllTyping();
    if (!this.started) return;

    if (opened && Date.now() - this.openedAt >= STABLE_AFTER_MS) this.attempt = 0;
    let delay: number | undefined;
    let rotate = !opened;
    if (opened && code === 1001) {
      delay = 0;
      rotate = true;
    } else if (code === 4001 || (!opened && httpStatus === 401)) {
      if (!this.getToken) {
        return this.shutdown(
          code === 4001
            ? new ChorusError({ code: 2004, name: "token_expired", message: "the token expired (close 4001) and there is no getToken to get another", retryable: false })
            : ChorusError.client("handshake_refused", `the server refused the token (HTTP 401${this.lastError ? `: ${this.lastError}` : ""})`),
        );
      }
      this.needFreshToken = true;
      if (code === 4001) delay = 0;
    } else if (!opened && this.getToken && this.token) {
      // Browsers do not report a refused handshake's status: a token that is
      // close to its expiry is replaced before the next attempt.
      const exp = jwtClaims(this.token)?.exp;
      if (exp !== undefined && exp * 1000 - Date.now() < this.refreshBeforeExpiryMs) this.needFreshToken = true;
    }
    if (rotate && this.urls.length > 1) this.urlIndex = (this.urlIndex + 1) % this.urls.length;

    const ro = this.reconnectOpts;
    if (ro === false) {
      this.setState("disconnected");
      this.emit("disconnected", { code, reason, willReconnect: false, delayMs: 0, ...(httpStatus ? { httpStatus } : {}) });
      return this.shutdown(
        opened
          ? ChorusError.client("connection_lost", `the connection closed (${code}${reason ? ` ${reason}` : ""}) and reconnect is off`)
          : ChorusError.client("not_connected", `could not connect (${code}${reason ? ` ${reason}` : ""}${httpStatus ? `, HTTP ${httpStatus}` : ""}) and reconnect is off`),
        true,
      );
    }
    if (this.attempt >= ro.maxAttempts) {
      return this.shutdown(ChorusError.client("reconnect_failed", `gave up after ${this.attempt} attempts (last close ${code} ${reason})`));
    }
    if (delay === undefined) {
      const cap = Math.min(ro.maxDelayMs, ro.initialDelayMs * ro.factor ** this.attempt);
      delay = Math.random() * cap; // full jitter
      if (code === 4003) delay = Math.max(delay, ro.rateLimitedDelayMs);
    }
    this.attempt++;
    this.setState("disconnected");
    this.emit("disconnected", { code, reason, willReconnect: true, delayMs: delay, ...(httpStatus ? { httpStatus } : {}) });
    this.reconnectTimer = setTimeout(() => void this.open(), Math.min(delay, MAX_TIMER));
  }

  private shutdown(error: ChorusError | undefined, quiet = false): void {
    const wasStarted = this.started;
    this.started = false;
    this.socketGen++;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.reconnectTimer = this.refreshTimer = undefined;
    this.removeOnline();
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        /* ignore */
      }
    }
    const err = error ?? ChorusError.client("closed", "the client was closed");
    const reqs = [...this.pending.values(), ...this.queue];
    this.pending.clear();
    this.queue = [];
    for (const r of reqs) this.fail(r, new ChorusError(err, { op: r.op, ...(r.clientId ? { clientId: r.clientId } : {}) }));
    for (const sub of this.subs.values()) sub._onDisconnect();
    this.stopAllTyping();
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.reject(err);
    if (!wasStarted && this.state === "closed") return;
    this.setState("closed");
    if (error && !quiet) this.emit("error", error);
    this.emit("closed", error);
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (!this.getToken || !this.token) return;
    const exp = jwtClaims(this.token)?.exp;
    if (exp === undefined) return;
    const remaining = exp * 1000 - Date.now();
    const lead = Math.min(this.refreshBeforeExpiryMs, Math.max(0, remaining) / 4);
    const at = Math.max(0, remaining - lead);
    const gen = this.socketGen;
    this.refreshTimer = setTimeout(() => void this.autoRefresh(gen), Math.min(at, MAX_TIMER));
  }

  private async autoRefresh(gen: number): Promise<void> {
    this.refreshTimer = undefined;
    if (gen !== this.socketGen || this.state !== "connected") return;
    try {
      await this.refreshToken();
    } catch (e) {
      if (gen !== this.socketGen) return;
      this.emitErr(e);
      // Try again while the token is still valid; otherwise the server closes with 4001 and we reconnect with a new one.
      const exp = this.token ? jwtClaims(this.token)?.exp : undefined;
      const left = exp !== undefined ? exp * 1000 - Date.now() : 0;
      if (left > 500) this.refreshTimer = setTimeout(() => void this.autoRefresh(gen), Math.min(5000, left / 2));
      else this.needFreshToken = true;
    }
  }

  private installOnline(): void {
    const w = (globalThis as { window?: { addEventListener?: Function } }).window;
    if (!this.reconnectOnOnline || !w || typeof w.addEventListener !== "function") return;
    this.onlineHandler = () => {
      if (this.state === "disconnected" && this.reconnectTimer && this.started) {
        clearTimeout(this.reconnectTimer);
        this.reconnectTimer = undefined;
        this.attempt = 0;
        void this.open();
      }
    };
    w.addEventListener("online", this.onlineHandler);
  }

  private removeOnline(): void {
    const w = (globalThis as { window?: { removeEventListener?: Function } }).window;
    if (this.onlineHandler && w && typeof w.removeEventListener === "function") w.removeEventListener("online", this.onlineHandler);
    this.onlineHandler = undefined;
  }

  // ------------------------------------------------------------ typing

  private typingState = new Map<string, { timer: ReturnType<typeof setInterval>; activity: boolean }>();

  /** @internal see Messages.typing */
  _typing(room: string): void {
    const t = this.typingState.get(room);
    if (t) {
      t.activity = true;
      return;
    }
    if (this.state !== "connected") return; // ephemeral: nothing to catch up on later
    const send = () => this._internal("room.typing", { room }).catch((e) => this.emitErr(e));
    void send();
    const entry = {
      activity: false,
      timer: setInterval(() => {
        if (!entry.activity || this.state !== "connected") return this._stopTyping(room);
        entry.activity = false;
        void send();
      }, this.typingIntervalMs),
    };
    this.typingState.set(room, entry);
  }

  /** @internal */
  _stopTyping(room: string): void {
    const t = this.typingState.get(room);
    if (!t) return;
    clearInterval(t.timer);
    this.typingState.delete(room);
  }

  private stopAllTyping(): void {
    for (const room of [...this.typingState.keys()]) this._stopTyping(room);
  }
}

function watchKey(w: PresenceWatchArgs): string {
  return JSON.stringify({ users: [...(w.users ?? [])].sort(), room: w.room ?? null });
}
