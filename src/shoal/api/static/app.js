// shoal dashboard: vanilla ES module, no framework, no build step, no CDN.
//
// It polls the node that served it (same origin) and draws what it answers:
//   GET /v1/cluster            nodes, links (and instances, once placement fills them)   every 1 s
//   GET /v1/instances          placed models and their shards                            every 1.5 s
//   GET /v1/placement          plans + predictions for a model, on request
//   POST/DELETE /v1/instances  place / stop
//   GET /v1/models, POST /v1/chat/completions (stream: true)   chat
// An endpoint that answers 404 "no such endpoint" is shown as not available on this node yet, and
// the rest of the page keeps working. Text from the server only ever lands in textContent.

const CLUSTER_POLL_MS = 1000;
const INSTANCES_POLL_MS = 1500;
const MISSING_RETRY_MS = 15000; // how often to look again for an endpoint that was missing
const MODELS_POLL_MS = 15000;
const GONE_KEEP_MS = 60000; // a node that left the view stays on screen, marked gone, this long
const REQUEST_TIMEOUT_MS = 4000;
const STORE_KEY = "shoal.chat.v1";
const API_KEY_STORE = "shoal.apiKey";

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------ DOM helpers

/** h("div", {class: "x", onclick: fn}, child, "text", [more]) -> element (text is never parsed as HTML) */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") for (const [p, val] of Object.entries(v)) el.style.setProperty(p, val);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  el.append(...children);
  return el;
}

// ------------------------------------------------------------------------------------ formatting

function fmtBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n.toFixed(0)} B` : `${n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
}
function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}
function fmtRate(mbps) {
  if (mbps === null || mbps === undefined || !Number.isFinite(mbps)) return "–";
  return mbps >= 1000 ? `${(mbps / 1000).toFixed(1)} Gb/s` : `${mbps.toFixed(0)} Mb/s`;
}
function fmtTps(x) { return x === null || x === undefined || !Number.isFinite(x) ? "–" : x.toFixed(x < 10 ? 2 : 1); }
function fmtAgo(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  if (s < 1.5) return "just now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}
const instColor = (id) => `hsl(${hashHue(String(id))} 45% 50%)`;
function layersText(l) { return Array.isArray(l) && l.length === 2 ? `layers ${l[0]}–${l[1] - 1}` : ""; }

function hashHue(text) {
  let x = 2166136261;
  for (let i = 0; i < text.length; i++) { x ^= text.charCodeAt(i); x = Math.imul(x, 16777619); }
  return (x >>> 0) % 360;
}
// Mid-dark, saturated colours that white text reads on in both schemes; no red (red means down).
// Nodes take them in the order the page first sees them, so a small cluster gets distinct ones.
const PALETTE = ["#2f6fb5", "#2e8b57", "#7b4fb8", "#1f8383", "#b0601a", "#4f5bd5", "#a0468c", "#5d7a1f"];
const paletteIndex = new Map();
function colorFor(id) {
  id = String(id);
  if (!paletteIndex.has(id)) paletteIndex.set(id, paletteIndex.size);
  const i = paletteIndex.get(id);
  return i < PALETTE.length ? PALETTE[i] : `hsl(${(hashHue(id) % 300) + 30} 55% 40%)`;
}

// ------------------------------------------------------------------------------------ HTTP

class HttpError extends Error {
  constructor(status, message, code, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
  /** The route is not there at all (not "this model/instance does not exist"). */
  get missingEndpoint() {
    return this.status === 404 && (this.code === "unknown_url" || this.code === undefined || this.code === null);
  }
}

function authHeaders() {
  const key = localStorage.getItem(API_KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorFrom(resp) {
  const text = await resp.text().catch(() => "");
  let body = null;
  try { body = JSON.parse(text); } catch { /* aiohttp's plain-text 404, a proxy's HTML... */ }
  const err = body && (body.error ?? body.detail);
  const message = typeof err === "string" ? err : err?.message ?? (text.slice(0, 200) || resp.statusText);
  const code = typeof err === "object" && err ? err.code ?? undefined : undefined;
  if (resp.status === 401) askForKey();
  return new HttpError(resp.status, message, code, body);
}

async function api(path, { method = "GET", body, timeout = REQUEST_TIMEOUT_MS, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const signals = [AbortSignal.timeout(timeout)];
  if (signal) signals.push(signal);
  const resp = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.any(signals), cache: "no-store",
  });
  if (!resp.ok) throw await errorFrom(resp);
  if (resp.status === 204) return null;
  const text = await resp.text();
  return text.trim() ? JSON.parse(text) : null;
}

let keyDialogOpen = false;
function askForKey() {
  const dlg = $("key-dialog");
  if (keyDialogOpen || !dlg.showModal) return;
  keyDialogOpen = true;
  $("key-input").value = localStorage.getItem(API_KEY_STORE) || "";
  dlg.showModal();
}
function initKeyDialog() {
  const dlg = $("key-dialog");
  dlg.addEventListener("close", () => {
    keyDialogOpen = false;
    if (dlg.returnValue === "save") {
      const key = $("key-input").value.trim();
      if (key) localStorage.setItem(API_KEY_STORE, key); else localStorage.removeItem(API_KEY_STORE);
      refreshModels();
    }
  });
}

// ------------------------------------------------------------------------------------ state

const state = {
  cluster: null, // last /v1/cluster
  seen: new Map(), // node id -> {view, goneSince}: nodes keep their card for a while after they leave
  connected: null,
  instances: [], // normalised instances, whatever their source
  instancesSource: "unknown", // "api" | "cluster" | "local" | "none"
  models: [], // /v1/models ids
  modelsError: null,
};

const nodeName = (id) => state.seen.get(id)?.view.name ?? String(id).slice(0, 8);

// ------------------------------------------------------------------------------------ topology

async function pollCluster() {
  try {
    const data = await api("/v1/cluster");
    state.cluster = data;
    setConnected(true);
    mergeNodes(data.nodes || []);
    renderTopology();
    if (state.instancesSource === "cluster" || state.instancesSource === "none") useClusterInstances();
  } catch (e) {
    setConnected(false, e);
    renderTopology();
  } finally {
    setTimeout(pollCluster, document.hidden ? 5 * CLUSTER_POLL_MS : CLUSTER_POLL_MS);
  }
}

function mergeNodes(nodes) {
  const now = Date.now();
  const present = new Set();
  for (const n of nodes) {
    present.add(n.id);
    state.seen.set(n.id, { view: n, goneSince: null });
  }
  for (const [id, entry] of state.seen) {
    if (present.has(id)) continue;
    if (entry.goneSince === null) entry.goneSince = now;
    else if (now - entry.goneSince > GONE_KEEP_MS) state.seen.delete(id);
  }
}

function setConnected(ok, err) {
  if (state.connected === ok && ok) return;
  state.connected = ok;
  const conn = $("conn");
  conn.classList.toggle("live", ok);
  conn.classList.toggle("lost", !ok);
  $("conn-text").textContent = ok ? "live" : "disconnected";
  const banner = $("banner");
  banner.hidden = ok;
  if (!ok) banner.textContent = `Lost contact with this node (${location.host}): ${err?.message || "no answer"}. Retrying every second…`;
}

function nodeStatus(entry) {
  if (entry.goneSince !== null) return "gone";
  return entry.view.status === "up" ? "up" : "down";
}

function shardsOnNode(nodeId) {
  const out = [];
  for (const inst of state.instances) {
    for (const sh of inst.shards) if (sh.node_id === nodeId) out.push({ inst, sh });
  }
  return out;
}

function renderNodeCard(entry) {
  const n = entry.view;
  const p = n.profile || {};
  const status = nodeStatus(entry);
  const total = p.ram_total_bytes ?? null;
  const avail = n.memory_available_bytes ?? null;
  const used = total !== null && avail !== null ? Math.max(0, total - avail) : null;
  const accels = p.accelerators || [];
  const device = accels.length ? accels.map((a) => a.kind.toUpperCase()).join(" + ") : "CPU";
  const statusText = status === "up" ? "up" : status === "down" ? `down · seen ${fmtAgo(n.last_seen_s)}` : "gone";

  const shardItems = shardsOnNode(n.id).map(({ inst, sh }) =>
    h("li", { class: "chip", style: { "--chip-color": instColor(inst.id) } },
      [inst.model, layersText(sh.layers) || "whole model", sh.tp_size > 1 ? `tp ${sh.tp_rank}/${sh.tp_size}` : ""].filter(Boolean).join(" · ")));

  return [
    h("div", { class: "node-head" },
      h("h3", {}, n.name),
      n.is_self ? h("span", { class: "pill self", title: "the node serving this page" }, "this node") : null,
      h("span", { class: `pill ${status}`, "data-status": status }, statusText)),
    h("div", { class: "addr" }, n.address || ""),
    h("dl", {},
      h("dt", {}, "Device"), h("dd", {}, `${device}${p.cpu_cores_logical ? ` · ${p.cpu_cores_logical} cores` : ""}`),
      h("dt", {}, "CPU"), h("dd", {}, p.cpu_model || "unknown"),
      accels.length ? [h("dt", {}, "GPU"), h("dd", {}, accels.map((a) => `${a.name} (${fmtBytes(a.memory_total_bytes)})`).join(", "))] : null,
      h("dt", { title: "measured fp32 matrix multiply throughput, and memory bandwidth" }, "Speed"),
      h("dd", {}, p.gflops_fp32 ? `${p.gflops_fp32.toFixed(0)} GFLOP/s · ${p.memory_bandwidth_gbps?.toFixed(1)} GB/s` : "–")),
    h("div", { class: "meter" },
      h("div", {
        class: "meter-bar", role: "meter", "aria-label": `Memory used on ${n.name}`,
        "aria-valuemin": 0, "aria-valuemax": total ?? 0, "aria-valuenow": used ?? 0,
        "aria-valuetext": used !== null ? `${fmtBytes(used)} used of ${fmtBytes(total)}` : "unknown",
      }, h("span", { style: { width: used !== null && total ? `${(100 * used / total).toFixed(1)}%` : "0%" } })),
      h("div", { class: "meter-text" },
        h("span", {}, `${fmtBytes(used)} / ${fmtBytes(total)} used`),
        h("span", {}, `${fmtBytes(avail)} free`))),
    shardItems.length ? h("ul", { class: "shards", "aria-label": `Shards on ${n.name}` }, shardItems) : null,
  ];
}

function renderTopology() {
  const list = $("nodes");
  const entries = [...state.seen.values()].sort((a, b) =>
    (b.view.is_self === true) - (a.view.is_self === true) || a.view.name.localeCompare(b.view.name) || a.view.id.localeCompare(b.view.id));
  const keep = new Set(entries.map((e) => e.view.id));
  for (const li of [...list.children]) if (!keep.has(li.dataset.nodeId)) li.remove();

  let prev = null;
  for (const entry of entries) {
    const id = entry.view.id;
    let li = list.querySelector(`li[data-node-id="${CSS.escape(id)}"]`);
    if (!li) {
      li = h("li", { class: "node", "data-node-id": id, style: { "--node-color": colorFor(id) } });
    }
    const status = nodeStatus(entry);
    // Redraw a card only when what it shows changed (keeps text selectable while it is live).
    const sig = JSON.stringify([entry.view, status, shardsOnNode(id).map(({ inst, sh }) => [inst.id, inst.model, sh])]);
    if (li.dataset.sig !== sig) {
      li.dataset.sig = sig;
      li.className = `node ${status}`;
      li.dataset.status = status;
      li.setAttribute("aria-label", `${entry.view.name}, ${status}`);
      li.replaceChildren(...renderNodeCard(entry).flat().filter(Boolean));
    }
    const want = prev ? prev.nextSibling : list.firstChild;
    if (want !== li) list.insertBefore(li, want);
    prev = li;
  }

  const nodes = entries.map((e) => e.view);
  const up = entries.filter((e) => nodeStatus(e) === "up").length;
  const c = state.cluster;
  const self = nodes.find((n) => n.is_self);
  $("cluster-summary").textContent = c
    ? `cluster ${c.cluster || "?"} · ${up} of ${entries.length} node${entries.length === 1 ? "" : "s"} up${self ? ` · served by ${self.name}` : ""}`
    : "connecting…";
  $("topology-meta").textContent = c ? `updated ${new Date().toLocaleTimeString()}` : "";
  renderLinksTable();
  drawLinks();
}

function currentLinks() {
  const links = state.cluster?.links || [];
  return links.filter((l) => state.seen.has(l.a) && state.seen.has(l.b));
}

function renderLinksTable() {
  const links = currentLinks();
  $("links-count").textContent = `(${links.length})`;
  $("links-body").replaceChildren(...(links.length ? links.map((l) => h("tr", {},
    h("td", {}, `${nodeName(l.a)} ↔ ${nodeName(l.b)}`),
    h("td", { class: "num" }, fmtMs(l.rtt_ms)),
    h("td", { class: "num" }, fmtRate(l.bandwidth_mbps)),
    h("td", {}, fmtAgo(l.age_s)))) : [h("tr", {}, h("td", { colspan: 4, class: "muted" }, "no link measured yet"))]));
}

/** Lines between card centres, under the cards; each labelled (RTT over bandwidth) at its midpoint
 *  when the label fits in the gap between cards. The links table below always has them all. */
function drawLinks() {
  const svg = $("topo-links");
  const box = $("topo").getBoundingClientRect();
  const rects = new Map();
  for (const li of $("nodes").children) {
    const r = li.getBoundingClientRect();
    rects.set(li.dataset.nodeId, { x: r.left - box.left, y: r.top - box.top, w: r.width, h: r.height });
  }
  const overlapsCard = (x, y, w, hgt) =>
    [...rects.values()].some((r) => x < r.x + r.w && x + w > r.x && y < r.y + r.h && y + hgt > r.y);
  const lines = [];
  const labels = [];
  for (const l of currentLinks()) {
    const a = rects.get(l.a), b = rects.get(l.b);
    if (!a || !b) continue;
    const ax = a.x + a.w / 2, ay = a.y + a.h / 2, bx = b.x + b.w / 2, by = b.y + b.h / 2;
    const down = [l.a, l.b].some((id) => nodeStatus(state.seen.get(id)) !== "up");
    lines.push(s("line", { x1: ax, y1: ay, x2: bx, y2: by, class: down ? "down" : "" }));
    const rtt = fmtMs(l.rtt_ms), bw = fmtRate(l.bandwidth_mbps);
    const w = Math.max(rtt.length, bw.length) * 7.4 + 14, hgt = 36;
    const mx = (ax + bx) / 2, my = (ay + by) / 2;
    if (overlapsCard(mx - w / 2, my - hgt / 2, w, hgt)) continue;
    labels.push(s("g", { class: "label", transform: `translate(${mx} ${my})` },
      s("title", {}, `${nodeName(l.a)} ↔ ${nodeName(l.b)}: round trip ${rtt}, bandwidth ${bw}`),
      s("rect", { x: -w / 2, y: -hgt / 2, width: w, height: hgt, rx: 8 }),
      s("text", { "text-anchor": "middle", y: -7, "dominant-baseline": "central", class: "rtt" }, rtt),
      s("text", { "text-anchor": "middle", y: 8, "dominant-baseline": "central", class: "bw" }, bw)));
  }
  svg.setAttribute("viewBox", `0 0 ${box.width} ${box.height}`);
  svg.replaceChildren(...lines, ...labels);
}

// ------------------------------------------------------------------------------------ instances

/** One instance in the shape the page draws, from whatever endpoint produced it. */
function normInstance(raw) {
  const shards = (raw.shards || raw.assignments || raw.stages || []).map((sh) => ({
    node_id: sh.node_id ?? sh.node ?? "",
    layers: sh.layers ?? (sh.start_layer !== undefined ? [sh.start_layer, sh.end_layer] : null),
    tp_rank: sh.tp_rank ?? 0,
    tp_size: sh.tp_size ?? 1,
    status: sh.status,
  }));
  return {
    id: String(raw.id ?? raw.instance_id ?? raw.model),
    model: raw.model ?? raw.name ?? "?",
    strategy: raw.strategy ?? "",
    status: String(raw.status ?? raw.state ?? "unknown").toLowerCase(),
    error: raw.error ?? raw.reason ?? null,
    num_layers: raw.num_layers ?? null,
    shards,
    stoppable: raw.stoppable ?? true,
  };
}

async function pollInstances() {
  let next = INSTANCES_POLL_MS;
  try {
    const data = await api("/v1/instances");
    state.instancesSource = "api";
    state.instances = (data?.instances || data?.data || []).map(normInstance);
    $("instances-unavailable").hidden = true;
  } catch (e) {
    if (e instanceof HttpError && e.missingEndpoint) {
      // No instances endpoint here yet: show what /v1/cluster or the local API know instead.
      next = MISSING_RETRY_MS;
      const note = $("instances-unavailable");
      note.hidden = false;
      note.textContent = "Placement is not available on this node yet (GET /v1/instances answered 404). " +
        "Models still load on demand on this node when you chat; they show up here.";
      if (state.instancesSource !== "local") state.instancesSource = "cluster";
      useClusterInstances();
      pollLocalModels();
    } else {
      $("instances-meta").textContent = `could not refresh: ${e.message}`;
    }
  } finally {
    renderInstances();
    setTimeout(pollInstances, document.hidden ? 5 * next : next);
  }
}

function useClusterInstances() {
  const list = state.cluster?.instances || [];
  if (list.length || state.instancesSource === "cluster") {
    state.instances = list.map(normInstance);
    renderInstances();
  }
}

// Without the instances endpoint, the API's /healthz still says which models this node has loaded.
let localTimer = null;
async function pollLocalModels() {
  clearTimeout(localTimer);
  if (state.instancesSource === "api") return;
  try {
    const data = await api("/healthz");
    const self = state.cluster?.nodes?.find((n) => n.is_self);
    const local = (data?.models || []).map((m) => normInstance({
      id: `local:${m}`, model: m, strategy: "on demand (this node)", status: "ready", stoppable: false,
      shards: self ? [{ node_id: self.id, layers: null }] : [],
    }));
    if (local.length || state.instancesSource === "local") {
      state.instancesSource = "local";
      state.instances = [...(state.cluster?.instances || []).map(normInstance), ...local];
      renderInstances();
      renderTopology();
    }
  } catch { /* no API on this node either: nothing to add */ }
  localTimer = setTimeout(pollLocalModels, INSTANCES_POLL_MS);
}

function layerBar(inst) {
  const shards = inst.shards.filter((sh) => Array.isArray(sh.layers));
  if (!shards.length) return null;
  const total = inst.num_layers ?? Math.max(...shards.map((sh) => sh.layers[1]));
  const sorted = [...shards].sort((a, b) => a.layers[0] - b.layers[0] || a.tp_rank - b.tp_rank);
  return h("div", { class: "layerbar", role: "img", "aria-label": `${inst.model} layers by node: ` + sorted.map((sh) => `${nodeName(sh.node_id)} ${layersText(sh.layers)}`).join("; ") },
    sorted.map((sh) => {
      const frac = (sh.layers[1] - sh.layers[0]) / (total || 1) / (sh.tp_size || 1);
      const tp = sh.tp_size > 1 ? ` · tp${sh.tp_rank}` : "";
      return h("span", {
        style: { "--node-color": colorFor(sh.node_id), flex: `${frac} 1 0` },
        title: `${nodeName(sh.node_id)}: ${layersText(sh.layers)}${tp}`,
      }, `${nodeName(sh.node_id)} ${sh.layers[0]}–${sh.layers[1] - 1}${tp}`);
    }));
}

async function stopInstance(inst, button) {
  button.disabled = true;
  button.textContent = "Stopping…";
  try {
    await api(`/v1/instances/${encodeURIComponent(inst.id)}`, { method: "DELETE", timeout: 15000 });
    state.instances = state.instances.filter((i) => i.id !== inst.id);
    renderInstances();
    renderTopology();
    refreshModels();
  } catch (e) {
    button.disabled = false;
    button.textContent = `Stop ${inst.model}`;
    $("instances-meta").textContent = `stopping ${inst.model} failed: ${e.message}`;
  }
}

function renderInstances() {
  const list = $("instance-list");
  const items = state.instances.map((inst) => {
    const stop = inst.stoppable && state.instancesSource === "api"
      ? h("button", { type: "button", class: "danger small", "aria-label": `Stop ${inst.model}` }, "Stop")
      : null;
    if (stop) stop.addEventListener("click", () => stopInstance(inst, stop));
    const nodes = [...new Set(inst.shards.map((sh) => sh.node_id))];
    return h("li", { class: "instance", "data-instance-id": inst.id, "data-status": inst.status, style: { "--inst-color": instColor(inst.id) } },
      h("div", { class: "instance-head" },
        h("h3", {}, inst.model),
        h("span", { class: `pill ${inst.status}` }, inst.status),
        stop),
      h("p", { class: "meta" },
        [inst.strategy && `strategy: ${inst.strategy}`, `${nodes.length} node${nodes.length === 1 ? "" : "s"}: ${nodes.map(nodeName).join(", ")}`,
          state.instancesSource === "api" ? `id ${inst.id.slice(0, 12)}` : null].filter(Boolean).join(" · ")),
      layerBar(inst),
      inst.error ? h("p", { class: "meta error-text" }, String(inst.error)) : null);
  });
  // Keep focus on a Stop button across refreshes: only redraw when something changed.
  const sig = JSON.stringify([state.instancesSource, state.instances]);
  if (list.dataset.sig !== sig) {
    list.dataset.sig = sig;
    list.replaceChildren(...items);
  }
  $("instances-empty").hidden = state.instances.length > 0;
  if (state.instancesSource === "api") $("instances-meta").textContent = `${state.instances.length} placed`;
}

// ------------------------------------------------------------------------------------ placement

function pick(obj, ...keys) {
  for (const k of keys) if (obj && obj[k] !== undefined && obj[k] !== null) return obj[k];
  return undefined;
}

const REQUEST_STRATEGIES = new Set(["auto", "pipeline", "tensor", "hybrid", "expert"]);

function shardBytes(sh) {
  const whole = pick(sh, "memory_bytes", "bytes", "memory");
  if (whole !== undefined) return whole;
  const parts = ["weight_bytes", "kv_bytes", "overhead_bytes"].map((k) => sh[k]).filter((x) => typeof x === "number");
  return parts.length ? parts.reduce((a, b) => a + b, 0) : undefined;
}

/** Plans from /v1/placement, accepting the shapes a planner may reasonably answer with:
 *  {strategies: {auto: plan, pipeline: plan, tensor: {error}}} (the planner's preview: the best plan
 *  of each strategy, auto's choice among them), {plans: [...]}, or a single plan. Each plan keeps
 *  `key`, the strategy it was asked for (what Place sends back), and `strategy`, what it is. */
function normPlacement(body) {
  let raw = pick(body, "plans", "candidates", "options");
  let strategies = pick(body, "strategies", "previews", "by_strategy");
  // The node's planner answers {plans: {auto: plan, pipeline: {error}, ...}}: keyed by strategy.
  if (raw && !Array.isArray(raw) && typeof raw === "object") { strategies = raw; raw = undefined; }
  if (!raw && strategies && !Array.isArray(strategies) && typeof strategies === "object") {
    raw = Object.entries(strategies).map(([key, p]) => ({ ...(typeof p === "object" && p ? p : { error: String(p) }), _key: key }));
  }
  if (!raw && Array.isArray(strategies)) raw = strategies;
  if (!raw) raw = [pick(body, "plan", "placement") || body];
  const plans = raw.map((p) => {
    const pred = pick(p, "prediction", "predicted", "predictions", "estimate") || p;
    const ttftS = pick(pred, "ttft_s", "time_to_first_token_s");
    const ttft = pick(pred, "ttft_ms", "time_to_first_token_ms") ?? (ttftS !== undefined ? ttftS * 1000 : undefined);
    const tps = pick(pred, "decode_tokens_per_s", "tokens_per_s", "tps", "tokens_per_second");
    const shards = (pick(p, "shards", "assignments", "stages") || []).map((sh) => ({
      node_id: pick(sh, "node_id", "node") ?? "",
      node_name: sh.node_name,
      layers: pick(sh, "layers") ?? (sh.start_layer !== undefined ? [sh.start_layer, sh.end_layer] : null),
      tp_rank: sh.tp_rank ?? 0,
      tp_size: sh.tp_size ?? 1,
      bytes: shardBytes(sh),
    }));
    const mem = new Map();
    const memRaw = pick(p, "memory_by_node", "memory_per_node", "memory_bytes_per_node");
    if (memRaw && typeof memRaw === "object") for (const [id, b] of Object.entries(memRaw)) mem.set(id, typeof b === "object" ? shardBytes(b) : b);
    else for (const sh of shards) if (sh.bytes !== undefined) mem.set(sh.node_id, (mem.get(sh.node_id) || 0) + sh.bytes);
    for (const sh of shards) if (!mem.has(sh.node_id)) mem.set(sh.node_id, undefined);
    let why = pick(p, "reason", "why", "reasons", "explanation");
    const err = pick(p, "error", "refusal");
    if (Array.isArray(why)) why = why.join(" ");
    const errText = typeof err === "object" ? err.message : err;
    const feasible = !err && p.feasible !== false && p.ok !== false && (shards.length > 0 || p.feasible === true);
    const strategy = p.strategy || p._key || body?.strategy || "plan";
    const key = p._key || (REQUEST_STRATEGIES.has(strategy) ? strategy : "auto");
    return { key, strategy, ttft, tps, shards, mem, why: errText || why, feasible, num_layers: pick(p, "num_layers") ?? pick(body, "num_layers") };
  });
  const chosenRaw = pick(body, "chosen", "best", "selected", "recommended");
  const chosen = (typeof chosenRaw === "object" ? chosenRaw?.strategy : chosenRaw)
    ?? plans.find((p) => p.key === "auto" && p.feasible)?.key
    ?? [...plans].filter((p) => p.feasible).sort((a, b) => (b.tps ?? 0) - (a.tps ?? 0))[0]?.key;
  return { model: body?.model, plans, chosen };
}

async function preview(ev) {
  ev.preventDefault();
  const model = $("place-model").value;
  const strategy = $("place-strategy").value;
  const plan = $("plan");
  const btn = $("preview-btn");
  if (!model) return;
  btn.disabled = true;
  plan.replaceChildren(h("p", { class: "muted" }, `Planning ${model}…`));
  try {
    const q = new URLSearchParams({ model, strategy });
    const body = await api(`/v1/placement?${q}`, { timeout: 15000 });
    $("place-unavailable").hidden = true;
    renderPlans(model, normPlacement(body), strategy);
  } catch (e) {
    plan.replaceChildren();
    if (e instanceof HttpError && e.missingEndpoint) {
      const note = $("place-unavailable");
      note.hidden = false;
      note.textContent = "Placement preview is not available on this node yet (GET /v1/placement answered 404). " +
        "Chat still works: the model loads on demand on this node.";
    } else {
      plan.replaceChildren(h("p", { class: "error-text", role: "alert" }, `Could not plan ${model}: ${e.message}`));
    }
  } finally {
    btn.disabled = false;
  }
}

function planNodeRow(nodeId, bytes) {
  const entry = state.seen.get(nodeId);
  const n = entry?.view;
  const total = n?.profile?.ram_total_bytes;
  const avail = n?.memory_available_bytes;
  const used = total !== undefined && avail !== undefined ? total - avail : undefined;
  const pct = (x) => (total ? `${Math.max(0, Math.min(100, (100 * x) / total)).toFixed(1)}%` : "0%");
  return h("li", { style: { "--node-color": colorFor(nodeId) } },
    h("span", { class: "who" }, h("span", { class: "swatch", "aria-hidden": "true" }), nodeName(nodeId)),
    h("div", { class: "meter" },
      h("div", { class: "meter-bar", role: "img", "aria-label": `${nodeName(nodeId)}: ${fmtBytes(bytes)} for this model, ${fmtBytes(used)} already used of ${fmtBytes(total)}` },
        h("span", { style: { width: pct(used ?? 0) } }),
        bytes !== undefined ? h("span", { class: "plan", style: { left: pct(used ?? 0), width: pct(bytes) } }) : null),
      h("div", { class: "meter-text" },
        h("span", {}, bytes !== undefined ? `+${fmtBytes(bytes)} for this model` : "memory not estimated"),
        h("span", {}, `${fmtBytes(avail)} free of ${fmtBytes(total)}`))));
}

function renderPlans(model, placement, requested) {
  // Under "auto", the strategy auto picked is shown once, as "auto → <strategy>".
  const auto = placement.plans.find((p) => p.key === "auto" && p.feasible);
  const same = (p) => auto && p !== auto && p.strategy === auto.strategy && JSON.stringify(p.shards) === JSON.stringify(auto.shards);
  const shown = placement.plans.filter((p) => !(requested === "auto" && same(p)));
  const cards = shown.map((p) => {
    const isChosen = p.key === requested || (requested === "auto" && p.key === placement.chosen) || placement.plans.length === 1;
    const title = p.key === p.strategy ? p.strategy : `${p.key} → ${p.strategy}`;
    const place = p.feasible ? h("button", { type: "button", class: isChosen ? "" : "secondary", "data-strategy": p.key }, `Place ${model} (${title})`) : null;
    if (place) place.addEventListener("click", () => placeModel(model, p, place));
    return h("article", { class: `plan-card${isChosen ? " chosen" : ""}`, "data-strategy": p.key, "aria-label": `${title} plan` },
      h("div", { class: "plan-head" },
        h("h3", {}, title),
        isChosen && p.feasible ? h("span", { class: "pill ready" }, p.key === "auto" ? "fastest" : "chosen") : null,
        p.feasible ? null : h("span", { class: "pill infeasible" }, "does not fit")),
      p.feasible ? h("dl", { class: "predict" },
        h("div", {}, h("dt", {}, "time to first token"), h("dd", { class: "ttft" }, fmtMs(p.ttft))),
        h("div", {}, h("dt", {}, "tokens/s"), h("dd", { class: "tps" }, fmtTps(p.tps))),
        h("div", {}, h("dt", {}, "nodes"), h("dd", {}, String(p.mem.size)))) : null,
      layerBar({ model, shards: p.shards, num_layers: p.num_layers }),
      p.mem.size ? h("ul", { class: "plan-nodes", "aria-label": "Memory per node" }, [...p.mem].map(([id, b]) => planNodeRow(id, b))) : null,
      p.why ? h("p", { class: "why" }, String(p.why)) : null,
      place);
  });
  // The chosen plan first: it is the one "Place" is about.
  cards.sort((a, b) => b.classList.contains("chosen") - a.classList.contains("chosen"));
  $("plan").replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "The planner returned no plan.")]));
}

