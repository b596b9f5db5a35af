// Reconnects against a real node: restarts, network drops, catch-up, the offline queue.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { ChorusClient, ChorusError, type ChorusClientOptions, type DisconnectInfo, type Entry, type UnrecoveredInfo } from "../src/index.js";
import { ChorusNode, nextEvent, waitFor } from "./node.js";
import { Proxy } from "./proxy.js";

let node: ChorusNode;
let proxy: Proxy;
const clients: ChorusClient[] = [];

before(async () => {
  node = await ChorusNode.start({ config: "[limits]\nmax_catchup = 20" });
  proxy = await Proxy.start(() => node.port);
});
after(async () => {
  for (const c of clients) c.close();
  await proxy?.close();
  await node?.destroy();
});

function client(user: string, opts: Partial<ChorusClientOptions> = {}): ChorusClient {
  const c = new ChorusClient({
    url: node.url,
    getToken: () => node.token(user),
    WebSocket,
    reconnect: { initialDelayMs: 20, maxDelayMs: 300 },
    ...opts,
  });
  clients.push(c);
  return c;
}

async function publicRoom(owner: ChorusClient, room: string): Promise<void> {
  await owner.rooms.create({ room, kind: "public" });
}

/** Every stored message of a room, oldest first. */
async function allMessages(c: ChorusClient, room: string): Promise<Entry[]> {
  const out: Entry[] = [];
  let after = 0;
  for (;;) {
    const page = await c.history(`room:${room}`, { after, limit: 200 });
    out.push(...page.entries);
    if (!page.more || page.entries.length === 0) break;
    after = page.entries[page.entries.length - 1]!.offset;
  }
  return out.filter((e) => e.kind === "message");
}

function assertContiguous(seen: Entry[], from: number, to: number, what: string): void {
  const offsets = seen.map((e) => e.offset);
  const want = Array.from({ length: to - from + 1 }, (_, i) => from + i);
  assert.deepEqual(offsets, want, `${what}: every offset once, in order`);
}

test("node restart: the subscription resumes with no gap and no duplicate; sends during the restart are stored once", async () => {
  const room = "restart";
  const alice = client("alice");
  const bob = client("bob");
  const disconnects: DisconnectInfo[] = [];
  alice.on("disconnected", (d) => disconnects.push(d));
  await Promise.all([alice.connect(), bob.connect()]);
  await publicRoom(alice, room);
  const seen: Entry[] = [];
  const unrecovered: UnrecoveredInfo[] = [];
  const sub = await alice.rooms.join(room, { onEntry: (e) => seen.push(e), onUnrecovered: (u) => unrecovered.push(u) });
  await bob.rooms.join(room);
  const start = sub.offset!;

  // Bob sends a steady stream; the node restarts (SIGTERM: close 1001) in the middle of it.
  const N = 60;
  const sends: Promise<unknown>[] = [];
  let restarted: Promise<void> | undefined;
  for (let i = 0; i < N; i++) {
    sends.push(bob.messages.send(room, `m${i}`));
    if (i === 20) restarted = node.restart();
    await new Promise((r) => setTimeout(r, 5));
  }
  await restarted;
  const results = (await Promise.all(sends)) as { offset: number; duplicate: boolean }[];
  const last = Math.max(...results.map((r) => r.offset));
  await waitFor(() => (sub.offset ?? 0) >= last, "alice has every entry", 10000);

  assert.ok(disconnects.some((d) => d.code === 1001 && d.delayMs === 0), `a 1001 close reconnects at once: ${JSON.stringify(disconnects)}`);
  assert.deepEqual(unrecovered, []);
  // Alice: every entry after her join, once, in order (bob's joined entry and his messages).
  assertContiguous(seen.filter((e) => e.offset > start), start + 1, last, "alice");
  // The store: each message once, in the order it was sent.
  const stored = await allMessages(alice, room);
  assert.deepEqual(stored.map((e) => e.text), Array.from({ length: N }, (_, i) => `m${i}`));
  assert.equal(new Set(stored.map((e) => e.client_id)).size, N);
});

