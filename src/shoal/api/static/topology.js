// The Topology panel and the page header: GET /v1/cluster every second (a `ClusterView`,
// cluster/topology.py), drawn as node cards, the links between them and a links table.
// A node that left the view keeps its card, marked gone, for a minute.

import { api } from "./api.js";
import { $, h, s } from "./dom.js";
import { colorFor, fmtAgo, fmtBytes, fmtMs, fmtRate, instColor, layersText, plural } from "./format.js";
import { liveInstances } from "./instances.js";

const POLL_MS = 1000;
const GONE_KEEP_MS = 60000;

let cluster = null; // the last ClusterView
const seen = new Map(); // node id -> {view: NodeView, goneSince: ms or null}
let connected = null;

/** The last NodeView of a node this page has seen (for its memory), or undefined. */
export const nodeView = (id) => seen.get(id)?.view;

// Links are drawn only between nodes the page has seen (currentLinks).
const nodeName = (id) => seen.get(id).view.name;

export function startTopology() {
  new ResizeObserver(drawLinks).observe($("topo"));
  poll();
}

async function poll() {
  try {
    cluster = await api("/v1/cluster");
    setConnected(true);
    mergeNodes(cluster.nodes);
  } catch (e) {
    setConnected(false, e);
  }
  renderTopology();
  setTimeout(poll, document.hidden ? 5 * POLL_MS : POLL_MS);
}

function mergeNodes(nodes) {
  const now = Date.now();
  const present = new Set();
  for (const n of nodes) {
    present.add(n.id);
    seen.set(n.id, { view: n, goneSince: null });
  }
  for (const [id, entry] of seen) {
    if (present.has(id)) continue;
    if (entry.goneSince === null) entry.goneSince = now;
    else if (now - entry.goneSince > GONE_KEEP_MS) seen.delete(id);
  }
}

function setConnected(ok, err) {
  if (connected === ok && ok) return;
  connected = ok;
  const conn = $("conn");
  conn.classList.toggle("live", ok);
  conn.classList.toggle("lost", !ok);
  $("conn-text").textContent = ok ? "live" : "disconnected";
  const banner = $("banner");
  banner.hidden = ok;
  if (!ok) banner.textContent = `Lost contact with this node (${location.host}): ${err.message}. Retrying every second…`;
}

const nodeStatus = (entry) => (entry.goneSince !== null ? "gone" : entry.view.status);

function shardsOnNode(nodeId) {
  return liveInstances().flatMap((inst) => inst.shards.filter((sh) => sh.node_id === nodeId).map((sh) => ({ inst, sh })));
}

// Where a node's shards compute (`shoal node --device`), in words.
const COMPUTES_ON = { cpu: "CPU", "torch-cpu": "CPU (torch)", cuda: "CUDA GPU", mps: "Apple GPU", mlx: "Apple GPU (MLX)" };

function computesOn(device) {
  const [kind, index] = (device || "cpu").split(":");
  return (COMPUTES_ON[kind] ?? kind) + (index !== undefined ? ` ${index}` : "");
}

function nodeCard(entry) {
  const n = entry.view;
  const p = n.profile; // null until the node has measured itself
  const status = nodeStatus(entry);
  const total = p ? p.ram_total_bytes : null;
  const avail = n.memory_available_bytes;
  const used = total !== null ? Math.max(0, total - avail) : null;
  const accels = p ? p.accelerators : [];
  const device = p ? computesOn(p.device) : "CPU";
  const statusText = status === "up" ? "up" : status === "down" ? `down · seen ${fmtAgo(n.last_seen_s)}` : "gone";

  const chips = shardsOnNode(n.id).map(({ inst, sh }) =>
    h("li", { class: "chip", style: { "--chip-color": instColor(inst.id) } },
      [inst.model, layersText(sh.layers), sh.tp_size > 1 ? `tp ${sh.tp_rank}/${sh.tp_size}` : ""].filter(Boolean).join(" · ")));

  return [
    h("div", { class: "node-head" },
      h("h3", {}, n.name),
      n.is_self ? h("span", { class: "pill self", title: "the node serving this page" }, "this node") : null,
      h("span", { class: `pill ${status}`, "data-status": status }, statusText)),
    h("div", { class: "addr" }, n.address),
    h("dl", {},
      h("dt", { title: "where this node's shards compute (shoal node --device)" }, "Device"),
      h("dd", { "data-device": p ? p.device : "" }, p ? `${device} · ${p.cpu_cores_logical} cores` : device),
      h("dt", {}, "CPU"), h("dd", {}, p ? p.cpu_model : "not measured yet"),
      accels.length ? [h("dt", {}, "GPU"), h("dd", {}, accels.map((a) => `${a.name} (${fmtBytes(a.memory_total_bytes)})`).join(", "))] : null,
      h("dt", { title: "measured fp32 matrix multiply throughput, and memory bandwidth" }, "Speed"),
      h("dd", {}, p ? `${p.gflops_fp32.toFixed(0)} GFLOP/s · ${p.memory_bandwidth_gbps.toFixed(1)} GB/s` : "–")),
    h("div", { class: "meter" },
      h("div", {
        class: "meter-bar", role: "meter", "aria-label": `Memory used on ${n.name}`,
        "aria-valuemin": 0, "aria-valuemax": total ?? 0, "aria-valuenow": used ?? 0,
        "aria-valuetext": used !== null ? `${fmtBytes(used)} used of ${fmtBytes(total)}` : "unknown",
      }, h("span", { style: { width: used !== null && total ? `${(100 * used / total).toFixed(1)}%` : "0%" } })),
      h("div", { class: "meter-text" },
        h("span", {}, `${fmtBytes(used)} / ${fmtBytes(total)} used`),
        h("span", {}, `${fmtBytes(avail)} free`))),
    chips.length ? h("ul", { class: "shards", "aria-label": `Shards on ${n.name}` }, chips) : null,
  ];
}

