// The job page: list, watch, submit, read reports and download artifacts, with the API key
// the user pastes (kept in sessionStorage, sent as "Authorization: Bearer" to /v1 only).
"use strict";

const KEY_ITEM = "attnonly.apiKey";
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const RUNNING = new Set(["downloading", "converting", "checking", "uploading"]);
const $ = (id) => document.getElementById(id);

let selectedId = null;   // the job shown in the detail panel (from /jobs/{id})
let selectedJob = null;
let jobs = [];
let ticks = 0;
let busy = false;
let reportFor = null;    // the job whose report the frame shows

function apiKey() { return sessionStorage.getItem(KEY_ITEM) || ""; }
function authHeaders() { return { Authorization: "Bearer " + apiKey() }; }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showMessage(text, isError) {
  const m = $("message");
  m.textContent = text || "";
  m.className = "message" + (isError ? " error" : "");
  m.hidden = !text;
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function errorOf(resp) {
  let code = "http_" + resp.status, message = resp.statusText || "request failed";
  try {
    const body = await resp.json();
    if (body && body.error) { code = body.error.code; message = body.error.message; }
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) message = "the API key was not accepted (" + message + ")";
  return new ApiError(resp.status, code, message);
}

async function api(path, init) {
  if (!apiKey()) throw new ApiError(401, "unauthorized", "enter your API key first");
  const opts = Object.assign({}, init || {});
  opts.headers = Object.assign({}, authHeaders(), opts.headers || {});
  const resp = await fetch(path, opts);
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// /report and /artifacts/{name} answer 307 to a short-lived presigned S3 URL. fetch follows
// it (the browser drops the Authorization header on the way to another origin; S3 needs
// only the URL); once the headers arrive, resp.url is that URL: stop the body there and
// let the browser open the URL itself.
async function presignedUrl(path) {
  const ctl = new AbortController();
  let resp;
  try {
    resp = await fetch(path, { headers: authHeaders(), signal: ctl.signal, cache: "no-store" });
  } catch (e) {
    throw new Error("could not follow the download link to storage (" + e.message +
                    "; the S3 endpoint must allow CORS GETs from this page)");
  }
  if (!resp.ok) { const err = await errorOf(resp); ctl.abort(); throw err; }
  const url = resp.url;
  ctl.abort();
  return url;
}

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(n < 10 ? 1 : 0) + " " + units[i];
}

function fmtValue(v) {
  if (typeof v !== "number" || Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? String(Number(v.toPrecision(4))) : v.toExponential(2);
}

function fmtTime(s) { return s ? new Date(s).toLocaleString() : "—"; }

function stateBadge(state) {
  return el("span", { class: "state " + (RUNNING.has(state) ? "running " : "") + state }, state);
}

function progressBar(job) {
  const pct = job.state === "succeeded" ? 100 : Math.max(0, Math.min(100, (job.progress && job.progress.percent) || 0));
  const bar = el("div", { class: "progress" + (job.state === "succeeded" ? " done" : FINISHED.has(job.state) ? " bad" : "") },
                 el("div"));
  bar.firstChild.style.width = pct + "%";
  return bar;
}

function progressText(job) {
  const p = job.progress || {};
  if (FINISHED.has(job.state)) {
    return job.state + (p.layers_total ? " · " + p.layers_total + " layers" : "");
  }
  const parts = [];
  if (p.stage) parts.push(p.stage);
  if (p.layers_total) parts.push("layer " + (p.layers_done || 0) + " of " + p.layers_total);
  if (typeof p.percent === "number") parts.push(p.percent.toFixed(0) + "%");
  return parts.join(" · ");
}

// --- the list ------------------------------------------------------------------------

function renderList() {
  const body = $("jobs").tBodies[0];
  body.replaceChildren(...jobs.map((job) => {
    const cell = el("td", {}, progressBar(job), el("span", { class: "muted" }, progressText(job)));
    const row = el("tr", { "data-id": job.id, onclick: () => select(job.id) },
      el("td", {}, el("code", {}, job.id.slice(0, 12))),
      el("td", { class: "source", title: job.source_url }, job.source_url),
      el("td", {}, stateBadge(job.state)),
      cell,
      el("td", { class: "muted" }, fmtTime(job.created_at)));
    if (job.id === selectedId) row.classList.add("selected");
    return row;
  }));
  $("jobs-empty").hidden = jobs.length > 0;
  $("jobs-empty").textContent = apiKey() ? "No jobs yet: submit one above." : "Enter your API key to see your jobs.";
}

async function refreshList() {
  const page = await api("/v1/jobs?limit=20");
  jobs = page.jobs;
  renderList();
}

// --- one job -------------------------------------------------------------------------

function renderDetail() {
  const job = selectedJob;
  $("detail").hidden = !selectedId;
  if (!selectedId) return;
  $("detail-id").textContent = selectedId;
  if (!job) { $("detail-state").replaceChildren(); $("detail-facts").replaceChildren(); return; }
  $("detail-state").replaceChildren(stateBadge(job.state));
  const bar = progressBar(job);
  $("detail-bar").parentElement.className = bar.className;
  $("detail-bar").style.width = bar.firstChild.style.width;
  $("detail-progress").textContent = progressText(job);

  const facts = [["Source", job.source_url], ["Created", fmtTime(job.created_at)],
                 ["Started", fmtTime(job.started_at)], ["Finished", fmtTime(job.finished_at)]];
  if (job.attempts > 1) facts.push(["Attempts", String(job.attempts)]);
  for (const [k, v] of Object.entries(job.summary || {})) {
    if (v !== null && typeof v !== "object") facts.push([k.replace(/_/g, " "), fmtValue(v)]);
  }
  $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));

  const err = $("detail-error");
  err.hidden = !job.error;
  err.textContent = job.error ? job.error.code + ": " + job.error.message : "";

  const actions = [];
  if (job.artifacts.some((a) => a.name === "report.html")) {
    actions.push(el("button", { id: "open-report", type: "button", onclick: () => openReport(job.id) }, "View report"));
  }
  for (const a of job.artifacts) {
    actions.push(el("button", { type: "button", class: "quiet", "data-artifact": a.name,
                                title: a.sha256 ? "sha256 " + a.sha256 : "",
                                onclick: () => download(job.id, a.name) },
                    "⬇ " + a.name + " (" + fmtBytes(a.size) + ")"));
  }
  if (!FINISHED.has(job.state) && !job.cancel_requested) {
    actions.push(el("button", { type: "button", class: "quiet", onclick: () => cancel(job.id) }, "Cancel"));
  }
  $("detail-actions").replaceChildren(...actions);
  if (reportFor !== job.id) { $("report").hidden = true; $("report").removeAttribute("src"); }
}

