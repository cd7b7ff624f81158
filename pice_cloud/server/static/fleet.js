// The PICE fleet page: polls fleet/state and redraws. No dependencies; every string from the
// server is set as text (never as HTML): edges choose their own profile and model names.
"use strict";

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(200, 1000 * (parseFloat(params.get("interval")) || 1));
const STATE_URL = location.pathname.replace(/\/+$/, "") + "/state";
const MODES = ["progressive", "auto", "cloud", "sot", "unknown"];
const OUTCOMES = ["ok", "rejected", "invalid", "error", "cancelled"];
let lastOk = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "title") node.title = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const fmt = {
  num: (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US",
    { minimumFractionDigits: d, maximumFractionDigits: d })),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(0) + "%"),
  s: (v) => (v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(1) : v.toFixed(0)) + " s"),
};

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function card(label, value, warn, id) {
  return el("div", { class: "card" + (warn ? " warn" : ""), "data-card": id },
    el("div", { class: "v" }, value), el("div", { class: "k" }, label));
}

function drawHeader(s) {
  const pill = document.getElementById("cloud-status");
  pill.textContent = s.cloud.status.replace("_", " ");
  pill.className = "pill " + s.cloud.status;
  document.getElementById("cloud-id").textContent =
    `cloud ${s.cloud.id} · ${s.cloud.llm.backend} ${s.cloud.llm.model} · up ${fmt.s(s.cloud.uptime_s)}`;
  const broker = document.getElementById("broker-banner");
  broker.hidden = s.broker.connected;
  broker.textContent = s.broker.connected ? "" : s.broker.message;
}

