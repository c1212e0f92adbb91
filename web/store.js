// Conversations kept in the browser (IndexedDB), one record each:
// { id (its X-Session-Id), title, updated, settings, messages }.

const NAME = "sluicegate";
const STORE = "conversations";
let opened = null;

function open() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function run(mode, act) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const request = act(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request.result);
    tx.onerror = () => reject(tx.error);
  });
}

/** Every conversation, the most recent first. */
export async function all() {
  const list = await run("readonly", (s) => s.getAll());
  return list.sort((a, b) => b.updated - a.updated);
}

export const put = (conversation) => run("readwrite", (s) => s.put(conversation));
export const remove = (id) => run("readwrite", (s) => s.delete(id));

/** Whether `value` has a conversation's shape (for imports). */
export function valid(value) {
  return value && typeof value.id === "string" && typeof value.title === "string"
    && Array.isArray(value.messages)
    && value.messages.every((m) => (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}
