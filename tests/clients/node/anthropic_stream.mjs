// The official @anthropic-ai/sdk package, unmodified: a stream read to its
// final message, then a stream aborted mid-way, which cancels the answer.
import assert from "node:assert/strict";
import Anthropic from "@anthropic-ai/sdk";

const base = process.env.SLUICEGATE_URL;
const client = new Anthropic({ baseURL: base, apiKey: "not-needed", maxRetries: 0 });

const stream = client.messages.stream({
  model: "echo",
  max_tokens: 50,
  messages: [{ role: "user", content: "node streams these words" }],
});
let text = "";
stream.on("text", (delta) => (text += delta));
const final = await stream.finalMessage();
assert.equal(text, "node streams these words");
assert.equal(final.content[0].text, text);
assert.equal(final.stop_reason, "end_turn");
assert.equal(final.usage.output_tokens, 4);

// Abort after the first words: the server is told by the closed connection
// (and, to stop at once rather than after the reattach grace, the cancel
// endpoint with the message's id).
const words = Array.from({ length: 300 }, (_, i) => `w${i}`).join(" ");
const long = client.messages.stream({ model: "echo", max_tokens: 400, messages: [{ role: "user", content: words }] });
let id = null;
let deltas = 0;
for await (const event of long) {
  if (event.type === "message_start") id = event.message.id;
  if (event.type === "content_block_delta" && ++deltas === 3) {
    long.abort();
    break;
  }
}
assert.ok(id?.startsWith("msg_"), id);
const cancel = await (await fetch(`${base}/v1/chat/completions/${id}/cancel`, { method: "POST" })).json();
assert.equal(cancel.cancelled, true, JSON.stringify(cancel));
// Replayed, the answer ends as a well-formed cancelled message.
const replay = await (await fetch(`${base}/v1/chat/completions/${id}/events`)).text();
const events = replay.split("\n\n").filter(Boolean).map((e) => e.match(/^event: (.*)$/m)?.[1]);
assert.deepEqual(events.slice(-2), ["message_delta", "message_stop"]);
assert.ok(replay.includes('"stop_reason":"cancelled"'), replay);
console.log("anthropic-node: ok");
