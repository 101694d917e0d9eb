// The Plantlink fleet console. Plain JavaScript, no build step, no third-party code: every
// request goes to this origin's API with the tenant token kept in sessionStorage.
"use strict";

const KEY = "plantlink-token";
const REFRESH_MS = 5000;
let timer = null;
let rulesCache = [];
// Bumped by every navigation and sign-out: a render or refresh started before it is dropped.
let generation = 0;
// Set while the rule form holds unsaved input: the alerts view does not refresh under it.
let formDirty = false;

// --- DOM helpers: elements are built, never parsed from strings (no injection) ---

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const svgNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function table(id, head, rows, empty) {
  const t = el("table", { id },
    el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  if (rows.length === 0) {
    body.append(el("tr", {}, el("td", { colspan: head.length, class: "muted" }, empty)));
  }
  rows.forEach((r) => body.append(r));
  t.append(body);
  return t;
}

function duration(s) {
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function ago(iso) {
  if (!iso) return "never";
  return `${duration(Math.max(0, (Date.now() - Date.parse(iso)) / 1000))} ago`;
}

// The age of a gateway's oldest queued reading now: its report's, plus the time since.
// An agent before uplink revision 1.1 reports no bytes (and no age).
function oldestAge(q) {
  if (!q.at) return ["", "not reported"];
  if (q.queued_bytes === null || q.queued_bytes === undefined) {
    return ["", "not reported (agent before uplink 1.1)"];
  }
  if (q.queued_readings === 0) return [0, "empty"];
  if (q.oldest_age_seconds === null || q.oldest_age_seconds === undefined) return ["", "unknown"];
  const s = q.oldest_age_seconds + Math.max(0, (Date.now() - Date.parse(q.at)) / 1000);
  return [s.toFixed(1), duration(s)];
}

function num(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "string") return v; // NaN and infinities come as strings
  return Math.abs(v) >= 1000 || Number.isInteger(v) ? String(v) : v.toPrecision(4);
}

function status(text, bad) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = bad ? "bad" : "muted";
}

// --- The API ---

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(KEY);
  if (!token) throw new ApiError(401, "signed out");
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!r.ok) {
    const why = (json && json.error) || text || r.statusText;
    if (r.status === 401) signOut(`The token was not accepted: ${why}`);
    throw new ApiError(r.status, `${method} ${path}: ${r.status} ${why}`);
  }
  return json;
}

// --- Sign-in ---

function signOut(message) {
  generation += 1;
  formDirty = false;
  sessionStorage.removeItem(KEY);
  if (timer) clearTimeout(timer);
  document.getElementById("nav").hidden = true;
  document.getElementById("view").replaceChildren();
  rulesCache = [];
  // The next sign-in (perhaps another tenant's) starts at the fleet.
  history.replaceState(null, "", location.pathname);
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message || "";
}

async function signIn(token) {
  sessionStorage.setItem(KEY, token);
  try {
    const lag = await api("GET", "/v1/pipeline/lag");
    document.getElementById("tenant").textContent = `tenant ${lag.tenant}`;
    document.getElementById("signin").hidden = true;
    document.getElementById("nav").hidden = false;
    route();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) signOut(String(e.message || e));
  }
}

// --- Views ---

function schedule(fn) {
  if (timer) clearTimeout(timer);
  const mine = generation;
  timer = setTimeout(async () => {
    if (mine !== generation) return;
    try { await fn(mine); } catch (e) { if (mine === generation) status(String(e.message || e), true); }
    if (mine === generation) schedule(fn);
  }, REFRESH_MS);
}

// Renders a view unless a navigation or sign-out came after the render began (`mine`).
function show(mine, ...children) {
  if (mine !== generation) return;
  document.getElementById("view").replaceChildren(...children);
  status(`updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`);
}

