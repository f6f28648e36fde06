// ponder ui: polls the JSON endpoints of ponder/ui/app.py; no libraries, nothing loaded from elsewhere.
"use strict";

const svg = document.getElementById("timeline");
const SVG_NS = svg.namespaceURI; // the inline <svg> knows its own namespace: no URL in this file
const W = 900, H = 360, PAD = 40, SIGNAL_TOP = 10, SIGNAL_BOTTOM = 190, SCORE_TOP = 210, SCORE_BOTTOM = 330;
const PALETTE = ["#3b6fd8", "#7a4fc9", "#1a9aa0", "#b04a8f", "#5a7d2a", "#c0652d", "#44546a", "#9c8a1c"];
const state = { after: 0, decisions: new Map(), key: null, tenant: null, timelineSig: "", explainId: null };

function hashParams() { return new URLSearchParams(location.hash.replace(/^#/, "")); }

function setHash(changes) {
  const p = hashParams();
  for (const [k, v] of Object.entries(changes)) { if (v === null || v === undefined) p.delete(k); else p.set(k, v); }
  location.hash = p.toString();
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function status(text, st) {
  const el = document.getElementById("status");
  el.textContent = text; el.dataset.state = st;
}

function fmtTime(ts) { return new Date(ts * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z"); }

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// -- the live decision stream -------------------------------------------------------------------

async function pollDecisions() {
  try {
    for (;;) {
      const { decisions } = await getJSON(`api/decisions?after=${state.after}`);
      for (const d of decisions) addDecision(d);
      if (decisions.length) state.after = decisions[decisions.length - 1].rowid;
      if (decisions.length < 500) break;
    }
    status(`live · ${state.decisions.size} decisions`, "live");
  } catch (e) {
    status(`store: ${e.message}`, "error");
  }
}

function addDecision(d) {
  const stream = document.getElementById("stream");
  const old = state.decisions.get(d.decision_id);
  if (old) old.remove(); // a replayed decision was stored again: the latest stands
  const li = el("li", { "class": "decision", "data-decision-id": d.decision_id, "data-key": d.key,
                        "data-tenant": d.tenant, "data-ts": String(d.ts) });
  li.append(el("span", { "class": "action" }, `${d.action} `), el("span", {}, `${d.tenant ? d.tenant + "/" : ""}${d.key}`),
            el("div", { "class": "meta" }, `${fmtTime(d.ts)} · ${d.tier} · ${d.severity} · $${d.cost_usd.toFixed(6)}`),
            el("div", { "class": "meta" }, d.reason));
  li.addEventListener("click", () => setHash({ key: d.key, tenant: d.tenant, explain: d.decision_id }));
  stream.prepend(li);
  state.decisions.set(d.decision_id, li);
  const count = document.getElementById("decision-count");
  count.textContent = String(state.decisions.size);
  count.dataset.count = String(state.decisions.size);
}

// -- keys and the timeline ----------------------------------------------------------------------

async function pollKeys() {
  try {
    const { keys } = await getJSON("api/keys");
    const sel = document.getElementById("key-select");
    const want = JSON.stringify([state.tenant ?? "", state.key ?? ""]);
    const have = new Set([...sel.options].map(o => o.value));
    for (const k of keys) {
      const v = JSON.stringify([k.tenant, k.key]);
      if (!have.has(v)) sel.append(el("option", { value: v }, `${k.tenant ? k.tenant + "/" : ""}${k.key} (${k.events})`));
    }
    if (state.key === null && keys.length) { setHash({ key: keys[0].key, tenant: keys[0].tenant }); return; }
    sel.value = want;
  } catch (e) {
    status(`store: ${e.message}`, "error");
  }
}

async function pollTimeline() {
  if (state.key === null) return;
  const q = new URLSearchParams({ key: state.key });
  if (state.tenant !== null) q.set("tenant", state.tenant);
  try {
    const doc = await getJSON(`api/timeline?${q}`);
    const last = doc.gates.length ? doc.gates[doc.gates.length - 1].ts : 0;
    const sig = `${state.key}|${state.tenant}|${doc.gates.length}|${last}|${doc.decisions.length}`;
    if (sig === state.timelineSig) return;
    state.timelineSig = sig;
    drawTimeline(doc);
  } catch (e) {
    status(`store: ${e.message}`, "error");
  }
}

function node(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

function drawTimeline(doc) {
  svg.replaceChildren();
  svg.dataset.key = doc.key;
  svg.dataset.tenant = doc.tenant ?? "";
  const times = [...doc.gates.map(g => g.ts), ...doc.decisions.map(d => d.ts)];
  const counts = { signal: 0, score: 0, escalation: 0, decision: 0 };
  if (!times.length) { svg.dataset.points = "0"; return; }
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const x = t => PAD + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - 2 * PAD);
  // each field on its own scale: a temperature and a counter share the signal band
  const fields = new Map();
  for (const g of doc.gates) for (const [f, v] of Object.entries(g.signal)) {
    const r = fields.get(f) || { lo: v, hi: v };
    r.lo = Math.min(r.lo, v); r.hi = Math.max(r.hi, v); fields.set(f, r);
  }
  const ySignal = (f, v) => { const r = fields.get(f); return SIGNAL_BOTTOM - (r.hi > r.lo ? (v - r.lo) / (r.hi - r.lo) : 0.5) * (SIGNAL_BOTTOM - SIGNAL_TOP); };
  const yScore = s => SCORE_BOTTOM - Math.max(0, Math.min(1, s)) * (SCORE_BOTTOM - SCORE_TOP);
  const g = (cls) => { const e = node("g", { "class": cls }); svg.append(e); return e; };
  const axes = g("axes");
  axes.append(node("line", { "class": "axis", x1: PAD, y1: SIGNAL_BOTTOM, x2: W - PAD, y2: SIGNAL_BOTTOM }),
              node("line", { "class": "axis", x1: PAD, y1: SCORE_BOTTOM, x2: W - PAD, y2: SCORE_BOTTOM }));
  const label = (x0, y0, text) => { const t = node("text", { "class": "label", x: x0, y: y0 }); t.textContent = text; axes.append(t); };
  const color = new Map([...fields.keys()].map((f, i) => [f, PALETTE[i % PALETTE.length]]));
  let lx = PAD;
  if (!fields.size) label(PAD, SIGNAL_TOP + 10, "signal: (none kept)");
  for (const [f, r] of fields) {
    const t = node("text", { "class": "label", x: lx, y: SIGNAL_TOP + 10, style: `fill: ${color.get(f)}` });
    t.textContent = `${f} ${r.lo}–${r.hi}`; axes.append(t); lx += 14 + 7 * t.textContent.length;
  }
  label(PAD, SCORE_TOP + 2, "gate score (0–1)");
  label(PAD, H - 8, fmtTime(t0)); label(W - PAD - 130, H - 8, fmtTime(t1));
  const sigLayer = g("signals"), scoreLayer = g("scores"), escLayer = g("escalations"), decLayer = g("decisions");
  const line = [];
  const traces = new Map([...fields.keys()].map(f => [f, []]));
  for (const r of doc.gates) {
    for (const [f, v] of Object.entries(r.signal)) {
      traces.get(f).push(`${x(r.ts)},${ySignal(f, v)}`);
      const c = node("circle", { cx: x(r.ts), cy: ySignal(f, v), r: 2, style: `fill: ${color.get(f)}`,
                                 "data-kind": "signal", "data-ts": r.ts, "data-field": f, "data-value": v });
      c.addEventListener("mouseenter", () => hover(`${fmtTime(r.ts)} ${f} = ${v}`));
      sigLayer.append(c); counts.signal++;
    }
    line.push(`${x(r.ts)},${yScore(r.score)}`);
    const s = node("circle", { cx: x(r.ts), cy: yScore(r.score), r: 1.5, "data-kind": "score", "data-ts": r.ts, "data-value": r.score });
    s.addEventListener("mouseenter", () => hover(`${fmtTime(r.ts)} score ${r.score.toFixed(3)} ${r.reasons}`));
    scoreLayer.append(s); counts.score++;
    if (r.escalated) {
      const cx = x(r.ts), cy = SCORE_TOP - 4;
      const m = node("polygon", { points: `${cx - 5},${cy - 8} ${cx + 5},${cy - 8} ${cx},${cy}`, "data-kind": "escalation", "data-ts": r.ts });
      m.addEventListener("mouseenter", () => hover(`${fmtTime(r.ts)} escalated: ${r.reasons}`));
      escLayer.append(m); counts.escalation++;
    }
  }
  scoreLayer.prepend(node("polyline", { "class": "score-line", points: line.join(" ") }));
  for (const [f, pts] of traces) {
    sigLayer.prepend(node("polyline", { "class": "signal-line", points: pts.join(" "), style: `stroke: ${color.get(f)}` }));
  }
  for (const d of doc.decisions) {
    const m = node("line", { x1: x(d.ts), y1: SIGNAL_TOP, x2: x(d.ts), y2: SCORE_BOTTOM, "data-kind": "decision",
                             "data-ts": d.ts, "data-decision-id": d.decision_id });
    m.addEventListener("mouseenter", () => hover(`${fmtTime(d.ts)} ${d.action} (${d.tier}): ${d.reason}`));
    m.addEventListener("click", () => setHash({ explain: d.decision_id }));
    decLayer.append(m); counts.decision++;
  }
  for (const [k, n] of Object.entries(counts)) svg.dataset[k] = String(n);
  svg.dataset.points = String(counts.signal + counts.score + counts.escalation + counts.decision);
}

function hover(text) { document.getElementById("timeline-hover").textContent = text; }

// -- the explain view ---------------------------------------------------------------------------

async function showExplain(id) {
  const panel = document.getElementById("explain"), body = document.getElementById("explain-body");
  for (const li of document.querySelectorAll("#stream li.selected")) li.classList.remove("selected");
  if (!id) { panel.hidden = true; panel.dataset.decisionId = ""; return; }
  state.decisions.get(id)?.classList.add("selected");
  panel.hidden = false;
  panel.dataset.decisionId = id;
  document.getElementById("explain-id").textContent = id;
  body.replaceChildren(el("p", {}, "loading…"));
  let doc;
  try { doc = await getJSON(`api/explain/${encodeURIComponent(id)}`); } catch (e) {
    body.replaceChildren(el("p", { id: "explain-error" }, e.message)); return;
  }
  const d = doc.decision;
  const parts = [
    el("p", { id: "explain-summary" }, `${d.action} (${d.severity}, confidence ${d.confidence}) by ${d.tier}${d.model ? " / " + d.model : ""} at ${fmtTime(d.ts)}: ${d.reason}`),
    el("h3", {}, "Gate"),
    el("p", { id: "explain-gate" }, `score ${doc.gate.score ?? "?"} · ${doc.gate.findings.map(f => `${f.kind} ${f.field}`).join("; ") || "no findings"}`),
    el("h3", {}, "Route"),
    el("p", { id: "explain-route" }, `${doc.route.join(" → ") || "(reflex)"}${doc.skipped.length ? " · skipped: " + doc.skipped.join("; ") : ""}`),
    el("h3", {}, "Cost"),
    el("p", { id: "explain-cost" }, `$${doc.cost_usd.toFixed(6)} · prompt ${doc.tokens.prompt} (new ${doc.tokens.new}, cached ${doc.tokens.cached}) · completion ${doc.tokens.completion}`),
    el("h3", {}, "Prompt as sent"),
    el("pre", { id: "explain-prompt" }, doc.prompt ? doc.prompt.prefix + doc.prompt.tail : "(no model call)"),
  ];
  if (doc.attempts.length) {
    parts.push(el("h3", {}, "Model calls"));
    const list = el("ol", { id: "explain-attempts" });
    for (const a of doc.attempts) for (const o of a.outputs) {
      list.append(el("li", {}, `${a.tier}${a.model ? " / " + a.model : ""}: ${o.text}${o.error ? "  ✗ " + o.error : "  ✓"}`));
    }
    parts.push(list);
  }
  if (doc.stages.length) {
    parts.push(el("h3", {}, "Where the time went"));
    const t = el("table", { id: "explain-stages" });
    for (const s of doc.stages) {
      const tr = el("tr");
      tr.append(el("td", {}, "  ".repeat(s.depth) + s.name), el("td", {}, `${s.ms.toFixed(2)} ms`));
      t.append(tr);
    }
    parts.push(t);
  }
  body.replaceChildren(...parts);
}

document.getElementById("explain-close").addEventListener("click", () => setHash({ explain: null }));
document.getElementById("key-select").addEventListener("change", e => {
  const [tenant, key] = JSON.parse(e.target.value);
  setHash({ key, tenant });
});

function route() {
  const p = hashParams();
  const key = p.get("key"), tenant = p.get("tenant");
  if (key !== state.key || tenant !== state.tenant) {
    state.key = key; state.tenant = tenant; state.timelineSig = "";
    pollTimeline();
  }
  const id = p.get("explain");
  if (id !== state.explainId) { state.explainId = id; showExplain(id); }
}

window.addEventListener("hashchange", route);
route();
pollDecisions(); pollKeys();
setInterval(pollDecisions, 1000);
setInterval(pollTimeline, 1000);
setInterval(pollKeys, 5000);