async function placeModel(model, plan, button) {
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Placing…";
  const nodes = [...new Set(plan.shards.map((sh) => sh.node_id))].filter(Boolean);
  // The strategy it was asked for ("auto" may have picked "single", which is not a request) and its
  // nodes in stage order, so the planner reproduces the plan that was shown.
  const body = { model, strategy: plan.key, ...(nodes.length ? { nodes } : {}) };
  try {
    const inst = await api("/v1/instances", { method: "POST", body, timeout: 30000 });
    const note = h("p", { class: "muted", role: "status" }, `Placed ${model}${inst?.id ? ` as ${inst.id}` : ""}: see Instances for its progress.`);
    $("plan").append(note);
    button.textContent = "Placed";
    pollInstancesSoon();
    refreshModels();
  } catch (e) {
    button.disabled = false;
    button.textContent = label;
    const msg = e instanceof HttpError && e.missingEndpoint
      ? "Placing is not available on this node yet (POST /v1/instances answered 404)."
      : `Placing ${model} failed: ${e.message}`;
    $("plan").append(h("p", { class: "error-text", role: "alert" }, msg));
  }
}

function refreshInstancesNow() {
  if (state.instancesSource === "api") pollInstancesSoon();
  else pollLocalModels();
}

let soonTimer = null;
function pollInstancesSoon() {
  clearTimeout(soonTimer);
  soonTimer = setTimeout(async () => {
    try {
      const data = await api("/v1/instances");
      state.instancesSource = "api";
      state.instances = (data?.instances || []).map(normInstance);
      renderInstances();
      renderTopology();
    } catch { /* the regular poll reports */ }
  }, 200);
}