test("network drop: missed entries come first, in order, then live ones", async () => {
  const room = "drop";
  const alice = client("alice", { url: proxy.url });
  const bob = client("bob");
  await Promise.all([alice.connect(), bob.connect()]);
  await publicRoom(bob, room);
  await bob.rooms.join(room);
  const seen: Entry[] = [];
  const sub = await alice.rooms.join(room);
  const start = sub.offset!;
  sub.on("entry", (e) => seen.push(e));
  await bob.messages.send(room, "before");
  await waitFor(() => seen.some((e) => e.text === "before"), "live entry");

  const down = nextEvent<[DisconnectInfo]>((f) => alice.on("disconnected", f), "alice disconnected");
  proxy.cut();
  await down;
  for (let i = 0; i < 5; i++) await bob.messages.send(room, `missed ${i}`);
  proxy.restore();
  await waitFor(() => alice.state === "connected", "alice reconnected", 5000);
  const live = await bob.messages.send(room, "after");
  await waitFor(() => sub.offset === live.offset, "alice caught up");
  assertContiguous(seen, start + 1, live.offset, "alice");
  assert.deepEqual(seen.filter((e) => e.kind === "message").map((e) => e.text), ["before", "missed 0", "missed 1", "missed 2", "missed 3", "missed 4", "after"]);
});

test("too far behind: the SDK pages the gap with history, no entry lost or repeated", async () => {
  const room = "far";
  const alice = client("alice", { url: proxy.url });
  const bob = client("bob");
  await Promise.all([alice.connect(), bob.connect()]);
  await publicRoom(bob, room);
  await bob.rooms.join(room);
  const seen: Entry[] = [];
  const unrecovered: UnrecoveredInfo[] = [];
  const sub = await alice.rooms.join(room, { onUnrecovered: (u) => unrecovered.push(u) });
  const start = sub.offset!; // entries may have arrived since the reply: read it with the listener added
  sub.on("entry", (e) => seen.push(e));
  const down = nextEvent<[DisconnectInfo]>((f) => alice.on("disconnected", f), "alice disconnected");
  proxy.cut();
  await down;
  for (let i = 0; i < 45; i++) await bob.messages.send(room, `m${i}`); // more than max_catchup = 20
  proxy.restore();
  const reply = await nextEvent<[any]>((f) => sub.on("subscribed", f), "resubscribed");
  assert.equal(reply[0].recovered, false);
  assert.match(reply[0].reason, /^too_far_behind/);
  const live = await bob.messages.send(room, "live");
  await waitFor(() => sub.offset === live.offset, "alice caught up", 5000);
  assertContiguous(seen, start + 1, live.offset, "alice");
  assert.deepEqual(unrecovered, []);
});

test("recovered: false surfaces with its reason (epoch_changed, offset_ahead)", async () => {
  const room = "epochs";
  const alice = client("alice");
  await alice.connect();
  await publicRoom(alice, room);
  const joined = await alice.rooms.join(room);
  await alice.messages.send(room, "x");
  await joined.unsubscribe();

  const events: UnrecoveredInfo[] = [];
  const s1 = await alice.subscribe(`room:${room}`, { offset: 1, epoch: "0000000000000000", onUnrecovered: (u) => events.push(u) });
  assert.equal(events.length, 1);
  assert.equal(events[0]!.reason, "epoch_changed");
  assert.equal(events[0]!.previousEpoch, "0000000000000000");
  assert.equal(events[0]!.epoch, s1.epoch);
  await s1.unsubscribe();

  const s2 = await alice.subscribe(`room:${room}`, { offset: 999, epoch: s1.epoch!, onUnrecovered: (u) => events.push(u) });
  assert.equal(events[1]!.reason, "offset_ahead");
  // Live entries still follow, after the head.
  const got: Entry[] = [];
  s2.on("entry", (e) => got.push(e));
  const m = await alice.messages.send(room, "live");
  await waitFor(() => got.length === 1, "live entry after recovered: false");
  assert.equal(got[0]!.offset, m.offset);
});

