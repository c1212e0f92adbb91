// A minimal useChat page (browser/use_chat/app.jsx, bundled here with
// esbuild from the pinned npm packages, no CDN) in Debian's Chromium,
// against the binary (with --cors-origin '*'): it chats and stops against
// one started with --reattach-grace 0s (SLUICEGATE_URL), and resumes after
// a reload against one with a grace longer than the test
// (SLUICEGATE_WAITING_URL).
import assert from "node:assert/strict";
import http from "node:http";
import path from "node:path";
import { readFile } from "node:fs/promises";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { chromiumOptions } from "./chromium.mjs";

const base = process.env.SLUICEGATE_URL;
const waiting = process.env.SLUICEGATE_WAITING_URL;
const out = path.join(process.env.SCREENSHOT_DIR, "use-chat");
await build({
  entryPoints: [path.join(import.meta.dirname, "use_chat/app.jsx")],
  bundle: true,
  format: "esm",
  jsx: "automatic",
  define: { "process.env.NODE_ENV": '"production"' },
  outfile: path.join(out, "app.js"),
  logLevel: "warning",
});
const bundle = await readFile(path.join(out, "app.js"));
const html = '<!doctype html><meta charset="utf-8"><title>useChat</title><div id="root"></div><script type="module" src="/app.js"></script>';

// The app's static files, on an origin of its own.
const site = http.createServer((req, res) => {
  if (req.url === "/app.js") {
    res.writeHead(200, { "content-type": "text/javascript" }).end(bundle);
  } else {
    res.writeHead(200, { "content-type": "text/html" }).end(html);
  }
});
await new Promise((resolve) => site.listen(0, "127.0.0.1", resolve));
const pageUrl = (server, chat) =>
  `http://127.0.0.1:${site.address().port}/?chat=${chat}&server=${encodeURIComponent(server)}`;

const words = (n, tag) => Array.from({ length: n }, (_, i) => `${tag}${i}`).join(" ");
const sample = async (series) => {
  const metrics = await (await fetch(`${base}/metrics`)).text();
  return Number(metrics.split("\n").find((l) => l.startsWith(series))?.split(" ").at(-1) ?? 0);
};
const clientGone = 'sluicegate_generations_ended_total{cause="client_gone"}';

const browser = await chromium.launch(chromiumOptions);
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(pageUrl(base, "browser-chat"));
  // resume: true asked on load; an idle chat answered 204.
  await page.waitForFunction(() => document.querySelector("#status")?.textContent === "ready");
  const assistant = (n) => page.evaluate((n) => {
    const li = document.querySelectorAll("#messages li.assistant")[n];
    return li ? { id: li.dataset.id, text: li.textContent } : null;
  }, n);
  const send = async (text) => {
    await page.fill("#input", text);
    await page.click("#send");
  };

  // 1. A chat: the echo's answer streams in, whole.
  const first = words(8, "w");
  await send(first);
  await page.waitForFunction((t) => document.querySelector("#messages li.assistant")?.textContent === t, first);
  await page.waitForFunction(() => document.querySelector("#status").textContent === "ready");
  assert.match((await assistant(0)).id, /^chatcmpl-/);

  // 2. Stop: the page keeps what it had, and the server's generation ends.
  const long = words(80, "s");
  await send(long);
  await page.waitForFunction(() => (document.querySelectorAll("#messages li.assistant")[1]?.textContent ?? "").length > 0);
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelector("#status").textContent === "ready");
  const stopped = await assistant(1);
  assert.ok(long.startsWith(stopped.text) && stopped.text !== long, `partial: ${stopped.text}`);
  const deadline = Date.now() + 30_000;
  while ((await sample(clientGone)) < 1) {
    assert.ok(Date.now() < deadline, "the generation ends on the server");
    await new Promise((r) => setTimeout(r, 20));
  }
  const events = await (await fetch(`${base}/v1/chat/completions/${stopped.id}/events`)).text();
  assert.match(events, /"finish_reason":"cancelled"/);

  // 3. A reload mid-answer: resume: true brings the same message back,
  // replayed from the start, and it goes on live to the end.
  await page.goto(pageUrl(waiting, "browser-chat-resume"));
  await page.waitForFunction(() => document.querySelector("#status")?.textContent === "ready");
  const resumed = words(60, "r");
  await send(resumed);
  await page.waitForFunction(() => (document.querySelector("#messages li.assistant")?.textContent ?? "").length > 0);
  const before = await assistant(0);
  assert.notEqual(before.text, resumed, "reloaded mid-answer");
  await page.reload();
  await page.waitForFunction((t) => document.querySelector("#messages li.assistant")?.textContent === t, resumed);
  await page.waitForFunction(() => document.querySelector("#status").textContent === "ready");
  assert.equal((await assistant(0)).id, before.id, "the same message");
  assert.equal(await page.locator("#messages li.assistant").count(), 1);

  await page.screenshot({ path: path.join(out, "use-chat.png"), fullPage: true });
  assert.deepEqual(errors, []);
  console.log("chromium-use-chat: ok");
} finally {
  await browser.close();
  site.close();
}
