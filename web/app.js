// The chat page: one conversation per X-Session-Id, answers streamed over
// fetch and rendered as markdown as they arrive (see markdown.js).
import { copy, renderer } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const transcript = $("transcript"), input = $("input"), keyField = $("key"), modelField = $("model");

keyField.value = localStorage.getItem("sluicegate.key") || "";
keyField.addEventListener("change", () => { localStorage.setItem("sluicegate.key", keyField.value); loadModels(); });

const newId = () => (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());
let session = newId();
let history = [];       // {role, content} sent to the server
let current = null;     // the answer streaming now

function headers(extra) {
  const h = Object.assign({ "Content-Type": "application/json" }, extra || {});
  if (keyField.value) h["Authorization"] = "Bearer " + keyField.value;
  return h;
}

async function readError(response) {
  let message = "HTTP " + response.status;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  // What to do about it, where the person can do something.
  if (response.status === 401) return message + " Enter an API key above.";
  if (response.status === 429) {
    const after = response.headers.get("Retry-After");
    return message + " Retry " + (after ? "in " + after + " s." : "shortly.");
  }
  return message;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await readError(response));
    const { data } = await response.json();
    const chosen = modelField.value;
    modelField.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === chosen)) modelField.value = chosen;
  } catch (e) {
    modelField.replaceChildren(new Option("(models unavailable: " + e.message + ")", ""));
  }
}

function bubble(role, text) {
  $("empty")?.remove();
  const el = document.createElement("div");
  el.className = "msg " + role;
  const body = document.createElement(role === "user" ? "span" : "div");
  body.className = "text";
  body.textContent = text;   // a question is shown as typed
  el.append(body);
  transcript.append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setMeta(el, text) {
  let meta = el.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; el.append(meta); }
  meta.textContent = text;
}

/** Server-Sent Events from a fetch body: fields in any order, CR/LF/CRLF,
 *  comments, multi-line data, and the id as it is read. */
async function* sseEvents(body, onId) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", data = [], sawData = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let match;
    while ((match = /\r\n|\r|\n/.exec(buffer))) {
      if (match[0] === "\r" && match.index === buffer.length - 1) break; // maybe CRLF split
      const line = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      if (line === "") {
        if (sawData) yield data.join("\n");
        data = []; sawData = false;
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") { data.push(val); sawData = true; }
      else if (field === "id" && !val.includes("\0")) onId(val);
    }
  }
}

async function send(text) {
  const model = modelField.value || undefined;
  if (current) {
    // The unfinished answer stays in the conversation as far as it got.
    history.push({ role: "assistant", content: current.text });
    current.recorded = true;
  }
  history.push({ role: "user", content: text });
  bubble("user", text);
  const el = bubble("assistant", "");
  const answer = { el, text: "", id: null, lastEventId: null, finish: null, done: false, tokens: 0, first: 0, started: performance.now() };
  answer.view = renderer(el.querySelector(".text"));
  current = answer;
  $("stop").disabled = false;
  setMeta(el, "…");
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  messages.push(...history);
  const request = JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } });
  for (let attempt = 0; attempt < 6 && !answer.done; attempt++) {
    if (attempt > 0) await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** attempt, 4000)));
    try {
      const extra = { "X-Session-Id": session };
      // A retry names the last event seen: the server resumes that
      // generation instead of starting another.
      if (answer.lastEventId) extra["Last-Event-ID"] = answer.lastEventId;
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(extra), body: request });
      if (!response.ok) { fail(answer, await readError(response)); return; }
      answer.id = response.headers.get("X-Completion-Id") || answer.id;
      for await (const data of sseEvents(response.body, (id) => { answer.lastEventId = id; })) {
        if (data === "[DONE]") { answer.done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) { fail(answer, chunk.error.message); return; }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (!answer.first) answer.first = performance.now();
          answer.tokens++;
          answer.text += piece;
          answer.view.update(answer.text);
          showStats(answer, "streaming");
          el.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) answer.finish = choice.finish_reason;
      }
    } catch (e) {
      // The connection dropped: retry with Last-Event-ID.
      setMeta(el, "reconnecting…");
    }
  }
  finish(answer);
}

function showStats(answer, state) {
  const parts = [state];
  if (answer.first) {
    parts.push("first token " + Math.round(answer.first - answer.started) + " ms");
    const seconds = (performance.now() - answer.first) / 1000;
    if (answer.tokens > 1 && seconds > 0) parts.push(((answer.tokens - 1) / seconds).toFixed(1) + " tokens/s");
  }
  setMeta(answer.el, parts.join(" · "));
}

/** The answer as it ended, with a button that copies its markdown. */
function settle(answer) {
  answer.view.finish(answer.text);
  if (!answer.text) return;
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy answer");
  button.addEventListener("click", () => copy(answer.text, button));
  actions.append(button);
  answer.el.append(actions);
}

function finish(answer) {
  if (!answer.done && !answer.failed) { fail(answer, "the connection was lost; send again to retry."); return; }
  if (answer.failed) return;
  settle(answer);
  if (!answer.recorded) history.push({ role: "assistant", content: answer.text });
  const stopped = answer.finish === "cancelled";
  answer.el.classList.toggle("stopped", stopped);
  showStats(answer, stopped ? "stopped" : answer.finish === "length" ? "cut at max tokens" : "done");
  if (current === answer) { current = null; $("stop").disabled = true; }
}

function fail(answer, message) {
  answer.failed = true;
  settle(answer);
  answer.el.classList.add("error");
  setMeta(answer.el, "error: " + message);
  if (current === answer) { current = null; $("stop").disabled = true; }
}

async function stop() {
  const answer = current;
  if (!answer || !answer.id) return;
  $("stop").disabled = true;
  // Cancel on the server, so the model stops at once; the stream then ends
  // with finish_reason "cancelled".
  await fetch("/v1/chat/completions/" + encodeURIComponent(answer.id) + "/cancel", { method: "POST", headers: headers() }).catch(() => {});
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  input.style.height = "";
  // Sending mid-answer: the server cancels the unfinished answer of this
  // session, which then ends as stopped.
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
input.addEventListener("input", () => { input.style.height = ""; input.style.height = input.scrollHeight + "px"; });
$("stop").addEventListener("click", stop);
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && current) stop(); });
$("new").addEventListener("click", () => {
  if (current) stop();
  session = newId(); history = []; current = null;
  transcript.replaceChildren();
  const p = document.createElement("p"); p.className = "empty"; p.id = "empty"; p.textContent = "New conversation.";
  transcript.append(p);
  input.focus();
});
loadModels();
input.focus();
