// Potluck swarm health: fetches /api/v1/state every few seconds and re-renders in place.
// Every value from the swarm goes into the page as text (textContent), never as markup.
"use strict";

const REFRESH_MS = 2500;
const FOLD_ABOVE = 40;  // node tables of models with more nodes start folded
const expanded = new Set();  // "model/peer" of node rows whose details are open
const openTables = new Map();  // model -> whether the user unfolded (true) or folded (false) its table
let last = null;  // the last state received
let failedSince = null;  // when fetching started to fail (local clock, seconds)
let lag = {updatedAt: undefined, seconds: 0, at: 0};  // how old the swarm read was when first received

// Ages in the JSON are as of its updated_at; the page adds the time since, measured on its own
// clock from the server's Date header, so a phone with a wrong clock still shows right ages.
function sinceUpdate() { return lag.seconds + (Date.now() / 1000 - lag.at); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "style") for (const [p, v] of Object.entries(value)) node.style.setProperty(p, v);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
  return node;
}

const fmt = {
  count(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(0) + "k";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
    return String(Math.round(n));
  },
  rate(n) { return n >= 100 ? fmt.count(n) : n.toFixed(1); },
  ms(s) {
    if (s === null || s === undefined) return "–";
    return s < 0.01 ? (s * 1e3).toFixed(1) + " ms" : Math.round(s * 1e3) + " ms";
  },
  ago(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  },
  span(a, b) { return a + ":" + b; },  // as the CLI writes spans: start inclusive, end exclusive
  short(peer) { return peer.length > 14 ? "…" + peer.slice(-8) : peer; },
};

function age(node) { return node.age_s === null ? null : node.age_s + sinceUpdate(); }

function totals(state) {
  const t = state.totals;
  const card = (label, value, sub, tone) => el("div", {class: "card" + (tone ? " tone-" + tone : "")},
    el("div", {class: "value"}, value), el("div", {class: "label"}, label), el("div", {class: "sub"}, sub));
  const online = t.nodes_by_status.online;
  const broken = t.nodes_by_status.unreachable + t.nodes_by_status.stale;
  return [
    card("models usable", `${t.models_usable} / ${t.models}`, "by a client with default options",
         t.models_usable < t.models ? "bad" : "good"),
    card("nodes online", `${online} / ${t.nodes}`, broken ? `${broken} unreachable or expired` : "all records fresh",
         broken ? "warn" : ""),
    card("blocks covered", `${t.blocks_covered} / ${t.blocks}`, "with at least one live node",
         t.blocks_covered < t.blocks ? "bad" : "good"),
    card("tokens served", fmt.count(t.tokens_served), "by nodes that answered", ""),
  ];
}

function coverage(model) {
  const cells = model.blocks.map((b, i) => el("div", {
    class: "cell c" + Math.min(b.online, 2) + (b.joining ? " joining" : ""),
    title: `block ${i}: ${b.online} online` + (b.joining ? `, ${b.joining} joining` : ""),
    data: {online: b.online, joining: b.joining},
  }));
  return el("div", {class: "coverage-wrap"},
    el("div", {class: "coverage", role: "img", style: {"--blocks": model.num_blocks},
               "aria-label": `coverage of ${model.num_blocks} blocks`}, cells),
    el("div", {class: "axis"}, el("span", {}, "0"), el("span", {}, String(model.num_blocks))));
}

function spanBar(node, numBlocks) {
  return el("div", {class: "spanbar", "aria-hidden": "true"}, el("div", {style: {
    "--from": (node.start / numBlocks * 100).toFixed(2) + "%",
    "--to": ((numBlocks - node.end) / numBlocks * 100).toFixed(2) + "%",
  }}));
}