async function fleet(mine) {
  const [lag, devices, open, rules] = await Promise.all([
    api("GET", "/v1/pipeline/lag"),
    api("GET", "/v1/devices"),
    api("GET", "/v1/alerts?state=firing&limit=100"),
    api("GET", "/v1/alert-rules"),
  ]);
  rulesCache = rules.rules;
  const gateways = Object.entries(lag.gateways || {}).map(([id, g]) => {
    const up = g.connections > 0;
    const q = g.queue || {};
    const conflicts = (lag.conflicts || {})[id];
    const [oldestValue, oldestText] = oldestAge(q);
    return el("tr", { "data-gateway": id, "data-state": up ? "connected" : "disconnected" },
      el("td", {}, id),
      el("td", { class: up ? "ok" : "bad" }, up ? "connected" : "disconnected"),
      el("td", { class: "n", "data-value": q.queued_readings ?? "" }, q.queued_readings ?? "not reported"),
      el("td", { class: "n", "data-value": oldestValue }, oldestText),
      el("td", {}, q.at ? ago(q.at) : ""),
      el("td", { class: "n" }, g.readings_in_flight),
      el("td", {}, ago(g.last_ack_at)),
      el("td", { class: "n" }, g.batches_refused),
      el("td", { class: "n" }, conflicts ? conflicts.readings : g.readings_conflicting));
  });
  const deviceRows = devices.devices.map((d) =>
    el("tr", { "data-device": d.device_id },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.device_id)}` }, d.device_id)),
      el("td", {}, d.device_type || ""),
      el("td", {}, ago(d.last_seen_at)),
      el("td", { class: "n" }, d.readings_recent)));
  show(mine,
    el("section", {},
      el("h2", {}, "Gateways"),
      table("gateways",
        ["Gateway", "Uplink", "Queue (readings)", "Oldest queued", "Reported", "In flight", "Last ack", "Refused batches", "Conflicts"],
        gateways, "No gateway has connected to this replica yet.")),
    el("section", {},
      el("h2", {}, `Devices (${devices.devices.length}${devices.truncated ? "+" : ""})`),
      table("devices", ["Device", "Type", "Last seen", "Readings, this hour and last"], deviceRows,
        "No device has sent readings yet.")),
    el("section", {},
      el("h2", {}, "Open alerts"),
      alertTable("open-alerts", open.alerts, "No alert is open.")));
}

function alertTable(id, alerts, empty) {
  const rows = alerts.map((a) =>
    el("tr", { "data-alert": a.alert_id, "data-state": a.state, "data-rule": a.rule_id },
      el("td", { class: a.state === "firing" ? "bad" : "ok" }, a.state),
      el("td", {}, `${a.severity}`),
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(a.device_id)}` }, a.device_id)),
      el("td", {}, ruleName(a.rule_id)),
      el("td", { class: "n" }, num(a.value)),
      el("td", { class: "n" }, num(a.threshold)),
      el("td", {}, a.backfill ? "backfill" : "live"),
      el("td", {}, a.window_end ? new Date(a.window_end).toLocaleString() : ""),
      el("td", {}, a.resolved_at ? ago(a.resolved_at) : "")));
  return table(id, ["State", "Severity", "Device", "Rule", "Value", "Threshold", "Lane", "Window end", "Resolved"],
    rows, empty);
}

function ruleName(id) {
  const r = rulesCache.find((x) => x.id === id);
  return r ? r.name : `rule ${id}`;
}

const RANGES = [["1h", 3600], ["6h", 6 * 3600], ["24h", 86400], ["7d", 7 * 86400], ["30d", 30 * 86400], ["365d", 365 * 86400]];

async function device(mine, id, metric, range) {
  const latest = await api("GET", `/v1/devices/${encodeURIComponent(id)}/metrics/latest`);
  const metrics = Object.keys(latest.metrics).sort();
  const m = metric && metrics.includes(metric) ? metric : metrics[0];
  const secs = (RANGES.find(([k]) => k === range) || RANGES[0])[1];
  const to = new Date();
  const from = new Date(to.getTime() - secs * 1000);
  const q = `metric=${encodeURIComponent(m)}&from=${from.toISOString()}&to=${to.toISOString()}&limit=5000`;
  const series = await api("GET", `/v1/devices/${encodeURIComponent(id)}/metrics?${q}`);
  const points = (series.series[0] || { points: [] }).points;
  const pick = (field, k) => el("select", { id: field, onchange: () => { location.hash = `#/device/${encodeURIComponent(id)}/${encodeURIComponent(document.getElementById("metric").value)}/${document.getElementById("range").value}`; } },
    k.map((v) => el("option", { value: v, selected: v === (field === "metric" ? m : (range || "1h")) }, v)));
  const latestRows = metrics.map((name) => {
    const p = latest.metrics[name];
    return el("tr", { "data-metric": name },
      el("td", {}, name), el("td", { class: "n" }, num(p.value)), el("td", {}, ago(p.ts)));
  });
  show(mine,
    el("section", {},
      el("h2", {}, "Device ", el("span", { id: "device-id" }, id)),
      el("p", {}, "Metric ", pick("metric", metrics), " over the last ", pick("range", RANGES.map(([k]) => k)),
        " · ", el("span", { id: "resolution" }, `resolution ${series.resolution}`),
        series.resolution === "raw" ? "" : " (the band is each bucket's min to max)",
        series.truncated ? " · truncated" : ""),
      chart(points, series.resolution)),
    el("section", {},
      el("h2", {}, "Latest values"),
      table("latest", ["Metric", "Value", "When"], latestRows, "No readings.")));
}

