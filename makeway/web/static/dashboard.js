// The dashboard polls /api/stats and /api/jobs, keeps the last ten minutes of
// figures in memory, and draws them with uPlot. Changes (cancel, pause,
// resume) are POST requests with the token typed into the page.
"use strict";

const POLL_MS = 2000;
const KEEP_POINTS = 300;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
const PRESSURE = ["cpu", "memory", "io"];

const history = { at: [], latency: {}, backlog: {}, preemptions: {}, cpu: {}, pressure: {} };
const charts = {};
let tierNames = [];
let lastCpu = null;

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function token() {
  return document.getElementById("token").value.trim();
}

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) {
    throw new Error(`${path}: HTTP ${response.status}`);
  }
  return response.json();
}

async function change(path) {
  const response = await fetch(path, { method: "POST", headers: { Authorization: `Bearer ${token()}` } });
  const body = await response.json();
  if (!response.ok) {
    setStatus(`${path}: ${body.detail || response.status}`, true);
    return;
  }
  setStatus(`${body.target}: ${body.state}${body.changed ? "" : " (no change)"}`, false);
  refresh();
}

function makeChart(id, series) {
  const element = document.getElementById(id);
  const options = {
    width: Math.max(400, element.clientWidth || 440),
    height: 200,
    series: [{}].concat(series.map((name, index) => ({ label: name, stroke: COLORS[index % COLORS.length], width: 2 }))),
    axes: [{}, { size: 50 }],
  };
  const data = [[]].concat(series.map(() => []));
  element.innerHTML = "";
  return new uPlot(options, data, element);
}

function ensureCharts(names) {
  if (names.join() === tierNames.join()) {
    return;
  }
  tierNames = names;
  charts.latency = makeChart("chart-latency", names);
  charts.backlog = makeChart("chart-backlog", names);
  charts.preemptions = makeChart("chart-preemptions", names);
  charts.cpu = makeChart("chart-cpu", names);
  charts.pressure = makeChart("chart-pressure", PRESSURE);
}

function push(series, key, value) {
  series[key] = series[key] || [];
  series[key].push(value);
  if (series[key].length > KEEP_POINTS) {
    series[key].shift();
  }
}

function recordStats(stats) {
  history.at.push(stats.at);
  if (history.at.length > KEEP_POINTS) {
    history.at.shift();
  }
  const cpuTotal = {};
  let cpuSum = 0;
  for (const tier of stats.tiers) {
    const delta = lastCpu ? Math.max(0, tier.cpu_s - (lastCpu[tier.name] || 0)) : 0;
    cpuTotal[tier.name] = delta;
    cpuSum += delta;
  }
  lastCpu = Object.fromEntries(stats.tiers.map((tier) => [tier.name, tier.cpu_s]));
  for (const tier of stats.tiers) {
    push(history.latency, tier.name, tier.p99_ms);
    push(history.backlog, tier.name, tier.backlog);
    push(history.preemptions, tier.name, tier.preemptions_per_s);
    push(history.cpu, tier.name, cpuSum > 0 ? cpuTotal[tier.name] / cpuSum : null);
  }
  for (const resource of PRESSURE) {
    push(history.pressure, resource, resource in stats.pressure ? stats.pressure[resource] : null);
  }
}

function draw() {
  const at = history.at.slice();
  charts.latency.setData([at].concat(tierNames.map((name) => history.latency[name].slice())));
  charts.backlog.setData([at].concat(tierNames.map((name) => history.backlog[name].slice())));
  charts.preemptions.setData([at].concat(tierNames.map((name) => history.preemptions[name].slice())));
  charts.cpu.setData([at].concat(tierNames.map((name) => history.cpu[name].slice())));
  charts.pressure.setData([at].concat(PRESSURE.map((name) => history.pressure[name].slice())));
}

function cell(row, text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) {
    td.className = "number";
  }
  row.appendChild(td);
  return td;
}

function button(parent, label, path) {
  const element = document.createElement("button");
  element.textContent = label;
  element.dataset.action = label;
  element.addEventListener("click", () => change(path));
  parent.appendChild(element);
}

function format(value) {
  return value === null || value === undefined ? "-" : value.toFixed(1);
}

function renderTiers(stats, paused) {
  const body = document.querySelector("#tiers tbody");
  body.innerHTML = "";
  for (const tier of stats.tiers) {
    const row = document.createElement("tr");
    row.dataset.tier = tier.name;
    cell(row, tier.name);
    cell(row, String(tier.backlog), true);
    cell(row, String(tier.running), true);
    cell(row, String(tier.suspended), true);
    cell(row, String(tier.completed), true);
    cell(row, format(tier.p50_ms), true);
    cell(row, format(tier.p99_ms), true);
    cell(row, tier.preemptions_per_s.toFixed(2), true);
    const actions = cell(row, "");
    if (paused[tier.name] !== undefined && tier.name !== "interactive") {
      const path = paused[tier.name] ? `/api/resume/${encodeURIComponent(tier.name)}` : `/api/pause/${encodeURIComponent(tier.name)}`;
      button(actions, paused[tier.name] ? "resume" : "pause", path);
    }
    body.appendChild(row);
  }
}

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.innerHTML = "";
  for (const job of jobs) {
    const row = document.createElement("tr");
    row.dataset.job = job.id;
    cell(row, job.id);
    cell(row, job.name);
    cell(row, job.tier);
    cell(row, job.state + (job.paused ? " (paused)" : ""));
    cell(row, String(job.attempt), true);
    const progress = job.progress_total ? `${Math.round((100 * job.progress_done) / job.progress_total)} %` : "";
    cell(row, progress + (job.progress_message ? ` ${job.progress_message}` : ""));
    const actions = cell(row, "");
    if (["queued", "running", "suspended"].includes(job.state)) {
      const id = encodeURIComponent(job.id);
      button(actions, "cancel", `/api/jobs/${id}/cancel`);
      button(actions, job.paused ? "resume" : "pause", job.paused ? `/api/resume/${id}` : `/api/pause/${id}`);
    }
    body.appendChild(row);
  }
}

async function refresh() {
  try {
    const [stats, tiers, jobs] = await Promise.all([getJson("/api/stats"), getJson("/api/tiers"), getJson("/api/jobs?limit=50")]);
    ensureCharts(stats.tiers.map((tier) => tier.name));
    recordStats(stats);
    draw();
    renderTiers(stats, Object.fromEntries(tiers.map((tier) => [tier.name, tier.paused])));
    renderJobs(jobs);
    document.body.dataset.updates = String(history.at.length);
  } catch (error) {
    setStatus(String(error), true);
  }
}

const stored = sessionStorage.getItem("makeway-token");
if (stored) {
  document.getElementById("token").value = stored;
}
document.getElementById("token").addEventListener("change", () => sessionStorage.setItem("makeway-token", token()));
refresh();
setInterval(refresh, POLL_MS);
