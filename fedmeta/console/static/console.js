// fedmeta console: the pages over the console's JSON API. No framework, no build step, nothing loaded from elsewhere.
// Every value from the API (site names, log lines) is put in the page as text, never as HTML.
"use strict";

const KEY = "fedmeta-console-key";
const POLL_MS = 1000;
const COLORS = ["#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#5c940d", "#e67700"];
let timer = null;
let me = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs, text) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new Unauthorized();
  const headers = { "X-API-Key": key, ...(options.body ? { "Content-Type": "application/json" } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) { sessionStorage.removeItem(KEY); throw new Unauthorized(); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { const e = new Error(body.error || `HTTP ${response.status}`); e.status = response.status; throw e; }
  return body;
}

function toSignIn() {
  const next = location.pathname === "/signin" ? "/" : location.pathname;
  history.replaceState(null, "", "/signin?next=" + encodeURIComponent(next));
  route();
}

function fmtSeconds(x) {
  if (x === null || x === undefined) return "–";
  if (x < 90) return `${x.toFixed(0)} s`;
  if (x < 5400) return `${(x / 60).toFixed(1)} min`;
  return `${(x / 3600).toFixed(1)} h`;
}
const fmt = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
function protectionText(p) {
  const parts = [];
  if (p.dp) parts.push("DP");
  if (p.secagg) parts.push("SecAgg+");
  if (p.rule && p.rule !== "mean") parts.push(p.rule);
  if (p.compression && p.compression !== "none") parts.push(p.compression);
  return parts.join(", ") || "none";
}
const statusCell = (status) => h("span", { class: `status ${status}`, "data-status": status }, status);

function main(...children) {
  const el = document.getElementById("main");
  el.replaceChildren(...children);
  return el;
}

// --- sign in ------------------------------------------------------------------------------------
function signInPage() {
  const error = h("div", { class: "error", id: "signin-error" });
  const input = h("input", { id: "key", type: "password", autocomplete: "off", placeholder: "fm_…" });
  const form = h("form", { class: "signin", onsubmit: async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try {
      me = await api("/api/whoami");
      const next = new URLSearchParams(location.search).get("next") || "/";
      history.pushState(null, "", next.startsWith("/") ? next : "/");
      route();
    } catch (err) {
      error.textContent = err instanceof Unauthorized ? "That key was not accepted (unknown or revoked)." : err.message;
    }
  } }, h("label", { for: "key" }, "API key"), input, h("p", { class: "muted" },
    "A viewer or coordinator key: fedmeta keys create --role viewer --name you --site-home HOME"), h("button", { type: "submit" }, "Sign in"), error);
  main(h("h1", {}, "Sign in"), form);
  input.focus();
}