async function refreshSelected() {
  if (!selectedId) return;
  if (selectedJob && FINISHED.has(selectedJob.state) && selectedJob.id === selectedId) return;
  try {
    selectedJob = await api("/v1/jobs/" + encodeURIComponent(selectedId));
  } catch (e) {
    if (e.status === 404) { selectedJob = null; showMessage(e.message, true); }
    throw e;
  }
  renderDetail();
}

function select(id, replace) {
  if (id !== selectedId) { selectedJob = null; reportFor = null; }
  selectedId = id;
  const path = id ? "/jobs/" + encodeURIComponent(id) : "/";
  if (location.pathname !== path) history[replace ? "replaceState" : "pushState"]({}, "", path);
  renderDetail();
  renderList();
  if (apiKey()) refreshSelected().catch(report);
}

async function openReport(id) {
  try {
    const url = await presignedUrl("/v1/jobs/" + encodeURIComponent(id) + "/report");
    reportFor = id;
    const frame = $("report");
    frame.src = url;
    frame.hidden = false;
    frame.scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (e) { report(e); }
}

async function download(id, name) {
  try {
    const url = await presignedUrl("/v1/jobs/" + encodeURIComponent(id) + "/artifacts/" + encodeURIComponent(name));
    // Served as an attachment: the browser downloads it and this page stays.
    el("a", { href: url, rel: "noopener" }).click();
  } catch (e) { report(e); }
}

async function cancel(id) {
  try {
    selectedJob = await api("/v1/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST" });
    renderDetail();
  } catch (e) { report(e); }
}

// --- forms, polling ------------------------------------------------------------------

function report(e) {
  showMessage(e.code ? e.code + ": " + e.message : e.message, true);
}

function showKeyState() {
  $("key-status").textContent = apiKey() ? "key set for this tab" : "";
  $("key").value = "";
  $("key").placeholder = apiKey() ? "•••••••• (paste to switch)" : "ak_…";
}

async function tick() {
  if (busy || !apiKey() || document.hidden) return;
  busy = true;
  try {
    const active = jobs.some((j) => !FINISHED.has(j.state)) || (selectedJob && !FINISHED.has(selectedJob.state));
    if (ticks++ % (active ? 1 : 10) === 0) await refreshList();
    await refreshSelected();
  } catch (e) {
    report(e);
    if (e.status === 401) { sessionStorage.removeItem(KEY_ITEM); showKeyState(); }
  } finally { busy = false; }
}

function init() {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_ITEM, key);
    showMessage("");
    showKeyState();
    ticks = 0;
    selectedJob = null;
    tick();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    jobs = []; selectedJob = null;
    showKeyState(); renderList(); renderDetail();
  });
  $("refresh").addEventListener("click", () => { ticks = 0; tick(); });
  $("submit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { source_url: $("source").value.trim() };
    const options = $("options").value.trim();
    try {
      if (options) {
        try { body.options = JSON.parse(options); } catch (e) { throw new Error("options: not JSON (" + e.message + ")"); }
      }
      $("submit").disabled = true;
      const created = await api("/v1/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      showMessage("");
      $("source").value = "";
      ticks = 0;
      select(created.id);
      await refreshList();
    } catch (e) { report(e); } finally { $("submit").disabled = false; }
  });
  window.addEventListener("popstate", () => select(idFromPath(), true));

  showKeyState();
  renderList();
  select(idFromPath(), true);
  setInterval(tick, 1000);
  tick();
}

function idFromPath() {
  const m = location.pathname.match(/^\/jobs\/([^/]+)$/);
  return m ? decodeURIComponent(m[1]) : null;
}

init();
