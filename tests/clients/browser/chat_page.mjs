// The built-in chat page in Debian's Chromium, driven by playwright-core:
// streaming shows progressively, a message sent mid-answer stops the
// answer, Stop and Escape stop it, answers render as sanitized markdown
// (incrementally, with copy buttons), raw HTML in them stays text, the
// page keeps to its Content-Security-Policy, follows a dark system
// theme, and fits a phone.
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { chromiumOptions } from "./chromium.mjs";

const base = process.env.SLUICEGATE_URL;
const shots = process.env.SCREENSHOT_DIR;
const browser = await chromium.launch(chromiumOptions);
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  await page.context().grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const violations = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) violations.push(m.text()); });
  const missing = [];
  page.on("response", (r) => { if (r.status() === 404) missing.push(r.url()); });
  const response = await page.goto(`${base}/`);
  assert.match(response.headers()["content-security-policy"] ?? "", /script-src 'self'/);
  await page.waitForFunction(() => document.querySelector("#model").value === "echo");

  const answerText = (n) => page.evaluate((n) => document.querySelectorAll(".msg.assistant .text")[n]?.textContent ?? "", n);
  const send = async (text) => {
    await page.fill("#input", text);
    await page.press("#input", "Enter");
  };
  const words = (n, tag) => Array.from({ length: n }, (_, i) => `${tag}${i}`).join(" ");

  // Enter sends; Shift+Enter is a new line.
  await page.fill("#input", "first line");
  await page.press("#input", "Shift+Enter");
  assert.equal(await page.inputValue("#input"), "first line\n");

  // 1. The answer streams in progressively.
  const sentence = words(8, "w");
  await send(sentence);
  await page.waitForFunction(() => {
    const t = document.querySelector(".msg.assistant .text")?.textContent ?? "";
    return t.length > 0 && t.length < 30;
  });
  const partial = await answerText(0);
  assert.ok(sentence.startsWith(partial) && partial !== sentence, `partial text first: ${partial}`);
  await page.waitForFunction(() => /done/.test(document.querySelector(".msg.assistant .meta")?.textContent ?? ""));
  assert.equal(await answerText(0), sentence);
  assert.match(await page.textContent(".msg.assistant .meta"), /first token \d+ ms · [\d.]+ tokens\/s/);

  // 2. A message sent mid-answer stops that answer.
  await send(words(60, "long"));
  await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant .text")[1]?.textContent ?? "").length > 0);
  await send("interrupting question");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant")[1].classList.contains("stopped"));
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant .text")[2]?.textContent === "interrupting question");

  // 3. Stop stops the answer (on the server, through the cancel endpoint).
  await send(words(60, "stop"));
  await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant .text")[3]?.textContent ?? "").length > 0);
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant")[3].classList.contains("stopped"));
  assert.match(await page.textContent(".msg.assistant.stopped .meta"), /stopped/);

  // 4. Model output is shown as text, never as HTML.
  const html = '<img src=x onerror="window.pwned=1"><b>bold</b>';
  await send(html);
  await page.waitForFunction((html) => document.querySelectorAll(".msg.assistant .text")[4]?.textContent === html, html);
  assert.equal(await page.locator("#transcript img, #transcript b").count(), 0);
  assert.equal(await page.evaluate(() => window.pwned), undefined);

  // 5. Markdown from the model: inline marks, and links that open apart
  //    from the page; a javascript: link loses its target.
  await send("**bold** and `code` and [a link](https://example.com/x) and [bad](javascript:alert(1))");
  await page.waitForFunction(() => /done/.test(document.querySelectorAll(".msg.assistant .meta")[5]?.textContent ?? ""));
  const marks = await page.evaluate(() => {
    const el = document.querySelectorAll(".msg.assistant .text")[5];
    const link = el.querySelector('a[href="https://example.com/x"]');
    return {
      strong: el.querySelector("strong")?.textContent,
      code: el.querySelector("code")?.textContent,
      rel: link?.getAttribute("rel"),
      target: link?.getAttribute("target"),
      scripted: el.querySelectorAll('a[href^="javascript"]').length,
    };
  });
  assert.deepEqual(marks, { strong: "bold", code: "code", rel: "noopener noreferrer", target: "_blank", scripted: 0 });
  // Copy answer puts the answer's markdown on the clipboard.
  await page.locator(".msg.assistant").nth(5).getByRole("button", { name: "Copy answer" }).click();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()),
    "**bold** and `code` and [a link](https://example.com/x) and [bad](javascript:alert(1))");

  // 6. Blocks render as they stream, each complete block once: the
  //    page's own module fed a text piece by piece, a frame per piece.
  const blocks = await page.evaluate(async () => {
    const { renderer } = await import("/ui/markdown.js");
    const box = document.createElement("div");
    document.body.append(box);
    const view = renderer(box);
    const text = "# Title\n\nSome *text*.\n\n- one\n- two\n\n```js\nlet x = 1;\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<script>window.pwned = 2</script>\n";
    let heading = null;
    for (let i = 1; i <= text.length; i += 3) {
      view.update(text.slice(0, i));
      await new Promise((r) => requestAnimationFrame(r));
      // Once the heading is complete it is kept: the same node to the end.
      heading ??= box.firstElementChild.querySelector("h1");
    }
    view.finish(text);
    const result = {
      kept: heading !== null && box.querySelector("h1") === heading,
      h1: box.querySelector("h1")?.textContent,
      em: box.querySelector("em")?.textContent,
      items: box.querySelectorAll("li").length,
      code: box.querySelector("pre code")?.textContent,
      coloured: box.querySelector("pre code .hljs-keyword")?.textContent,
      copy: box.querySelectorAll(".code button.copy").length,
      cells: box.querySelectorAll("td").length,
      scripts: box.querySelectorAll("script").length,
      shown: box.textContent.includes("<script>window.pwned = 2</script>"),
    };
    box.remove();
    return result;
  });
  assert.deepEqual(blocks, { kept: true, h1: "Title", em: "text", items: 2, code: "let x = 1;\n", coloured: "let", copy: 1, cells: 2, scripts: 0, shown: true });
  assert.equal(await page.evaluate(() => window.pwned), undefined);

  // 7. Escape stops the answer that streams.
  await send(words(60, "esc"));
  await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant .text")[6]?.textContent ?? "").length > 0);
  await page.keyboard.press("Escape");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant")[6].classList.contains("stopped"));
  assert.deepEqual(violations, [], "nothing the page does breaks its policy");
  assert.deepEqual(missing, [], "every file the page asks for is there");

  await page.screenshot({ path: `${shots}/chat-desktop.png`, fullPage: true });
  // 8. Dark mode follows the system.
  const background = () => page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const light = await background();
  await page.emulateMedia({ colorScheme: "dark" });
  assert.notEqual(await background(), light);
  await page.screenshot({ path: `${shots}/chat-dark.png`, fullPage: true });
  await page.emulateMedia({ colorScheme: "light" });
  // 9. Conversations are kept in the browser. A reload while an answer
  //    streams continues it through the session route, with no gap and
  //    no repeat.
  const longText = words(40, "re");
  await send(longText);
  await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant .text")[7]?.textContent ?? "").length > 20);
  await page.reload();
  await page.waitForFunction(() => /done/.test(document.querySelectorAll(".msg.assistant .meta")[7]?.textContent ?? ""));
  assert.equal(await answerText(7), longText);
  assert.equal(await page.locator("#list li").count(), 1);

  // 10. A new conversation, its answer regenerated and its question
  //     edited; then back to the first, whole.
  await page.click("#new");
  assert.equal(await page.locator(".msg").count(), 0);
  const doneAt = (i) => page.waitForFunction((i) => /done/.test(document.querySelectorAll(".msg.assistant .meta")[i]?.textContent ?? ""), i);
  // Editing the question whose answer streams, then sending it, cancels
  // that answer on the server (the session's next request replaces it).
  const replaced = async () => Number(/sluicegate_generations_ended_total\{cause="session_replaced"\} (\d+)/
    .exec(await (await fetch(`${base}/metrics`)).text())?.[1] ?? 0);
  const before = await replaced();
  await send(words(60, "edit"));
  await page.waitForFunction(() => (document.querySelector(".msg.assistant .text")?.textContent ?? "").length > 0);
  await page.getByRole("button", { name: "Edit and resend" }).click();
  assert.equal(await page.locator(".msg").count(), 0);
  await page.fill("#input", "second conversation");
  await page.press("#input", "Enter");
  await doneAt(0);
  assert.equal(await answerText(0), "second conversation");
  for (let i = 0; (await replaced()) !== before + 1; i++) {
    assert.ok(i < 50, "the edited question's answer was cancelled on the server");
    await new Promise((r) => setTimeout(r, 100));
  }
  await page.getByRole("button", { name: "Regenerate" }).click();
  await doneAt(0);
  assert.equal(await page.locator(".msg.assistant").count(), 1);
  assert.equal(await answerText(0), "second conversation");
  await page.getByRole("button", { name: "Edit and resend" }).click();
  assert.equal(await page.inputValue("#input"), "second conversation");
  assert.equal(await page.locator(".msg").count(), 0);
  await page.fill("#input", "second conversation edited");
  await page.press("#input", "Enter");
  await doneAt(0);
  assert.equal(await answerText(0), "second conversation edited");
  assert.equal(await page.locator("#list li").count(), 2);
  await page.locator("#list li .open").nth(1).click();
  assert.equal(await page.locator(".msg.assistant").count(), 8);

  // 11. Rename, export, delete, and import the export back.
  page.once("dialog", (d) => d.accept("Renamed"));
  await page.locator("#list li.current .rename").click();
  await page.waitForFunction(() => document.querySelector("#list li.current .open")?.textContent === "Renamed");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export")]);
  const file = await download.path();
  const exported = JSON.parse(await readFile(file, "utf8"));
  assert.deepEqual(exported.map((c) => c.title).sort(), ["Renamed", "second conversation edited"]);
  page.once("dialog", (d) => d.accept());
  await page.locator("#list li.current .delete").click();
  await page.waitForFunction(() => document.querySelectorAll("#list li").length === 1);
  await page.setInputFiles("#import", file);
  await page.waitForFunction(() => document.querySelectorAll("#list li").length === 2);
  await page.locator("#list li .open", { hasText: "Renamed" }).click();
  assert.equal(await answerText(7), longText);

  // 12. Accessibility: axe-core finds nothing serious or critical, light
  //     or dark (in a context that lets the test inject it past the
  //     page's policy).
  const axePath = createRequire(import.meta.url).resolve("axe-core/axe.min.js");
  const audit = await browser.newContext({ bypassCSP: true, viewport: { width: 1100, height: 800 } });
  const auditPage = await audit.newPage();
  await auditPage.goto(`${base}/`);
  await auditPage.waitForFunction(() => document.querySelector("#model").value === "echo");
  await auditPage.fill("#input", "**an answer** with `code` and a [link](https://example.com)");
  await auditPage.press("#input", "Enter");
  await auditPage.waitForFunction(() => /done/.test(document.querySelector(".msg.assistant .meta")?.textContent ?? ""));
  await auditPage.addScriptTag({ path: axePath });
  for (const colorScheme of ["light", "dark"]) {
    await auditPage.emulateMedia({ colorScheme });
    const found = await auditPage.evaluate(async () => (await window.axe.run()).violations
      .filter((v) => v.impact === "serious" || v.impact === "critical")
      .map((v) => `${v.id}: ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`));
    assert.deepEqual(found, [], `axe, ${colorScheme}`);
  }
  await audit.close();

  // 13. History survives a browser restart with the same profile.
  const profile = await mkdtemp(join(tmpdir(), "sluicegate-profile-"));
  try {
    const open = async () => {
      const context = await chromium.launchPersistentContext(profile, chromiumOptions);
      const tab = context.pages()[0] ?? await context.newPage();
      await tab.goto(`${base}/`);
      await tab.waitForFunction(() => document.querySelector("#model").value === "echo");
      return [context, tab];
    };
    let [context, tab] = await open();
    await tab.fill("#input", "kept across a restart");
    await tab.press("#input", "Enter");
    // Written to IndexedDB, ended, before the browser goes.
    await tab.waitForFunction(async () => {
      const { all } = await import("/ui/store.js");
      return (await all()).some((c) => c.messages.at(-1)?.state === "stop");
    });
    await context.close();
    [context, tab] = await open();
    await tab.waitForFunction(() => document.querySelector(".msg.assistant .text")?.textContent === "kept across a restart");
    assert.equal(await tab.textContent("#list li.current .open"), "kept across a restart");
    await context.close();
  } finally {
    await rm(profile, { recursive: true, force: true });
  }

  await page.setViewportSize({ width: 375, height: 812 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `no sideways scrolling on a phone (${overflow}px)`);
  await page.screenshot({ path: `${shots}/chat-phone.png` });
  console.log("chromium: ok");
} finally {
  await browser.close();
}
