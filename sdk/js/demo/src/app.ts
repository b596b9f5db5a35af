// The Chorus demo: a small chat app on @chorus/client, plain TypeScript and DOM.
import { ChorusClient, ChorusError, type Entry, type Notification, type Presence, type RoomSummary, type Subscription } from "../../dist/index.js";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const el = (tag: string, props: Record<string, string> = {}, ...children: (Node | string)[]) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
};

interface RoomState {
  summary: RoomSummary;
  unread: number;
  sub?: Subscription;
}

let client: ChorusClient;
let me = "";
const rooms = new Map<string, RoomState>();
let current: string | undefined;
/** Messages of the current room by offset (edits and deletes applied). */
let messages = new Map<number, Entry>();
const receipts = new Map<string, number>(); // user -> offset, current room
const presence = new Map<string, Presence>();
let replyTo: number | undefined;
let notifUnread = 0;

// ------------------------------------------------------------ sign in

$("signin").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $<HTMLInputElement>("user").value.trim();
  const msgpack = $<HTMLInputElement>("msgpack").checked;
  try {
    await signIn(user, msgpack);
  } catch (e) {
    $("signin-error").textContent = String((e as Error).message ?? e);
  }
});

async function fetchToken(user: string): Promise<{ token: string; url: string }> {
  const res = await fetch(`/token?user=${encodeURIComponent(user)}`);
  if (!res.ok) throw new Error(`token: ${res.status} ${await res.text()}`);
  return res.json();
}

async function signIn(user: string, msgpack: boolean): Promise<void> {
  const first = await fetchToken(user);
  let pending: string | undefined = first.token;
  me = user;
  client = new ChorusClient({
    url: first.url,
    // The first token is already here; later ones (refresh, reconnect) come from the dev server.
    getToken: async () => {
      const t = pending;
      pending = undefined;
      return t ?? (await fetchToken(user)).token;
    },
    encoding: msgpack ? "msgpack" : "json",
  });
  client.on("state", (s) => {
    const c = $("conn");
    c.textContent = s;
    c.className = `conn ${s}`;
  });
  client.on("error", (e) => console.warn("chorus:", e.toString()));
  client.on("entry", onEntry);
  client.on("typing", (t) => {
    if (t.room !== current) return;
    const others = t.users.filter((u) => u !== me);
    $("typing").textContent = others.length ? `${others.join(", ")} ${others.length > 1 ? "are" : "is"} typing…` : "";
  });
  client.on("receipt", (r) => {
    if (r.room !== current || r.user === me) return;
    receipts.set(r.user, r.offset);
    renderReceipts();
  });
  client.on("presence", (p) => {
    presence.set(p.user, p);
    renderPresence();
  });
  client.on("notifications", (n) => {
    setBell(n.unread);
    // A direct message or an invitation may be about a room we do not list yet.
    if (n.items.some((i) => i.room && !rooms.has(i.room))) void loadRooms();
    if (!$("notif-panel").hidden) void showNotifications();
  });
  client.on("notifications.read", (n) => setBell(n.unread));
  await client.connect();
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me").textContent = user;
  setBell(await client.notifications.unread());
  await loadRooms();
}

// ------------------------------------------------------------ rooms

async function loadRooms(): Promise<void> {
  const list = await client.rooms.list();
  for (const s of list) {
    const known = rooms.get(s.room.id);
    if (known) {
      known.summary = s;
      continue;
    }
    const state: RoomState = { summary: s, unread: s.unread };
    rooms.set(s.room.id, state);
    // Every listed room is subscribed, so unread counts move live.
    state.sub = await client.rooms.join(s.room.id, {
      onUnrecovered: (u) => {
        if (u.channel === `room:${current}`) {
          $("recovery").hidden = false;
          $("recovery").textContent = `History could not be resumed (${u.reason}); reloaded.`;
          void openRoom(current!);
        }
      },
    });
  }
  renderRooms();
}

function roomLabel(s: RoomSummary): string {
  if (s.room.kind === "direct") {
    // The node names direct rooms dm:<len>:<a>:<b>; show the other user.
    const m = /^dm:(\d+):(.*)$/.exec(s.room.id);
    if (m) {
      const a = m[2]!.slice(0, Number(m[1]));
      const b = m[2]!.slice(Number(m[1]) + 1);
      return `@ ${a === me ? b : a}`;
    }
    return `@ ${s.room.id}`;
  }
  return `# ${s.room.name ?? s.room.id}`;
}

