// Stock Yjs clients against real Chorus nodes: two y-websocket
// WebsocketProviders converge on a Y.Text and a Y.Map through /doc/<name>,
// see each other's awareness, and a provider that connects later gets the
// whole state; then the same with the providers on two nodes of a cluster
// (shared CQL store: CHORUS_CQL=host:port, skipped without it unless
// CHORUS_REQUIRE_CQL=1). Nothing here is Chorus code: yjs, y-websocket and
// ws from npm, as an app would use them.
//
//   CHORUS_BIN=target/debug/chorus node --test tests/yjs/interop.test.mjs
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
const WAIT_MS = 15000;
const SECRET = "yjs-interop-jwt-secret-0123";
const API_KEY = "yjs-interop-api-key";

function chorusBin() {
  if (process.env.CHORUS_BIN) return process.env.CHORUS_BIN;
  const p = resolve(here, "../../target/debug/chorus");
  if (existsSync(p)) return p;
  throw new Error("chorus binary not found: cargo build -p chorus-node, or set CHORUS_BIN");
}

function cleanEnv() {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("CHORUS_")) env[k] = v;
  env.CHORUS_LOG_LEVEL = "warn";
  return env;
}

const cleanups = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** A `chorus start` process on port 0; resolves once it printed "listening on". */
async function startNode(configPath, dataDir, args = []) {
  const proc = spawn(
    chorusBin(),
    ["start", "--config", configPath, "--listen", "127.0.0.1:0", "--data-dir", dataDir, ...args],
    { env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] },
  );
  let stderr = "";
  proc.stderr.on("data", (d) => (stderr = (stderr + d).slice(-8000)));
  const port = await new Promise((res, rej) => {
    let out = "";
    const timer = setTimeout(() => rej(new Error(`no address within 20 s: ${stderr}`)), 20000);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /listening on ([\d.]+):(\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        res(Number(m[2]));
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      rej(new Error(`chorus exited with ${code}: ${stderr}`));
    });
  });
  const node = {
    port,
    proc,
    async stop() {
      if (proc.exitCode !== null) return;
      await new Promise((res) => {
        const t = setTimeout(() => proc.kill("SIGKILL"), 10000);
        proc.once("exit", () => {
          clearTimeout(t);
          res();
        });
        proc.kill("SIGTERM");
      });
    },
  };
  cleanups.push(() => node.stop());
  return node;
}

function token(configPath, user, claims) {
  const args = ["token", "--user", user, "--config", configPath];
  if (claims) args.push("--claims", JSON.stringify(claims));
  return execFileSync(chorusBin(), args, { encoding: "utf8", env: cleanEnv() }).trim();
}

async function api(node, method, path) {
  const r = await fetch(`http://127.0.0.1:${node.port}${path}`, { method, headers: { "x-api-key": API_KEY } });
  return { status: r.status, body: await r.json().catch(() => null) };
}

async function eventually(what, f) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A stock provider, as an app would make one (no BroadcastChannel: each is its own "tab"). */
function provider(node, doc, tok) {
  const ydoc = new Y.Doc();
  const p = new WebsocketProvider(`ws://127.0.0.1:${node.port}/doc`, doc, ydoc, {
    params: { token: tok },
    WebSocketPolyfill: WebSocket,
    disableBc: true,
  });
  cleanups.push(async () => {
    p.destroy();
    ydoc.destroy();
  });
  return { ydoc, p, text: ydoc.getText("body"), map: ydoc.getMap("meta") };
}

/** JSON with sorted keys: two replicas may hold a map's keys in different orders. */
const canonical = (o) => JSON.stringify(Object.fromEntries(Object.entries(o).sort(([x], [y]) => (x < y ? -1 : 1))));

const synced = (c) => eventually("sync", () => c.p.synced);

