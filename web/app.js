// The chat page: conversations kept in the browser, each its own
// X-Session-Id; answers streamed over fetch and rendered as markdown as
// they arrive (markdown.js). A reload while an answer streams picks it up
// again through the session route, from the last event kept.
import { copy, renderer } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const transcript = $("transcript"), input = $("input"), keyField = $("key"), modelField = $("model");
const settingFields = { system: $("system"), temperature: $("temperature"), max_tokens: $("max-tokens") };

keyField.value = localStorage.getItem("sluicegate.key") || "";
keyField.addEventListener("change", () => { localStorage.setItem("sluicegate.key", keyField.value); loadModels(); });

const newId = () => (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());

let conversations = [];  // every one, the most recent first
let conv = null;         // the one shown
const live = new Map();  // conversation id -> the answer streaming there

function fresh() {
  return { id: newId(), title: "New chat", updated: Date.now(), settings: { system: "You are a helpful assistant." }, messages: [] };
}

// Saving: at most once per quarter second per conversation while tokens
// arrive, and at once when an answer ends.
const saving = new Map();
function save(c, now) {
  c.updated = Date.now();
  clearTimeout(saving.get(c.id));
  const write = () => { saving.delete(c.id); store.put(c).catch(() => {}); };
  if (now) write(); else saving.set(c.id, setTimeout(write, 250));
}

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
    const chosen = (conv && conv.settings.model) || modelField.value;
    modelField.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === chosen)) modelField.value = chosen;
  } catch (e) {
    modelField.replaceChildren(new Option("(models unavailable: " + e.message + ")", ""));
  }
}

// ---- the side list -------------------------------------------------------

function drawList() {
  const list = $("list");
  list.replaceChildren(...conversations.map((c) => {
    const item = document.createElement("li");
    item.classList.toggle("current", c === conv);
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = c.title;
    open.setAttribute("aria-current", c === conv ? "true" : "false");
    open.addEventListener("click", () => show(c));
    const rename = document.createElement("button");
    rename.type = "button"; rename.className = "rename"; rename.textContent = "✎";
    rename.setAttribute("aria-label", "Rename " + c.title);
    rename.addEventListener("click", () => {
      const title = prompt("Rename the conversation", c.title);
      if (title && title.trim()) { c.title = title.trim(); save(c, true); drawList(); }
    });
    const del = document.createElement("button");
    del.type = "button"; del.className = "delete"; del.textContent = "×";
    del.setAttribute("aria-label", "Delete " + c.title);
    del.addEventListener("click", () => forget(c));
    item.append(open, rename, del);
    return item;
  }));
}

async function forget(c) {
  if (!confirm("Delete \u201c" + c.title + "\u201d?")) return;
  const answer = live.get(c.id);
  if (answer) stop(answer);
  conversations = conversations.filter((x) => x !== c);
  await store.remove(c.id).catch(() => {});
  if (conv === c) show(conversations[0] || create());
  else drawList();
}

function create() {
  const c = fresh();
  conversations.unshift(c);
  return c;
}

// ---- one conversation ----------------------------------------------------

function bubble(role, text) {
  $("empty")?.remove();
  const el = document.createElement("div");
  el.className = "msg " + role;
  const body = document.createElement(role === "user" ? "span" : "div");
  body.className = "text";
  body.textContent = text;   // a question is shown as typed
  el.append(body);
  transcript.append(el);
  return el;
}

function setMeta(el, text) {
  let meta = el.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; el.append(meta); }
  meta.textContent = text;
}

const ENDINGS = { stop: "done", length: "cut at max tokens", cancelled: "stopped", content_filter: "filtered", tool_calls: "tool call" };

/** A finished answer's look: markdown, how it ended, its actions. */
function settle(msg, el) {
  renderer(el.querySelector(".text")).finish(msg.content);
  el.classList.toggle("stopped", msg.state === "cancelled");
  el.classList.toggle("error", msg.state === "error");
  setMeta(el, msg.state === "error" ? "error: " + msg.error : [ENDINGS[msg.state] || msg.state, msg.stats].filter(Boolean).join(" · "));
  el.querySelector(".actions")?.remove();
  const actions = document.createElement("div");
  actions.className = "actions";
  if (msg.content) {
    const button = document.createElement("button");
    button.type = "button"; button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy answer");
    button.addEventListener("click", () => copy(msg.content, button));
    actions.append(button);
  }
  if (conv && conv.messages[conv.messages.length - 1] === msg) {
    const again = document.createElement("button");
    again.type = "button"; again.textContent = "Regenerate";
    again.addEventListener("click", () => regenerate(conv));
    actions.append(again);
  }
  if (actions.childElementCount) el.append(actions);
}