function nodeRow(model, node, key) {
  const open = expanded.has(key);
  const toggle = () => { open ? expanded.delete(key) : expanded.add(key); if (last) render(last); };
  return el("tr", {
    class: "node " + node.status + (open ? " open" : ""), tabindex: "0", "aria-expanded": String(open),
    data: {peer: node.peer_id, status: node.status, key}, onclick: toggle,
    onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); } },
  },
    el("td", {class: "name"}, el("span", {class: "chev", "aria-hidden": "true"}), node.name || "(unnamed)"),
    el("td", {class: "mono opt", title: node.peer_id}, fmt.short(node.peer_id)),
    el("td", {}, el("div", {class: "span"}, el("span", {class: "mono"}, fmt.span(node.start, node.end)),
                    spanBar(node, model.num_blocks))),
    el("td", {}, el("span", {class: "pill " + node.status}, node.status)),
    el("td", {class: "num opt", title: `${node.forward_tokens_per_s.toFixed(0)} tokens/s forward`},
       fmt.rate(node.inference_steps_per_s) + " steps/s"),
    el("td", {class: "num opt"}, fmt.count(node.cache_tokens_left)),
    el("td", {class: "opt"}, `${weights(node)} · ${node.device || "cpu"}`),
    el("td", {class: "opt"}, node.version || "–"),
    el("td", {class: "opt", title: `how other machines reach this node, as it reports: ${node.reachability}`},
       node.reachability === "relayed" ? "via relay" : node.connection || "–"),
    el("td", {class: "num opt", title: `record expires in ${fmt.ago(Math.max(0, node.expires_in_s - sinceUpdate()))}`},
       fmt.ago(age(node))),
    el("td", {class: "num"}, fmt.ms(node.ping_s)));
}

function weights(node) {  // "float32", or "float32, int8" for a node holding quantised weights
  return node.quant && node.quant !== "none" ? `${node.dtype}, ${node.quant}` : node.dtype;
}

function detailRow(node, names, columns) {
  const worst = Math.max(0.001, ...node.pings.map((p) => p.rtt_s));
  const pings = node.pings.length ? el("ul", {class: "pings"}, node.pings.map((p) => el("li", {},
    el("span", {class: "who", title: p.peer_id}, names.get(p.peer_id) || fmt.short(p.peer_id)),
    el("span", {class: "bar"}, el("i", {style: {"--w": (p.rtt_s / worst * 100).toFixed(1) + "%"}})),
    el("span", {class: "num"}, fmt.ms(p.rtt_s)))))
    : el("p", {class: "muted"}, "This node has not published pings to other nodes yet.");
  const facts = [
    ["peer id", node.peer_id], ["blocks", `${node.start}:${node.end}`],
    ["throughput", fmt.rate(node.inference_steps_per_s) + " steps/s"],
    ["forward", node.forward_tokens_per_s.toFixed(0) + " tokens/s"], ["cache left", fmt.count(node.cache_tokens_left)],
    ["open sessions", String(node.active_sessions)],
    ["tokens served", fmt.count(node.tokens_served)], ["weights", weights(node)], ["device", node.device || "cpu"],
    ["version", node.version || "–"],
    ["connection", node.connection || "not connected"], ["reachable", node.reachability],
    ["record age", fmt.ago(age(node))],
    ["expires in", fmt.ago(Math.max(0, node.expires_in_s - sinceUpdate()))],
  ];
  return el("tr", {class: "details"}, el("td", {colspan: String(columns)},
    el("dl", {class: "facts"}, facts.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {class: "mono"}, v)))),
    el("h4", {}, "Measured pings to other nodes"), pings));
}

const HEADERS = [["Name"], ["Peer", "opt"], ["Span"], ["State"], ["Throughput", "num opt"], ["Cache left", "num opt"],
                 ["dtype", "opt"], ["Version", "opt"], ["Link", "opt"], ["Age", "num opt"], ["Latency", "num"]];

function modelSection(model) {
  const rows = [];
  const names = new Map(model.nodes.map((n) => [n.peer_id, n.name]));
  for (const node of model.nodes) {
    const key = model.name + "/" + node.peer_id;
    rows.push(nodeRow(model, node, key));
    if (expanded.has(key)) rows.push(detailRow(node, names, HEADERS.length));
  }
  const missing = model.missing_blocks.map(([a, b]) => fmt.span(a, b)).join(", ");
  const single = model.missing_blocks.length === 1 && model.missing_blocks[0][1] - model.missing_blocks[0][0] === 1;
  const plural = single ? "block" : "blocks";
  const r = model.replicas;
  return el("section", {class: "model", data: {model: model.name}},
    el("div", {class: "model-head"},
      el("h2", {}, model.name),
      el("span", {class: "muted"}, `${model.family} · ${model.num_blocks} blocks · ${model.nodes.length} ` +
                                     (model.nodes.length === 1 ? "node" : "nodes")),
      el("span", {class: "badge " + (model.usable ? "good" : model.usable_with ? "warn" : "bad")},
         model.usable ? "usable end to end"
           : model.usable_with ? `usable only with ${model.usable_with.join(" ")}`
           : `not usable: no live node for ${plural} ${missing}`)),
    coverage(model),
    el("p", {class: "replicas muted"},
       `${r["0"]} uncovered · ${r["1"]} with one node · ${r["2+"]} with two or more`),
    el("details", {class: "nodes-box", open: tableOpen(model) ? "" : null,
                   ontoggle: (e) => openTables.set(model.name, e.target.open)},
      el("summary", {}, nodeSummary(model)),
      el("div", {class: "table-wrap"}, el("table", {class: "nodes"},
        el("thead", {}, el("tr", {}, HEADERS.map(([h, c]) => el("th", {class: c}, h)))),
        el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", {colspan: String(HEADERS.length), class: "muted"},
          "No node records.")))))));
}

