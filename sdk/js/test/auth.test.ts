// Tokens against a real node: refresh before exp, 4001, refused handshakes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { ChorusClient, ChorusError, type DisconnectInfo, type Entry } from "../src/index.js";
import { ChorusNode, nextEvent, waitFor } from "./node.js";

let node: ChorusNode;
before(async () => {
  node = await ChorusNode.start();
});
after(async () => {
  await node?.destroy();
});

const quick = { initialDelayMs: 20, maxDelayMs: 200 };

test("getToken: the token is refreshed with auth.refresh before exp, without reconnecting", async () => {
  let calls = 0;
  const c = new ChorusClient({
    url: node.url,
    getToken: () => {
      calls++;
      return node.token("carol", { ttl: "3s" });
    },
    WebSocket,
    reconnect: quick,
  });
  const disconnects: DisconnectInfo[] = [];
  c.on("disconnected", (d) => disconnects.push(d));
  const refreshed: number[] = [];
  c.on("token", (t) => refreshed.push(t.expiresAt));
  try {
    await c.connect();
    const firstExp = Date.now() + 3000;
    await waitFor(() => refreshed.length >= 2 && Date.now() > firstExp + 1000, "two refreshes, past the first token's exp", 10000);
    await c.ping();
    assert.deepEqual(disconnects, [], "never disconnected");
    assert.ok(calls >= 3);
    assert.ok(refreshed[1]! > refreshed[0]!);
  } finally {
    c.close();
  }
});

test("close 4001 (refresh failed): a new token first, then the reconnect resumes the subscription", async () => {
  let blocked = false;
  const c = new ChorusClient({
    url: node.url,
    getToken: () => {
      if (blocked) throw new Error("token service down");
      return node.token("dave", { ttl: "2s" });
    },
    WebSocket,
    reconnect: quick,
  });
  const errors: ChorusError[] = [];
  c.on("error", (e) => errors.push(e));
  const other = new ChorusClient({ url: node.url, token: node.token("erin"), WebSocket });
  try {
    await Promise.all([c.connect(), other.connect()]);
    await other.rooms.create({ room: "auth-room", kind: "public" });
    await other.rooms.join("auth-room");
    const seen: Entry[] = [];
    const sub = await c.rooms.join("auth-room");
    sub.on("entry", (e) => seen.push(e));
    blocked = true; // the refresh before exp fails: the node closes with 4001
    const [d] = await nextEvent<[DisconnectInfo]>((f) => c.on("disconnected", f), "4001", (d) => d.code === 4001, 6000);
    assert.equal(d.delayMs, 0);
    const m1 = await other.messages.send("auth-room", "while away");
    blocked = false;
    await waitFor(() => c.state === "connected", "reconnected with a new token", 5000);
    const m2 = await other.messages.send("auth-room", "back");
    await waitFor(() => sub.offset === m2.offset, "caught up");
    assert.deepEqual(seen.filter((e) => e.kind === "message").map((e) => e.offset), [m1.offset, m2.offset]);
    assert.ok(errors.some((e) => e.name === "token_unavailable"));
  } finally {
    c.close();
    other.close();
  }
});

test("a static token that expires: close 4001 ends the client with token_expired", async () => {
  // 2 s: `exp` is in whole seconds, so a 1 s token minted just before a
  // second ticks over can be expired before the client connects.
  const c = new ChorusClient({ url: node.url, token: node.token("frank", { ttl: "2s" }), WebSocket, reconnect: quick });
  await c.connect();
  const [err] = await nextEvent<[ChorusError | undefined]>((f) => c.on("closed", f), "closed", () => true, 8000);
  assert.equal(c.state, "closed");
  assert.equal(err?.code, 2004);
  assert.equal(err?.name, "token_expired");
});

test("an expired static token is refused before connecting; a bad one on the handshake (HTTP 401)", async () => {
  const expired = new ChorusClient({ url: node.url, token: node.token("gina", { ttl: "1s" }), WebSocket });
  await new Promise((r) => setTimeout(r, 1100));
  await assert.rejects(expired.connect(), (e: unknown) => e instanceof ChorusError && e.code === 2004);
  assert.equal(expired.state, "closed");

  const t = node.token("gina");
  const forged = t.slice(0, -4) + (t.endsWith("AAAA") ? "BBBB" : "AAAA");
  const bad = new ChorusClient({ url: node.url, token: forged, WebSocket });
  await assert.rejects(bad.connect(), (e: unknown) => e instanceof ChorusError && e.name === "handshake_refused" && !e.retryable);
});
