// Line charts drawn as SVG: raw values thin, an exponential moving average on top. The values a
// chart plots are kept on its <svg> (data-series), exactly as the API gave them.
const NS = "http://www.w3.org/2000/svg";
const W = 600, H = 200, PAD = { l: 52, r: 10, t: 10, b: 24 };

const svgEl = (tag, attrs = {}) => {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
};

export function smooth(values, weight) {
  // bias-corrected exponential moving average (what training dashboards call "smoothing")
  const out = [];
  let avg = 0, n = 0;
  for (const v of values) {
    n += 1;
    avg = weight * avg + (1 - weight) * v;
    out.push(avg / (1 - weight ** n));
  }
  return out;
}

export const fmt = (v) => {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
};

// series: [{name, points: [[x, y], ...]}]; opts: {title, smoothing (0..0.99), xLabel, xTime (x is
// epoch seconds: labelled as clock times)}
export function lineChart(series, opts = {}) {
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.chart = opts.id || opts.title || "";
  const h3 = document.createElement("h3");
  h3.textContent = opts.title || "";
  box.append(h3);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  svg.setAttribute("aria-label", opts.title || "chart");
  svg.dataset.series = JSON.stringify(series.map((s) => ({ name: s.name, points: s.points })));
  box.append(svg);
  const legend = document.createElement("div");
  legend.className = "legend";
  box.append(legend);
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (!pts.length) {
    legend.textContent = "no data yet";
    return box;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
  const sy = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  svg.append(svgEl("line", { class: "axis", x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b }));
  svg.append(svgEl("line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b }));
  for (const [y, v] of [[PAD.t + 8, y1], [H - PAD.b, y0]]) {
    const t = svgEl("text", { class: "tick", x: 4, y });
    t.textContent = fmt(v);
    svg.append(t);
  }
  for (const [x, v, anchor] of [[PAD.l, x0, "start"], [W - PAD.r, x1, "end"]]) {
    const t = svgEl("text", { class: "tick", x, y: H - 6, "text-anchor": anchor });
    t.textContent = opts.xTime ? new Date(v * 1000).toLocaleTimeString() : `${fmt(v)}${opts.xLabel ? " " + opts.xLabel : ""}`;
    svg.append(t);
  }
  const weight = opts.smoothing ?? 0;
  series.forEach((s, i) => {
    const good = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!good.length) return;
    const d = (ys) => good.map(([x], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(ys[j]).toFixed(1)}`).join("");
    const raw = good.map((p) => p[1]);
    if (weight > 0) svg.append(svgEl("path", { class: `raw series-${i}`, d: d(raw) }));
    svg.append(svgEl("path", { class: `smooth series-${i}`, d: d(weight > 0 ? smooth(raw, weight) : raw) }));
    if (good.length === 1) {  // one point makes no line: mark it
      svg.append(svgEl("circle", { class: `dot series-${i}`, cx: sx(good[0][0]).toFixed(1), cy: sy(good[0][1]).toFixed(1), r: 3 }));
    }
    const last = good[good.length - 1];
    const item = document.createElement("span");
    item.textContent = `${s.name}: ${fmt(last[1])} at ${opts.xTime ? new Date(last[0] * 1000).toLocaleTimeString() : fmt(last[0])}`;
    legend.append(item);
  });
  return box;
}
