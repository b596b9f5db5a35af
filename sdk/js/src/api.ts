import type { ChorusClient, RequestOptions, SubscribeOptions, Subscription } from "./client.js";
import { newClientId } from "./client.js";
import type {
  HistoryPage,
  Member,
  NotificationPage,
  NotificationPrefs,
  NotificationsRead,
  Presence,
  PresenceSetArgs,
  PresenceWatchArgs,
  Published,
  RoomCreateArgs,
  RoomInfo,
  RoomSummary,
} from "./types.js";

export interface SendOptions extends RequestOptions {
  attachments?: unknown;
  /** The offset this message answers (a thread reply). */
  replyTo?: number;
  /** Idempotency key; generated when absent. A retry with the same id is stored once. */
  clientId?: string;
}

export interface HistoryOptions extends RequestOptions {
  before?: number;
  after?: number;
  limit?: number;
}

/** Rooms: create, direct, join (subscribes), leave, invite, kick, members, list. */
export class Rooms {
  constructor(private readonly c: ChorusClient) {}

  create(args: RoomCreateArgs, o?: RequestOptions): Promise<RoomInfo> {
    return this.c.request("room.create", args, o);
  }
  /** The one direct room of the caller and `user` (created on first use). */
  direct(user: string, o?: RequestOptions): Promise<RoomInfo> {
    return this.c.request("room.direct", { user }, o);
  }
  /** Joins a room and subscribes to `room:<id>`; the subscription survives reconnects. */
  join(room: string, opts?: SubscribeOptions): Promise<Subscription> {
    return this.c.addSubscription(`room:${room}`, "join", opts ?? {});
  }
  async leave(room: string, o?: RequestOptions): Promise<{ left: boolean }> {
    const res = await this.c.request("room.leave", { room }, o);
    const sub = this.c.subscription(`room:${room}`);
    if (sub) {
      this.c._dropSubscription(sub);
      sub._end(undefined);
    }
    return res;
  }
  invite(room: string, user: string, o?: RequestOptions): Promise<{ invited: string }> {
    return this.c.request("room.invite", { room, user }, o);
  }
  kick(room: string, user: string, o?: RequestOptions): Promise<{ removed: string }> {
    return this.c.request("room.kick", { room, user }, o);
  }
  async members(room: string, o?: RequestOptions): Promise<Member[]> {
    return (await this.c.request("room.members", { room }, o)).members;
  }
  /** Every room the user is a member of, with its head, read marker and unread count. */
  async list(o?: RequestOptions): Promise<RoomSummary[]> {
    return (await this.c.request("rooms.list", {}, o)).rooms;
  }
}

/** Messages: send, reply, edit, delete, history, typing, read markers. */
export class Messages {
  constructor(private readonly c: ChorusClient) {}

  /** Sends a message; while disconnected it waits in the offline queue and goes out after the reconnect with its `client_id`. */
  send(room: string, text: string, o: SendOptions = {}): Promise<Published> {
    const clientId = o.clientId ?? newClientId();
    this.c._stopTyping(room);
    return this.c.request(
      "room.send",
      {
        room,
        text,
        client_id: clientId,
        ...(o.attachments !== undefined ? { attachments: o.attachments } : {}),
        ...(o.replyTo !== undefined ? { reply_to: o.replyTo } : {}),
      },
      { clientId, ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}) },
    );
  }
  /** A reply in the thread of the message at `offset`. */
  reply(room: string, offset: number, text: string, o: Omit<SendOptions, "replyTo"> = {}): Promise<Published> {
    return this.send(room, text, { ...o, replyTo: offset });
  }
  edit(room: string, offset: number, text: string, o?: RequestOptions): Promise<Published> {
    return this.c.request("room.edit", { room, offset, text }, o);
  }
  delete(room: string, offset: number, o?: RequestOptions): Promise<Published> {
    return this.c.request("room.delete", { room, offset }, o);
  }
  /** A page of the room's history: the newest without `before`/`after`. */
  history(room: string, o: HistoryOptions = {}): Promise<HistoryPage> {
    const { timeoutMs, ...page } = o;
    return this.c.history(`room:${room}`, page, timeoutMs !== undefined ? { timeoutMs } : {});
  }
  /**
   * Call on every keystroke: sends `room.typing` at once, then again every
   * `typingIntervalMs` while keystrokes keep coming; stops by itself when they
   * stop, on `stopTyping`, and on `send` in that room.
   */
  typing(room: string): void {
    this.c._typing(room);
  }
  stopTyping(room: string): void {
    this.c._stopTyping(room);
  }
  /** Moves the read marker forward to `offset` (never back). */
  read(room: string, offset: number, o?: RequestOptions): Promise<{ room: string; offset: number; unread: number }> {
    return this.c.request("room.read", { room, offset }, o);
  }
}