function renderRooms(): void {
  const ul = $("rooms");
  ul.replaceChildren(
    ...[...rooms.values()].map((r) => {
      const li = el(
        "li",
        { "data-room": r.summary.room.id, "data-testid": `room-${r.summary.room.id}`, class: r.summary.room.id === current ? "current" : "" },
        el("span", {}, roomLabel(r.summary)),
        el("span", { class: "badge", "data-count": String(r.unread), "data-testid": `unread-${r.summary.room.id}` }, r.unread ? String(r.unread) : ""),
      );
      li.addEventListener("click", () => void openRoom(r.summary.room.id));
      return li;
    }),
  );
}

$("join-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = $<HTMLInputElement>("join-room").value.trim();
  try {
    // A small chat room: joins are shown (and refresh the presence list).
    await client.rooms.create({ room: id, kind: "public", name: id, membership_entries: true });
  } catch (e) {
    if (!(e instanceof ChorusError && e.name === "room_exists")) throw e;
  }
  await client.rooms.join(id);
  await loadRooms();
  $<HTMLInputElement>("join-room").value = "";
  await openRoom(id);
});

$("dm-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $<HTMLInputElement>("dm-user").value.trim();
  const room = await client.rooms.direct(user);
  await loadRooms();
  $<HTMLInputElement>("dm-user").value = "";
  await openRoom(room.id);
});

async function openRoom(id: string): Promise<void> {
  const prev = current;
  if (prev && prev !== id) await client.presence.unwatch({ room: prev }).catch(() => {});
  current = id;
  replyTo = undefined;
  $("replying").hidden = true;
  $("recovery").hidden = true;
  $("typing").textContent = "";
  receipts.clear();
  renderReceipts();
  const r = rooms.get(id)!;
  $("room-title").textContent = roomLabel(r.summary);
  $<HTMLInputElement>("text").disabled = false;
  $<HTMLButtonElement>("composer").querySelector("button")!.disabled = false;
  messages = new Map();
  const page = await client.messages.history(id, { limit: 50 });
  for (const e of page.entries) apply(e);
  renderMessages();
  // Presence of the room's members: now, then live.
  presence.clear();
  for (const p of await client.presence.watch({ room: id })) presence.set(p.user, p);
  for (const p of await client.presence.query([me])) presence.set(p.user, p);
  renderPresence();
  renderRooms();
  markRead();
  $<HTMLInputElement>("text").focus();
}

/** Moves the read marker to the newest entry of the open room. */
function markRead(): void {
  if (!current || document.visibilityState === "hidden") return;
  const r = rooms.get(current);
  const last = Math.max(0, ...messages.keys(), r?.sub?.offset ?? 0);
  if (!r || last === 0) return;
  if (r.unread !== 0) {
    r.unread = 0;
    renderRooms();
  }
  client.messages.read(current, last).catch((e) => console.warn(e));
}
document.addEventListener("visibilitychange", markRead);

// ------------------------------------------------------------ messages

function onEntry(channel: string, e: Entry): void {
  const id = channel.slice("room:".length);
  if (!channel.startsWith("room:") || !rooms.has(id)) return;
  if (id === current) {
    apply(e);
    renderMessages();
    if (e.kind === "joined") {
      // A new member: watch the room again to see them too.
      void client.presence.watch({ room: id }).then((ps) => {
        for (const p of ps) presence.set(p.user, p);
        renderPresence();
      });
    }
    if (e.kind === "message" && e.sender !== me) markRead();
  } else if (e.kind === "message" && e.sender !== me) {
    rooms.get(id)!.unread++;
    renderRooms();
  }
}

/** Adds an entry to the open room's view; edits and deletes change their target. */
function apply(e: Entry): void {
  if (e.kind === "edit" || e.kind === "delete") {
    const t = e.target !== undefined ? messages.get(e.target) : undefined;
    if (t) {
      if (e.kind === "edit") {
        t.text = e.text ?? "";
        t.edited_at = e.ts;
      } else t.deleted = true;
    }
    return;
  }
  messages.set(e.offset, e);
}

