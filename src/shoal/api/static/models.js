// The model pickers of the Place and Chat panels: GET /v1/models every 15 s (OpenAI's
// {"object": "list", "data": [{"id", ...}]}), with the models of ready instances marked.

import { api } from "./api.js";
import { $, h } from "./dom.js";
import { liveInstances } from "./instances.js";

const POLL_MS = 15000;

let models = []; // ids
let error = null; // why the list could not be read, or null

/** Why there is no model to choose, for the chat's status line; null when the list was read. */
export const modelsError = () => error;

export function startModels() {
  refreshModels();
  setInterval(refreshModels, POLL_MS);
}

export async function refreshModels() {
  try {
    models = (await api("/v1/models")).data.map((m) => m.id);
    error = null;
  } catch (e) {
    error = e.message;
    $("chat-status").textContent = error;
  }
  renderModelChoices();
}

export function renderModelChoices() {
  const ready = new Set(liveInstances().filter((i) => i.status === "ready").map((i) => i.model));
  const ids = [...new Set([...ready, ...models])];
  const sig = JSON.stringify([ids, [...ready], error]);
  for (const sel of [$("place-model"), $("chat-model")]) {
    if (sel.dataset.sig === sig) continue;
    sel.dataset.sig = sig;
    // The choice survives a redraw; before the first one, the chat's is the saved conversation's.
    const current = sel.value || sel.dataset.want || "";
    const label = (id) => (sel.id === "chat-model" && ready.has(id) ? `${id} (ready)` : id);
    sel.replaceChildren(...(ids.length ? ids.map((id) => h("option", { value: id }, label(id))) : [h("option", { value: "" }, error || "no models")]));
    if (ids.includes(current)) sel.value = current;
  }
}