/** Topics and feeds: subscribe, publish, history. */
export class Topics {
  constructor(private readonly c: ChorusClient) {}

  subscribe(topic: string, opts?: SubscribeOptions): Promise<Subscription> {
    return this.c.subscribe(`topic:${topic}`, opts);
  }
  /** Publishes to a topic (needs the token's `publish` claim); idempotent with its `client_id`. */
  publish(topic: string, data: unknown, o: RequestOptions & { clientId?: string } = {}): Promise<Published> {
    const clientId = o.clientId ?? newClientId();
    return this.c.request(
      "topic.publish",
      { topic, data, client_id: clientId },
      { clientId, ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}) },
    );
  }
  history(topic: string, o: HistoryOptions = {}): Promise<HistoryPage> {
    const { timeoutMs, ...page } = o;
    return this.c.history(`topic:${topic}`, page, timeoutMs !== undefined ? { timeoutMs } : {});
  }
  /** The caller's own feed (`feed:<user>`). */
  subscribeFeed(opts?: SubscribeOptions): Promise<Subscription> {
    return this.c.subscribe(`feed:${this.me()}`, opts);
  }
  feedHistory(o: HistoryOptions = {}): Promise<HistoryPage> {
    const { timeoutMs, ...page } = o;
    return this.c.history(`feed:${this.me()}`, page, timeoutMs !== undefined ? { timeoutMs } : {});
  }
  private me(): string {
    if (!this.c.user) throw new TypeError("the token has no `sub`: the user is unknown");
    return this.c.user;
  }
}

/** Notifications: list, unread, mark read, preferences; live pushes are the client's `notifications` events. */
export class Notifications {
  constructor(private readonly c: ChorusClient) {}

  list(o: { before?: number; limit?: number; unreadOnly?: boolean } & RequestOptions = {}): Promise<NotificationPage> {
    const { timeoutMs, unreadOnly, ...rest } = o;
    return this.c.request(
      "notifications.list",
      { ...rest, ...(unreadOnly !== undefined ? { unread_only: unreadOnly } : {}) },
      timeoutMs !== undefined ? { timeoutMs } : {},
    );
  }
  async unread(o?: RequestOptions): Promise<number> {
    return (await this.c.request("notifications.unread", {}, o)).unread;
  }
  markRead(ids: number[], o?: RequestOptions): Promise<NotificationsRead> {
    return this.c.request("notifications.read", { ids }, o);
  }
  markAllRead(o?: RequestOptions): Promise<NotificationsRead> {
    return this.c.request("notifications.read", { all: true }, o);
  }
  getPrefs(o?: RequestOptions): Promise<NotificationPrefs> {
    return this.c.request("notifications.prefs.get", {}, o);
  }
  setPrefs(prefs: Partial<NotificationPrefs>, o?: RequestOptions): Promise<NotificationPrefs> {
    return this.c.request("notifications.prefs.set", prefs, o);
  }
}

/** Presence: set, watch / unwatch (restored after a reconnect), query; changes are the client's `presence` events. */
export class PresenceApi {
  constructor(private readonly c: ChorusClient) {}

  /** Sets the caller's status and/or activity line (re-applied after a reconnect). */
  async set(args: PresenceSetArgs, o?: RequestOptions): Promise<Presence> {
    this.c._rememberPresence(args);
    return this.c.request("presence.set", args, o);
  }
  /** Watches users and/or a room's members: returns their presence now; changes arrive as `presence` events. */
  async watch(args: PresenceWatchArgs, o?: RequestOptions): Promise<Presence[]> {
    const res = await this.c.request("presence.watch", args, o);
    this.c._rememberWatch(args);
    return res.users;
  }
  /** Stops watching; resolves with how many users the connection still watches. */
  async unwatch(args: PresenceWatchArgs, o?: RequestOptions): Promise<{ watching: number }> {
    this.c._forgetWatch(args);
    return this.c.request("presence.unwatch", args, o);
  }
  async query(users: string[], o?: RequestOptions): Promise<Presence[]> {
    return (await this.c.request("presence.query", { users }, o)).users;
  }
}
