// Model output as markdown, rendered as it streams. Model output is
// untrusted: raw HTML in it is shown as text, what marked makes of the rest
// goes through DOMPurify, and links open apart from the page.
//
// Incremental: the blocks that are complete (another block follows them)
// are rendered once and kept; only the last, still growing block is parsed
// again, at most once per frame. A long answer is never re-parsed whole.

import { Lexer, Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

const escapeHtml = (s) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const marked = new Marked({
  gfm: true,
  // Block and inline HTML alike: shown as typed.
  renderer: {
    html: ({ text, block }) => {
      const shown = escapeHtml(text.replace(/\n+$/, ""));
      return block ? "<p>" + shown + "</p>" : shown;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("rel", "noopener noreferrer");
    node.setAttribute("target", "_blank");
  }
});

/** Copies `text`, and says so on `button` for a moment. */
export async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (_) {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

/** Markdown to sanitized DOM, with a copy button on each code block. */
function render(markdown) {
  const fragment = DOMPurify.sanitize(marked.parse(markdown), { RETURN_DOM_FRAGMENT: true });
  // No blank text between blocks: the text a reader copies is the text.
  for (const node of [...fragment.childNodes]) {
    if (node.nodeType === Node.TEXT_NODE && !node.textContent.trim()) node.remove();
  }
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    // Coloured when the fence names a language highlight.js knows: it
    // rebuilds the block from its text, escaped.
    const language = code && /(?:^|\s)language-([\w+#-]+)/.exec(code.className);
    if (language && hljs.getLanguage(language[1])) hljs.highlightElement(code);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    button.addEventListener("click", () => copy(code ? code.textContent : pre.textContent, button));
    const wrap = document.createElement("div");
    wrap.className = "code";
    pre.replaceWith(wrap);
    wrap.append(button, pre);
  }
  return fragment;
}

/** A renderer into `container`: `update(text)` with the whole text so far
 *  (cheap, call it per token), `finish(text)` once at the end. */
export function renderer(container) {
  const done = document.createElement("div");
  const live = document.createElement("div");
  container.replaceChildren(done, live);
  let frozen = 0; // characters of the text rendered into `done` for good
  let pending = null;
  let scheduled = false;

  function draw() {
    scheduled = false;
    if (pending === null) return;
    // As marked reads it, so that lengths agree with its tokens.
    const text = pending.replace(/\r\n?/g, "\n");
    pending = null;
    const tokens = new Lexer({ gfm: true }).lex(text.slice(frozen));
    // Every block before the last one that has text is complete.
    let last = tokens.length - 1;
    while (last > 0 && tokens[last].type === "space") last--;
    if (last > 0) {
      const complete = tokens.slice(0, last).map((t) => t.raw).join("");
      done.append(render(complete));
      frozen += complete.length;
    }
    live.replaceChildren(render(text.slice(frozen)));
  }

  return {
    update(text) {
      pending = text;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(draw);
      }
    },
    finish(text) {
      pending = text;
      draw();
    },
  };
}
