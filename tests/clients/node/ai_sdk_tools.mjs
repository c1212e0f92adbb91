// The Vercel AI SDK's providers, unmodified: streamText with tools over
// two steps (the call, then the answer after its result).
// Env: SLUICEGATE_URL; PROVIDER ("compatible", the default: chat
// completions; "openai": the Responses API; "anthropic": the Messages
// API); MODEL (default: the server's first model); PROMPT; TOOL_CHOICE
// ("auto", "required" or a tool name); EXPECT_CALLS (default 1);
// EXPECT_REASONING ("1" when the model reasons first).
import assert from "node:assert/strict";
import { streamText, tool, stepCountIs } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { createOpenAI } from "@ai-sdk/openai";
import { createAnthropic } from "@ai-sdk/anthropic";
import { z } from "zod";

const base = process.env.SLUICEGATE_URL;
const models = await (await fetch(`${base}/v1/models`)).json();
const modelId = process.env.MODEL ?? models.data[0].id;
const model = {
  compatible: () =>
    createOpenAICompatible({ name: "sluicegate", baseURL: `${base}/v1`, apiKey: "not-needed" }).chatModel(modelId),
  openai: () => createOpenAI({ baseURL: `${base}/v1`, apiKey: "not-needed" })(modelId),
  anthropic: () => createAnthropic({ baseURL: `${base}/v1`, apiKey: "not-needed" })(modelId),
}[process.env.PROVIDER ?? "compatible"]();

const executed = [];
const tools = {
  get_weather: tool({
    description: "The current weather in a city.",
    inputSchema: z.object({ city: z.string() }),
    execute: async ({ city }) => {
      executed.push(["get_weather", city]);
      return { city, temperature: 21 };
    },
  }),
  get_time: tool({
    description: "The time in a time zone.",
    inputSchema: z.object({ zone: z.string() }),
    execute: async ({ zone }) => {
      executed.push(["get_time", zone]);
      return { zone, time: "12:00" };
    },
  }),
};
const choice = process.env.TOOL_CHOICE ?? "required";
const toolChoice = ["auto", "required", "none"].includes(choice) ? choice : { type: "tool", toolName: choice };

const result = streamText({
  model,
  system: "You are a helpful assistant.",
  prompt: process.env.PROMPT ?? "What is the weather in Paris?",
  tools,
  toolChoice,
  temperature: 0,
  maxOutputTokens: 64,
  stopWhen: stepCountIs(2),
  prepareStep: ({ stepNumber }) => (stepNumber > 0 ? { toolChoice: "none" } : {}),
});

const seen = { inputDeltas: 0, calls: [], results: 0, text: "", reasoning: "", finishes: [] };
for await (const part of result.fullStream) {
  switch (part.type) {
    case "tool-input-delta":
      seen.inputDeltas++;
      break;
    case "tool-call":
      seen.calls.push(part);
      break;
    case "tool-result":
      seen.results++;
      break;
    case "text-delta":
      seen.text += part.text;
      break;
    case "reasoning-delta":
      seen.reasoning += part.text;
      break;
    case "finish-step":
      seen.finishes.push(part.finishReason);
      break;
    case "error":
      throw part.error;
  }
}
const expectCalls = Number(process.env.EXPECT_CALLS ?? "1");
assert.equal(seen.calls.length, expectCalls, JSON.stringify(seen));
for (const call of seen.calls) {
  assert.ok(call.toolName in tools, call.toolName);
  assert.equal(typeof call.input, "object", JSON.stringify(call));
  assert.ok(!call.invalid, `the call's input is valid: ${JSON.stringify(call)}`);
}
assert.ok(seen.inputDeltas >= expectCalls, "arguments streamed as deltas");
assert.equal(seen.results, expectCalls);
assert.equal(executed.length, expectCalls);
assert.deepEqual(seen.finishes[0], "tool-calls", JSON.stringify(seen.finishes));
assert.equal(seen.finishes.length, 2, "a second step answered after the results");
if (process.env.EXPECT_REASONING === "1") assert.ok(seen.reasoning.length > 0, "reasoning relayed");
console.log(`ai-sdk tools: ok ${JSON.stringify({ calls: seen.calls.map((c) => [c.toolName, c.input]), text: seen.text })}`);
