// One job: live progress from GET /v1/jobs/{id}/events (no polling of the job), the
// compression-dynamics chart drawn point by point, and once it is done the report, its plots,
// the artifacts and the worker's log.
import {
  api,
  badge,
  el,
  fetchFile,
  fmtAge,
  fmtBytes,
  fmtCount,
  fmtDuration,
  fmtPercent,
  followEvents,
  setText,
  targetText,
  TERMINAL,
} from "./app.js";
import { drawChart } from "./chart.js";

const root = document.getElementById("job");
const jobId = root.dataset.jobId;
const base = `/v1/jobs/${jobId}`;
const SHORT_STAGE = { Baseline: "base", "Filter Prune": "P", "Layer Trunc": "T", "Final Fine-Tune": "FT" };

let baseMacs = null;
let lastMacs = null;
let lastTop1 = null;
let events = 0;
let points = [];
let finished = false;
let logCursor = null;
let logTimer = null;

function showError(message) {
  const box = document.getElementById("job-error");
  box.textContent = message;
  box.hidden = false;
}

// ------------------------------------------------------------------ progress
function describe(job) {
  const c = job.config;
  let when = `submitted ${fmtAge(job.created_at)}`;
  if (job.finished_at && job.started_at) {
    when += `, ran ${fmtDuration((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000)}`;
  }
  setText("meta", `${c.model} · ${c.dataset} · ${targetText(c)} · ${when}`);
  document.getElementById("meta").title = `created ${job.created_at}`;
}

function render(state) {
  badge(document.getElementById("state"), state.state);
  root.dataset.state = state.state;
  const bar = document.getElementById("bar");
  bar.style.width = `${state.percent}%`;
  bar.className = `bar state-${state.state}`;
  setText("percent", fmtPercent(state.percent));
  setText("stage", state.stage || (state.state === "queued" ? "waiting for a worker" : "–"));
  setText("step", state.total_steps ? `${state.step} / ${state.total_steps}` : "–");
  if (state.macs !== null && state.macs !== undefined) lastMacs = state.macs;
  if (state.top1 !== null && state.top1 !== undefined) lastTop1 = state.top1;
  const share = baseMacs && lastMacs !== null ? ` (${((100 * lastMacs) / baseMacs).toFixed(1)} % of base)` : "";
  setText("macs", lastMacs === null ? "–" : `${fmtCount(lastMacs)}${share}`);
  setText("top1", fmtPercent(lastTop1, 2));
  setText("message", state.message || "–");
  const cancel = document.getElementById("cancel");
  cancel.hidden = TERMINAL.has(state.state) || state.cancel_requested;
  document.title = TERMINAL.has(state.state)
    ? `${state.state} · job ${jobId.slice(0, 8)}`
    : `${Math.round(state.percent)} % · job ${jobId.slice(0, 8)}`;
  if (state.error) {
    document.getElementById("failure").hidden = false;
    setText("error-code", state.error.code);
    setText("error-message", state.error.message);
  }
}

function addPoint(state) {
  if (state.macs === null || state.macs === undefined || !(state.stage in SHORT_STAGE)) return false;
  if (state.stage === "Baseline") baseMacs = state.macs;
  const short = SHORT_STAGE[state.stage];
  const label = state.stage === "Baseline" || state.stage === "Final Fine-Tune" ? short : `${short}${state.step}`;
  const point = { key: `${state.stage}/${state.step}/${state.macs}`, label, macs: state.macs, top1: state.top1 ?? null };
  const last = points[points.length - 1];
  if (last && last.key === point.key) {
    if (point.top1 !== null) last.top1 = point.top1;
  } else {
    points.push(point);
  }
  return true;
}

function redraw() {
  const reference = baseMacs || (points.length ? points[0].macs : null);
  drawChart(
    document.getElementById("chart"),
    points.map((p) => ({ ...p, macsKeptPct: reference ? (100 * p.macs) / reference : null })),
  );
}

// ------------------------------------------------------------------ when it is over
function table(node, head, rows) {
  node.replaceChildren(
    el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", {}, c)))))),
  );
}

function change(a, b, digits = 2) {
  const d = b - a;
  return `${d >= 0 ? "+" : "−"}${Math.abs(d).toFixed(digits)} pt`;
}

