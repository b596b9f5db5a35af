// Client logic against a scripted fake WebSocket: close codes, backoff, ordering.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChorusClient, ChorusError, type DisconnectInfo, type Entry, type WebSocketLike } from "../src/index.js";

/** A fake socket; the test plays the server through `FakeWS.last`. */
class FakeWS implements WebSocketLike {
  static sockets: FakeWS[] = [];
  static refuse = false;
  static get last(): FakeWS {
    return FakeWS.sockets[FakeWS.sockets.length - 1]!;
  }
  readyState = 0;
  protocol = "";
  binaryType: any = "blob";
  sent: any[] = [];
  onopen: ((ev: any) => void) | null = null;
  onclose: ((ev: any) => void) | null = null;
  onmessage: ((ev: any) => void) | null = null;
  onerror: ((ev: any) => void) | null = null;
  constructor(
    readonly url: string,
    readonly protocols?: string | string[],
  ) {
    FakeWS.sockets.push(this);
    setTimeout(() => {
      if (FakeWS.refuse) {
        this.onerror?.({ message: "connect ECONNREFUSED" });
        this.onclose?.({ code: 1006, reason: "" });
      } else {
        this.readyState = 1;
        this.protocol = "chorus.v1.json";
        this.onopen?.({});
      }
    }, 1);
  }
  send(data: any): void {
    this.sent.push(JSON.parse(data));
  }
  close(): void {
    this.readyState = 3;
  }
  // server side
  serverClose(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  push(frame: unknown): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  reply(id: number, ok: unknown): void {
    this.push({ id, ok });
  }
  request(op: string): any {
    return this.sent.find((f) => f.op === op);
  }
}

// A token with a far `exp` (the signature is never checked client-side).
const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
const TOKEN = `${b64({ alg: "HS256" })}.${b64({ sub: "alice", exp: Math.floor(Date.now() / 1000) + 3600 })}.sig`;

function waitFor(cond: () => unknown, what: string, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  return new Promise((res, rej) => {
    const tick = () => {
      if (cond()) return res();
      if (Date.now() > end) return rej(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 2);
    };
    tick();
  });
}

function fresh(opts: object = {}): { c: ChorusClient; disc: DisconnectInfo[] } {
  FakeWS.sockets = [];
  FakeWS.refuse = false;
  const c = new ChorusClient({ url: ["ws://a/ws", "ws://b/ws"], token: TOKEN, WebSocket: FakeWS, ...opts });
  const disc: DisconnectInfo[] = [];
  c.on("disconnected", (d) => disc.push(d));
  return { c, disc };
}

test("the token goes in the URL and the subprotocol is offered", async () => {
  const { c } = fresh();
  await c.connect();
  assert.equal(new URL(FakeWS.last.url).searchParams.get("token"), TOKEN);
  assert.deepEqual(FakeWS.last.protocols, ["chorus.v1.json"]);
  assert.equal(c.user, "alice");
  c.close();
});

test("backoff: exponential with full jitter, bounded; failed handshakes rotate URLs", async () => {
  const { c, disc } = fresh({ reconnect: { initialDelayMs: 10, maxDelayMs: 40, factor: 2 } });
  await c.connect();
  FakeWS.refuse = true;
  FakeWS.last.serverClose(1006);
  await waitFor(() => disc.length >= 6, "six failed attempts");
  const delays = disc.map((d) => d.delayMs);
  const caps = [10, 20, 40, 40, 40, 40];
  delays.slice(0, 6).forEach((d, i) => assert.ok(d >= 0 && d <= caps[i]!, `attempt ${i}: ${d} <= ${caps[i]}`));
  // failed handshakes move on to the next URL
  const hosts = FakeWS.sockets.map((s) => new URL(s.url).host);
  assert.ok(hosts.includes("a") && hosts.includes("b"));
  c.close();
});

test("close 4003 backs off at least rateLimitedDelayMs; 1001 reconnects at once to the next URL", async () => {
  const { c, disc } = fresh({ reconnect: { initialDelayMs: 10, maxDelayMs: 40, rateLimitedDelayMs: 5000 } });
  await c.connect();
  assert.equal(new URL(FakeWS.last.url).host, "a");
  FakeWS.last.serverClose(1001, "shutting down");
  assert.equal(disc[0]!.delayMs, 0);
  await waitFor(() => c.state === "connected", "reconnected");
  assert.equal(new URL(FakeWS.last.url).host, "b");
  FakeWS.last.serverClose(4003, "rate limit");
  assert.ok(disc[1]!.delayMs >= 5000, `4003 delay ${disc[1]!.delayMs}`);
  c.close();
});

test("browsers: the online event reconnects at once instead of waiting for the backoff", async () => {
  const win = new EventTarget();
  (globalThis as any).window = win;
  try {
    const { c, disc } = fresh({ reconnect: { initialDelayMs: 60000, maxDelayMs: 60000 } });
    await c.connect();
    FakeWS.refuse = true;
    FakeWS.last.serverClose(1006);
    await waitFor(() => disc.length === 1, "disconnected");
    FakeWS.refuse = false;
    const before = FakeWS.sockets.length;
    win.dispatchEvent(new Event("online"));
    await waitFor(() => c.state === "connected", "reconnected on online");
    assert.equal(FakeWS.sockets.length, before + 1);
    c.close();
  } finally {
    delete (globalThis as any).window;
  }
});

test("maxAttempts: the client gives up with reconnect_failed", async () => {
  const { c } = fresh({ reconnect: { initialDelayMs: 1, maxDelayMs: 2, maxAttempts: 3 } });
  await c.connect();
  FakeWS.refuse = true;
  const closed = new Promise<ChorusError | undefined>((r) => c.on("closed", r));
  FakeWS.last.serverClose(1006);
  const err = await closed;
  assert.equal(err?.name, "reconnect_failed");
  assert.equal(c.state, "closed");
});

test("states and events: connecting, connected, disconnected, closed", async () => {
  const { c } = fresh({ reconnect: { initialDelayMs: 1, maxDelayMs: 2 } });
  const states: string[] = [];
  c.on("state", (s) => states.push(s));
  await c.connect();
  FakeWS.last.serverClose(4002, "slow consumer");
  await waitFor(() => states.filter((s) => s === "connected").length === 2, "reconnected");
  c.close();
  assert.deepEqual(states, ["connecting", "connected", "disconnected", "connecting", "connected", "closed"]);
});

test("live entries that arrive before the subscribe reply wait: missed first, never twice", async () => {
  const { c } = fresh();
  await c.connect();
  const seen: number[] = [];
  const p = c.subscribe("room:r", { offset: 3, epoch: "e1", onEntry: (e) => seen.push(e.offset) });
  await waitFor(() => FakeWS.last.request("subscribe"), "subscribe sent");
  const req = FakeWS.last.request("subscribe");
  assert.deepEqual(req.args, { channel: "room:r", offset: 3, epoch: "e1" });
  const entry = (offset: number): Entry => ({ offset, kind: "message", msg_seq: offset, ts: 0, text: `t${offset}` });
  // a live push overtakes the reply (and repeats one of the missed)
  FakeWS.last.push({ push: "entry", channel: "room:r", epoch: "e1", offset: 6, data: entry(6) });
  FakeWS.last.push({ push: "entry", channel: "room:r", epoch: "e1", offset: 5, data: entry(5) });
  FakeWS.last.reply(req.id, { channel: "room:r", epoch: "e1", offset: 5, recovered: true, missed: [entry(4), entry(5)] });
  const sub = await p;
  assert.deepEqual(seen, [4, 5, 6]);
  FakeWS.last.push({ push: "entry", channel: "room:r", epoch: "e1", offset: 6, data: entry(6) });
  assert.deepEqual(seen, [4, 5, 6]);
  // a gap in live entries is filled from history before going on
  FakeWS.last.push({ push: "entry", channel: "room:r", epoch: "e1", offset: 9, data: entry(9) });
  await waitFor(() => FakeWS.last.request("history"), "history asked");
  const h = FakeWS.last.request("history");
  assert.deepEqual(h.args, { channel: "room:r", after: 6, limit: 999 });
  FakeWS.last.push({ push: "entry", channel: "room:r", epoch: "e1", offset: 10, data: entry(10) });
  FakeWS.last.reply(h.id, { channel: "room:r", head: { epoch: "e1", offset: 10, msg_seq: 10 }, entries: [entry(7), entry(8), entry(9), entry(10)], more: false });
  await waitFor(() => seen.length === 7, "gap filled");
  assert.deepEqual(seen, [4, 5, 6, 7, 8, 9, 10]);
  assert.equal(sub.offset, 10);
  // after a reconnect it resubscribes from the last delivered offset and epoch
  FakeWS.last.serverClose(1006);
  await waitFor(() => c.state === "connected" && FakeWS.last.request("subscribe"), "resubscribed");
  assert.deepEqual(FakeWS.last.request("subscribe").args, { channel: "room:r", offset: 10, epoch: "e1" });
  c.close();
});

test("a resubscribe push: the client subscribes again from its last offset and epoch", async () => {
  const { c } = fresh();
  await c.connect();
  const seen: number[] = [];
  const p = c.subscribe("room:r", { onEntry: (e) => seen.push(e.offset) });
  await waitFor(() => FakeWS.last.request("subscribe"), "subscribe sent");
  const first = FakeWS.last.request("subscribe");
  FakeWS.last.reply(first.id, { channel: "room:r", epoch: "e1", offset: 2, recovered: true, missed: [] });
  await p;
  const entry = (offset: number): Entry => ({ offset, kind: "message", msg_seq: offset, ts: 0, text: `t${offset}` });
  FakeWS.last.push({ push: "entry", channel: "room:r", epoch: "e1", offset: 3, data: entry(3) });
  FakeWS.last.push({ push: "resubscribe", channel: "room:r", ephemeral: true, data: { reason: "too_far_behind" } });
  await waitFor(() => FakeWS.last.sent.filter((f) => f.op === "subscribe").length === 2, "subscribed again");
  const again = FakeWS.last.sent.filter((f) => f.op === "subscribe")[1];
  assert.deepEqual(again.args, { channel: "room:r", offset: 3, epoch: "e1" });
  FakeWS.last.reply(again.id, { channel: "room:r", epoch: "e1", offset: 5, recovered: true, missed: [entry(4), entry(5)] });
  await waitFor(() => seen.length === 3, "missed entries delivered");
  assert.deepEqual(seen, [3, 4, 5]);
  c.close();
});

test("typing repeats while keystrokes continue and stops by itself", async () => {
  const { c } = fresh({ typingIntervalMs: 30 });
  await c.connect();
  const count = () => FakeWS.last.sent.filter((f) => f.op === "room.typing").length;
  c.messages.typing("r");
  c.messages.typing("r");
  assert.equal(count(), 1, "throttled");
  const keys = setInterval(() => c.messages.typing("r"), 5);
  await new Promise((r) => setTimeout(r, 100));
  clearInterval(keys);
  const whileTyping = count();
  assert.ok(whileTyping >= 3, `repeated: ${whileTyping}`);
  await new Promise((r) => setTimeout(r, 100));
  assert.ok(count() <= whileTyping + 1, "stopped after the keystrokes stopped");
  c.close();
});

test("errors carry code, name and retryable", () => {
  const e = new ChorusError({ code: 3003, name: "not_member", message: "join first", retryable: false }, { op: "room.send" });
  assert.equal(e.code, 3003);
  assert.equal(e.name, "not_member");
  assert.equal(e.retryable, false);
  assert.equal(e.op, "room.send");
  assert.ok(e instanceof Error);
  assert.equal(new ChorusError({ code: 5002, message: "x" }).name, "store_unavailable");
  assert.equal(new ChorusError({ code: 5002, message: "x" }).retryable, true);
  assert.equal(ChorusError.client("timeout", "t").code, 9001);
});
