// Numbers and colours as the page shows them. A missing value (null) is shown as "–".

const known = (x) => typeof x === "number" && Number.isFinite(x);

export function fmtBytes(n) {
  if (!known(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n.toFixed(0)} B` : `${n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
}

export function fmtMs(ms) {
  if (!known(ms)) return "–";
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

export function fmtRate(mbps) {
  if (!known(mbps)) return "–";
  return mbps >= 1000 ? `${(mbps / 1000).toFixed(1)} Gb/s` : `${mbps.toFixed(0)} Mb/s`;
}

export const fmtTps = (x) => (known(x) ? x.toFixed(x < 10 ? 2 : 1) : "–");

export function fmtAgo(s) {
  if (!known(s)) return "–";
  if (s < 1.5) return "just now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

/** A shard's [start, end) layer range, as people count layers. */
export const layersText = ([start, end]) => `layers ${start}–${end - 1}`;

export const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function hashHue(text) {
  let x = 2166136261;
  for (let i = 0; i < text.length; i++) { x ^= text.charCodeAt(i); x = Math.imul(x, 16777619); }
  return (x >>> 0) % 360;
}

export const instColor = (id) => `hsl(${hashHue(id)} 45% 50%)`;

// Mid-dark, saturated colours that white text reads on in both schemes; no red (red means down).
// Nodes take them in the order the page first sees them, so a small cluster gets distinct ones.
const PALETTE = ["#2f6fb5", "#2e8b57", "#7b4fb8", "#1f8383", "#b0601a", "#4f5bd5", "#a0468c", "#5d7a1f"];
const paletteIndex = new Map();

export function colorFor(nodeId) {
  if (!paletteIndex.has(nodeId)) paletteIndex.set(nodeId, paletteIndex.size);
  const i = paletteIndex.get(nodeId);
  return i < PALETTE.length ? PALETTE[i] : `hsl(${(hashHue(nodeId) % 300) + 30} 55% 40%)`;
}
