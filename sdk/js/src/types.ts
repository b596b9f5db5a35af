// Wire types of the Chorus protocol v1 (docs/protocol.md). Field names are the wire names.

/** Milliseconds since the Unix epoch. */
export type Millis = number;

export type EntryKind = "message" | "edit" | "delete" | "joined" | "left" | "publish";

/** One record of a channel (room, topic or feed): an `entry` push, a `missed` item, a history item. */
export interface Entry {
  offset: number;
  kind: EntryKind;
  /** How many `message` entries the channel has up to this one. */
  msg_seq: number;
  ts: Millis;
  sender?: string;
  client_id?: string;
  text?: string;
  attachments?: unknown;
  /** The offset this message answers (threads). */
  reply_to?: number;
  /** For `edit` / `delete`: the offset of the message changed. */
  target?: number;
  /** Payload of a `publish` entry; `{by}` on a `joined` / `left` entry done by someone else. */
  data?: unknown;
  edited_at?: Millis;
  deleted?: boolean;
}

export interface ChannelHead {
  epoch: string;
  offset: number;
  msg_seq: number;
}

export type RoomKind = "direct" | "group" | "public";

export interface RoomInfo {
  id: string;
  kind: RoomKind;
  name?: string;
  created_by: string;
  created_at: Millis;
  /** Joins and leaves are `joined` / `left` entries (absent on rooms created before the setting). */
  membership_entries?: boolean;
}

export interface Member {
  user: string;
  role: "owner" | "member";
  joined_at: Millis;
}

export interface RoomSummary {
  room: RoomInfo;
  head: ChannelHead;
  read_offset: number;
  unread: number;
}

export type Priority = "low" | "normal" | "high" | "urgent";

export interface Notification {
  id: number;
  user: string;
  type: string;
  title: string;
  body?: string;
  data?: unknown;
  priority: Priority;
  category?: string;
  room?: string;
  created_at: Millis;
  expires_at?: Millis;
  read: boolean;
}

export interface NotificationPrefs {
  muted_categories: string[];
  muted_rooms: string[];
}

export type Status = "online" | "idle" | "offline";

export interface Presence {
  user: string;
  status: Status;
  last_seen?: Millis;
  activity?: string;
  devices: number;
}

// ---- results ----

export interface Published {
  channel: string;
  epoch: string;
  offset: number;
  /** True when a send with this `client_id` was already stored: nothing new was written. */
  duplicate: boolean;
}

export interface Subscribed {
  channel: string;
  epoch: string;
  /** The channel's head when the subscription began. */
  offset: number;
  recovered: boolean;
  /** Why `recovered` is false: `epoch_changed`, `offset_ahead`, `too_far_behind`, `history_trimmed` (older nodes append `: <explanation>`). */
  reason?: string;
  /** A human-readable explanation beside `reason` (newer nodes). */
  detail?: string;
  missed: Entry[];
}

export interface HistoryPage {
  channel: string;
  head: ChannelHead;
  /** Oldest first. */
  entries: Entry[];
  more: boolean;
}

export interface NotificationPage {
  items: Notification[];
  unread: number;
  more: boolean;
}

export interface NotificationsRead {
  ids: number[];
  all: boolean;
  unread: number;
}

// ---- push payloads ----

export interface NotificationsPush {
  items: Notification[];
  unread: number;
}

export interface TypingPush {
  room: string;
  users: string[];
}

export interface ReceiptPush {
  room: string;
  user: string;
  offset: number;
}

/** Any frame the server pushes. */
export interface PushFrame {
  push: string;
  channel?: string;
  epoch?: string;
  offset?: number;
  ephemeral?: boolean;
  data: unknown;
}

// ---- every request: its arguments and its result ----

export interface RoomCreateArgs {
  room?: string;
  kind: "group" | "public";
  name?: string;
  members?: string[];
  /** Record joins and leaves as entries; default true, false for public rooms. */
  membership_entries?: boolean;
}

export interface SendArgs {
  room: string;
  text: string;
  attachments?: unknown;
  reply_to?: number;
  client_id?: string;
}

export interface HistoryArgs {
  channel: string;
  before?: number;
  after?: number;
  limit?: number;
}

export interface NotificationsListArgs {
  before?: number;
  limit?: number;
  unread_only?: boolean;
}

export interface PresenceSetArgs {
  status?: "online" | "idle";
  /** `""` clears the line. */
  activity?: string;
}

export interface PresenceWatchArgs {
  users?: string[];
  room?: string;
}

/** Every op of docs/protocol.md with its `args` and its `ok` result. */
export interface Ops {
  ping: { args: Record<string, never>; result: { pong: Millis } };
  "auth.refresh": { args: { token: string }; result: { expires_at: Millis } };
  "room.create": { args: RoomCreateArgs; result: RoomInfo };
  "room.direct": { args: { user: string }; result: RoomInfo };
  "room.join": { args: { room: string }; result: Subscribed };
  "room.leave": { args: { room: string }; result: { left: boolean } };
  "room.invite": { args: { room: string; user: string }; result: { invited: string } };
  "room.kick": { args: { room: string; user: string }; result: { removed: string } };
  "room.members": { args: { room: string }; result: { room: string; members: Member[] } };
  "rooms.list": { args: Record<string, never>; result: { rooms: RoomSummary[] } };
  "room.send": { args: SendArgs; result: Published };
  "room.edit": { args: { room: string; offset: number; text: string }; result: Published };
  "room.delete": { args: { room: string; offset: number }; result: Published };
  history: { args: HistoryArgs; result: HistoryPage };
  "room.typing": { args: { room: string }; result: Record<string, never> };
  "room.read": { args: { room: string; offset: number }; result: { room: string; offset: number; unread: number } };
  subscribe: { args: { channel: string; offset?: number; epoch?: string }; result: Subscribed };
  unsubscribe: { args: { channel: string }; result: { channel: string } };
  "topic.publish": { args: { topic: string; data: unknown; client_id?: string }; result: Published };
  "notifications.list": { args: NotificationsListArgs; result: NotificationPage };
  "notifications.unread": { args: Record<string, never>; result: { unread: number } };
  "notifications.read": { args: { ids: number[] } | { all: true }; result: NotificationsRead };
  "notifications.prefs.get": { args: Record<string, never>; result: NotificationPrefs };
  "notifications.prefs.set": { args: Partial<NotificationPrefs>; result: NotificationPrefs };
  "presence.set": { args: PresenceSetArgs; result: Presence };
  "presence.watch": { args: PresenceWatchArgs; result: { users: Presence[] } };
  /** The result is not in docs/protocol.md; the node answers how many users this connection still watches. */
  "presence.unwatch": { args: PresenceWatchArgs; result: { watching: number } };
  "presence.query": { args: { users: string[] }; result: { users: Presence[] } };
}

export type Op = keyof Ops;
export type ArgsOf<K extends Op> = Ops[K]["args"];
export type ResultOf<K extends Op> = Ops[K]["result"];