test("offline queue: sends while disconnected go out once after the reconnect, in order", async () => {
  const room = "queue";
  const bob = client("bob", { url: proxy.url });
  await bob.connect();
  await publicRoom(bob, room);
  await bob.rooms.join(room);
  const down = nextEvent<[DisconnectInfo]>((f) => bob.on("disconnected", f), "bob disconnected");
  proxy.cut();
  await down;
  const sends = [0, 1, 2, 3, 4].map((i) => bob.messages.send(room, `offline ${i}`));
  assert.equal(bob.queued, 5);
  assert.equal(bob.state === "disconnected" || bob.state === "connecting", true);
  proxy.restore();
  const res = await Promise.all(sends);
  assert.ok(res.every((r) => r.duplicate === false));
  const stored = await allMessages(bob, room);
  assert.deepEqual(stored.map((e) => e.text), ["offline 0", "offline 1", "offline 2", "offline 3", "offline 4"]);
  assert.deepEqual(res.map((r) => r.offset), stored.map((e) => e.offset));
});

test("offline queue: a send whose reply was lost is resent with its client_id and stored once", async () => {
  const room = "lost-reply";
  const bob = client("bob", { url: proxy.url });
  await bob.connect();
  await publicRoom(bob, room);
  await bob.rooms.join(room);
  proxy.dropReplies = true; // the request reaches the node, its reply never comes back
  const send = bob.messages.send(room, "once");
  await waitFor(async () => (await node.api("GET", `/rooms/${room}/messages`)).entries.some((e: Entry) => e.text === "once"), "stored");
  proxy.cut();
  proxy.restore();
  const res = await send;
  assert.equal(res.duplicate, true, "the retry found the stored message");
  const stored = await allMessages(bob, room);
  assert.deepEqual(stored.map((e) => e.text), ["once"]);
  assert.equal(stored[0]!.offset, res.offset);
});

test("offline queue: bounded, and a send that outlives its timeout rejects clearly", async () => {
  const bob = client("bob", { url: proxy.url, queue: { max: 2, timeoutMs: 300 } });
  await bob.connect();
  const down = nextEvent<[DisconnectInfo]>((f) => bob.on("disconnected", f), "bob disconnected");
  proxy.cut();
  await down;
  const a = bob.messages.send("anywhere", "1", { clientId: "c-keep-1" });
  const b = bob.messages.send("anywhere", "2");
  await assert.rejects(bob.messages.send("anywhere", "3"), (e: unknown) => e instanceof ChorusError && e.name === "queue_full" && e.code === 9002);
  await assert.rejects(a, (e: unknown) => {
    assert.ok(e instanceof ChorusError);
    assert.equal(e.name, "timeout");
    assert.equal(e.retryable, true);
    assert.equal(e.clientId, "c-keep-1");
    assert.match(e.message, /room\.send: no reply within 300 ms .*waiting for a connection.*c-keep-1/);
    return true;
  });
  await assert.rejects(b, (e: unknown) => e instanceof ChorusError && e.name === "timeout");
  assert.equal(bob.queued, 0);
  proxy.restore();
  bob.close();
  await assert.rejects(bob.ping(), (e: unknown) => e instanceof ChorusError && e.name === "closed");
});

test("close 1001 with several URLs: the client moves to the next node at once", async () => {
  const other = await ChorusNode.start();
  try {
    const draining = await ChorusNode.start();
    const alice = client("alice", { url: [draining.url, other.url] });
    await alice.connect();
    const moved = nextEvent<[{ url: string }]>((f) => alice.on("connected", f), "reconnected");
    const disc = nextEvent<[DisconnectInfo]>((f) => alice.on("disconnected", f), "disconnected");
    const t0 = Date.now();
    await draining.destroy();
    const [d] = await disc;
    assert.equal(d.code, 1001);
    assert.equal(d.delayMs, 0);
    const [c] = await moved;
    assert.equal(c.url, other.url);
    assert.ok(Date.now() - t0 < 5000);
    await alice.ping();
  } finally {
    await other.destroy();
  }
});
