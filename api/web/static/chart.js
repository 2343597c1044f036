// The compression-dynamics chart: plain SVG, redrawn whole on every new point (a job has tens
// of points, so there is nothing to gain from incremental drawing). Left axis: MACs kept, as a
// share of the base model; right axis: top-1, percent.

const NS = "http://www.w3.org/2000/svg";
const W = 720;
const H = 280;
const PAD = { left: 56, right: 56, top: 34, bottom: 44 };
const MACS_COLOR = "#2563eb";
const TOP1_COLOR = "#ea580c";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceRange(lo, hi) {
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const span = hi - lo;
  const step = Math.pow(10, Math.floor(Math.log10(span / 4)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= 5) || step * 10;
  return { lo: Math.floor(lo / nice) * nice, hi: Math.ceil(hi / nice) * nice, step: nice };
}

function ticks({ lo, hi, step }) {
  const out = [];
  for (let v = lo; v <= hi + step / 2; v += step) out.push(Number(v.toFixed(6)));
  return out;
}

/** points: [{label, macsKept (0..1 or null), top1 (percent or null)}] */
export function drawChart(root, points) {
  root.replaceChildren();
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  if (points.length === 0) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, "No step measured yet"));
    return;
  }
  const n = points.length;
  const x = (i) => PAD.left + (n === 1 ? plotW / 2 : (i * plotW) / (n - 1));
  const macsRange = { lo: 0, hi: 100, step: 20 };
  const top1s = points.map((p) => p.top1).filter((v) => v !== null && v !== undefined);
  const top1Range = top1s.length ? niceRange(Math.min(...top1s), Math.max(...top1s)) : { lo: 0, hi: 100, step: 20 };
  const yL = (v) => PAD.top + plotH * (1 - (v - macsRange.lo) / (macsRange.hi - macsRange.lo));
  const yR = (v) => PAD.top + plotH * (1 - (v - top1Range.lo) / (top1Range.hi - top1Range.lo));

  const grid = svg("g", { class: "grid" });
  for (const t of ticks(macsRange)) {
    grid.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: yL(t), y2: yL(t) }));
    grid.append(svg("text", { x: PAD.left - 8, y: yL(t) + 4, "text-anchor": "end", fill: MACS_COLOR }, `${t}%`));
  }
  for (const t of ticks(top1Range)) {
    grid.append(svg("text", { x: W - PAD.right + 8, y: yR(t) + 4, "text-anchor": "start", fill: TOP1_COLOR }, `${t}`));
  }
  const every = Math.max(1, Math.ceil(n / 12));
  points.forEach((p, i) => {
    if (i % every === 0 || i === n - 1) {
      grid.append(svg("text", { x: x(i), y: H - PAD.bottom + 18, "text-anchor": "middle" }, p.label));
    }
  });
  grid.append(svg("text", { x: PAD.left - 48, y: PAD.top - 18, fill: MACS_COLOR, class: "axis-title" }, "MACs kept"));
  grid.append(svg("text", { x: W - PAD.right + 48, y: PAD.top - 18, "text-anchor": "end", fill: TOP1_COLOR, class: "axis-title" }, "top-1 %"));
  grid.append(svg("text", { x: PAD.left + plotW / 2, y: H - 6, "text-anchor": "middle", class: "axis-title" }, "step"));
  root.append(grid);

  function series(key, y, color, cls) {
    const g = svg("g", { class: cls });
    let d = "";
    points.forEach((p, i) => {
      const v = p[key];
      if (v === null || v === undefined) return;
      d += `${d ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
    });
    g.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": 2.5 }));
    points.forEach((p, i) => {
      const v = p[key];
      if (v === null || v === undefined) return;
      const dot = svg("circle", { cx: x(i), cy: y(v), r: 4, fill: color });
      dot.append(svg("title", {}, `${p.label}: ${key === "macsKeptPct" ? v.toFixed(1) + " % of MACs" : v.toFixed(2) + " % top-1"}`));
      g.append(dot);
    });
    root.append(g);
  }
  series("macsKeptPct", yL, MACS_COLOR, "series-macs");
  series("top1", yR, TOP1_COLOR, "series-top1");

  root.dataset.points = String(n);
}
