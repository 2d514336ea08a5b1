// Requests to the node that served the page, with the API key when one is stored.
//
// Every /v1/ route answers a failure as {"error": {"message": ..., ...}} (api/errors.py, and the
// instance and placement routes); anything else came from something in between (a proxy), and
// only its status line is shown.

import { $ } from "./dom.js";

const REQUEST_TIMEOUT_MS = 4000;
const API_KEY_STORE = "shoal.apiKey";

export function authHeaders() {
  const key = localStorage.getItem(API_KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export async function errorFrom(resp) {
  if (resp.status === 401) askForKey();
  const json = (resp.headers.get("Content-Type") || "").startsWith("application/json");
  const message = json ? (await resp.json()).error.message : `${resp.status} ${resp.statusText}`;
  return new Error(message);
}

/** The JSON answer of `path`; a refusal is thrown as an Error with the server's message. */
export async function api(path, { method = "GET", body, timeout = REQUEST_TIMEOUT_MS } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeout), cache: "no-store",
  });
  if (!resp.ok) throw await errorFrom(resp);
  return resp.json();
}

// -- the key dialog: opened by the first 401, at most once at a time

let keyDialogOpen = false;

function askForKey() {
  const dlg = $("key-dialog");
  if (keyDialogOpen) return;
  keyDialogOpen = true;
  $("key-input").value = localStorage.getItem(API_KEY_STORE) || "";
  dlg.showModal();
}

/** `onSaved` runs after the user saves a key (or clears it), to retry what was refused. */
export function initKeyDialog(onSaved) {
  const dlg = $("key-dialog");
  dlg.addEventListener("close", () => {
    keyDialogOpen = false;
    if (dlg.returnValue !== "save") return;
    const key = $("key-input").value.trim();
    if (key) localStorage.setItem(API_KEY_STORE, key); else localStorage.removeItem(API_KEY_STORE);
    onSaved();
  });
}