// A big model's table starts folded, so a wall screen shows every model's coverage at once.
function tableOpen(model) {
  return openTables.has(model.name) ? openTables.get(model.name) : model.nodes.length <= FOLD_ABOVE;
}

function nodeSummary(model) {
  const counts = {};
  for (const node of model.nodes) counts[node.status] = (counts[node.status] || 0) + 1;
  const parts = Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([s, n]) => `${n} ${s}`);
  return `Nodes: ${parts.join(" · ") || "none"}`;
}

function statusLine(state) {
  const now = Date.now() / 1000;
  const parts = [];
  if (failedSince) parts.push(el("span", {class: "warn"}, `dashboard not answering for ${fmt.ago(now - failedSince)}`));
  if (state.updated_at === null) parts.push("no successful crawl yet");
  else parts.push(`swarm read ${fmt.ago(sinceUpdate())} ago`);
  if (state.crawl.last_error) {
    parts.push(el("span", {class: "warn"}, `DHT read failing (${state.crawl.last_error}): showing the last good view`));
  }
  parts.push(`crawl ${fmt.ms(state.crawl.duration_s)} every ${state.crawl.period_s} s`);
  return parts.flatMap((p, i) => (i ? [" · ", p] : [p]));
}

function render(state) {
  const began = performance.now();
  last = state;
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.key : null;
  document.getElementById("status").replaceChildren(...statusLine(state));
  document.getElementById("totals").replaceChildren(...totals(state));
  const models = state.models.length ? state.models.map(modelSection)
    : [el("p", {class: "empty"}, state.updated_at === null ? "Waiting for the first crawl of the swarm…"
                                                           : "No model is announced in this swarm.")];
  document.getElementById("models").replaceChildren(...models);
  const t = state.totals;
  document.title = `${t.models_usable}/${t.models} usable · Potluck swarm health`;
  if (focused) {  // keyboard users keep their place across re-renders
    const row = Array.from(document.querySelectorAll("tr.node")).find((r) => r.dataset.key === focused);
    if (row) row.focus({preventScroll: true});
  }
  void document.body.offsetHeight;  // lay the page out now, so renderMs counts layout too
  const body = document.body.dataset;
  body.renders = String(Number(body.renders || 0) + 1);
  body.renderMs = (performance.now() - began).toFixed(1);
  body.updatedAt = String(state.updated_at);
}

function selecting() {
  const selection = window.getSelection();
  return selection !== null && !selection.isCollapsed && selection.toString().trim() !== "";
}

async function refresh() {
  try {
    const response = await fetch("api/v1/state", {cache: "no-cache"});  // revalidated with its ETag
    if (!response.ok) throw new Error("HTTP " + response.status);
    const state = await response.json();
    if (state.updated_at !== lag.updatedAt) {
      const serverNow = Date.parse(response.headers.get("Date")) / 1000;
      const seconds = state.updated_at === null || isNaN(serverNow) ? 0 : Math.max(0, serverNow - state.updated_at);
      lag = {updatedAt: state.updated_at, seconds, at: Date.now() / 1000};
    }
    failedSince = null;
    if (selecting()) last = state;  // someone is copying text (a peer id): do not pull it from under them
    else render(state);
  } catch (error) {
    failedSince = failedSince || Date.now() / 1000;
    if (last && !selecting()) render(last);
    else if (!last) document.getElementById("status").textContent = "cannot reach the dashboard: " + error.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