// ------------------------------------------------------------------------------------ models

async function refreshModels() {
  try {
    const data = await api("/v1/models");
    state.models = (data?.data || []).map((m) => m.id);
    state.modelsError = null;
  } catch (e) {
    state.modelsError = e instanceof HttpError && e.missingEndpoint ? "The OpenAI API is not mounted on this node." : e.message;
  }
  const ready = new Set(state.instances.filter((i) => i.status === "ready").map((i) => i.model));
  const ids = [...new Set([...ready, ...state.models])];
  for (const sel of [$("place-model"), $("chat-model")]) {
    const current = sel.value || sel.dataset.want || "";
    const opts = ids.map((id) => h("option", { value: id }, sel.id === "chat-model" && ready.has(id) ? `${id} (ready)` : id));
    const sig = JSON.stringify([ids, [...ready]]);
    if (sel.dataset.sig !== sig) {
      sel.dataset.sig = sig;
      sel.replaceChildren(...(opts.length ? opts : [h("option", { value: "" }, state.modelsError || "no models")]));
      if (ids.includes(current)) sel.value = current;
    }
  }
  if (state.modelsError) $("chat-status").textContent = state.modelsError;
}

// ------------------------------------------------------------------------------------ chat

const chat = {
  messages: [], // {role, content, stats?, error?}
  controller: null,
};