function userBubble(c, msg) {
  const el = bubble("user", msg.content);
  const edit = document.createElement("button");
  edit.type = "button"; edit.className = "edit"; edit.textContent = "Edit";
  edit.setAttribute("aria-label", "Edit and resend");
  edit.addEventListener("click", () => {
    // Everything after this question goes; the question comes back to
    // the composer, and sending it cancels what streams (same session).
    const at = c.messages.indexOf(msg);
    c.messages.splice(at);
    input.value = msg.content;
    save(c, true);
    show(c);
    input.focus();
  });
  el.append(edit);
}

function show(c) {
  conv = c;
  localStorage.setItem("sluicegate.current", c.id);
  for (const [name, field] of Object.entries(settingFields)) field.value = c.settings[name] ?? "";
  if (c.settings.model && [...modelField.options].some((o) => o.value === c.settings.model)) modelField.value = c.settings.model;
  transcript.replaceChildren();
  if (!c.messages.length) {
    const p = document.createElement("p"); p.className = "empty"; p.id = "empty";
    p.textContent = "Ask anything. Enter sends, Shift+Enter adds a line, Escape stops.";
    transcript.append(p);
  }
  for (const msg of c.messages) {
    if (msg.role === "user") { userBubble(c, msg); continue; }
    const el = bubble("assistant", "");
    const answer = live.get(c.id);
    if (answer && answer.msg === msg) {
      // Streaming: the live answer draws here from now on.
      answer.el = el;
      answer.view = renderer(el.querySelector(".text"));
      answer.view.update(msg.content);
      setMeta(el, "streaming");
    } else {
      settle(msg, el);
    }
  }
  $("stop").disabled = !live.has(c.id);
  drawList();
  transcript.lastElementChild?.scrollIntoView({ block: "end" });
}

// ---- streaming -----------------------------------------------------------

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

/** What the server is sent: the conversation up to the new answer. */
function requestBody(c) {
  const messages = [];
  const s = c.settings;
  if (s.system && s.system.trim()) messages.push({ role: "system", content: s.system.trim() });
  for (const m of c.messages.slice(0, -1)) {
    if (m.role === "user" || m.content) messages.push({ role: m.role, content: m.content });
  }
  const body = { model: s.model || modelField.value || undefined, messages, stream: true, stream_options: { include_usage: true } };
  if (s.temperature !== undefined && s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.max_tokens) body.max_tokens = Number(s.max_tokens);
  return JSON.stringify(body);
}

/** Streams one answer into `msg`, opening (and after a drop, reopening
 *  from the last event seen) with `open(lastEventId)`. */
async function stream(c, msg, open) {
  const answer = { c, msg, el: null, view: null, id: null, done: false, tokens: 0, first: 0, started: performance.now() };
  live.set(c.id, answer);
  if (conv === c) show(c);
  const draw = (text) => { if (answer.el) setMeta(answer.el, text); };
  for (let attempt = 0; attempt < 6 && !answer.done; attempt++) {
    if (attempt > 0) await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** attempt, 4000)));
    try {
      const response = await open(msg.lastEventId);
      if (response.status === 204) { end(answer, "error", "the server no longer holds this answer; send again."); return; }
      if (!response.ok) { end(answer, "error", await readError(response)); return; }
      answer.id = response.headers.get("X-Completion-Id") || answer.id;
      for await (const data of sseEvents(response.body, (id) => { msg.lastEventId = id; })) {
        if (data === "[DONE]") { answer.done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) { end(answer, "error", chunk.error.message); return; }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (!answer.first) answer.first = performance.now();
          answer.tokens++;
          msg.content += piece;
          answer.view?.update(msg.content);
          draw(stats(answer, "streaming"));
          save(c);
          if (conv === c) answer.el?.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) msg.finish = choice.finish_reason;
      }
    } catch (e) {
      // The connection dropped: retry from the last event seen.
      draw("reconnecting…");
    }
  }
  if (answer.done) end(answer, msg.finish || "stop");
  else end(answer, "error", "the connection was lost; send again to retry.");
}

function stats(answer, state) {
  const parts = [state];
  if (answer.first) {
    parts.push("first token " + Math.round(answer.first - answer.started) + " ms");
    const seconds = (performance.now() - answer.first) / 1000;
    if (answer.tokens > 1 && seconds > 0) parts.push(((answer.tokens - 1) / seconds).toFixed(1) + " tokens/s");
  }
  return parts.join(" · ");
}

