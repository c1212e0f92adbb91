// @microsoft/fetch-event-source, unmodified, through a proxy that cuts the
// first connection mid-stream: the library retries by itself (re-POSTing
// with Last-Event-ID) and the text must arrive exactly once.
import assert from "node:assert/strict";
import net from "node:net";

// The library is written for browsers: it schedules retries with
// window.setTimeout and (un)registers a visibility listener on document.
globalThis.window = globalThis;
globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };
const { fetchEventSource } = await import("@microsoft/fetch-event-source");

const target = new URL(process.env.SLUICEGATE_URL);
let connections = 0;
let cut = false;
const proxy = net.createServer((client) => {
  connections++;
  const server = net.connect(Number(target.port), target.hostname);
  client.pipe(server);
  const cutThis = !cut;
  let events = 0;
  server.on("data", (bytes) => {
    client.write(bytes);
    if (cutThis && !cut) {
      events += (bytes.toString().match(/^data: /gm) || []).length;
      if (events >= 5) {
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

const words = Array.from({ length: 30 }, (_, i) => `w${i}`).join(" ");
let text = "";
let done = false;
let opens = 0;
let retries = 0;
class Retry extends Error {}

await fetchEventSource(`http://127.0.0.1:${proxy.address().port}/v1/chat/completions`, {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({ model: "echo", stream: true, messages: [{ role: "user", content: words }] }),
  openWhenHidden: true,
  async onopen(response) {
    opens++;
    assert.equal(response.status, 200);
  },
  onmessage(event) {
    if (event.data === "[DONE]") {
      done = true;
      return;
    }
    const chunk = JSON.parse(event.data);
    text += chunk.choices[0]?.delta?.content ?? "";
  },
  onclose() {
    // The documented way to ask for a retry when the server closes early.
    if (!done) throw new Retry("closed before [DONE]");
  },
  onerror(error) {
    retries++;
    if (retries > 5) throw error;
    return 200; // retry in 200 ms
  },
});
proxy.close();
assert.ok(cut, "the proxy cut the first connection");
assert.ok(connections >= 2 && opens >= 2, `retried: ${connections} connections, ${opens} opens`);
assert.equal(text, words, "the answer exactly once, no gap, no duplicate");
console.log(`fetch-event-source: ok after ${retries} retry`);