// --- runs -----------------------------------------------------------------------------------------
async function runsPage() {
  const body = h("tbody", { id: "runs" });
  main(h("h1", {}, "Runs"), h("table", {}, h("thead", {}, h("tr", {}, ["run", "status", "round", "elapsed", "left", "algorithm", "protections", "ε spent"].map((c) => h("th", {}, c)))), body));
  const refresh = async () => {
    const { runs } = await api("/api/runs");
    body.replaceChildren(...(runs.length ? runs.map((r) => h("tr", { "data-run": r.name },
      h("td", {}, h("a", { href: `/runs/${encodeURIComponent(r.name)}` }, r.name)), h("td", {}, statusCell(r.status)),
      h("td", { class: "num" }, `${r.round} of ${r.rounds}`), h("td", { class: "num" }, fmtSeconds(r.elapsed)),
      h("td", { class: "num" }, r.status === "running" ? fmtSeconds(r.seconds_left) : "–"), h("td", {}, r.algorithm),
      h("td", {}, protectionText(r.protections)), h("td", { class: "num" }, r.epsilon === null || r.epsilon === undefined ? "–" : fmt(r.epsilon, 2))))
      : [h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No runs yet. Launch one, or point the console at a folder of run folders."))]));
  };
  await poll(refresh);
}

// --- one run ------------------------------------------------------------------------------------
function lineChart(title, yLabel, series) {
  const W = 560, H = 260, L = 58, R = 12, T = 10, B = 38;
  const points = series.flatMap((c) => c.x.map((x, i) => [x, c.y[i]]).filter(([, y]) => y !== null));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${yLabel} by round` });
  const legend = h("div", { class: "legend" }, series.map((c, i) => {
    const item = h("span", {}, c.label);
    item.style.setProperty("--c", COLORS[i % COLORS.length]);  // through the CSSOM: the page's CSP allows no inline style attribute
    return item;
  }));
  const box = h("div", { class: "chart-box", "data-chart": title }, h("h3", {}, title), svg, legend);
  if (!points.length) { svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no rounds yet")); return box; }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.05 || 0.5; y1 += Math.abs(y1) * 0.05 || 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: Y(y), y2: Y(y) }), s("text", { x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, y.toPrecision(3)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  for (let x = Math.ceil(x0); x <= x1; x += step) svg.append(s("text", { x: X(x), y: H - B + 16, "text-anchor": "middle" }, String(x)));
  svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }), s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }),
    s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "round"),
    s("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle" }, yLabel));
  series.forEach((c, i) => {
    const pts = c.x.map((x, j) => [x, c.y[j]]).filter(([, y]) => y !== null).map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
    svg.append(s("polyline", { points: pts, stroke: COLORS[i % COLORS.length], "data-series": c.label }));
  });
  return box;
}

function mergeSeries(store, update) {
  const t = update.train;
  t.round.forEach((r, i) => { store.loss.set(r, t.loss[i]); });
  const e = update.evaluation;
  e.round.forEach((r, i) => {
    const row = store.evaluation.get(r) || {};
    for (const [k, v] of Object.entries(e)) if (k !== "round") row[k] = v[i];
    store.evaluation.set(r, row);
  });
}

function charts(store) {
  const rounds = [...store.loss.keys()].sort((a, b) => a - b);
  const boxes = [lineChart("Training loss", "mean loss of the round's sites", [{ label: "training loss", x: rounds, y: rounds.map((r) => store.loss.get(r)) }])];
  const evalRounds = [...store.evaluation.keys()].sort((a, b) => a - b);
  const keys = [...new Set(evalRounds.flatMap((r) => Object.keys(store.evaluation.get(r))))].sort();
  for (const metric of ["acc", "auc", "mse"]) {
    const chosen = keys.filter((k) => k.endsWith("." + metric));
    if (!chosen.length) continue;
    const name = { acc: "accuracy", auc: "AUC", mse: "mean squared error" }[metric];
    boxes.push(lineChart(`Held-out ${name}, per task`, name, chosen.map((k) => {
      const [task, level] = k.split(".");
      return { label: `${task} (${level === "global" ? "global model" : "personalized"})`, x: evalRounds, y: evalRounds.map((r) => store.evaluation.get(r)[k] ?? null) };
    })));
  }
  return boxes;
}

function sitesTable(sites) {
  const hasRegion = sites.some((x) => x.region), hasMapping = sites.some((x) => x.mapping), hasContribution = sites.some((x) => x.contribution !== null);
  const columns = ["site", "status", "rows per task", "rounds", "last reply", "s / round", "failures", ...(hasRegion ? ["region"] : []), ...(hasMapping ? ["mapping"] : []), ...(hasContribution ? ["contribution"] : [])];
  return h("table", { id: "sites" }, h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))), h("tbody", {}, sites.map((x) => h("tr", { "data-site": x.site },
    h("td", {}, x.site), h("td", {}, x.status), h("td", {}, Object.entries(x.rows).map(([t, n]) => `${t} ${n}`).join(", ") || "–"),
    h("td", { class: "num" }, x.rounds), h("td", {}, x.last_contact || "–"), h("td", { class: "num" }, x.seconds === null ? "–" : fmt(x.seconds, 2)),
    h("td", { class: "num", title: x.last_failure || "" }, x.failures), ...(hasRegion ? [h("td", {}, x.region || "–")] : []),
    ...(hasMapping ? [h("td", {}, x.mapping || "–")] : []), ...(hasContribution ? [h("td", { class: "num" }, x.contribution === null ? "–" : fmt(x.contribution, 4))] : [])))));
}

function accountBox(a) {
  if (!a.dp) return h("p", { class: "muted", id: "account" }, a.note);
  return h("div", { class: "facts", id: "account" },
    h("span", {}, "ε (released models)"), h("span", {}, fmt(a.epsilon, 3)), h("span", {}, "ε (a site that knows the sample)"), h("span", {}, fmt(a.epsilon_known_sample, 3)),
    h("span", {}, "δ"), h("span", {}, a.delta ?? "–"), h("span", {}, "budget"), h("span", {}, a.max_epsilon ?? "none"),
    h("span", {}, "noise × clip"), h("span", {}, `${a.noise_multiplier ?? "–"} × ${a.clip_norm ?? "–"}`));
}

function modelsList(models) {
  if (!models.length) return h("p", { class: "muted", id: "models" }, "No base model yet: it is written after the last round.");
  return h("ul", { id: "models" }, models.map((m) => h("li", {}, m.level === "global"
    ? `global base after round ${m.round}: ${m.path} (${(m.bytes / 1024).toFixed(0)} kB)`
    : `region ${m.region} > ${m.path ? `regional base (${m.rounds} rounds on ${m.sites} sites, from global round ${m.global_round}): ${m.path}` : `keeps the global base${m.note ? ": " + m.note : ""}`}`)));
}

async function runPage(name) {
  const store = { loss: new Map(), evaluation: new Map(), since: 0 };
  const head = h("div", {}), chartArea = h("div", { class: "charts", id: "charts" }), sitesArea = h("div", {}), accountArea = h("div", {}), eventsArea = h("div", {}), modelsArea = h("div", {});
  const actions = h("div", { class: "actions" }), error = h("div", { class: "error", id: "action-error" });
  main(h("h1", {}, `Run ${name}`), head, actions, error, h("h2", {}, "Rounds"), chartArea, h("h2", {}, "Sites"), sitesArea,
    h("h2", {}, "Privacy"), accountArea, h("h2", {}, "Events"), eventsArea, h("h2", {}, "Base models"), modelsArea);
  const act = (what) => async () => {
    error.textContent = "";
    try { await api(`/api/runs/${encodeURIComponent(name)}/${what}`, { method: "POST", body: "{}" }); await refresh(); } catch (e) { if (e instanceof Unauthorized) return toSignIn(); error.textContent = e.message; }
  };
  let shownActions = "";
  const refresh = async () => {
    const [run, update] = await Promise.all([api(`/api/runs/${encodeURIComponent(name)}`), api(`/api/runs/${encodeURIComponent(name)}/metrics?since=${store.since}`)]);
    mergeSeries(store, update);
    const lastTrain = update.train.round.length ? Math.max(...update.train.round) : 0;
    // Evaluation rows of a round are logged with the next round's training: re-read the last round next time.
    store.since = Math.max(0, Math.max(store.since, lastTrain) - 1);
    head.replaceChildren(h("p", {}, statusCell(run.status), " · ", h("span", { id: "round", "data-round": run.round }, `round ${run.round} of ${run.rounds}`),
      ` · ${fmtSeconds(run.elapsed)} elapsed`, run.status === "running" && run.seconds_left !== null ? ` · about ${fmtSeconds(run.seconds_left)} left` : "",
      ` · ${run.algorithm} · protections: ${protectionText(run.protections)}`, run.exit_code !== null && run.exit_code !== undefined ? ` · exit code ${run.exit_code}` : ""));
    const coordinator = me && me.role === "coordinator";
    const wanted = coordinator ? `${run.status}/${run.launched}` : "";
    if (wanted !== shownActions) {
      shownActions = wanted;
      actions.replaceChildren(...(coordinator && run.launched && (run.status === "running" || run.status === "starting") ? [h("button", { id: "stop", onclick: act("stop") }, "Stop (checkpoint and stop)")] : []),
        ...(coordinator && run.status === "stopped" ? [h("button", { id: "resume", class: "secondary", onclick: act("resume") }, "Resume")] : []));
    }
    chartArea.replaceChildren(...charts(store));
    sitesArea.replaceChildren(run.sites.length ? sitesTable(run.sites) : h("p", { class: "muted" }, "No site has answered yet."));
    accountArea.replaceChildren(accountBox(run.account));
    eventsArea.replaceChildren(run.events.length ? h("ul", { class: "events", id: "events" }, run.events.map((e) => h("li", {}, (e.round !== null ? `round ${e.round}: ` : "") + (e.site ? `${e.site}: ` : "") + e.event))) : h("p", { class: "muted" }, "No failures, retries or refused updates."));
    modelsArea.replaceChildren(modelsList(run.models));
  };
  await poll(refresh);
}

// --- launch ---------------------------------------------------------------------------------------
const EXAMPLE = `# A run configuration, as fedmeta train --config reads it (docs/configuration.md lists every key).
rounds = 20

[federation]
kind = "hospitals"
n_sites = 6

[model]
hidden = [32]
`;

function launchPage() {
  const error = h("div", { class: "error", id: "launch-error" });
  const name = h("input", { id: "name", required: true, placeholder: "hospitals-trial" });
  const rounds = h("input", { id: "rounds", type: "number", min: 1, placeholder: "(from the configuration)" });
  const config = h("textarea", { id: "config", spellcheck: "false" }, EXAMPLE);
  const form = h("form", { class: "launch", onsubmit: async (e) => {
    e.preventDefault();
    error.textContent = "";
    const body = { name: name.value.trim(), config: config.value, ...(rounds.value ? { rounds: Number(rounds.value) } : {}) };
    try {
      await api("/api/runs", { method: "POST", body: JSON.stringify(body) });
      history.pushState(null, "", `/runs/${encodeURIComponent(body.name)}`);
      route();
    } catch (err) { if (err instanceof Unauthorized) return toSignIn(); error.textContent = err.message; }
  } }, h("label", { for: "name" }, "Run name"), name, h("label", { for: "rounds" }, "Rounds"), rounds,
    h("label", { for: "config" }, "Configuration (TOML)"), config, error, h("button", { type: "submit", id: "launch" }, "Launch"));
  main(h("h1", {}, "Launch a run"), me && me.role !== "coordinator" ? h("p", { class: "error" }, "Launching needs a coordinator key.") : form);
}

// --- routing ---------------------------------------------------------------------------------------
async function poll(refresh) {
  const tick = async () => {
    try { await refresh(); } catch (e) {
      if (e instanceof Unauthorized) return toSignIn();
      const note = document.getElementById("poll-error") || document.getElementById("main").appendChild(h("p", { class: "error", id: "poll-error" }));
      note.textContent = e.message;
      if (e.status === 404) return;
    }
    timer = setTimeout(tick, POLL_MS);
  };
  await tick();
}

async function route() {
  clearTimeout(timer);
  const path = location.pathname;
  if (path === "/signin") return signInPage();
  if (!sessionStorage.getItem(KEY)) return toSignIn();
  try { me = me || await api("/api/whoami"); } catch (e) { if (e instanceof Unauthorized) return toSignIn(); }
  document.getElementById("who").replaceChildren(me ? `${me.name} (${me.role}) ` : "", h("a", { href: "#", onclick: (e) => { e.preventDefault(); sessionStorage.removeItem(KEY); me = null; toSignIn(); } }, "sign out"));
  document.getElementById("nav-launch").hidden = !(me && me.role === "coordinator");
  if (path === "/launch") return launchPage();
  const run = path.match(/^\/runs\/([^/]+)$/);
  if (run) return runPage(decodeURIComponent(run[1]));
  return runsPage();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[href^='/']");
  if (!a || e.ctrlKey || e.metaKey || e.button !== 0) return;
  e.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);
route();