function end(answer, state, error) {
  const { c, msg } = answer;
  msg.state = state;
  if (error) msg.error = error;
  msg.stats = stats(answer, "").replace(/^ · /, "");
  if (live.get(c.id) === answer) live.delete(c.id);
  save(c, true);
  // Drawn again whole: an answer replaced mid-stream ends after the next
  // one has taken the page.
  if (conv === c) show(c);
}

function ask(c, text) {
  const previous = live.get(c.id);
  if (previous) {
    // The server ends the unfinished answer of this session (its next
    // request replaces it); it stays as far as it got.
    live.delete(c.id);
  }
  if (!c.messages.length || c.title === "New chat") c.title = text.slice(0, 48);
  c.messages.push({ role: "user", content: text });
  answerIn(c);
}

function answerIn(c) {
  const msg = { role: "assistant", content: "", state: "streaming", lastEventId: null };
  c.messages.push(msg);
  conversations = [c, ...conversations.filter((x) => x !== c)];
  save(c, true);
  const body = requestBody(c);
  stream(c, msg, (last) => {
    const extra = { "X-Session-Id": c.id };
    // A retry names the last event seen: the server resumes that
    // generation instead of starting another.
    if (last) extra["Last-Event-ID"] = last;
    return fetch("/v1/chat/completions", { method: "POST", headers: headers(extra), body });
  });
}

function regenerate(c) {
  const last = c.messages[c.messages.length - 1];
  if (!last || last.role !== "assistant" || live.has(c.id)) return;
  c.messages.pop();
  answerIn(c);
}

/** After a reload: the answer that was streaming continues from the last
 *  event kept, through the session's route. */
function reattach(c, msg) {
  stream(c, msg, (last) => {
    const extra = last ? { "Last-Event-ID": last } : {};
    return fetch("/v1/sessions/" + encodeURIComponent(c.id) + "/stream", { headers: headers(extra) });
  });
}

async function stop(answer) {
  if (!answer) return;
  $("stop").disabled = true;
  const id = answer.id || (answer.msg.lastEventId || "").split(".")[0];
  if (!id) return;
  // Cancel on the server, so the model stops at once; the stream then ends
  // with finish_reason "cancelled".
  await fetch("/v1/chat/completions/" + encodeURIComponent(id) + "/cancel", { method: "POST", headers: headers() }).catch(() => {});
}

// ---- import and export ---------------------------------------------------

function exportAll() {
  const blob = new Blob([JSON.stringify(conversations, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "sluicegate-conversations.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function importFile(file) {
  try {
    const value = JSON.parse(await file.text());
    const list = (Array.isArray(value) ? value : [value]).filter(store.valid);
    if (!list.length) throw new Error("no conversations in it");
    for (const c of list) {
      // What streamed when it was exported does not stream now.
      for (const m of c.messages) if (m.state === "streaming") { m.state = "error"; m.error = "interrupted"; }
      c.settings = c.settings || {};
      c.updated = Number(c.updated) || Date.now();
      conversations = [c, ...conversations.filter((x) => x.id !== c.id)];
      await store.put(c);
    }
    show(list[0]);
  } catch (e) {
    alert("Import failed: " + e.message);
  }
}

// ---- wiring --------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  input.style.height = "";
  ask(conv, text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
input.addEventListener("input", () => { input.style.height = ""; input.style.height = input.scrollHeight + "px"; });
$("stop").addEventListener("click", () => stop(live.get(conv.id)));
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && live.has(conv.id)) stop(live.get(conv.id)); });
$("new").addEventListener("click", () => { show(create()); input.focus(); });
$("menu").addEventListener("click", () => document.body.classList.toggle("side-open"));
$("export").addEventListener("click", exportAll);
$("import").addEventListener("change", (e) => { if (e.target.files[0]) importFile(e.target.files[0]); e.target.value = ""; });
for (const [name, field] of Object.entries(settingFields)) {
  field.addEventListener("change", () => { conv.settings[name] = field.value; save(conv, true); });
}
modelField.addEventListener("change", () => { conv.settings.model = modelField.value; save(conv, true); });

conversations = await store.all().catch(() => []);
const last = localStorage.getItem("sluicegate.current");
show(conversations.find((c) => c.id === last) || conversations[0] || create());
for (const c of conversations) {
  const msg = c.messages[c.messages.length - 1];
  if (msg && msg.role === "assistant" && msg.state === "streaming") reattach(c, msg);
}
loadModels();
input.focus();