function renderReport(report) {
  document.getElementById("report").hidden = false;
  table(document.getElementById("summary"), ["", "Base", "Compressed", "Change"], [
    ["Top-1 (test)", fmtPercent(report.base.top1, 2), fmtPercent(report.pruned.top1, 2), change(report.base.top1, report.pruned.top1)],
    ["Top-5 (test)", fmtPercent(report.base.top5, 2), fmtPercent(report.pruned.top5, 2), change(report.base.top5, report.pruned.top5)],
    ["MACs", fmtCount(report.base.macs), fmtCount(report.pruned.macs), `${(100 * report.macs_ratio).toFixed(1)} % kept`],
    ["Parameters", fmtCount(report.base.params), fmtCount(report.pruned.params), `${(100 * report.params_ratio).toFixed(1)} % kept`],
    // Measured only when the job timed latency (latency.enabled).
    ...(report.speedup ? [["Speed-up", "", `${report.speedup.toFixed(2)}×`, report.speedup_runtime || ""]] : []),
  ]);
  const notes = [...report.notes];
  if (report.timings_s && report.timings_s.total) notes.unshift(`Compression took ${fmtDuration(report.timings_s.total)}.`);
  if (report.guarantee) notes.push(`Relative output error on validation data: p99 ${report.guarantee.delta_p99.toExponential(2)}, max ${report.guarantee.delta_max.toExponential(2)}.`);
  document.getElementById("notes").replaceChildren(...notes.map((n) => el("li", {}, n)));

  const ref = report.base.macs;
  table(document.getElementById("steps"), ["Stage", "Step", "MACs kept", "Params", "Top-1 (val)", "Top-5 (val)", "Kept", "Detail"],
    report.steps.map((s) => [s.stage, s.step, fmtPercent((100 * s.macs) / ref), fmtCount(s.params), fmtPercent(s.top1, 2), fmtPercent(s.top5, 2), s.accepted ? "yes" : "rolled back", s.detail]));
  if (report.latency.length) {
    document.getElementById("latency-card").hidden = false;
    table(document.getElementById("latency"), ["Runtime", "Batch", "Device", "Base", "Compressed", "Speed-up"],
      report.latency.map((l) => [l.runtime, l.batch_size, `${l.device} ${l.dtype}`, `${l.base_ms.toFixed(2)} ms`, `${l.pruned_ms.toFixed(2)} ms`, `${l.speedup.toFixed(2)}×`]));
  }
  if (report.parity.length) {
    document.getElementById("parity-card").hidden = false;
    table(document.getElementById("parity"), ["Format", "Largest |Δ logit|", "Samples", "Passed"],
      report.parity.map((p) => [p.format, p.max_abs_diff.toExponential(2), p.samples, p.passed ? "yes" : "no"]));
  }
  if (report.combination.length) {
    document.getElementById("combination-card").hidden = false;
    table(document.getElementById("combination"), ["Variant", "Precision", "MACs", "Top-1", "Top-5", "Size"],
      report.combination.map((c) => [c.variant, c.precision, fmtCount(c.macs), fmtPercent(c.top1, 2), fmtPercent(c.top5, 2), fmtBytes(c.size_bytes)]));
  }
  if (points.length < 2) {
    // The live events are gone (expired): draw the chart from the report's step records.
    points = [];
    baseMacs = ref;
    for (const s of report.steps.filter((s) => s.accepted)) addPoint({ stage: s.stage, step: s.step, macs: s.macs, top1: s.top1 });
    redraw();
  }
}

async function verify(blob, expected) {
  if (!(window.crypto && crypto.subtle)) return null; // not a secure context: cannot check
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  return hex === expected;
}

function downloadLink(file) {
  const link = el("a", { href: file.url, class: "button small", download: file.name }, "Download");
  const status = el("span", { class: "verify" });
  link.addEventListener("click", async (e) => {
    // An <a href> cannot carry the key header: fetch the file, check it, save it as a blob.
    e.preventDefault();
    link.setAttribute("aria-busy", "true");
    status.textContent = "downloading…";
    try {
      const blob = await (await fetchFile(file.url)).blob();
      const ok = await verify(blob, file.sha256);
      status.textContent = ok === null ? "saved" : ok ? "sha256 verified" : "sha256 MISMATCH";
      status.className = ok === false ? "verify bad" : "verify ok";
      const url = URL.createObjectURL(blob);
      const save = el("a", { href: url, download: file.name, hidden: true });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) {
      status.textContent = `failed: ${err.message}`;
      status.className = "verify bad";
    } finally {
      link.removeAttribute("aria-busy");
    }
  });
  return el("span", { class: "dl" }, link, status);
}

