// The Chat panel: POST /v1/chat/completions with stream: true, read as server-sent events.
//
// Chunks are OpenAI's chat.completion.chunk; the finish chunk and the usage chunk (choices: [])
// carry shoal's own timings in "shoal" ({ttft_ms, tokens_per_s} once known), which replace the
// page's estimates. A failure after the stream started arrives as one {"error": {...}} event, and
// SSE comments are keep-alives while a model loads. The conversation lives in sessionStorage.

import { errorFrom } from "./api.js";
import { $, h } from "./dom.js";
import { fmtMs, fmtTps } from "./format.js";
import { refreshInstancesSoon } from "./instances.js";
import { modelsError } from "./models.js";

const STORE_KEY = "shoal.chat.v1";
const FINISH_TEXT = { stop: "", length: "max tokens reached", stopped: "stopped" };

const chat = {
  messages: [], // {role, content, stats?, error?}
  controller: null, // the AbortController of the reply streaming now
};

export function initChat() {
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-stop").addEventListener("click", stopChat);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-model").addEventListener("change", saveConversation);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendChat(); }
    else if (e.key === "Escape") stopChat();
  });
  loadConversation();
}

function loadConversation() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    if (saved) {
      chat.messages = saved.messages;
      $("chat-model").dataset.want = saved.model;
    }
  } catch { /* a broken store is an empty conversation */ }
  for (const m of chat.messages) $("chat-log").append(messageEl(m));
  const last = chat.messages.filter((m) => m.role === "assistant" && m.stats).pop();
  if (last) setStats(last.stats);
  scrollLog();
}

function saveConversation() {
  try {
    sessionStorage.setItem(STORE_KEY, JSON.stringify({ messages: chat.messages, model: $("chat-model").value }));
  } catch { /* full or disabled storage: the page still holds it */ }
}

function statsText(st) {
  const parts = [];
  if (st.ttft_ms !== undefined) parts.push(`TTFT ${fmtMs(st.ttft_ms)}`);
  if (st.tps !== undefined) parts.push(`${fmtTps(st.tps)} tok/s`);
  parts.push(`${st.tokens} tokens`);
  const finish = st.finish in FINISH_TEXT ? FINISH_TEXT[st.finish] : st.finish;
  if (finish) parts.push(finish);
  parts.push(st.model);
  return parts.join(" · ");
}

function messageEl(m) {
  return h("li", { class: `msg ${m.role}${m.error ? " error" : ""}`, "data-role": m.role },
    h("span", { class: "who" }, m.role === "user" ? "you" : m.role),
    h("p", { class: "text" }, m.content),
    m.role === "assistant" ? h("span", { class: "foot" }, m.error || statsText(m.stats)) : null);
}

function scrollLog() {
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

function setStats(st) {
  $("stat-ttft").textContent = st.ttft_ms === undefined ? "–" : fmtMs(st.ttft_ms);
  $("stat-tps").textContent = st.tps === undefined ? "–" : fmtTps(st.tps);
  $("stat-tokens").textContent = String(st.tokens);
}

function setStreaming(on) {
  $("chat-send").disabled = on;
  $("chat-stop").disabled = !on;
  $("chat-clear").disabled = on;
  $("chat-model").disabled = on;
}

/** Server-sent events from a fetch body: yields each event's data (string), and null for comments. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = [];
      let comment = false;
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith(":")) comment = true;
      }
      if (data.length) yield data.join("\n");
      else if (comment) yield null;
    }
  }
}

async function sendChat(ev) {
  ev?.preventDefault();
  if (chat.controller) return;
  const input = $("chat-input");
  const text = input.value.trim();
  const model = $("chat-model").value;
  if (!text) return;
  if (!model) { $("chat-status").textContent = modelsError() || "No model to chat with."; return; }
  input.value = "";

  const user = { role: "user", content: text };
  chat.messages.push(user);
  $("chat-log").append(messageEl(user));
  const st = { model, tokens: 0 };
  const reply = { role: "assistant", content: "", stats: st };
  chat.messages.push(reply);
  const el = messageEl(reply);
  el.classList.add("streaming");
  $("chat-log").append(el);
  const textEl = el.querySelector(".text");
  const footEl = el.querySelector(".foot");
  scrollLog();

  const maxTokens = parseInt($("chat-max-tokens").value, 10);
  const temperature = parseFloat($("chat-temperature").value);
  const history = chat.messages.filter((m) => m !== reply && !m.error).map(({ role, content }) => ({ role, content }));
  const body = {
    model, messages: history, stream: true, stream_options: { include_usage: true },
    ...(Number.isFinite(maxTokens) && maxTokens > 0 ? { max_tokens: maxTokens } : {}),
    ...(Number.isFinite(temperature) ? { temperature } : {}),
  };

  const controller = new AbortController();
  chat.controller = controller;
  setStreaming(true);
  const status = $("chat-status");
  status.textContent = `Waiting for ${model}…`;
  const t0 = performance.now();
  let tFirst = null;
  setStats(st);
  const waitTimer = setInterval(() => {
    if (tFirst === null) status.textContent = `Waiting for ${model}… ${((performance.now() - t0) / 1000).toFixed(0)} s (a model that is not loaded yet loads first)`;
  }, 1000);

  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal, cache: "no-store",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw await errorFrom(resp);
    for await (const data of sseEvents(resp.body)) {
      if (data === null) continue;
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0]; // absent from the usage chunk
      const piece = choice?.delta.content;
      if (piece) {
        const now = performance.now();
        if (tFirst === null) {
          tFirst = now;
          st.ttft_ms = now - t0;
          status.textContent = "Streaming…";
          refreshInstancesSoon(); // the request may have just loaded the model
        }
        reply.content += piece;
        textEl.textContent = reply.content;
        st.tokens++;
        if (st.tokens > 1 && now > tFirst) st.tps = (st.tokens - 1) / ((now - tFirst) / 1000);
        setStats(st);
        footEl.textContent = statsText(st);
        scrollLog();
      }
      if (choice?.finish_reason) st.finish = choice.finish_reason;
      if (chunk.shoal) {
        if (chunk.shoal.ttft_ms !== undefined) st.ttft_ms = chunk.shoal.ttft_ms;
        if (chunk.shoal.tokens_per_s !== undefined) st.tps = chunk.shoal.tokens_per_s;
      }
      if (chunk.usage) st.tokens = chunk.usage.completion_tokens;
    }
    status.textContent = "";
  } catch (e) {
    if (controller.signal.aborted) {
      st.finish = "stopped";
      status.textContent = "Stopped.";
    } else {
      reply.error = `Error: ${e.message}`;
      el.classList.add("error");
      status.textContent = reply.error;
    }
  } finally {
    clearInterval(waitTimer);
    chat.controller = null;
    setStats(st);
    el.classList.remove("streaming");
    el.dataset.done = "true";
    footEl.textContent = reply.error || statsText(st);
    setStreaming(false);
    saveConversation();
    input.focus();
  }
}

function stopChat() {
  chat.controller?.abort();
}

function clearChat() {
  if (chat.controller) return;
  chat.messages = [];
  $("chat-log").replaceChildren();
  setStats({ tokens: 0 });
  $("chat-status").textContent = "Conversation cleared.";
  saveConversation();
}
