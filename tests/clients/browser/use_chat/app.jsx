// A minimal chat page on the AI SDK's useChat, talking to sluicegate with
// no server of its own in between. The test bundles it with esbuild; the
// page reads sluicegate's address and the chat id from its query string.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";
import { useState } from "react";
import { createRoot } from "react-dom/client";

const params = new URLSearchParams(location.search);
const transport = new DefaultChatTransport({
  api: `${params.get("server")}/v1/ui/chat`,
  body: { model: "echo" },
});

function App() {
  const { messages, sendMessage, status, stop } = useChat({
    id: params.get("chat"),
    transport,
    resume: true,
  });
  const [input, setInput] = useState("");
  const busy = status === "submitted" || status === "streaming";
  return (
    <main>
      <ul id="messages">
        {messages.map((m) => (
          <li key={m.id} className={m.role} data-id={m.id}>
            {m.parts.map((p, i) => (p.type === "text" ? <span key={i}>{p.text}</span> : null))}
          </li>
        ))}
      </ul>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          sendMessage({ text: input });
          setInput("");
        }}
      >
        <input id="input" value={input} onChange={(e) => setInput(e.target.value)} />
        <button id="send" type="submit" disabled={busy}>Send</button>
        <button id="stop" type="button" onClick={() => stop()} disabled={!busy}>Stop</button>
      </form>
      <p id="status">{status}</p>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<App />);
