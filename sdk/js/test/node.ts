// Starts and stops a real Chorus node for the tests.
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

/** The chorus binary: $CHORUS_BIN, else the workspace's target/debug/chorus. */
export function chorusBin(): string {
  if (process.env.CHORUS_BIN) return process.env.CHORUS_BIN;
  // build/test/ -> sdk/js -> repo root
  for (const up of ["../../../..", "../../.."]) {
    const p = resolve(here, up, "target/debug/chorus");
    if (existsSync(p)) return p;
  }
  throw new Error("chorus binary not found: build it (cargo build -p chorus-node) or set CHORUS_BIN");
}

export function mintToken(user: string, opts: { ttl?: string; claims?: object; config?: string } = {}): string {
  const args = ["token", "--user", user];
  if (opts.ttl) args.push("--ttl", opts.ttl);
  if (opts.claims) args.push("--claims", JSON.stringify(opts.claims));
  if (opts.config) args.push("--config", opts.config);
  return execFileSync(chorusBin(), args, { encoding: "utf8", env: cleanEnv() }).trim();
}

function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("CHORUS_")) env[k] = v;
  env.CHORUS_LOG_LEVEL = "warn";
  return env;
}

export interface NodeOptions {
  /** Extra TOML appended to the config (e.g. "[limits]\nmax_catchup = 5"). */
  config?: string;
}

/** A Chorus node in a temp dir; `restart()` keeps its data and its port. */
export class ChorusNode {
  readonly dir: string;
  readonly configPath: string;
  port = 0;
  private proc: ChildProcess | undefined;
  private stderr = "";

  private constructor(opts: NodeOptions) {
    this.dir = mkdtempSync(join(tmpdir(), "chorus-sdk-test-"));
    this.configPath = join(this.dir, "chorus.toml");
    writeFileSync(this.configPath, `version = 1\n${opts.config ?? ""}\n`);
  }

  static async start(opts: NodeOptions = {}): Promise<ChorusNode> {
    const n = new ChorusNode(opts);
    await n.launch();
    return n;
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }
  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  token(user: string, opts: { ttl?: string; claims?: object } = {}): string {
    return mintToken(user, { ...opts, config: this.configPath });
  }

  private launch(): Promise<void> {
    const proc = spawn(
      chorusBin(),
      ["start", "--config", this.configPath, "--listen", `127.0.0.1:${this.port}`, "--data-dir", join(this.dir, "data")],
      { env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] },
    );
    this.proc = proc;
    this.stderr = "";
    proc.stderr!.on("data", (d) => {
      this.stderr = (this.stderr + d).slice(-8000);
    });
    return new Promise((res, rej) => {
      let out = "";
      const timer = setTimeout(() => {
        proc.kill("SIGKILL");
        rej(new Error(`chorus did not report its address within 20 s; stderr:\n${this.stderr}`));
      }, 20000);
      proc.stdout!.on("data", (d) => {
        out += d;
        const m = /listening on ([\d.]+):(\d+)/.exec(out);
        if (m) {
          clearTimeout(timer);
          this.port = Number(m[2]);
          res();
        }
      });
      proc.once("exit", (code) => {
        clearTimeout(timer);
        rej(new Error(`chorus exited with ${code} before listening; stderr:\n${this.stderr}`));
      });
    });
  }

  /** SIGTERM (ordered shutdown: clients get close 1001) and wait for the exit. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    this.proc = undefined;
    await new Promise<void>((res) => {
      const t = setTimeout(() => p.kill("SIGKILL"), 15000);
      p.once("exit", () => {
        clearTimeout(t);
        res();
      });
      p.kill(signal);
    });
  }

  /** Same data dir, same port. */
  async restart(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    await this.stop(signal);
    for (let i = 0; ; i++) {
      try {
        await this.launch();
        return;
      } catch (e) {
        // The port may linger for a moment after the exit.
        if (i >= 20) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  async destroy(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Calls the server API with the dev API key. */
  async api(method: string, path: string, body?: unknown): Promise<any> {
    const res = await fetch(`${this.http}/api/v1${path}`, {
      method,
      headers: { "x-api-key": "dev-api-key", "content-type": "application/json" },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : undefined;
  }
}

/** Waits until `cond()` is truthy (polling), or fails after `timeoutMs`. */
export async function waitFor<T>(cond: () => T | Promise<T>, what: string, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Resolves with the arguments of the next `event` for which `pred` holds. */
export function nextEvent<A extends any[]>(
  on: (fn: (...args: A) => void) => () => void,
  what: string,
  pred: (...args: A) => boolean = () => true,
  timeoutMs = 5000,
): Promise<A> {
  return new Promise((res, rej) => {
    const off = on((...args: A) => {
      if (!pred(...args)) return;
      clearTimeout(t);
      off();
      res(args);
    });
    const t = setTimeout(() => {
      off();
      rej(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
    }, timeoutMs);
  });
}