export function renderTopology() {
  const list = $("nodes");
  const entries = [...seen.values()].sort((a, b) =>
    b.view.is_self - a.view.is_self || a.view.name.localeCompare(b.view.name) || a.view.id.localeCompare(b.view.id));
  const keep = new Set(entries.map((e) => e.view.id));
  for (const li of [...list.children]) if (!keep.has(li.dataset.nodeId)) li.remove();

  let prev = null;
  for (const entry of entries) {
    const id = entry.view.id;
    let li = list.querySelector(`li[data-node-id="${CSS.escape(id)}"]`);
    if (!li) li = h("li", { class: "node", "data-node-id": id, style: { "--node-color": colorFor(id) } });
    const status = nodeStatus(entry);
    // Redraw a card only when what it shows changed (keeps text selectable while it is live).
    const sig = JSON.stringify([entry.view, status, shardsOnNode(id).map(({ inst, sh }) => [inst.id, inst.model, sh.layers, sh.tp_rank, sh.tp_size])]);
    if (li.dataset.sig !== sig) {
      li.dataset.sig = sig;
      li.className = `node ${status}`;
      li.dataset.status = status;
      li.setAttribute("aria-label", `${entry.view.name}, ${status}`);
      li.replaceChildren(...nodeCard(entry).filter(Boolean));
    }
    const want = prev ? prev.nextSibling : list.firstChild;
    if (want !== li) list.insertBefore(li, want);
    prev = li;
  }

  const up = entries.filter((e) => nodeStatus(e) === "up").length;
  const self = entries.find((e) => e.view.is_self)?.view;
  $("cluster-summary").textContent = cluster
    ? `cluster ${cluster.cluster} · ${up} of ${plural(entries.length, "node")} up${self ? ` · served by ${self.name}` : ""}`
    : "connecting…";
  $("topology-meta").textContent = cluster ? `updated ${new Date().toLocaleTimeString()}` : "";
  renderLinksTable();
  drawLinks();
}

const currentLinks = () => (cluster ? cluster.links.filter((l) => seen.has(l.a) && seen.has(l.b)) : []);

function renderLinksTable() {
  const links = currentLinks();
  $("links-count").textContent = `(${links.length})`;
  $("links-body").replaceChildren(...(links.length ? links.map((l) => h("tr", {},
    h("td", {}, `${nodeName(l.a)} ↔ ${nodeName(l.b)} (${(l.kind || "tcp").toUpperCase()})`),
    h("td", { class: "num" }, fmtMs(l.rtt_ms)),
    h("td", { class: "num" }, fmtRate(l.bandwidth_mbps)),
    h("td", {}, fmtAgo(l.age_s)))) : [h("tr", {}, h("td", { colspan: 4, class: "muted" }, "no link measured yet"))]));
}

/** Lines between card centres, under the cards; each labelled (kind and RTT over bandwidth) at its midpoint
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
    const down = [l.a, l.b].some((id) => nodeStatus(seen.get(id)) !== "up");
    // The link's kind (TCP or RDMA: the planner prices each differently) styles its line and is in
    // its label's title and the links table; the label itself stays as narrow as the gap allows.
    const kind = (l.kind || "tcp").toLowerCase();
    lines.push(s("line", { x1: ax, y1: ay, x2: bx, y2: by, class: [down ? "down" : "", kind].filter(Boolean).join(" "),
                           "data-kind": kind }));
    const rtt = fmtMs(l.rtt_ms), bw = fmtRate(l.bandwidth_mbps);
    const w = Math.max(rtt.length, bw.length) * 7.4 + 14, hgt = 36;
    const mx = (ax + bx) / 2, my = (ay + by) / 2;
    if (overlapsCard(mx - w / 2, my - hgt / 2, w, hgt)) continue;
    labels.push(s("g", { class: "label", transform: `translate(${mx} ${my})` },
      s("title", {}, `${nodeName(l.a)} ↔ ${nodeName(l.b)}: ${kind.toUpperCase()}, round trip ${rtt}, bandwidth ${bw}`),
      s("rect", { x: -w / 2, y: -hgt / 2, width: w, height: hgt, rx: 8 }),
      s("text", { "text-anchor": "middle", y: -7, "dominant-baseline": "central", class: "rtt" }, rtt),
      s("text", { "text-anchor": "middle", y: 8, "dominant-baseline": "central", class: "bw" }, bw)));
  }
  svg.setAttribute("viewBox", `0 0 ${box.width} ${box.height}`);
  svg.replaceChildren(...lines, ...labels);
}
