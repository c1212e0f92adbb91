// The AI SDK's own DefaultChatTransport (package `ai`, pinned in
// package.json) straight to sluicegate, as useChat drives it: send, a cut
// connection resumed with reconnectToStream, and 204 when idle. Parts are
// assembled with the package's readUIMessageStream.
import assert from "node:assert/strict";
import net from "node:net";
import { DefaultChatTransport, readUIMessageStream } from "ai";

const base = process.env.SLUICEGATE_URL;
const words = (n, tag) => Array.from({ length: n }, (_, i) => `${tag}${i}`).join(" ");
const user = (text) => ({ id: `u-${text.length}`, role: "user", parts: [{ type: "text", text }] });
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

/// Every chunk the transport yields, in `seen`, and the assembled message.
async function assemble(stream, seen, errors = []) {
  const tapped = stream.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      seen.push(chunk);
      controller.enqueue(chunk);
    },
  }));
  let message;
  for await (const snapshot of readUIMessageStream({ stream: tapped, onError: (e) => errors.push(e) })) {
    message = snapshot;
  }
  return message;
}

const send = (transport, chatId, text, abortSignal) => transport.sendMessages({
  chatId,
  messages: [user(text)],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal,
});

// 1. One answer, assembled by the ai package: the echo of the question.
{
  const transport = new DefaultChatTransport({ api: `${base}/v1/ui/chat`, body: { model: "echo" } });
  const question = words(12, "q");
  const seen = [];
  const message = await assemble(await send(transport, "node-chat-1", question), seen);
  assert.equal(message.role, "assistant");
  assert.equal(textOf(message), question);
  assert.equal(seen[0].type, "start");
  assert.match(seen[0].messageId, /^chatcmpl-/);
  assert.equal(message.id, seen[0].messageId);
  assert.deepEqual(seen.at(-1), { type: "finish", finishReason: "stop" });
}

// 2. A connection cut mid-answer, then reconnectToStream: the whole
// message again (useChat's resume replays it), no gap, no repeat.
{
  const target = new URL(base);
  let cut = false;
  const proxy = net.createServer((client) => {
    const server = net.connect(Number(target.port), target.hostname);
    client.pipe(server);
    const cutThis = !cut;
    let parts = 0;
    server.on("data", (bytes) => {
      client.write(bytes);
      if (cutThis && !cut) {
        parts += (bytes.toString().match(/^data: /gm) || []).length;
        if (parts >= 6) {
          cut = true;
          client.destroy();
          server.destroy();
        }
      }
    });
    server.on("end", () => client.end());
    server.on("error", () => client.destroy());
    client.on("error", () => server.destroy());
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  const transport = new DefaultChatTransport({
    api: `http://127.0.0.1:${proxy.address().port}/v1/ui/chat`,
    body: { model: "echo" },
  });
  const question = words(40, "c");
  const before = [];
  const errors = [];
  const partial = await assemble(await send(transport, "node-chat-2", question), before, errors);
  assert.ok(cut, "the proxy cut the first connection");
  assert.equal(errors.length, 1, `the cut is an error: ${errors}`);
  assert.ok(textOf(partial).length < question.length, "cut before the end");

  const replay = [];
  const resumed = await transport.reconnectToStream({ chatId: "node-chat-2" });
  assert.ok(resumed, "something to resume");
  const message = await assemble(resumed, replay);
  proxy.close();
  assert.deepEqual(replay.slice(0, before.length), before, "replayed from the start");
  assert.equal(textOf(message), question, "the whole answer exactly once");
  assert.equal(message.id, partial.id, "the same message, so useChat replaces its copy");
  assert.deepEqual(replay.at(-1), { type: "finish", finishReason: "stop" });
}

// 3. A chat with nothing to resume: 204, which the transport turns into null.
{
  const transport = new DefaultChatTransport({ api: `${base}/v1/ui/chat` });
  assert.equal(await transport.reconnectToStream({ chatId: "node-never-used" }), null);
}

console.log("ai-transport: ok");