function renderMessages(): void {
  const ol = $("messages");
  const atBottom = ol.scrollTop + ol.clientHeight >= ol.scrollHeight - 20;
  const items = [...messages.values()].sort((a, b) => a.offset - b.offset);
  ol.replaceChildren(
    ...items.map((m) => {
      if (m.kind !== "message") {
        const what = m.kind === "joined" ? "joined" : m.kind === "left" ? "left" : m.kind;
        return el("li", { class: "system", "data-offset": String(m.offset) }, `${m.sender ?? "?"} ${what}`);
      }
      const li = el("li", { "data-offset": String(m.offset), "data-testid": "message", class: m.deleted ? "deleted" : "" });
      if (m.reply_to !== undefined) {
        const q = messages.get(m.reply_to);
        li.append(el("div", { class: "quote", "data-testid": "quote" }, `↪ ${q?.sender ?? "?"}: ${q?.deleted ? "(deleted)" : (q?.text ?? `#${m.reply_to}`)}`));
      }
      li.append(
        el("span", { class: "who" }, m.sender ?? "?"),
        el("span", { class: "text", "data-testid": "text" }, m.deleted ? "(deleted)" : (m.text ?? "")),
        el("span", { class: "meta" }, `#${m.offset}${m.edited_at ? " · edited" : ""}`),
      );
      if (!m.deleted) {
        const actions = el("span", { class: "actions" });
        const reply = el("button", { "data-testid": "reply" }, "reply");
        reply.addEventListener("click", () => {
          replyTo = m.offset;
          $("replying").hidden = false;
          $("replying-to").textContent = `${m.sender}: ${m.text}`;
          $<HTMLInputElement>("text").focus();
        });
        actions.append(reply);
        if (m.sender === me) {
          const edit = el("button", { "data-testid": "edit" }, "edit");
          edit.addEventListener("click", async () => {
            const text = prompt("Edit message", m.text ?? "");
            if (text !== null && text !== m.text) await client.messages.edit(current!, m.offset, text);
          });
          const del = el("button", { "data-testid": "delete" }, "delete");
          del.addEventListener("click", () => void client.messages.delete(current!, m.offset));
          actions.append(edit, del);
        }
        li.append(actions);
      }
      return li;
    }),
  );
  if (atBottom) ol.scrollTop = ol.scrollHeight;
  renderReceipts();
}

function renderReceipts(): void {
  const seen = [...receipts.entries()].sort();
  $("receipts").textContent = seen.length ? `Seen by ${seen.map(([u, o]) => `${u} (#${o})`).join(", ")}` : "";
}

$("text").addEventListener("input", () => {
  if (current && $<HTMLInputElement>("text").value) client.messages.typing(current);
});

$("composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $<HTMLInputElement>("text");
  const text = input.value.trim();
  if (!text || !current) return;
  input.value = "";
  const room = current;
  const to = replyTo;
  replyTo = undefined;
  $("replying").hidden = true;
  try {
    // While offline this waits in the SDK's queue and goes out once after the reconnect.
    await (to !== undefined ? client.messages.reply(room, to, text) : client.messages.send(room, text));
  } catch (e) {
    alert(`not sent: ${(e as Error).message}`);
  }
});

$("cancel-reply").addEventListener("click", () => {
  replyTo = undefined;
  $("replying").hidden = true;
});

// ------------------------------------------------------------ presence

function renderPresence(): void {
  const ul = $("presence");
  ul.replaceChildren(
    ...[...presence.values()]
      .sort((a, b) => a.user.localeCompare(b.user))
      .map((p) =>
        el(
          "li",
          { "data-testid": `presence-${p.user}`, "data-status": p.status },
          el("span", { class: `dot ${p.status}` }),
          `${p.user}${p.user === me ? " (you)" : ""} — ${p.status}`,
          el("span", { class: "activity" }, p.activity ?? ""),
        ),
      ),
  );
}

$("activity-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const p = await client.presence.set({ activity: $<HTMLInputElement>("activity").value });
  presence.set(p.user, p);
  renderPresence();
});

// ------------------------------------------------------------ notifications

function setBell(n: number): void {
  notifUnread = n;
  $("bell-count").textContent = String(notifUnread);
}

$("bell").addEventListener("click", async () => {
  const panel = $("notif-panel");
  panel.hidden = !panel.hidden;
  if (!panel.hidden) await showNotifications();
});

async function showNotifications(): Promise<void> {
  const page = await client.notifications.list({ limit: 20 });
  setBell(page.unread);
  $("notif-list").replaceChildren(
    ...page.items.map((n: Notification) => {
      const li = el("li", { class: n.read ? "" : "unread", "data-testid": "notification" }, n.title, n.body ? el("div", {}, n.body) : "");
      li.addEventListener("click", async () => {
        await client.notifications.markRead([n.id]);
        if (n.room && rooms.has(n.room)) await openRoom(n.room);
        await showNotifications();
      });
      return li;
    }),
  );
  if (page.items.length === 0) $("notif-list").append(el("li", {}, "Nothing yet"));
}

$("notif-readall").addEventListener("click", async () => {
  await client.notifications.markAllRead();
  await showNotifications();
});

// For the browser test and the curious: the client in the console.
(globalThis as { chorus?: () => ChorusClient }).chorus = () => client;
