// The Instances panel: GET /v1/instances every 1.5 s, Stop (DELETE /v1/instances/{id}).
//
// The answer is {"instances": [...], "ended": [...]}, each instance in the shape of
// `public_instance` (daemon/records.py). Live ones (reserving, loading, ready, recovering) get a
// Stop button and their latest events ("b (1a2b3c4d) is down; re-placing", "re-placed on a+c in
// 3.4 s"); ended ones ("stopped", "failed", with `error` and `ended_at`) are listed apart, without.

import { api } from "./api.js";
import { $, h, replaceIfChanged } from "./dom.js";
import { colorFor, fmtTps, instColor, layersText, plural } from "./format.js";

const POLL_MS = 1500;
const SHOWN_EVENTS = 3;

let live = [];
let ended = [];
let onChange = () => {};

/** The instances that hold (or are getting) their nodes' memory now. */
export const liveInstances = () => live;

export function startInstances(changed) {
  onChange = changed;
  poll();
}

async function poll() {
  await refresh();
  setTimeout(poll, document.hidden ? 5 * POLL_MS : POLL_MS);
}

async function refresh() {
  try {
    const data = await api("/v1/instances");
    live = data.instances;
    ended = data.ended;
    render();
    onChange();
  } catch (e) {
    $("instances-meta").textContent = `could not refresh: ${e.message}`;
  }
}

let soonTimer = null;

/** Look again shortly (after a place, a stop, or a chat that may have loaded a model). */
export function refreshInstancesSoon() {
  clearTimeout(soonTimer);
  soonTimer = setTimeout(refresh, 200);
}

/** The layers each node holds, as one bar; a tensor group's ranks share their stage's width. */
export function layerBar(model, shards) {
  const total = Math.max(...shards.map((sh) => sh.layers[1]));
  const sorted = [...shards].sort((a, b) => a.layers[0] - b.layers[0] || a.tp_rank - b.tp_rank);
  return h("div", { class: "layerbar", role: "img", "aria-label": `${model} layers by node: ` + sorted.map((sh) => `${sh.node_name} ${layersText(sh.layers)}`).join("; ") },
    sorted.map((sh) => {
      const frac = (sh.layers[1] - sh.layers[0]) / total / sh.tp_size;
      const tp = sh.tp_size > 1 ? ` · tp${sh.tp_rank}` : "";
      return h("span", {
        style: { "--node-color": colorFor(sh.node_id), flex: `${frac} 1 0` },
        title: `${sh.node_name}: ${layersText(sh.layers)}${tp}`,
      }, `${sh.node_name} ${sh.layers[0]}–${sh.layers[1] - 1}${tp}`);
    }));
}

function nodesText(inst) {
  const names = [...new Set(inst.shards.map((sh) => sh.node_name))];
  return `${plural(names.length, "node")}: ${names.join(", ")}`;
}

async function stop(inst, button) {
  button.disabled = true;
  button.textContent = "Stopping…";
  try {
    await api(`/v1/instances/${encodeURIComponent(inst.id)}`, { method: "DELETE", timeout: 15000 });
    refreshInstancesSoon();
  } catch (e) {
    button.disabled = false;
    button.textContent = "Stop";
    $("instances-meta").textContent = `stopping ${inst.model} failed: ${e.message}`;
  }
}

function liveItem(inst) {
  const stopButton = h("button", { type: "button", class: "danger small", "aria-label": `Stop ${inst.model}` }, "Stop");
  stopButton.addEventListener("click", () => stop(inst, stopButton));
  return h("li", { class: "instance", "data-instance-id": inst.id, "data-status": inst.status, style: { "--inst-color": instColor(inst.id) } },
    h("div", { class: "instance-head" },
      h("h3", {}, inst.model),
      h("span", { class: `pill ${inst.status}` }, inst.status),
      inst.degraded ? h("span", { class: "pill degraded", title: "a better plan exists; it is re-placed when idle" }, "degraded") : null,
      stopButton),
    h("p", { class: "meta" },
      [`strategy: ${inst.strategy}`, nodesText(inst), ...held(inst), `predicted ${fmtTps(inst.prediction.decode_tokens_per_s)} tok/s`,
        `id ${inst.id.slice(0, 12)}`].join(" · ")),
    layerBar(inst.model, inst.shards),
    (inst.copying || []).map((c) => h("p", { class: "meta copying" },
      `copying the model's files to ${c.node_name} from ${c.source}: ${Math.floor(100 * c.done_bytes / Math.max(c.total_bytes, 1))}%`)),
    inst.error ? h("p", { class: "meta error-text" }, inst.error) : null,
    inst.events.length ? h("ul", { class: "events" }, inst.events.slice(-SHOWN_EVENTS).map((e) =>
      h("li", {}, `${new Date(e.at * 1000).toLocaleTimeString()} ${e.text}`))) : null);
}

// How the placement holds the weights and sums its groups, where it is not the default.
const held = (inst) => [inst.weights === "q8" ? "weights: 8-bit" : null,
  inst.collective && inst.collective !== "shoal" ? `groups sum over ${inst.collective}` : null].filter(Boolean);

function endedItem(inst) {
  const when = `ended ${new Date(inst.ended_at * 1000).toLocaleTimeString()}`;
  return h("li", { class: "instance ended", "data-instance-id": inst.id, "data-status": inst.status, style: { "--inst-color": instColor(inst.id) } },
    h("div", { class: "instance-head" },
      h("h3", {}, inst.model),
      h("span", { class: `pill ${inst.status}` }, inst.status)),
    h("p", { class: "meta" }, [`strategy: ${inst.strategy}`, nodesText(inst), `id ${inst.id.slice(0, 12)}`, when].filter(Boolean).join(" · ")),
    inst.error ? h("p", { class: "meta error-text" }, inst.error) : null);
}

// What a card shows, without the shards' live counters (which change on every poll).
const shown = (inst) => [inst.id, inst.model, inst.strategy, inst.weights, inst.collective, inst.status, inst.degraded, inst.error, inst.ended_at, inst.epoch, inst.events, inst.copying,
  inst.prediction.decode_tokens_per_s, inst.shards.map((sh) => [sh.node_id, sh.node_name, sh.layers, sh.tp_rank, sh.tp_size])];

function render() {
  replaceIfChanged($("instance-list"), JSON.stringify(live.map(shown)), () => live.map(liveItem));
  replaceIfChanged($("ended-list"), JSON.stringify(ended.map(shown)), () => ended.map(endedItem));
  $("instances-empty").hidden = live.length > 0;
  $("ended").hidden = ended.length === 0;
  $("instances-meta").textContent = `${live.length} running` + (ended.length ? ` · ${ended.length} recently ended` : "");
}
