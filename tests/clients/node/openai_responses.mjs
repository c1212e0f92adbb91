// The official openai npm package's Responses API, unmodified: a stream,
// then a stream cut after a few events and resumed where it was cut.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.env.SLUICEGATE_URL}/v1`, apiKey: "not-needed" });
const words = Array.from({ length: 30 }, (_, i) => `w${i}`).join(" ");

const stream = await client.responses.create({ model: "echo", input: "node streams these words", stream: true });
const events = [];
for await (const event of stream) events.push(event);
assert.equal(events[0].type, "response.created");
assert.equal(events.at(-1).type, "response.completed");
assert.deepEqual(events.map((e) => e.sequence_number), events.map((_, i) => i));
const text = events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");
assert.equal(text, "node streams these words");

// The stream helper, cut after event 6 (it aborts the connection)...
const cut = client.responses.stream({ model: "echo", input: words, background: true });
const seen = [];
for await (const event of cut) {
  seen.push(event);
  if (event.sequence_number === 6) break;
}
const id = seen[0].response.id;
// ...and resumed after it.
const rest = [];
for await (const event of await client.responses.retrieve(id, { stream: true, starting_after: 6 })) rest.push(event);
const all = seen.concat(rest);
assert.deepEqual(all.map((e) => e.sequence_number), all.map((_, i) => i), "no gap, no repeat");
const resumed = all.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");
assert.equal(resumed, words);
assert.equal(rest.at(-1).response.output[0].content[0].text, words);
console.log("openai-node responses: ok");
