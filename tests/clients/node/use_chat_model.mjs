// The real model through the AI SDK's DefaultChatTransport (package `ai`):
// one greedy answer, with the system prompt as a body extra.
import assert from "node:assert/strict";
import { DefaultChatTransport, readUIMessageStream } from "ai";

const transport = new DefaultChatTransport({
  api: `${process.env.SLUICEGATE_URL}/v1/ui/chat`,
  body: { system: "You are a helpful assistant.", temperature: 0, max_tokens: 30 },
});
const stream = await transport.sendMessages({
  chatId: "model-chat",
  messages: [{ id: "u1", role: "user", parts: [{ type: "text", text: "What is the capital of France?" }] }],
  trigger: "submit-message",
  messageId: undefined,
});
let message;
for await (const snapshot of readUIMessageStream({ stream, onError: (e) => { throw e; } })) {
  message = snapshot;
}
const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
assert.match(text, /Paris/, text);
console.log(`ai-model: ok: ${JSON.stringify(text)}`);