async function renderArtifacts(list) {
  document.getElementById("artifacts-card").hidden = false;
  table(document.getElementById("artifacts"), ["File", "Size", "sha256", ""],
    list.files.map((f) => [el("code", {}, f.name), fmtBytes(f.size), el("code", { class: "sha", title: f.sha256 }, f.sha256), downloadLink(f)]));
  const plots = list.files.filter((f) => f.name.endsWith(".png"));
  plots.sort((a, b) => (a.name === "dynamics.png" ? -1 : b.name === "dynamics.png" ? 1 : a.name.localeCompare(b.name)));
  if (!plots.length) return;
  document.getElementById("plots-card").hidden = false;
  const box = document.getElementById("plots");
  for (const f of plots) {
    const img = el("img", { alt: f.name });
    box.append(el("figure", { class: f.name === "dynamics.png" ? "wide" : "" }, img, el("figcaption", {}, f.name)));
    fetchFile(f.url)
      .then((r) => r.blob())
      .then((b) => (img.src = URL.createObjectURL(b)))
      .catch((err) => img.replaceWith(el("p", { class: "field-error" }, `could not load ${f.name}: ${err.message}`)));
  }
}

async function finish() {
  if (finished) return;
  finished = true;
  document.getElementById("live").hidden = true;
  try {
    const job = await api(base);
    render(job);
    describe(job);
    if (job.state === "succeeded") {
      const [report, artifacts] = await Promise.all([api(`${base}/report`), api(`${base}/artifacts`)]);
      renderReport(report);
      await renderArtifacts(artifacts);
    }
  } catch (err) {
    showError(`Could not load the result: ${err.message}`);
  }
  await pollLogs();
  root.dataset.loaded = "true";
}

// ------------------------------------------------------------------ log
async function pollLogs() {
  clearTimeout(logTimer);
  try {
    for (;;) {
      const page = await api(`${base}/logs?limit=500${logCursor ? `&after=${logCursor}` : ""}`);
      const pre = document.getElementById("log");
      for (const line of page.items) {
        pre.append(`${line.time.slice(11, 19)} ${line.level.padEnd(7)} ${line.message}\n`);
      }
      logCursor = page.next_after || logCursor;
      setText("log-count", String(pre.textContent.split("\n").length - 1));
      if (page.items.length < 500) break;
    }
  } catch {
    // The server is away or refused: the log is secondary, try again on the next round.
  }
  if (!finished) logTimer = setTimeout(pollLogs, 3000);
}

// ------------------------------------------------------------------ cancel
function setupCancel() {
  const button = document.getElementById("cancel");
  let armed = null;
  button.addEventListener("click", async () => {
    if (!armed) {
      button.textContent = "Click again to cancel";
      armed = setTimeout(() => {
        armed = null;
        button.textContent = "Cancel job";
      }, 4000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    button.disabled = true;
    try {
      render(await api(base, { method: "DELETE" }));
      button.textContent = "Cancel job";
    } catch (err) {
      showError(`Could not cancel: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------ start
async function start() {
  setupCancel();
  redraw();
  let job;
  try {
    job = await api(base);
  } catch (err) {
    showError(err.status === 404 ? "No such job (or it belongs to another API key)." : `Could not load the job: ${err.message}`);
    return;
  }
  // The state and progress come from the event stream, which starts with a replay of
  // everything so far: rendering this snapshot first would show the job step backwards.
  describe(job);
  document.getElementById("live").hidden = false;
  pollLogs();
  followEvents(`${base}/events`, {
    onEvent(event) {
      events += 1;
      setText("event-count", String(events));
      root.dataset.events = String(events);
      render(event.data);
      if (addPoint(event.data)) redraw();
      return TERMINAL.has(event.data.state);
    },
    onEnd: finish,
    onError(err, transient) {
      if (!transient) showError(`Live updates stopped: ${err.message}`);
    },
  });
}

start();