function loadConversation() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    if (saved && Array.isArray(saved.messages)) chat.messages = saved.messages;
    if (saved?.model) $("chat-model").dataset.want = saved.model;
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

const FINISH_TEXT = { stop: "", length: "max tokens reached", stopped: "stopped" };

function statsText(st) {
  if (!st) return "";
  const parts = [];
  if (st.ttft_ms !== undefined) parts.push(`TTFT ${fmtMs(st.ttft_ms)}`);
  if (st.tps !== undefined) parts.push(`${fmtTps(st.tps)} tok/s`);
  if (st.tokens !== undefined) parts.push(`${st.tokens} tokens`);
  const finish = st.finish in FINISH_TEXT ? FINISH_TEXT[st.finish] : st.finish;
  if (finish) parts.push(finish);
  if (st.model) parts.push(st.model);
  return parts.join(" · ");
}

function messageEl(m) {
  return h("li", { class: `msg ${m.role}${m.error ? " error" : ""}`, "data-role": m.role },
    h("span", { class: "who" }, m.role === "user" ? "you" : m.role),
    h("p", { class: "text" }, m.content),
    m.role === "assistant" ? h("span", { class: "foot" }, m.error ? m.error : statsText(m.stats)) : null);
}

function scrollLog() {
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

function setStats(st) {
  $("stat-ttft").textContent = st.ttft_ms === undefined ? "–" : fmtMs(st.ttft_ms);
  $("stat-tps").textContent = st.tps === undefined ? "–" : fmtTps(st.tps);
  $("stat-tokens").textContent = String(st.tokens ?? 0);
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
  if (!model) { $("chat-status").textContent = state.modelsError || "No model to chat with."; return; }
  input.value = "";

  const user = { role: "user", content: text };
  chat.messages.push(user);
  $("chat-log").append(messageEl(user));
  const reply = { role: "assistant", content: "", stats: { model } };
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
  let tokens = 0;
  const st = { model, tokens: 0 };
  setStats(st);
  const waitTimer = setInterval(() => {
    if (tFirst === null) status.textContent = `Waiting for ${model}… ${((performance.now() - t0) / 1000).toFixed(0)} s (a model that is not loaded yet loads first)`;
  }, 1000);

  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal, cache: "no-store",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw await errorFrom(resp);
    for await (const data of sseEvents(resp.body)) {
      if (data === null) continue; // keep-alive while the model loads
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new HttpError(500, chunk.error.message || String(chunk.error), chunk.error.code);
      const choice = chunk.choices?.[0];
      const piece = choice?.delta?.content;
      if (piece) {
        const now = performance.now();
        if (tFirst === null) {
          tFirst = now;
          st.ttft_ms = now - t0;
          status.textContent = "Streaming…";
          refreshInstancesNow(); // the request may have just loaded the model
        }
        tokens++;
        reply.content += piece;
        textEl.textContent = reply.content;
        st.tokens = tokens;
        if (tokens > 1 && now > tFirst) st.tps = (tokens - 1) / ((now - tFirst) / 1000);
        setStats(st);
        footEl.textContent = statsText(st);
        scrollLog();
      }
      if (choice?.finish_reason) st.finish = choice.finish_reason;
      // The server's own timings ride on the final chunk(s): they replace the page's estimates.
      if (chunk.shoal) {
        if (chunk.shoal.ttft_ms !== undefined) st.ttft_ms = chunk.shoal.ttft_ms;
        if (chunk.shoal.tokens_per_s !== undefined) st.tps = chunk.shoal.tokens_per_s;
      }
      if (chunk.usage?.completion_tokens !== undefined) st.tokens = chunk.usage.completion_tokens;
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
    reply.stats = st;
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

// ------------------------------------------------------------------------------------ start

function init() {
  initKeyDialog();
  $("place-form").addEventListener("submit", preview);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-stop").addEventListener("click", stopChat);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-model").addEventListener("change", saveConversation);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendChat(); }
    else if (e.key === "Escape") stopChat();
  });
  new ResizeObserver(() => drawLinks()).observe($("topo"));
  loadConversation();
  pollCluster();
  pollInstances();
  refreshModels();
  setInterval(refreshModels, MODELS_POLL_MS);
}

init();
