// The chat page's errors say what to do: a 401 asks for the key, a 429
// says when to retry. The server wants the key "k" and runs one
// generation at a time with no queue.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { chromiumOptions } from "./chromium.mjs";

const base = process.env.SLUICEGATE_URL;
const browser = await chromium.launch(chromiumOptions);
try {
  const page = await browser.newPage();
  await page.goto(`${base}/`);
  const metaOf = (i) => page.evaluate((i) => document.querySelectorAll(".msg.assistant .meta")[i]?.textContent ?? "", i);
  const send = async (text) => { await page.fill("#input", text); await page.press("#input", "Enter"); };

  // No key: the model list and an answer both say to enter one.
  await page.waitForFunction(() => /Enter an API key/.test(document.querySelector("#model").textContent));
  await send("without a key");
  await page.waitForFunction(() => document.querySelector(".msg.assistant.error"));
  assert.match(await metaOf(0), /^error: .*Enter an API key above\.$/);

  // With the key, answers stream.
  await page.fill("#key", "k");
  await page.dispatchEvent("#key", "change");
  await page.waitForFunction(() => document.querySelector("#model").value === "echo");
  await send(Array.from({ length: 40 }, (_, i) => `busy${i}`).join(" "));
  await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant .text")[1]?.textContent ?? "").length > 0);

  // While it runs, another conversation's question finds no room: 429.
  await page.click("#new");
  await send("no room now");
  await page.waitForFunction(() => document.querySelector(".msg.assistant.error"));
  assert.match(await metaOf(0), /^error: .*Retry (in \d+ s|shortly)\.$/);
  console.log("chromium errors: ok");
} finally {
  await browser.close();
}
