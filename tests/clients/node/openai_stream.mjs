// The official openai npm package, unmodified, streaming from sluicegate.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.env.SLUICEGATE_URL}/v1`, apiKey: "not-needed" });
const stream = await client.chat.completions.create({
  model: "echo",
  stream: true,
  stream_options: { include_usage: true },
  messages: [{ role: "user", content: "node streams these words" }],
});
let text = "";
let finish = null;
let usage = null;
let pieces = 0;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  if (choice) {
    if (choice.delta?.content) pieces++;
    text += choice.delta?.content ?? "";
    finish = choice.finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(text, "node streams these words");
assert.equal(pieces, 4, "one chunk per word");
assert.equal(finish, "stop");
assert.equal(usage.completion_tokens, 4);
console.log("openai-node: ok");
