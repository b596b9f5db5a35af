#!/usr/bin/env node
// The demo's development server: serves the page, mints development tokens
// with `chorus token` (the node itself has no token endpoint), and, unless
// --node is given, starts a Chorus node of its own in a temp directory.
//
//   node demo/server.mjs [--port 8080] [--node ws://127.0.0.1:7600/ws]
//                        [--chorus path/to/chorus] [--config chorus.toml]
//
// Development only: anyone who can reach it gets a token for any user.
import { spawn, execFile } from "node:child_process";
import { createServer } from "node:http";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");
const USER_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".map": "application/json", ".png": "image/png" };

export function findChorus() {
  if (process.env.CHORUS_BIN) return process.env.CHORUS_BIN;
  for (const p of ["target/debug/chorus", "target/release/chorus"]) {
    const full = join(repo, p);
    if (existsSync(full)) return full;
  }
  return "chorus";
}

/** Bundles demo/src/app.ts (and the SDK from dist/) into demo/public/app.js. */
export async function buildApp() {
  await build({
    entryPoints: [join(here, "src/app.ts")],
    outfile: join(here, "public/app.js"),
    bundle: true,
    format: "esm",
    target: "es2022",
    sourcemap: true,
    logLevel: "warning",
  });
}

function chorusEnv() {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith("CHORUS_") && k !== "CHORUS_CONFIG") delete env[k];
  env.CHORUS_LOG_LEVEL ??= "warn";
  return env;
}

/** Starts a Chorus node in a temp dir on a free port. */
export function startNode({ chorus = findChorus(), config = "" } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "chorus-demo-"));
  const cfg = join(dir, "chorus.toml");
  writeFileSync(cfg, `version = 1\n${config}\n`);
  const proc = spawn(chorus, ["start", "--config", cfg, "--listen", "127.0.0.1:0", "--data-dir", join(dir, "data")], {
    env: chorusEnv(),
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((res, rej) => {
    let out = "";
    const timer = setTimeout(() => rej(new Error("chorus did not start within 20 s")), 20000);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      rej(new Error(`chorus exited with ${code}`));
    });
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /listening on ([\d.]+:\d+)/.exec(out);
      if (!m) return;
      clearTimeout(timer);
      proc.removeAllListeners("exit");
      res({
        url: `ws://${m[1]}/ws`,
        http: `http://${m[1]}`,
        config: cfg,
        proc,
        async stop() {
          if (proc.exitCode === null) {
            await new Promise((r) => {
              proc.once("exit", r);
              proc.kill("SIGTERM");
            });
          }
          rmSync(dir, { recursive: true, force: true });
        },
      });
    });
  });
}

function mint(chorus, config, user) {
  const args = ["token", "--user", user, "--ttl", "1h"];
  if (config) args.push("--config", config);
  return new Promise((res, rej) =>
    execFile(chorus, args, { env: chorusEnv() }, (err, stdout, stderr) => (err ? rej(new Error(stderr || err.message)) : res(stdout.trim()))),
  );
}

/** Serves demo/public and GET /token?user=NAME. Resolves with {port, close}. */
export async function startDemoServer({ port = 8080, nodeUrl, chorus = findChorus(), config } = {}) {
  await buildApp();
  const root = join(here, "public");
  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    try {
      if (url.pathname === "/token") {
        const user = url.searchParams.get("user") ?? "";
        if (!USER_RE.test(user)) {
          res.writeHead(400, { "content-type": "application/json" });
          return res.end(JSON.stringify({ error: "user: 1-128 of A-Z a-z 0-9 _ - . : @" }));
        }
        const token = await mint(chorus, config, user);
        res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
        return res.end(JSON.stringify({ token, url: nodeUrl }));
      }
      const path = url.pathname === "/" ? "/index.html" : url.pathname;
      const file = resolve(root, "." + path);
      if (!file.startsWith(root) || !existsSync(file)) {
        res.writeHead(404);
        return res.end("not found");
      }
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      res.end(readFileSync(file));
    } catch (e) {
      res.writeHead(500, { "content-type": "text/plain" });
      res.end(String(e?.message ?? e));
    }
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  return {
    port: server.address().port,
    close: () =>
      new Promise((r) => {
        server.close(r);
        server.closeAllConnections();
      }),
  };
}

async function main() {
  const argv = process.argv.slice(2);
  const opt = (name) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const chorus = opt("chorus") ?? findChorus();
  let nodeUrl = opt("node");
  let config = opt("config");
  let node;
  if (!nodeUrl) {
    node = await startNode({ chorus, config: "[chat]\ntyping_ttl_ms = 3000" });
    nodeUrl = node.url;
    config = node.config;
    console.log(`started a Chorus node at ${nodeUrl} (data in a temp dir, removed on exit)`);
  }
  const demo = await startDemoServer({ port: Number(opt("port") ?? 8080), nodeUrl, chorus, config });
  console.log(`demo at http://127.0.0.1:${demo.port}/  (open it in two windows, sign in as two users)`);
  const stop = async () => {
    await demo.close();
    await node?.stop();
    process.exit(0);
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