function value(p) {
  const v = p.value !== undefined ? p.value : p.avg;
  return typeof v === "number" ? v : NaN;
}

function chart(points, resolution) {
  const W = 900, H = 320, L = 60, R = 12, T = 12, B = 28;
  const s = svg("svg", { id: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "data-points": points.length, "data-resolution": resolution });
  const xs = points.map((p) => Date.parse(p.ts));
  const lo = points.map((p) => (typeof p.min === "number" ? p.min : value(p))).filter(Number.isFinite);
  const hi = points.map((p) => (typeof p.max === "number" ? p.max : value(p))).filter(Number.isFinite);
  if (points.length === 0 || lo.length === 0) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" });
    t.textContent = "No data in this range.";
    s.append(t);
    return s;
  }
  let y0 = Math.min(...lo), y1 = Math.max(...hi);
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const X = (t) => L + ((t - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    s.append(svg("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }));
    const t = svg("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", class: "axis" });
    t.textContent = num(v);
    s.append(t);
  }
  for (const [t, anchor] of [[x0, "start"], [x1, "end"]]) {
    const e = svg("text", { x: X(t), y: H - 8, "text-anchor": anchor, class: "axis" });
    e.textContent = new Date(t).toLocaleString();
    s.append(e);
  }
  if (resolution !== "raw") {
    const top = points.filter((p) => typeof p.max === "number").map((p) => `${X(Date.parse(p.ts))},${Y(p.max)}`);
    const bottom = points.filter((p) => typeof p.min === "number").map((p) => `${X(Date.parse(p.ts))},${Y(p.min)}`).reverse();
    s.append(svg("polygon", { points: top.concat(bottom).join(" "), class: "band", id: "chart-band" }));
  }
  const line = points.filter((p) => Number.isFinite(value(p)))
    .map((p) => `${X(Date.parse(p.ts))},${Y(value(p))}`).join(" ");
  s.append(svg("polyline", { points: line, class: "line", id: "chart-line" }));
  if (points.length <= 300) {
    for (const p of points) {
      if (Number.isFinite(value(p))) {
        s.append(svg("circle", { cx: X(Date.parse(p.ts)), cy: Y(value(p)), r: 2.2, class: "dot" }));
      }
    }
  }
  return s;
}

// --- Alerts and rules ---

async function alerts(mine, editing) {
  const [list, rules] = await Promise.all([
    api("GET", "/v1/alerts?limit=100"),
    api("GET", "/v1/alert-rules"),
  ]);
  rulesCache = rules.rules;
  const ruleRows = rules.rules.map((r) =>
    el("tr", { "data-rule": r.id },
      el("td", {}, r.name),
      el("td", {}, r.kind === "absence" ? `silent for ${r.seconds} s` :
        `${r.aggregate || "avg"}(${r.metric}) ${r.op} ${r.threshold} over ${r.window ? r.window.seconds : "?"} s` +
        (r.for_windows > 1 ? ` for ${r.for_windows} windows` : "")),
      el("td", {}, selectorText(r.selector)),
      el("td", {}, r.severity),
      el("td", {},
        r.kind === "absence" ? el("span", { class: "muted" }, "edit through the API") :
          el("button", { type: "button", class: "edit", onclick: () => { formDirty = true; alerts(generation, r); } }, "Edit"),
        " ",
        el("button", { type: "button", class: "delete", onclick: async () => {
          if (!confirm(`Delete the rule "${r.name}"?`)) return;
          try { await api("DELETE", `/v1/alert-rules/${r.id}`); await route(); } catch (e) { status(e.message, true); }
        } }, "Delete"))));
  show(mine,
    el("section", {},
      el("h2", {}, "Alerts, newest first"),
      alertTable("alerts", list.alerts, "No alerts yet.")),
    el("section", {},
      el("h2", {}, "Rules"),
      table("rules", ["Name", "Condition", "Devices", "Severity", ""], ruleRows, "No rules yet."),
      ruleForm(editing)));
}

function selectorText(sel) {
  if (!sel) return "all devices";
  const parts = [];
  if (sel.device_id) parts.push(`device ${sel.device_id}`);
  if (sel.device_type) parts.push(`type ${sel.device_type}`);
  for (const [k, v] of Object.entries(sel.tags || {})) parts.push(`${k}=${v}`);
  return parts.length ? parts.join(", ") : "all devices";
}

function ruleForm(r) {
  const f = (id, label, input) => el("label", { for: id }, label, input);
  const opt = (id, values, cur) => el("select", { id }, values.map((v) => el("option", { value: v, selected: v === cur }, v)));
  const form = el("form", { id: "rule-form", oninput: () => { formDirty = true; }, onsubmit: async (ev) => {
    ev.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    // An edit keeps what the form does not show (tags, device type, the window's kind,
    // the description): the PUT replaces the whole rule.
    const body = r ? JSON.parse(JSON.stringify(r)) : {};
    delete body.id;
    const selector = Object.assign({}, body.selector || {});
    if (v("rule-device")) selector.device_id = v("rule-device");
    else delete selector.device_id;
    Object.assign(body, {
      name: v("rule-name"),
      metric: v("rule-metric"),
      selector,
      aggregate: v("rule-aggregate"),
      op: v("rule-op"),
      threshold: Number(v("rule-threshold")),
      window: Object.assign({ kind: "tumbling" }, body.window || {}, { seconds: Number(v("rule-window")) }),
      for_windows: Number(v("rule-for")),
      severity: v("rule-severity"),
    });
    try {
      if (r) await api("PUT", `/v1/alert-rules/${r.id}`, body);
      else await api("POST", "/v1/alert-rules", body);
      document.getElementById("rule-error").textContent = "";
      formDirty = false;
      await route();
    } catch (e) {
      document.getElementById("rule-error").textContent = e.message;
    }
  } },
  el("h3", {}, r ? `Edit rule ${r.id}` : "New threshold rule"),
  f("rule-name", "Name", el("input", { id: "rule-name", required: true, value: r ? r.name : "" })),
  f("rule-metric", "Metric", el("input", { id: "rule-metric", required: true, value: r ? r.metric || "" : "temperature" })),
  f("rule-device", "Device (empty: all)", el("input", { id: "rule-device", value: r && r.selector ? r.selector.device_id || "" : "" })),
  f("rule-aggregate", "Aggregate", opt("rule-aggregate", ["avg", "min", "max", "count", "last", "rate"], r ? r.aggregate || "avg" : "avg")),
  f("rule-op", "Is", opt("rule-op", [">", ">=", "<", "<=", "==", "!="], r ? r.op : ">")),
  f("rule-threshold", "Threshold", el("input", { id: "rule-threshold", type: "number", step: "any", required: true, value: r ? r.threshold : "" })),
  f("rule-window", "Window (s)", el("input", { id: "rule-window", type: "number", min: 1, max: 86400, required: true, value: r && r.window ? r.window.seconds : 60 })),
  f("rule-for", "For windows", el("input", { id: "rule-for", type: "number", min: 1, required: true, value: r ? r.for_windows || 1 : 1 })),
  f("rule-severity", "Severity", opt("rule-severity", ["critical", "warning", "info"], r ? r.severity : "warning")),
  el("button", { type: "submit", id: "rule-save" }, r ? "Save" : "Create"),
  r ? el("button", { type: "button", onclick: () => { formDirty = false; route(); } }, "Cancel") : null,
  el("p", { id: "rule-error", class: "bad" }));
  return form;
}

// --- Routing: #/fleet, #/device/<id>[/<metric>/<range>], #/alerts ---

async function route() {
  if (!sessionStorage.getItem(KEY)) return;
  generation += 1;
  const mine = generation;
  if (timer) clearTimeout(timer);
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  let view;
  if (parts[0] === "device" && parts[1]) view = (g) => device(g, parts[1], parts[2], parts[3]);
  else if (parts[0] === "alerts") view = (g) => (formDirty ? Promise.resolve() : alerts(g));
  else view = fleet;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.getAttribute("href") === `#/${parts[0] || "fleet"}`);
  }
  try {
    if (rulesCache.length === 0 && view !== fleet) rulesCache = (await api("GET", "/v1/alert-rules")).rules;
    formDirty = false;
    await view(mine);
    schedule(view);
  } catch (e) {
    if (mine !== generation) return;
    status(String(e.message || e), true);
    if (e instanceof ApiError && e.status === 404) {
      show(mine, el("section", {}, el("h2", {}, "Not found"), el("p", { id: "not-found" }, e.message)));
    }
  }
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn(document.getElementById("token").value.trim());
  });
  document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
  // A link may carry the token in its fragment (deploy/demo.sh prints one): it never
  // reaches a server; keep it for this tab and drop it from the address bar.
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#/fleet");
  }
  const token = sessionStorage.getItem(KEY);
  if (token) signIn(token);
  else signOut("");
});
