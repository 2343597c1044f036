// The jobs list: one page of GET /v1/jobs, filtered by state, refreshed while jobs run.
import { api, badge, el, fmtAge, fmtPercent, targetText, TERMINAL } from "./app.js";

const LIMIT = 20;
const REFRESH_MS = 5000;
const params = new URLSearchParams(location.search);
let state = params.get("state") || "";
let offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
let timer = null;

const filter = document.getElementById("state-filter");
filter.value = state;

function row(job) {
  const link = `/jobs/${job.id}`;
  const bar = el("div", { class: `bar state-${job.state}` });
  bar.style.width = `${job.percent}%`;
  const stateCell = el("td", {}, el("span", {}));
  badge(stateCell.firstChild, job.state);
  let detail = job.stage || "";
  if (job.state === "queued") detail = "waiting for a worker";
  else if (job.error) detail = job.error.code;
  else if (job.state === "succeeded" && job.result) {
    detail = `top-1 ${job.result.top1.toFixed(1)} %, ${(100 * job.result.macs_ratio).toFixed(0)} % of MACs`;
  } else if (job.state === "cancelled") detail = "";
  return el(
    "tr",
    { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, el("a", { href: link, class: "job-id", title: job.id }, job.id.slice(0, 12))),
    stateCell,
    el("td", {}, job.config.model),
    el("td", { class: "dataset", title: job.config.dataset }, job.config.dataset),
    el("td", {}, targetText(job.config)),
    el(
      "td",
      { class: "progress-col" },
      el("div", { class: "progress" }, bar),
      el("span", { class: "pct" }, fmtPercent(job.percent, 0)),
      el("span", { class: "sub" }, detail),
    ),
    el("td", { title: job.created_at }, fmtAge(job.created_at)),
  );
}

async function load() {
  clearTimeout(timer);
  const query = new URLSearchParams({ limit: LIMIT, offset });
  if (state) query.set("state", state);
  const table = document.getElementById("jobs");
  const errorBox = document.getElementById("list-error");
  let page;
  try {
    page = await api(`/v1/jobs?${query}`);
  } catch (err) {
    errorBox.textContent = `Could not load the jobs: ${err.message}`;
    errorBox.hidden = err.status === 401;
    return;
  }
  errorBox.hidden = true;
  if (page.items.length === 0 && offset > 0 && page.total > 0) {
    offset = Math.max(0, Math.floor((page.total - 1) / LIMIT) * LIMIT);
    return load();
  }
  document.getElementById("jobs-body").replaceChildren(...page.items.map(row));
  document.getElementById("empty").hidden = page.items.length > 0;
  const first = page.total ? offset + 1 : 0;
  const last = offset + page.items.length;
  document.getElementById("range").textContent = `${first}–${last} of ${page.total}`;
  document.getElementById("prev").disabled = offset === 0;
  document.getElementById("next").disabled = last >= page.total;
  table.setAttribute("aria-busy", "false");
  if (!document.body.dataset.rendered) {
    document.body.dataset.rendered = "jobs";
    performance.mark("jobs-rendered");
  }
  if (page.items.some((job) => !TERMINAL.has(job.state))) {
    timer = setTimeout(() => document.visibilityState === "visible" ? load() : (timer = setTimeout(load, REFRESH_MS)), REFRESH_MS);
  }
}

function navigate() {
  const query = new URLSearchParams();
  if (state) query.set("state", state);
  if (offset) query.set("offset", offset);
  history.replaceState(null, "", query.toString() ? `/?${query}` : "/");
  load();
}

filter.addEventListener("change", () => {
  state = filter.value;
  offset = 0;
  navigate();
});
document.getElementById("prev").addEventListener("click", () => {
  offset = Math.max(0, offset - LIMIT);
  navigate();
});
document.getElementById("next").addEventListener("click", () => {
  offset += LIMIT;
  navigate();
});

load();