/** The scenario both tests run: `nodes[i % nodes.length]` hosts provider i. */
async function scenario(nodes, configPath, docName) {
  const [na, nb] = [nodes[0], nodes[1 % nodes.length]];
  const a = provider(na, docName, token(configPath, "alice"));
  const b = provider(nb, docName, token(configPath, "bob"));
  await Promise.all([synced(a), synced(b)]);

  // Concurrent edits on both sides converge.
  a.text.insert(0, "hello from a. ");
  b.text.insert(0, "hello from b. ");
  a.map.set("title", "Notes");
  b.map.set("owner", "bob");
  for (let i = 0; i < 20; i++) {
    a.text.insert(a.text.length, `a${i} `);
    b.text.insert(0, `b${i} `);
    b.map.set(`k${i % 4}`, i);
  }
  await eventually("text and map to converge", () =>
    a.text.toString() === b.text.toString() &&
    a.text.toString().includes("a19") && a.text.toString().includes("b19") &&
    a.map.get("owner") === "bob" && b.map.get("title") === "Notes" &&
    canonical(a.map.toJSON()) === canonical(b.map.toJSON()));
  assert.deepEqual(Y.encodeStateVector(a.ydoc), Y.encodeStateVector(b.ydoc));

  // Awareness: each sees the other's state, and it goes when the other leaves.
  a.p.awareness.setLocalStateField("user", { name: "alice", cursor: 3 });
  b.p.awareness.setLocalStateField("user", { name: "bob", cursor: 7 });
  const seenBy = (c, name) => [...c.p.awareness.getStates().values()].some((s) => s.user?.name === name);
  await eventually("awareness both ways", () => seenBy(a, "bob") && seenBy(b, "alice"));

  // A third provider connecting later gets the whole state (and the awareness).
  const c = provider(nodes[nodes.length - 1], docName, token(configPath, "carol"));
  await synced(c);
  await eventually("the late provider to have everything", () =>
    c.text.toString() === a.text.toString() && c.map.get("owner") === "bob" && c.map.get("k3") !== undefined);
  await eventually("the late provider to see awareness", () => seenBy(c, "alice") && seenBy(c, "bob"));

  // The server keeps it: the API reads the same text and map.
  const r = await eventually("the API to read the doc", async () => {
    const r = await api(na, "GET", `/api/v1/docs/${docName}`);
    return r.status === 200 && r.body.json.body === a.text.toString() ? r : null;
  });
  assert.equal(r.body.json.meta.owner, "bob");

  // b leaves: the others see its awareness state removed.
  b.p.destroy();
  await eventually("bob's awareness to be removed", () => !seenBy(a, "bob") && !seenBy(c, "bob"));
}

function baseConfig(extra = "") {
  return `version = 1
[auth]
jwt_secret = "${SECRET}"
api_key = "${API_KEY}"
[shutdown]
timeout_ms = 5000
readiness_grace_ms = 0
[log]
level = "warn"
${extra}
`;
}

test("two stock providers converge on one node; a late one gets the full state", async () => {
  const dir = mkdtempSync(join(tmpdir(), "chorus-yjs-"));
  cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
  const configPath = join(dir, "chorus.toml");
  writeFileSync(configPath, baseConfig());
  const node = await startNode(configPath, join(dir, "data"));
  await scenario([node], configPath, "notes-42");

  // A token whose `docs` claim does not allow the document is refused at
  // the handshake (403); y-websocket keeps retrying, never syncs.
  const refused = await new Promise((res) => {
    const ws = new WebSocket(`ws://127.0.0.1:${node.port}/doc/secret-1?token=${token(configPath, "eve", { docs: ["notes-*"] })}`);
    ws.on("unexpected-response", (_req, resp) => res(resp.statusCode));
    ws.on("open", () => res("open"));
  });
  assert.equal(refused, 403);
});

test("providers on two nodes of a cluster converge", async (t) => {
  const cql = process.env.CHORUS_CQL;
  if (!cql) {
    if (process.env.CHORUS_REQUIRE_CQL === "1") throw new Error("CHORUS_REQUIRE_CQL=1 but CHORUS_CQL is not set");
    t.skip("set CHORUS_CQL=127.0.0.1:9042 (scripts/cassandra.sh start) to run the cluster case");
    return;
  }
  const dir = mkdtempSync(join(tmpdir(), "chorus-yjs-cluster-"));
  cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
  const keyspace = `chorus_yjs_${Date.now()}_${process.pid}`;
  const configPath = join(dir, "chorus.toml");
  writeFileSync(configPath, baseConfig(`
[cluster]
secret = "yjs-interop-cluster-secret-0123"
listen = "127.0.0.1:0"
transport_listen = "127.0.0.1:0"
gossip_interval_ms = 50
max_heartbeat_interval_ms = 500
join_timeout_ms = 10000
[storage]
backend = "scylla"
[storage.scylla]
contact_points = ["${cql}"]
keyspace = "${keyspace}"
request_timeout_ms = 20000
`));
  const n1 = await startNode(configPath, join(dir, "d1"), ["--node-id", "yjs-a"]);
  const seed = (await api(n1, "GET", "/api/v1/cluster")).body.members[0].gossip;
  const n2 = await startNode(configPath, join(dir, "d2"), ["--node-id", "yjs-b", "--seed", seed]);
  for (const n of [n1, n2]) {
    await eventually("both nodes up", async () => {
      const s = (await api(n, "GET", "/api/v1/cluster")).body;
      return s.members.filter((m) => m.state === "up").length === 2;
    });
  }
  // A document each node owns: whichever it is, one provider is remote.
  for (const name of ["shared-1", "shared-2"]) {
    await scenario([n1, n2], configPath, name);
  }
});
