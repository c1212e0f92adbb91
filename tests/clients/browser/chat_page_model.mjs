// The built-in chat page on the real model, in Chromium: with the page's
// default system prompt and temperature 0, the answer names Paris, and it
// ends as done with its figures.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { chromiumOptions } from "./chromium.mjs";

const base = process.env.SLUICEGATE_URL;
const browser = await chromium.launch(chromiumOptions);
try {
  const page = await browser.newPage();
  await page.goto(`${base}/`);
  await page.waitForFunction(() => document.querySelector("#model").value === "SmolLM2-135M-Instruct");
  assert.equal(await page.inputValue("#system"), "You are a helpful assistant.");
  await page.fill("#temperature", "0");
  await page.dispatchEvent("#temperature", "change");
  await page.fill("#input", "What is the capital of France?");
  await page.press("#input", "Enter");
  await page.waitForFunction(() => /done/.test(document.querySelector(".msg.assistant .meta")?.textContent ?? ""), null, { timeout: 60000 });
  const answer = await page.textContent(".msg.assistant .text");
  assert.match(answer, /Paris/);
  assert.match(await page.textContent(".msg.assistant .meta"), /done · first token \d+ ms · [\d.]+ tokens\/s/);
  console.log("chromium on the model: ok");
} finally {
  await browser.close();
}
