// Stopping an answer from the AI SDK's DefaultChatTransport (package `ai`):
// useChat's stop() aborts the fetch, and the generation on the server ends
// (the test starts sluicegate with --reattach-grace 0s); the cancel
// endpoint, with the message id as completion id, stops it explicitly.
import assert from "node:assert/strict";
import { DefaultChatTransport } from "ai";

const base = process.env.SLUICEGATE_URL;
const words = (n, tag) => Array.from({ length: n }, (_, i) => `${tag}${i}`).join(" ");
const transport = new DefaultChatTransport({ api: `${base}/v1/ui/chat`, body: { model: "echo" } });
const send = (chatId, text, abortSignal) => transport.sendMessages({
  chatId,
  messages: [{ id: "u1", role: "user", parts: [{ type: "text", text }] }],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal,
});

/// Reads chunks until a text-delta; returns the reader and what it read.
async function readUntilText(stream) {
  const reader = stream.getReader();
  const seen = [];
  for (;;) {
    const { value, done } = await reader.read();
    assert.ok(!done, "the answer goes on");
    seen.push(value);
    if (value.type === "text-delta") return { reader, seen };
  }
}

const sample = (metrics, series) => Number(
  metrics.split("\n").find((l) => l.startsWith(series))?.split(" ").at(-1) ?? 0,
);

async function until(what, check) {
  const deadline = Date.now() + 30_000;
  while (!(await check())) {
    assert.ok(Date.now() < deadline, `${what} within 30 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/// The generation's whole log through the OpenAI events route.
async function openaiReplay(id) {
  const body = await (await fetch(`${base}/v1/chat/completions/${id}/events`)).text();
  const chunks = body.split("\n").filter((l) => l.startsWith("data: {")).map((l) => JSON.parse(l.slice(6)));
  return {
    text: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""),
    finish: chunks.map((c) => c.choices[0]?.finish_reason).find((r) => r),
  };
}

const answer = words(300, "s");

// 1. stop(): the fetch is aborted mid-answer, and the server stops too.
{
  const abort = new AbortController();
  const { seen } = await readUntilText(await send("stop-chat-1", answer, abort.signal));
  abort.abort();
  const id = seen[0].messageId;
  const clientGone = 'sluicegate_generations_ended_total{cause="client_gone"}';
  await until("the generation ends", async () =>
    sample(await (await fetch(`${base}/metrics`)).text(), clientGone) === 1);
  const replay = await openaiReplay(id);
  assert.equal(replay.finish, "cancelled");
  assert.ok(replay.text.length < answer.length, "stopped well before the end");
}

// 2. An explicit stop: the cancel endpoint, named by the message id.
{
  const { reader, seen } = await readUntilText(await send("stop-chat-2", answer));
  const id = seen[0].messageId;
  const cancelled = await (await fetch(`${base}/v1/chat/completions/${id}/cancel`, { method: "POST" })).json();
  assert.equal(cancelled.cancelled, true);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    seen.push(value);
  }
  assert.deepEqual(seen.at(-1), { type: "finish", finishReason: "other" });
}

console.log("ai-stop: ok");
