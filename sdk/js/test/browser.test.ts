// The demo in a real browser: Debian's Chromium driven by playwright-core, two users.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { chromium, type Browser, type Page } from "playwright-core";
import { ChorusNode, chorusBin } from "./node.js";

const here = dirname(fileURLToPath(import.meta.url));
const outDir = join(here, "../../test-output");
// Compiled to build/test/: the demo server is loaded from the source tree.
const { startDemoServer } = (await import(pathToFileURL(join(here, "../../demo/server.mjs")).href)) as typeof import("../demo/server.mjs");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

let node: ChorusNode;
let demo: { port: number; close(): Promise<void> };
let browser: Browser;

before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (or set CHROMIUM)`);
  node = await ChorusNode.start({ config: "[chat]\ntyping_ttl_ms = 1500" });
  demo = await startDemoServer({ port: 0, nodeUrl: node.url, chorus: chorusBin(), config: node.configPath });
  // playwright gives every launch a fresh temporary --user-data-dir.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  await demo?.close();
  await node?.destroy();
});

async function signIn(page: Page, user: string, msgpack = false): Promise<void> {
  page.on("pageerror", (e) => console.error(`[${user}] page error:`, e));
  await page.goto(`http://127.0.0.1:${demo.port}/`);
  await page.getByTestId("user").fill(user);
  if (msgpack) await page.locator("#msgpack").check();
  await page.getByTestId("signin-button").click();
  await page.getByTestId("me").getByText(user).waitFor();
  await page.locator('[data-testid="conn"].connected').waitFor();
}

async function joinRoom(page: Page, room: string): Promise<void> {
  await page.getByTestId("join-room").fill(room);
  await page.getByTestId("join-button").click();
  await page.getByTestId("room-title").getByText(room).waitFor();
}

async function say(page: Page, text: string): Promise<void> {
  await page.getByTestId("composer").fill(text);
  await page.getByTestId("send").click();
}

/** The message whose own text (not a quote of it) is `text`. */
const message = (page: Page, text: string) =>
  page.getByTestId("messages").getByTestId("message").filter({ has: page.getByTestId("text").getByText(text, { exact: true }) });

test("two users in the demo: live messages, unread badge, bell, typing, receipts, replies, edits, presence", async () => {
  const ctxA = await browser.newContext();
  const ctxB = await browser.newContext();
  ctxA.setDefaultTimeout(10000);
  ctxB.setDefaultTimeout(10000);
  const alice = await ctxA.newPage();
  const bob = await ctxB.newPage();
  alice.on("dialog", (d) => void d.accept("are you there, bob?"));

  await signIn(alice, "alice");
  await signIn(bob, "bob", true); // bob speaks MessagePack, alice JSON
  assert.equal(await bob.evaluate(() => (globalThis as any).chorus().codec.encoding), "msgpack");
  await joinRoom(alice, "lobby");
  await joinRoom(bob, "lobby");
  await alice.locator('[data-testid="presence-bob"][data-status="online"]').waitFor(); // a member who joined later
  await joinRoom(bob, "random"); // lobby stays in bob's list, not open

  // A mention in a room bob is not looking at: his unread badge and his bell count it.
  await say(alice, "hello @bob");
  await message(alice, "hello @bob").waitFor();
  await bob.locator('[data-testid="unread-lobby"][data-count="1"]').waitFor();
  await bob.getByTestId("bell-count").getByText("1", { exact: true }).waitFor();

  // Bob opens the room: the message is there, the badge clears, alice sees the receipt.
  await bob.getByTestId("room-lobby").click();
  await message(bob, "hello @bob").waitFor();
  await bob.locator('[data-testid="unread-lobby"][data-count="0"]').waitFor({ state: "attached" }); // an empty badge is hidden
  await alice.getByTestId("receipts").getByText("Seen by bob").waitFor();

  // Live: a new message shows up for bob as it is sent.
  await say(alice, "are you there?");
  await message(bob, "are you there?").waitFor();

  // Typing shows, then clears after bob sends (the indicator expires on the node).
  await bob.getByTestId("composer").pressSequentially("yes I am", { delay: 20 });
  await alice.getByTestId("typing").getByText("bob is typing…").waitFor();
  await bob.getByTestId("composer").fill("");
  await alice.getByTestId("typing").getByText("bob is typing…").waitFor({ state: "detached", timeout: 8000 });
  assert.equal(await alice.getByTestId("typing").textContent(), "");

  // A reply (thread quote) and an edit, both live on the other side.
  const target = message(bob, "are you there?");
  await target.hover();
  await target.getByTestId("reply").click();
  await say(bob, "yes");
  await message(alice, "yes").getByTestId("quote").getByText("are you there?").waitFor();
  const mine = message(alice, "are you there?").first();
  await mine.hover();
  await mine.getByTestId("edit").click();
  await message(bob, "are you there, bob?").waitFor();

  // The bell: bob reads his notifications, the count clears.
  await bob.getByTestId("bell").click();
  await bob.getByTestId("notification").first().waitFor();
  await bob.getByTestId("notif-readall").click();
  await bob.getByTestId("bell-count").getByText("0", { exact: true }).waitFor();
  await bob.getByTestId("bell").click();

  // Presence: alice is online for bob, and offline once she closes the page.
  await bob.locator('[data-testid="presence-alice"][data-status="online"]').waitFor();
  mkdirSync(outDir, { recursive: true });
  await bob.screenshot({ path: join(outDir, "demo-bob.png"), fullPage: true });
  await alice.screenshot({ path: join(outDir, "demo-alice.png"), fullPage: true });
  await ctxA.close();
  await bob.locator('[data-testid="presence-alice"][data-status="offline"]').waitFor();
  await ctxB.close();
});
