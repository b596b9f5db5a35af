// Every request of docs/protocol.md, once, through the typed API, in both encodings.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { ChorusClient, ChorusError, type Encoding, type Entry, type Presence, type NotificationsPush } from "../src/index.js";
import { ChorusNode, nextEvent, waitFor } from "./node.js";

let node: ChorusNode;
before(async () => {
  node = await ChorusNode.start();
});
after(async () => {
  await node?.destroy();
});

function client(user: string, encoding: Encoding, claims?: object): ChorusClient {
  return new ChorusClient({
    url: node.url,
    token: node.token(user, claims ? { claims } : {}),
    encoding,
    WebSocket,
    reconnect: { initialDelayMs: 50, maxDelayMs: 500 },
  });
}

for (const encoding of ["json", "msgpack"] as const) {
  test(`every API call once (${encoding})`, async () => {
    const sfx = encoding;
    const alice = client(`alice-${sfx}`, encoding, { publish: [`post:*`] });
    const bob = client(`bob-${sfx}`, encoding);
    const A = `alice-${sfx}`;
    const B = `bob-${sfx}`;
    try {
      await Promise.all([alice.connect(), bob.connect()]);
      assert.equal(alice.state, "connected");
      assert.equal(alice.user, A);

      // ping
      const pong = await alice.ping();
      assert.ok(Math.abs(pong.pong - Date.now()) < 60_000);

      // auth.refresh
      const r = await alice.refreshToken(node.token(A, { claims: { publish: ["post:*"] } }));
      assert.ok(r.expires_at > Date.now());

      // room.create, room.invite, room.members, rooms.list
      const room = `team-${sfx}`;
      const info = await alice.rooms.create({ room, kind: "group", name: "Team" });
      assert.equal(info.id, room);
      assert.equal(info.kind, "group");
      assert.equal(info.created_by, A);
      await assert.rejects(alice.rooms.create({ room, kind: "group" }), (e: unknown) => {
        assert.ok(e instanceof ChorusError);
        assert.equal(e.code, 3004);
        assert.equal(e.name, "room_exists");
        assert.equal(e.retryable, false);
        assert.equal(e.op, "room.create");
        return true;
      });
      // bob cannot join an invite-only room before he is invited
      await assert.rejects(bob.rooms.join(room), (e: unknown) => e instanceof ChorusError && e.name === "not_member");
      assert.deepEqual(await alice.rooms.invite(room, B), { invited: B });
      const members = await alice.rooms.members(room);
      assert.deepEqual(members.map((m) => [m.user, m.role]).sort(), [[A, "owner"], [B, "member"]]);

      // room.join (subscribes), room.send, live entry for the other member
      const aliceSeen: Entry[] = [];
      const bobSeen: Entry[] = [];
      const aSub = await alice.rooms.join(room, { onEntry: (e) => aliceSeen.push(e) });
      const bSub = await bob.rooms.join(room, { onEntry: (e) => bobSeen.push(e) });
      assert.equal(aSub.state, "active");
      const bobGets = nextEvent<[string, Entry]>((f) => bob.on("entry", f), "bob's entry", (_c, e) => e.kind === "message");
      const sent = await alice.messages.send(room, `hello @${B}`, { attachments: { files: [{ name: "a.png", size: 1 }] } });
      assert.equal(sent.channel, `room:${room}`);
      assert.equal(sent.duplicate, false);
      const [ch, live] = await bobGets;
      assert.equal(ch, `room:${room}`);
      assert.equal(live.offset, sent.offset);
      assert.equal(live.text, `hello @${B}`);
      assert.equal(live.sender, A);
      assert.deepEqual(live.attachments, { files: [{ name: "a.png", size: 1 }] });
      assert.ok(live.client_id?.startsWith("c-"));

      // the same client_id twice is stored once
      const again = await alice.messages.send(room, `hello @${B}`, { clientId: live.client_id! });
      assert.equal(again.duplicate, true);
      assert.equal(again.offset, sent.offset);

      // reply, edit, delete
      const rep = await bob.messages.reply(room, sent.offset, "a reply");
      const edited = await bob.messages.edit(room, rep.offset, "an edited reply");
      assert.ok(edited.offset > rep.offset);
      await assert.rejects(alice.messages.edit(room, rep.offset, "not mine"), (e: unknown) => e instanceof ChorusError && e.code === 3006);
      const extra = await bob.messages.send(room, "to be deleted");
      const del = await bob.messages.delete(room, extra.offset);
      await waitFor(() => aliceSeen.some((e) => e.offset === del.offset), "alice sees the delete");
      const kinds = aliceSeen.filter((e) => e.kind !== "joined").map((e) => e.kind);
      assert.deepEqual(kinds, ["message", "message", "edit", "message", "delete"]);
      const offsets = aliceSeen.map((e) => e.offset);
      assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), "in order");
      assert.equal(new Set(offsets).size, offsets.length, "no duplicate");
      assert.equal(aliceSeen.find((e) => e.offset === rep.offset)?.reply_to, sent.offset);

      // history: newest page, before, after
      const page = await alice.messages.history(room, { limit: 2 });
      assert.equal(page.entries.length, 2);
      assert.equal(page.more, true);
      assert.equal(page.head.offset, del.offset);
      const older = await alice.messages.history(room, { before: page.entries[0]!.offset, limit: 100 });
      assert.ok(older.entries.every((e) => e.offset < page.entries[0]!.offset));
      const newer = await alice.history(`room:${room}`, { after: sent.offset });
      assert.equal(newer.entries[0]!.offset, sent.offset + 1);
      const storedReply = newer.entries.find((e) => e.offset === rep.offset)!;
      assert.equal(storedReply.text, "an edited reply");
      assert.ok(storedReply.edited_at);

      // typing: an ephemeral push to the other member
      const typing = nextEvent<[{ room: string; users: string[] }]>((f) => alice.on("typing", f), "typing", (t) => t.users.includes(B));
      bob.messages.typing(room);
      assert.equal((await typing)[0].room, room);
      bob.messages.stopTyping(room);

      // rooms.list and room.read (receipt push), unread counts
      const before = (await bob.rooms.list()).find((s) => s.room.id === room)!;
      assert.equal(before.head.offset, del.offset);
      const receipt = nextEvent<[{ room: string; user: string; offset: number }]>((f) => alice.on("receipt", f), "receipt", (r) => r.user === B);
      const read = await bob.messages.read(room, del.offset);
      assert.equal(read.unread, 0);
      assert.equal((await receipt)[0].offset, del.offset);
      const aliceRooms = await alice.rooms.list();
      const mine = aliceRooms.find((s) => s.room.id === room)!;
      assert.equal(typeof mine.unread, "number");

      // direct rooms
      const dm = await alice.rooms.direct(B);
      assert.equal(dm.kind, "direct");
      assert.equal((await bob.rooms.direct(A)).id, dm.id);

      // notifications: list, unread, mark read, prefs, live pushes
      const push = nextEvent<[NotificationsPush]>((f) => alice.on("notifications", f), "notification push");
      await node.api("POST", "/notifications", { user: A, type: "like", title: "Bob liked your post", category: "social" });
      const [np] = await push;
      assert.equal(np.items[0]!.title, "Bob liked your post");
      const list = await alice.notifications.list({ limit: 10 });
      assert.ok(list.items.length >= 1);
      assert.equal(await alice.notifications.unread(), list.unread);
      const readPush = nextEvent<[{ ids: number[]; unread: number }]>((f) => alice.on("notifications.read", f), "read push");
      const marked = await alice.notifications.markRead([list.items[0]!.id]);
      assert.deepEqual(marked.ids, [list.items[0]!.id]);
      await readPush;
      const unreadOnly = await alice.notifications.list({ unreadOnly: true });
      assert.ok(unreadOnly.items.every((n) => !n.read));
      const all = await alice.notifications.markAllRead();
      assert.equal(all.unread, 0);
      const prefs = await alice.notifications.setPrefs({ muted_categories: ["social"], muted_rooms: [room] });
      assert.deepEqual(prefs.muted_categories, ["social"]);
      assert.deepEqual(await alice.notifications.getPrefs(), prefs);

      // presence: set, watch (and push), query, unwatch
      const watched = await bob.presence.watch({ users: [A] });
      assert.equal(watched[0]!.user, A);
      assert.equal(watched[0]!.status, "online");
      const change = nextEvent<[Presence]>((f) => bob.on("presence", f), "presence push", (p) => p.user === A && p.activity === "In a meeting");
      const me = await alice.presence.set({ activity: "In a meeting" });
      assert.equal(me.activity, "In a meeting");
      await change;
      const q = await bob.presence.query([A, "nobody-at-all"]);
      assert.equal(q.find((p) => p.user === A)?.activity, "In a meeting");
      assert.equal(q.find((p) => p.user === "nobody-at-all")?.status, "offline");
      await bob.presence.watch({ room });
      await bob.presence.unwatch({ room });
      assert.deepEqual(await bob.presence.unwatch({ users: [A] }), { watching: 0 });

      // topics: subscribe, publish (publish claim), history; forbidden without the claim
      const topic = `post:${sfx}`;
      const got: Entry[] = [];
      await bob.topics.subscribe(topic, { onEntry: (e) => got.push(e) });
      const pub = await alice.topics.publish(topic, { likes: 3 });
      await waitFor(() => got.length === 1, "topic entry");
      assert.equal(got[0]!.kind, "publish");
      assert.deepEqual(got[0]!.data, { likes: 3 });
      assert.equal(got[0]!.offset, pub.offset);
      await assert.rejects(bob.topics.publish(topic, 1), (e: unknown) => e instanceof ChorusError && e.name === "forbidden");
      const th = await bob.topics.history(topic);
      assert.equal(th.entries.length, 1);

      // feeds: the server API publishes, the user subscribes to their own feed
      const feed: Entry[] = [];
      await alice.topics.subscribeFeed({ onEntry: (e) => feed.push(e) });
      await node.api("POST", "/feeds", { users: [A], data: { story: 1 } });
      await waitFor(() => feed.length === 1, "feed entry");
      assert.deepEqual(feed[0]!.data, { story: 1 });
      assert.equal((await alice.topics.feedHistory()).entries.length, 1);
      await assert.rejects(bob.subscribe(`feed:${A}`), (e: unknown) => e instanceof ChorusError && e.code === 3001);

      // unsubscribe: no more entries
      const sub = bob.subscription(`topic:${topic}`)!;
      await sub.unsubscribe();
      assert.equal(sub.state, "ended");
      await assert.rejects(bob.request("unsubscribe", { channel: `topic:${topic}` }), (e: unknown) => e instanceof ChorusError && e.code === 3009);

      // room.kick (owner only) ends the kicked user's subscription; room.leave
      await assert.rejects(bob.rooms.kick(room, A), (e: unknown) => e instanceof ChorusError && e.code === 3001);
      const ended = nextEvent<[ChorusError | undefined]>((f) => bSub.on("ended", f), "bob's subscription ends");
      assert.deepEqual(await alice.rooms.kick(room, B), { removed: B });
      const [why] = await ended;
      assert.equal(why?.name, "not_member");
      assert.equal(bob.subscription(`room:${room}`), undefined);
      const pub2 = `lobby-${sfx}`;
      await alice.rooms.create({ room: pub2, kind: "public" });
      await bob.rooms.join(pub2);
      assert.deepEqual(await bob.rooms.leave(pub2), { left: true });
      assert.equal(bob.subscription(`room:${pub2}`), undefined);

      // a request error keeps the connection; unknown ops are typed too
      await assert.rejects(alice.request("nope" as any, {} as never), (e: unknown) => e instanceof ChorusError && e.name === "unknown_op");
      await assert.rejects(alice.messages.send("no-such-room", "x"), (e: unknown) => e instanceof ChorusError && e.code === 3002 && !!e.clientId);
      assert.equal(alice.state, "connected");
    } finally {
      alice.close();
      bob.close();
    }
    assert.equal(alice.state, "closed");
  });
}
