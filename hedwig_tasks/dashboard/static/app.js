// hedwig-tasks dashboard. Every element is built with textContent, never innerHTML with data:
// message bodies, reasons and headers are written by whoever published them.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const state = { meta: null, timer: null, filters: {}, page: 0, selected: new Set() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(text, error) {
  const notice = document.getElementById("notice");
  notice.textContent = text || "";
  notice.className = error ? "error" : "";
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 60) return seconds.toFixed(1) + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m" + String(Math.floor(seconds % 60)).padStart(2, "0") + "s";
  return Math.floor(seconds / 3600) + "h" + String(Math.floor((seconds % 3600) / 60)).padStart(2, "0") + "m";
}

function when(epoch) {
  return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function postJSON(path, body, retried) {
  const headers = { "Content-Type": "application/json", "X-CSRF-Token": CSRF };
  const token = sessionStorage.getItem("hedwig-dashboard-token");
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  if (response.status === 401 && !retried) {
    const given = window.prompt("This dashboard needs its token to change anything. Token:");
    if (given) {
      sessionStorage.setItem("hedwig-dashboard-token", given);
      return postJSON(path, body, true);
    }
  }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// -- charts -----------------------------------------------------------------------------------

function chart(name, label, times, values, format) {
  const known = values.map((v, i) => [times[i], v]).filter(([, v]) => v !== null && v !== undefined);
  const last = known.length ? known[known.length - 1][1] : null;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 200 48");
  svg.setAttribute("preserveAspectRatio", "none");
  if (known.length) {
    const t0 = Math.min(...known.map(([t]) => t)), t1 = Math.max(...known.map(([t]) => t));
    const top = Math.max(1, ...known.map(([, v]) => v));
    const points = known.map(([t, v]) => {
      const x = t1 > t0 ? ((t - t0) / (t1 - t0)) * 200 : 200;
      return x.toFixed(1) + "," + (46 - (v / top) * 44).toFixed(1);
    });
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  const shown = last === null ? "-" : format ? format(last) : String(last);
  return el("div", { class: "chart", "data-chart": name, "data-last": last === null ? "" : last, "data-points": known.length },
    el("div", { class: "label" }, label), el("div", { class: "value" }, shown), svg);
}

// -- views ------------------------------------------------------------------------------------

async function viewSubscriptions(view) {
  const data = await getJSON("/api/subscriptions");
  const nodes = [el("h2", {}, "Subscriptions")];
  if (data.error) nodes.push(el("p", { class: "muted" }, "counts unavailable: " + data.error));
  const rate = data.throughput;
  nodes.push(el("div", { class: "card" }, el("h3", {}, "All subscriptions"),
    el("div", { class: "charts" }, chart("throughput", "throughput (handled/s, live workers)", rate.t, rate.per_s, (v) => v.toFixed(2)))));
  for (const row of data.rows) {
    const s = row.series;
    const t = s.t || [];
    nodes.push(el("div", { class: "card", "data-subscription": row.subscription },
      el("h3", {}, row.subscription),
      el("div", { class: "charts" },
        chart("depth", "depth", t, s.depth || []),
        chart("in_flight", "in flight", t, s.in_flight || []),
        chart("dead_letters", "dead letters", t, s.dead_letters || []),
        chart("oldest", "oldest message age", t, s.oldest_s || [], ago)),
      Object.entries(row.details).map(([k, v]) => el("div", { class: "muted" }, k + ": " + v)),
      row.unknown_because ? el("div", { class: "muted" }, "-: " + row.unknown_because) : null));
  }
  if (!data.rows.length && !data.error) nodes.push(el("p", { class: "muted" }, "no counts yet"));
  view.replaceChildren(...nodes);
}

async function viewWorkers(view) {
  const data = await getJSON("/api/workers");
  const head = el("tr", {}, ["worker", "version", "pool", "held", "running", "handled", "failed", "up", "seen"].map((h) => el("th", {}, h)));
  const rows = [];
  for (const w of data.workers) {
    rows.push(el("tr", { "data-worker": w.worker },
      el("td", {}, w.worker), el("td", {}, w.version || "?"), el("td", {}, (w.pool || "?") + " x" + (w.concurrency || "?")),
      el("td", { class: "num" }, w.held ?? 0), el("td", { class: "num" }, w.running.length),
      el("td", { class: "num" }, w.handled ?? 0), el("td", { class: "num" }, w.failed ?? 0),
      el("td", {}, ago(data.now - (w.started || data.now))), el("td", {}, ago(w.seen_s))));
    for (const m of w.running) {
      rows.push(el("tr", { class: "running" }, el("td", { colspan: 9, class: "muted" },
        "running " + m.type + " id=" + m.id + " for " + ago(m.for_s))));
    }
  }
  const nodes = [el("h2", {}, "Workers")];
  if (data.error) nodes.push(el("p", { class: "muted" }, data.error));
  nodes.push(el("table", {}, el("thead", {}, head), el("tbody", {}, rows)));
  if (!data.workers.length) nodes.push(el("p", { class: "muted" }, "no live workers: none has written a heartbeat row lately"));
  view.replaceChildren(...nodes);
}

function filterForm(data) {
  const f = state.filters;
  const pick = (name, options) => el("select", { name },
    el("option", { value: "" }, "any"), options.map((o) => el("option", { value: o, selected: f[name] === o }, o)));
  const text = (name, placeholder) => el("input", { name, value: f[name] || "", placeholder, size: 10 });
  return el("form", { class: "filters", on: { submit: (event) => {
    event.preventDefault();
    state.filters = Object.fromEntries(new FormData(event.target).entries());
    state.page = 0;
    state.selected.clear();
    render();
  } } },
  el("label", {}, "subscription", pick("subscription", data.subscriptions)),
  el("label", {}, "type", pick("type", data.types)),
  el("label", {}, "reason contains", text("reason", "text")),
  el("label", {}, "older than", text("older_than", "2h")),
  el("label", {}, "newer than", text("newer_than", "15m")),
  el("button", { type: "submit", class: "primary" }, "Filter"));
}

async function act(verb, body, what) {
  const where = verb === "requeue" ? "back to the subscriptions they came from" : "for good";
  if (!window.confirm(verb + " " + what + " " + where + "?")) return;
  try {
    const done = await postJSON("/api/dead-letters/" + verb, body);
    show(verb + "d " + done.done + " dead letter(s)");
    state.selected.clear();
    return true;
  } catch (error) {
    show(verb + " failed: " + error.message, true);
    return false;
  }
}

async function viewDeadLetters(view) {
  const query = new URLSearchParams({ ...state.filters, page: state.page });
  const data = await getJSON("/api/dead-letters?" + query);
  const head = el("tr", {}, el("th", {}, ""), ["id", "type", "version", "subscription", "attempts", "died (UTC)", "reason"].map((h) => el("th", {}, h)));
  const rows = data.rows.map((r) => el("tr", { "data-id": r.id },
    el("td", {}, el("input", { type: "checkbox", checked: state.selected.has(r.id), on: { change: (e) => {
      if (e.target.checked) state.selected.add(r.id); else state.selected.delete(r.id);
    } } })),
    el("td", {}, el("a", { href: "#dead-letter/" + encodeURIComponent(r.id) }, r.id)),
    el("td", {}, r.type), el("td", {}, r.version), el("td", {}, r.subscription),
    el("td", { class: "num" }, r.attempts), el("td", {}, when(r.dead_at)), el("td", {}, r.reason)));
  const pages = Math.max(1, Math.ceil(data.matching / data.size));
  const total = data.total === null ? "an unknown number" : data.total.toLocaleString();
  const summary = data.matching.toLocaleString() + " matching of " + total + " dead letter(s)" +
    (data.read < (data.total || 0) ? " (filters see the oldest " + data.read.toLocaleString() + ")" : "");
  const filter = { ...state.filters };
  view.replaceChildren(el("h2", {}, "Dead letters"), filterForm(data),
    el("div", { class: "actions" }, el("span", { class: "muted", id: "dl-summary" }, summary),
      el("button", { on: { click: async () => { if (await act("requeue", { ids: [...state.selected] }, state.selected.size + " selected dead letter(s)")) render(); } } }, "Requeue selected"),
      el("button", { class: "danger", on: { click: async () => { if (await act("purge", { ids: [...state.selected] }, state.selected.size + " selected dead letter(s)")) render(); } } }, "Purge selected"),
      el("button", { on: { click: async () => { if (await act("requeue", { filter }, "all " + data.matching + " matching dead letter(s)")) render(); } } }, "Requeue all matching"),
      el("button", { class: "danger", on: { click: async () => { if (await act("purge", { filter }, "all " + data.matching + " matching dead letter(s)")) render(); } } }, "Purge all matching")),
    el("table", { id: "dead-letters" }, el("thead", {}, head), el("tbody", {}, rows)),
    el("div", { class: "pager" },
      el("button", { disabled: state.page <= 0, on: { click: () => { state.page -= 1; render(); } } }, "Previous"),
      el("span", { id: "dl-page" }, "page " + (state.page + 1) + " of " + pages),
      el("button", { disabled: state.page + 1 >= pages, on: { click: () => { state.page += 1; render(); } } }, "Next")));
}

async function viewDeadLetter(view, id) {
  let data;
  try {
    data = await getJSON("/api/dead-letter?" + new URLSearchParams({ id }));
  } catch (error) {
    view.replaceChildren(el("h2", {}, "Dead letter"), el("p", {}, error.message), el("a", { href: "#dead-letters" }, "back to the list"));
    return;
  }
  const fields = ["id", "hedwig_id", "type", "version", "subscription", "attempts", "dead_at", "reason"];
  const table = (entries) => el("table", {}, el("tbody", {}, entries.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
  const back = () => { location.hash = "#dead-letters"; };
  view.replaceChildren(el("h2", {}, "Dead letter " + data.id),
    el("div", { class: "actions" },
      el("a", { href: "#dead-letters" }, "back to the list"),
      el("button", { class: "primary", id: "requeue-one", on: { click: async () => { if (await act("requeue", { ids: [data.id] }, "this dead letter")) back(); } } }, "Requeue"),
      el("button", { class: "danger", id: "purge-one", on: { click: async () => { if (await act("purge", { ids: [data.id] }, "this dead letter")) back(); } } }, "Purge")),
    el("div", { class: "card" }, el("dl", { class: "fields" }, fields.map((k) => [el("dt", {}, k), el("dd", { "data-field": k }, data[k])]))),
    el("div", { class: "card" }, el("h3", {}, "Headers"), table(Object.entries(data.headers).sort())),
    el("div", { class: "card" }, el("h3", {}, "Attributes"), table(Object.entries(data.attributes).sort())),
    el("div", { class: "card" }, el("h3", {}, data.body !== undefined ? "Body" : "Body (not UTF-8; base64)"),
      el("pre", { id: "body" }, data.body !== undefined ? data.body : data.body_base64)));
}

async function viewSchemas(view) {
  const data = await getJSON("/api/schemas");
  view.replaceChildren(el("h2", {}, "Schemas"), ...data.map((s) => el("div", { class: "card", "data-schema": s.type + " " + s.major },
    el("h3", {}, s.type + " " + s.version),
    el("dl", { class: "fields" },
      el("dt", {}, "format"), el("dd", {}, s.format),
      el("dt", {}, "handler"), el("dd", {}, s.handler || "none in this app (published only)"),
      el("dt", {}, "topic"), el("dd", {}, s.topic || "-")),
    el("pre", {}, s.definition))));
}

// -- routing and polling ----------------------------------------------------------------------

const VIEWS = { subscriptions: viewSubscriptions, workers: viewWorkers, "dead-letters": viewDeadLetters, schemas: viewSchemas };
const LIVE = new Set(["subscriptions", "workers"]);

function route() {
  const hash = location.hash.replace(/^#/, "") || "subscriptions";
  if (hash.startsWith("dead-letter/")) return ["dead-letter", decodeURIComponent(hash.slice("dead-letter/".length))];
  return [VIEWS[hash] ? hash : "subscriptions", null];
}

async function render() {
  const [name, arg] = route();
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === name || (name === "dead-letter" && link.dataset.view === "dead-letters"));
  }
  const view = document.getElementById("view");
  try {
    if (name === "dead-letter") await viewDeadLetter(view, arg);
    else await VIEWS[name](view);
    view.dataset.view = name;
    view.dataset.rendered = String(Date.now());
  } catch (error) {
    show("could not load " + name + ": " + error.message, true);
  }
}

async function start() {
  state.meta = await getJSON("/api/meta");
  const m = state.meta;
  document.getElementById("meta").textContent = m.app + " · queue " + m.queue + " · " + m.transport + " · " + m.version;
  window.addEventListener("hashchange", render);
  await render();
  state.timer = setInterval(() => { if (LIVE.has(route()[0])) render(); }, m.refresh_s * 1000);
}

start();
