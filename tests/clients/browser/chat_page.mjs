// The built-in chat page in Debian's Chromium, driven by playwright-core:
// streaming shows progressively, a message sent mid-answer stops the
// answer, Stop stops it, model output is text, and the page fits a phone.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const base = process.env.SLUICEGATE_URL;
const shots = process.env.SCREENSHOT_DIR;
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  await page.goto(`${base}/`);
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

  await page.screenshot({ path: `${shots}/chat-desktop.png`, fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `no sideways scrolling on a phone (${overflow}px)`);
  await page.screenshot({ path: `${shots}/chat-phone.png` });
  console.log("chromium: ok");
} finally {
  await browser.close();
}
