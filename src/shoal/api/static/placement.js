// The Place panel: preview with GET /v1/placement, place with POST /v1/instances.
//
// The preview answers {"model", "spec", "plans": {strategy: plan}}: for "auto", the best plan of
// every strategy and auto's pick among them; otherwise just the one asked for. Each plan is a
// `Placement` (placement/planner.py) or {"error", "missing_bytes"} when there is none.

import { api } from "./api.js";
import { $, h } from "./dom.js";
import { colorFor, fmtBytes, fmtMs, fmtTps } from "./format.js";
import { layerBar, refreshInstancesSoon } from "./instances.js";
import { nodeView } from "./topology.js";

export function initPlacement() {
  $("place-form").addEventListener("submit", preview);
}

async function preview(ev) {
  ev.preventDefault();
  const model = $("place-model").value;
  const strategy = $("place-strategy").value;
  const btn = $("preview-btn");
  if (!model) return;
  btn.disabled = true;
  $("plan").replaceChildren(h("p", { class: "muted" }, `Planning ${model}…`));
  try {
    const body = await api(`/v1/placement?${new URLSearchParams({ model, strategy })}`, { timeout: 15000 });
    renderPlans(model, body.plans, strategy);
  } catch (e) {
    $("plan").replaceChildren(h("p", { class: "error-text", role: "alert" }, `Could not plan ${model}: ${e.message}`));
  } finally {
    btn.disabled = false;
  }
}

/** Bytes each node would hold, in stage order (ShardPlan's memory_bytes is not serialised). */
function memoryByNode(placement) {
  const out = new Map();
  for (const sh of placement.shards) {
    const bytes = sh.weight_bytes + sh.kv_bytes + sh.overhead_bytes;
    const prev = out.get(sh.node_id);
    out.set(sh.node_id, { name: sh.node_name, bytes: (prev ? prev.bytes : 0) + bytes });
  }
  return out;
}

function planNodeRow(nodeId, { name, bytes }) {
  const n = nodeView(nodeId);
  const total = n?.profile ? n.profile.ram_total_bytes : null;
  const avail = n ? n.memory_available_bytes : null;
  const used = total !== null && avail !== null ? total - avail : 0;
  const pct = (x) => (total ? `${Math.max(0, Math.min(100, (100 * x) / total)).toFixed(1)}%` : "0%");
  return h("li", { style: { "--node-color": colorFor(nodeId) } },
    h("span", { class: "who" }, h("span", { class: "swatch", "aria-hidden": "true" }), name),
    h("div", { class: "meter" },
      h("div", { class: "meter-bar", role: "img", "aria-label": `${name}: ${fmtBytes(bytes)} for this model, ${fmtBytes(used)} already used of ${fmtBytes(total)}` },
        h("span", { style: { width: pct(used) } }),
        h("span", { class: "plan", style: { left: pct(used), width: pct(bytes) } })),
      h("div", { class: "meter-text" },
        h("span", {}, `+${fmtBytes(bytes)} for this model`),
        h("span", {}, `${fmtBytes(avail)} free of ${fmtBytes(total)}`))));
}

function planCard(model, key, plan, chosen) {
  if ("error" in plan) {
    return h("article", { class: `plan-card${chosen ? " chosen" : ""}`, "data-strategy": key, "aria-label": `${key} plan` },
      h("div", { class: "plan-head" }, h("h3", {}, key), h("span", { class: "pill infeasible" }, "does not fit")),
      h("p", { class: "why" }, plan.error));
  }
  // "auto" may pick "single", which is not a strategy one can ask for: Place sends `key` back.
  const title = key === plan.strategy ? key : `${key} → ${plan.strategy}`;
  const mem = memoryByNode(plan);
  const place = h("button", { type: "button", class: chosen ? "" : "secondary", "data-strategy": key }, `Place ${model} (${title})`);
  place.addEventListener("click", () => placeModel(model, key, [...mem.keys()], place));
  return h("article", { class: `plan-card${chosen ? " chosen" : ""}`, "data-strategy": key, "aria-label": `${title} plan` },
    h("div", { class: "plan-head" },
      h("h3", {}, title),
      chosen ? h("span", { class: "pill ready" }, key === "auto" ? "fastest" : "chosen") : null),
    h("dl", { class: "predict" },
      h("div", {}, h("dt", {}, "time to first token"), h("dd", { class: "ttft" }, fmtMs(plan.prediction.ttft_s * 1000))),
      h("div", {}, h("dt", {}, "tokens/s"), h("dd", { class: "tps" }, fmtTps(plan.prediction.decode_tokens_per_s))),
      h("div", {}, h("dt", {}, "nodes"), h("dd", {}, String(mem.size)))),
    layerBar(model, plan.shards),
    h("ul", { class: "plan-nodes", "aria-label": "Memory per node" }, [...mem].map(([id, m]) => planNodeRow(id, m))),
    h("p", { class: "why" }, plan.reason),
    place);
}

function renderPlans(model, plans, requested) {
  // Under "auto", the strategy auto picked is shown once, as "auto → <strategy>".
  const auto = plans.auto && !("error" in plans.auto) ? plans.auto : null;
  const sameAsAuto = (key, p) => auto && key !== "auto" && !("error" in p) &&
    p.strategy === auto.strategy && JSON.stringify(p.shards) === JSON.stringify(auto.shards);
  const cards = Object.entries(plans)
    .filter(([key, p]) => !sameAsAuto(key, p))
    .map(([key, p]) => planCard(model, key, p, key === requested));
  // The chosen plan first: it is the one "Place" is about.
  cards.sort((a, b) => b.classList.contains("chosen") - a.classList.contains("chosen"));
  $("plan").replaceChildren(...cards);
}

async function placeModel(model, strategy, nodes, button) {
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Placing…";
  // The strategy asked for and its nodes in stage order, so the planner reproduces the plan shown.
  const body = { model, strategy, nodes };
  try {
    const { instance } = await api("/v1/instances", { method: "POST", body, timeout: 30000 });
    $("plan").append(h("p", { class: "muted", role: "status" }, `Placed ${model} as ${instance.id}: see Instances for its progress.`));
    button.textContent = "Placed";
    refreshInstancesSoon();
  } catch (e) {
    button.disabled = false;
    button.textContent = label;
    $("plan").append(h("p", { class: "error-text", role: "alert" }, `Placing ${model} failed: ${e.message}`));
  }
}
