// Requests to the node that served the page. The page holds no key: the browser sends the node's
// HttpOnly login cookie with every same-origin request (or, on loopback, none is needed), so no
// script of the page, nor anything injected into it, can read the key.
//
// Every /v1/ route answers a failure as {"error": {"message": ..., ...}} (api/errors.py, and the
// instance and placement routes); anything else came from something in between (a proxy), and
// only its status line is shown.

import { $ } from "./dom.js";

const REQUEST_TIMEOUT_MS = 4000;

export async function errorFrom(resp) {
  if (resp.status === 401) askForKey();
  const json = (resp.headers.get("Content-Type") || "").startsWith("application/json");
  const message = json ? (await resp.json()).error.message : `${resp.status} ${resp.statusText}`;
  return new Error(message);
}

/** The JSON answer of `path`; a refusal is thrown as an Error with the server's message. */
export async function api(path, { method = "GET", body, timeout = REQUEST_TIMEOUT_MS } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeout), cache: "no-store",
  });
  if (!resp.ok) throw await errorFrom(resp);
  return resp.json();
}

// -- the key dialog: opened by the first 401 (the login cookie expired, or the node's key changed),
// at most once at a time. The key goes to POST /login, which answers with a new cookie; it is not kept.

let keyDialogOpen = false;

function askForKey() {
  if (keyDialogOpen) return;
  keyDialogOpen = true;
  $("key-input").value = "";
  $("key-error").textContent = "";
  $("key-dialog").showModal();
}

/** `onSignedIn` runs once the node took the key, to retry what was refused. */
export function initKeyDialog(onSignedIn) {
  const dlg = $("key-dialog");
  dlg.addEventListener("close", async () => {
    keyDialogOpen = false;
    if (dlg.returnValue !== "save") return;
    const resp = await fetch("/login", {
      method: "POST", headers: { "Content-Type": "application/json" }, cache: "no-store",
      body: JSON.stringify({ key: $("key-input").value.trim() }),
    });
    $("key-input").value = "";
    if (resp.ok) {
      onSignedIn();
      return;
    }
    askForKey();
    $("key-error").textContent = "That is not this node's key.";
  });
}