function drawEdges(s) {
  const tbody = document.querySelector("#edges tbody");
  replaceRows(tbody, s.edges.map((e) => {
    const used = e.slots_used;
    const frac = used === null ? 0 : used / Math.max(1, e.slots_total);
    const late = e.timeout_s !== null && e.last_heartbeat_s > e.timeout_s / 2;
    return el("tr", { "data-device": e.device_id, "data-state": e.state },
      el("td", {}, el("strong", {}, e.device_id)),
      el("td", { class: "state-" + e.state, title: e.sources.join("+") }, e.state),
      el("td", {}, e.profile || "–"),
      el("td", {}, e.runtime || "–"),
      el("td", { class: "model" }, e.model_id || "–"),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${(100 * frac).toFixed(0)}%` })),
        `${used === null ? "–" : used}/${e.slots_total}`),
      el("td", { class: "num" }, fmt.num(e.queue_depth)),
      el("td", { class: "num" }, e.tokens_per_s ? fmt.num(e.tokens_per_s, 1) : "–"),
      el("td", { class: late ? "late" : "", title: e.heartbeat_s ? `heartbeat every ${e.heartbeat_s} s` : "" },
        `${fmt.s(e.last_heartbeat_s)} ago` + (e.timeout_s ? ` / ${fmt.s(e.timeout_s)}` : "")),
      el("td", { class: "num" }, fmt.num(e.tasks)),
      el("td", { class: "num" }, fmt.num(e.candidates)),
      el("td", { class: "num" }, fmt.num(e.refusals)),
      el("td", { class: "num" }, fmt.num(e.outstanding)));
  }));
  document.getElementById("live-count").textContent = `${s.live_edges} live`;
  document.getElementById("no-edges").hidden = s.edges.length > 0;
  document.getElementById("gone").replaceChildren(...s.gone.map((g) =>
    el("li", { "data-device": g.device_id, "data-state": "gone" },
      `${g.device_id} gone ${fmt.s(g.gone_s)} ago (last will or missed heartbeats)`,
      g.model_id ? ` · ran ${g.model_id}` : "")));
}

function drawRequests(s) {
  const r = s.requests;
  document.getElementById("request-cards").replaceChildren(
    card("finished", fmt.num(r.finished), false, "finished"),
    card("in flight", `${r.in_flight}/${r.max_concurrent}`, false, "in-flight"),
    card("queued", `${r.queued}/${r.max_queue}`, r.max_queue > 0 && r.queued >= r.max_queue, "queued"),
    card("refused (429/503)", fmt.num(r.rejected), r.rejected > 0, "rejected"),
    card("answered cloud-only", fmt.pct(r.cloud_only_share), r.cloud_only_share > 0.5, "cloud-only"),
    card("points by cloud fallback", fmt.pct(r.fallback_share), r.fallback_share > 0.5, "fallback"));
  const modes = Object.keys(r.by_mode).sort((a, b) => MODES.indexOf(a) - MODES.indexOf(b));
  replaceRows(document.querySelector("#requests tbody"), modes.map((mode) => {
    const lat = r.latency[mode] || {};
    return el("tr", { "data-mode": mode }, el("td", {}, mode),
      ...OUTCOMES.map((o) => el("td", { class: "num", "data-outcome": o }, fmt.num(r.by_mode[mode][o] || 0))),
      el("td", { class: "num" }, fmt.s(lat.mean_s)), el("td", { class: "num" }, fmt.s(lat.mean_first_token_s)));
  }));
  const edge = r.points.edge || 0, cloud = r.points.cloud || 0, total = edge + cloud;
  const split = document.getElementById("points");
  if (!total) {
    split.replaceChildren(el("span", { class: "muted" }, "no points expanded yet"));
  } else {
    const a = el("span", { class: "edge", "data-points": "edge" }, `edges ${edge}`);
    const b = el("span", { class: "cloud", "data-points": "cloud" }, `cloud ${cloud}`);
    a.style.width = `${(100 * edge) / total}%`;
    b.style.width = `${(100 * cloud) / total}%`;
    split.replaceChildren(...[edge ? a : null, cloud ? b : null].filter(Boolean));
  }
}

function drawLedger(s) {
  const l = s.ledger;
  document.getElementById("ledger-cards").replaceChildren(
    card("decoded by edges", fmt.num(l.edge_decode_tokens) + " tok", false, "edge-tokens"),
    card("decoded by cloud LLM", fmt.num(l.llm.decode_tokens) + " tok", false, "cloud-tokens"),
    card("edges' share of decoding (saved)", fmt.pct(l.edge_share_of_decoding), false, "saved"),
    card("cloud decoding on cloud-only answers", fmt.pct(l.cloud_only_share_of_cloud_decoding),
      l.cloud_only_share_of_cloud_decoding > 0.5, "cloud-only-decode"),
    card("cloud LLM seconds", fmt.num(l.llm.seconds, 1), false, "llm-seconds"));
  const total = (label, w, kind) => el("tr", { class: "muted", "data-purpose": label }, el("td", {}, label),
    el("td", {}, kind), el("td", { class: "num" }, fmt.num(w.calls)), el("td", { class: "num" }, fmt.num(w.prefill_tokens)),
    el("td", { class: "num" }, fmt.num(w.decode_tokens)), el("td", { class: "num" }, fmt.num(w.seconds, 2)));
  const rows = l.purposes.map((p) => el("tr", { "data-purpose": p.purpose }, el("td", {}, p.purpose),
    el("td", {}, p.kind === "embedding" ? "embedding" : "LLM"), el("td", { class: "num" }, fmt.num(p.calls)),
    el("td", { class: "num" }, fmt.num(p.prefill_tokens)), el("td", { class: "num" }, fmt.num(p.decode_tokens)),
    el("td", { class: "num" }, fmt.num(p.seconds, 2))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "muted", colSpan: 6 }, "no cloud work yet")));
  rows.push(total("total (LLM)", l.llm, "LLM"));
  if (l.embeddings.calls) rows.push(total("total (embedding)", l.embeddings, "embedding"));
  replaceRows(document.querySelector("#ledger tbody"), rows);
}

function drawGuards(s) {
  const blocks = [["sketch_refused", "Sketches refused, by reason"], ["sketch_repaired", "Sketches repaired"],
    ["candidate_refused", "Edge expansions refused"], ["cloud_expansion_refused", "Cloud expansions refused"]];
  document.getElementById("guards").replaceChildren(...blocks.map(([key, title]) => {
    const reasons = Object.entries(s.guards[key] || {});
    return el("div", { "data-guard": key }, el("h3", {}, title),
      reasons.length ? el("ul", { class: "reasons" }, ...reasons.map(([reason, n]) =>
        el("li", { "data-reason": reason }, el("span", { class: "n" }, fmt.num(n)), el("span", {}, reason))))
        : el("p", { class: "muted" }, "none"));
  }));
}

function drawRollout(s) {
  const r = s.rollout;
  const parts = [];
  if (r.active) {
    parts.push(el("p", { "data-rollout": r.done ? "done" : "in-progress" },
      el("strong", {}, r.target), ` from ${r.source}, issued ${fmt.s(r.age_s)} ago: `,
      `${r.on_target.length} of ${r.on_target.length + r.behind.length} live edges run it`, r.done ? " — done" : ""));
    if (r.behind.length) {
      parts.push(el("ul", { class: "behind" }, ...r.behind.map((b) => el("li", { "data-device": b.device_id },
        el("strong", {}, b.device_id), el("span", { class: "muted" }, `runs ${b.running || "–"}`),
        el("span", {}, b.phase ? `${b.phase}${b.detail ? ": " + b.detail : ""}` : "not started or not following")))));
    }
  } else {
    parts.push(el("p", { class: "muted", "data-rollout": "none" }, "No rollout announced."));
  }
  const builds = Object.entries(r.builds);
  if (builds.length) {
    parts.push(el("h3", {}, r.mixed ? "Builds (mixed fleet)" : "Builds"),
      el("ul", { class: "reasons" }, ...builds.map(([build, devices]) => el("li", {},
        el("span", { class: "n" }, devices.length), el("span", {}, `${build}: ${devices.join(", ")}`)))));
  }
  document.getElementById("rollout").replaceChildren(...parts);
}

function draw(s) {
  drawHeader(s);
  drawEdges(s);
  drawRequests(s);
  drawLedger(s);
  drawGuards(s);
  drawRollout(s);
}

async function poll() {
  const banner = document.getElementById("banner");
  try {
    const response = await fetch(STATE_URL, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    draw(state);
    lastOk = new Date();
    banner.hidden = true;
    document.getElementById("updated").textContent = `updated ${lastOk.toLocaleTimeString()}`;
    document.body.dataset.updated = String(state.time);
  } catch (err) {
    banner.hidden = false;
    banner.textContent = `The cloud does not answer (${err.message})` +
      (lastOk ? `; showing what it said at ${lastOk.toLocaleTimeString()}.` : ".");
    const pill = document.getElementById("cloud-status");
    pill.textContent = "unreachable";
    pill.className = "pill down";
  } finally {
    setTimeout(poll, INTERVAL_MS);
  }
}

poll();
