-- breaker.dashboard: the live dashboard page, as one self-contained HTML
-- string (inline CSS and JavaScript, no build step, nothing fetched but the
-- JSON it polls), so that luarocks installs it as a plain Lua module.
--
--   require("breaker.dashboard").render{ json_url = "metrics.json", refresh = 2 }
--
-- breaker.metrics.handler serves it. The page polls the JSON of
-- breaker.metrics (metrics.json) every `refresh` seconds without reloading,
-- keeps the last minutes of samples in memory and draws, per breaker: state
-- and colour, requests, errors and rejections per second, p50/p99 latency, a
-- chart of the last minutes and the time until the next probe of an open
-- breaker. `?refresh=SECONDS` in the page's URL overrides the interval.

local type, tostring, tonumber, error = type, tostring, tonumber, error
local gsub = string.gsub

local _M = { _VERSION = require "breaker.version" }

_M.html = [==[
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
:root {
  --bg: #10151c; --panel: #18202a; --panel2: #1f2934; --text: #e6edf3; --muted: #8b98a5;
  --line: #2b3846; --closed: #2fb36b; --open: #e5484d; --half_open: #f0a93b;
  --forced_open: #a66bd6; --disabled: #7b8794; --req: #5aa9f5; --err: #e5484d; --rej: #9aa5b1;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; padding: 14px 22px;
  border-bottom: 1px solid var(--line); background: var(--panel); flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; letter-spacing: .02em; }
header .ver, header .meta { color: var(--muted); font-size: 12px; }
#live { margin-left: auto; font-size: 12px; color: var(--muted); display: flex; align-items: center; gap: 6px; }
#live .dot { width: 9px; height: 9px; border-radius: 50%; background: var(--disabled); }
#live.ok .dot { background: var(--closed); } #live.stale .dot { background: var(--open); }
main { padding: 18px 22px 30px; }
.summary { display: flex; gap: 10px; margin-bottom: 16px; flex-wrap: wrap; }
.summary span { background: var(--panel); border: 1px solid var(--line); border-radius: 14px;
  padding: 3px 12px; font-size: 12px; color: var(--muted); }
.summary b { color: var(--text); }
#tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(350px, 1fr)); gap: 14px; }
.tile { background: var(--panel); border: 1px solid var(--line); border-left: 6px solid var(--sc);
  border-radius: 8px; padding: 12px 14px 10px; --sc: var(--disabled); transition: border-color .3s; }
.tile.state-closed { --sc: var(--closed); } .tile.state-open { --sc: var(--open); }
.tile.state-half_open { --sc: var(--half_open); } .tile.state-forced_open { --sc: var(--forced_open); }
.tile.state-disabled { --sc: var(--disabled); }
.tile.state-open, .tile.state-forced_open { background: linear-gradient(180deg, #2a1a1e 0%, var(--panel) 60%); }
.head { display: flex; align-items: center; gap: 8px; min-width: 0; }
.name { font-weight: 600; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px;
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; }
.badge { background: var(--sc); color: #0b0f14; font-weight: 700; font-size: 11px; letter-spacing: .06em;
  text-transform: uppercase; border-radius: 4px; padding: 2px 8px; white-space: nowrap; }
.tag { font-size: 10px; color: var(--muted); border: 1px solid var(--line); border-radius: 3px; padding: 0 5px; }
.nums { display: grid; grid-template-columns: repeat(5, 1fr); gap: 8px; margin: 10px 0 6px; }
.num { min-width: 0; }
.num .v { font-size: 15px; font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.num .l { font-size: 10px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
.num.err .v { color: var(--err); } .num.req .v { color: var(--req); }
.probe { font-size: 12px; min-height: 17px; color: var(--muted); }
.tile.state-open .probe, .tile.state-forced_open .probe { color: var(--open); font-weight: 600; }
.tile.state-half_open .probe { color: var(--half_open); font-weight: 600; }
svg.chart { width: 100%; height: 64px; display: block; background: var(--panel2); border-radius: 4px;
  margin-top: 6px; }
svg.chart polyline, svg.chart polygon { vector-effect: non-scaling-stroke; }
svg.chart .req { fill: none; stroke: var(--req); stroke-width: 1.6; }
svg.chart .err { fill: rgba(229, 72, 77, .35); stroke: var(--err); stroke-width: 1.2; }
svg.chart .rej { fill: none; stroke: var(--rej); stroke-width: 1.2; stroke-dasharray: 3 2; }
.axis { display: flex; justify-content: space-between; font-size: 10px; color: var(--muted); margin-top: 2px; }
.foot { font-size: 11px; color: var(--muted); margin-top: 6px; display: flex; gap: 10px; flex-wrap: wrap; }
.legend { font-size: 11px; color: var(--muted); margin: 0 0 10px; display: flex; gap: 14px; }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
h2 { font-size: 14px; margin: 26px 0 8px; color: var(--muted); text-transform: uppercase; letter-spacing: .06em; }
table { border-collapse: collapse; width: 100%; background: var(--panel); border: 1px solid var(--line);
  border-radius: 6px; font-size: 13px; }
th, td { text-align: right; padding: 6px 10px; border-bottom: 1px solid var(--line);
  font-variant-numeric: tabular-nums; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
th { color: var(--muted); font-weight: 500; font-size: 11px; text-transform: uppercase; }
.empty { color: var(--muted); padding: 20px; border: 1px dashed var(--line); border-radius: 8px; }
.hidden { display: none; }
</style>
</head>
<body data-json-url="{{JSON_URL}}" data-refresh="{{REFRESH}}">
<header>
  <h1>{{TITLE}}</h1>
  <span class="ver">breaker {{VERSION}}</span>
  <span class="meta" id="meta"></span>
  <span id="live"><span class="dot"></span><span id="live-text">connecting…</span></span>
</header>
<main>
  <div class="summary" id="summary"></div>
  <div class="legend"><span><i style="background:var(--req)"></i>requests/s</span>
    <span><i style="background:var(--err)"></i>errors/s</span>
    <span><i style="background:var(--rej)"></i>rejected/s</span>
    <span id="span-label"></span></div>
  <div id="tiles"></div>
  <div id="no-breakers" class="empty hidden">No breakers in this process yet.</div>
  <section id="policies-section" class="hidden">
    <h2>Policies</h2>
    <table><thead><tr><th>policy</th><th>retry reasons</th><th>retries</th><th>waited</th>
      <th>fallbacks</th><th>budget exhausted</th><th>bulkhead full</th></tr></thead>
      <tbody id="policies"></tbody></table>
  </section>
  <section id="llm-section" class="hidden">
    <h2>LLM models</h2>
    <table><thead><tr><th>client</th><th>model</th><th>breaker</th><th>calls</th><th>failures</th>
      <th>prompt tokens</th><th>completion tokens</th><th>cost</th></tr></thead>
      <tbody id="llm"></tbody></table>
  </section>
</main>
<script>
(function () {
  "use strict";
  var body = document.body;
  var jsonUrl = body.getAttribute("data-json-url") || "metrics.json";
  var refresh = parseFloat(body.getAttribute("data-refresh")) || 2;
  var q = new URLSearchParams(window.location.search);
  if (q.get("refresh") && parseFloat(q.get("refresh")) > 0) refresh = parseFloat(q.get("refresh"));
  refresh = Math.max(0.2, Math.min(refresh, 60));
  var HISTORY = 300;          // seconds of samples kept per breaker (the chart's longest span)
  var MIN_SPAN = 30;          // the chart's shortest span, while history builds up
  var MAX_SAMPLES = 900;      // and never more samples than this
  var RATE_SPAN = 5;          // seconds the current rates average over
  // Maps keyed by names from the JSON have no prototype: a breaker named
  // "constructor" or "__proto__" is a name like any other.
  function dict(init) {
    var d = Object.create(null);
    if (init) Object.keys(init).forEach(function (k) { d[k] = init[k]; });
    return d;
  }
  var STATE_LABEL = dict({ closed: "closed", open: "open", half_open: "half-open",
                           forced_open: "forced open", disabled: "disabled" });
  var SVGNS = "http://www.w3.org/2000/svg";
  var rings = dict();         // name -> [{t, req, err, rej, state}]
  var tiles = dict();         // name -> {el, parts}
  var lastFetch = 0;          // performance.now() of the last good snapshot
  var failuresInRow = 0;

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmtRate(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (v >= 100) return v.toFixed(0);
    if (v >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }
  function fmtSec(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
    if (s < 120) return s.toFixed(2) + " s";
    return (s / 60).toFixed(1) + " min";
  }
  function fmtNum(v) {
    if (v === null || v === undefined) return "–";
    return Math.abs(v) >= 1e6 ? (v / 1e6).toFixed(2) + "M" : String(Math.round(v * 1000) / 1000);
  }

  function makeTile(name) {
    var t = el("section", "tile");
    t.setAttribute("data-breaker", name);
    var head = el("div", "head");
    var nm = el("span", "name", name); nm.title = name;
    var shared = el("span", "tag hidden", "shared");
    var badge = el("span", "badge");
    head.appendChild(nm); head.appendChild(shared); head.appendChild(badge);
    var nums = el("div", "nums");
    var parts = { badge: badge, shared: shared };
    [["req", "req/s"], ["err", "err/s"], ["pct", "err %"], ["p50", "p50"], ["p99", "p99"]].forEach(function (d) {
      var n = el("div", "num " + d[0]);
      var v = el("div", "v", "–");
      n.appendChild(v); n.appendChild(el("div", "l", d[1]));
      nums.appendChild(n);
      parts[d[0]] = v;
    });
    var probe = el("div", "probe");
    var svg = document.createElementNS(SVGNS, "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("viewBox", "0 0 300 60");
    svg.setAttribute("preserveAspectRatio", "none");
    var bands = document.createElementNS(SVGNS, "g");
    var err = document.createElementNS(SVGNS, "polygon"); err.setAttribute("class", "err");
    var rej = document.createElementNS(SVGNS, "polyline"); rej.setAttribute("class", "rej");
    var req = document.createElementNS(SVGNS, "polyline"); req.setAttribute("class", "req");
    svg.appendChild(bands); svg.appendChild(err); svg.appendChild(rej); svg.appendChild(req);
    var axis = el("div", "axis");
    var axl = el("span", null, ""), axr = el("span", null, "now"), axm = el("span", null, "");
    axis.appendChild(axl); axis.appendChild(axm); axis.appendChild(axr);
    var foot = el("div", "foot");
    t.appendChild(head); t.appendChild(nums); t.appendChild(probe); t.appendChild(svg);
    t.appendChild(axis); t.appendChild(foot);
    parts.probe = probe; parts.bands = bands; parts.errLine = err; parts.rejLine = rej;
    parts.reqLine = req; parts.axl = axl; parts.axm = axm; parts.foot = foot;
    return { el: t, parts: parts, probeAt: null, probeText: "" };
  }

  // Rates (per second) between the newest sample and the one RATE_SPAN back.
  function currentRates(ring) {
    if (ring.length < 2) return null;
    var last = ring[ring.length - 1], first = ring[ring.length - 2];
    for (var i = ring.length - 2; i >= 0; i--) {
      first = ring[i];
      if (last.t - ring[i].t >= RATE_SPAN) break;
    }
    var dt = last.t - first.t;
    if (!(dt > 0)) return null;
    return { req: Math.max(0, last.req - first.req) / dt, err: Math.max(0, last.err - first.err) / dt,
             rej: Math.max(0, last.rej - first.rej) / dt };
  }

  var STATE_FILL = dict({ open: "rgba(229,72,77,.18)", forced_open: "rgba(166,107,214,.2)",
                          half_open: "rgba(240,169,59,.2)" });

  function drawChart(tile, ring, now) {
    var span = ring.length ? Math.min(HISTORY, Math.max(MIN_SPAN, now - ring[0].t)) : MIN_SPAN;
    var p = tile.parts, W = 300, H = 60, t0 = now - span;
    var pts = [];
    for (var i = 1; i < ring.length; i++) {
      var a = ring[i - 1], b = ring[i], dt = b.t - a.t;
      if (!(dt > 0)) continue;
      pts.push({ t: b.t, t_prev: a.t, state: b.state, req: Math.max(0, b.req - a.req) / dt,
                 err: Math.max(0, b.err - a.err) / dt, rej: Math.max(0, b.rej - a.rej) / dt });
    }
    var max = 1;
    pts.forEach(function (s) { max = Math.max(max, s.req, s.err, s.rej); });
    function x(t) { return ((t - t0) / span * W).toFixed(1); }
    function y(v) { return (H - 2 - v / max * (H - 6)).toFixed(1); }
    while (p.bands.firstChild) p.bands.removeChild(p.bands.firstChild);
    pts.forEach(function (s) {
      var f = STATE_FILL[s.state];
      if (!f) return;
      var r = document.createElementNS(SVGNS, "rect");
      var x0 = Math.max(0, parseFloat(x(s.t_prev)));
      r.setAttribute("x", x0); r.setAttribute("y", 0);
      r.setAttribute("width", Math.max(0.5, parseFloat(x(s.t)) - x0)); r.setAttribute("height", H);
      r.setAttribute("fill", f);
      p.bands.appendChild(r);
    });
    var req = [], rej = [], err = [];
    pts.forEach(function (s) {
      req.push(x(s.t) + "," + y(s.req)); rej.push(x(s.t) + "," + y(s.rej)); err.push(x(s.t) + "," + y(s.err));
    });
    p.reqLine.setAttribute("points", req.join(" "));
    p.rejLine.setAttribute("points", rej.join(" "));
    if (pts.length) {
      err.unshift(x(pts[0].t) + "," + (H - 2)); err.push(x(pts[pts.length - 1].t) + "," + (H - 2));
    }
    p.errLine.setAttribute("points", err.join(" "));
    p.axl.textContent = span < 90 ? "-" + Math.round(span) + " s" : "-" + (span / 60).toFixed(1) + " min";
    p.axm.textContent = "max " + fmtRate(max) + "/s";
  }

  function updateTile(b, now) {
    var tile = tiles[b.name];
    if (!tile) {
      tile = makeTile(b.name);
      tiles[b.name] = tile;
    }
    var ring = rings[b.name] || (rings[b.name] = []);
    ring.push({ t: now, req: (b.total_calls || 0) + (b.total_rejected || 0), err: b.total_failures || 0,
                rej: b.total_rejected || 0, state: b.state });
    while (ring.length > MAX_SAMPLES || (ring.length > 2 && ring[0].t < now - HISTORY - refresh)) ring.shift();
    var el0 = tile.el, p = tile.parts;
    el0.className = "tile state-" + b.state;
    el0.setAttribute("data-state", b.state);
    p.badge.textContent = STATE_LABEL[b.state] || b.state;
    p.shared.className = b.shared ? "tag" : "tag hidden";
    var r = currentRates(ring);
    p.req.textContent = r ? fmtRate(r.req) : "–";
    p.err.textContent = r ? fmtRate(r.err) : "–";
    p.pct.textContent = r && r.req > 0 ? Math.round(100 * r.err / r.req) + "%" :
      (b.failure_rate !== undefined ? Math.round(b.failure_rate) + "%" : "–");
    p.p50.textContent = b.latency ? fmtSec(b.latency.p50) : "–";
    p.p99.textContent = b.latency ? fmtSec(b.latency.p99) : "–";
    if (b.state === "open" && typeof b.retry_after === "number") {
      tile.probeAt = performance.now() + b.retry_after * 1000;
      tile.probeText = null;
    } else {
      tile.probeAt = null;
      if (b.state === "forced_open") tile.probeText = "forced open: no probe until reset";
      else if (b.state === "half_open") tile.probeText = "probing: " + (b.half_open_granted || 0) + " of " +
        (b.half_open_calls || "?") + " probes out, " + (b.half_open_succeeded || 0) + " succeeded";
      else if (b.state === "disabled") tile.probeText = "disabled: admits everything, never trips";
      else tile.probeText = "";
    }
    renderProbe(tile);
    drawChart(tile, ring, now);
    var f = p.foot;
    while (f.firstChild) f.removeChild(f.firstChild);
    [
      "window " + (b.calls || 0) + " calls, " + (b.failures || 0) + " failed" +
        (b.failure_rate !== undefined ? " (" + Math.round(b.failure_rate) + "%)" : ""),
      "in a row " + (b.consecutive_failures || 0),
      "opened " + (b.opened || 0) + "×",
      "total " + (b.total_calls || 0) + " / rejected " + (b.total_rejected || 0)
    ].forEach(function (s) { f.appendChild(el("span", null, s)); });
    return tile;
  }

  function renderProbe(tile) {
    var txt = tile.probeText;
    if (tile.probeAt !== null) {
      var left = Math.max(0, (tile.probeAt - performance.now()) / 1000);
      txt = left > 0 ? "next probe in " + left.toFixed(1) + " s" : "probe due";
    }
    if (tile.parts.probe.textContent !== txt) tile.parts.probe.textContent = txt || "";
  }

  function row(cells) {
    var tr = el("tr");
    cells.forEach(function (c) { tr.appendChild(el("td", null, c)); });
    return tr;
  }

  function renderTables(s) {
    var pol = s.policies || [], tb = $("policies");
    $("policies-section").className = pol.length ? "" : "hidden";
    while (tb.firstChild) tb.removeChild(tb.firstChild);
    pol.forEach(function (p) {
      var reasons = Object.keys(p.retry_reasons || {}).sort().map(function (k) {
        return k + " " + p.retry_reasons[k];
      }).join(", ");
      var fb = p.fallbacks || {};
      var fbs = Object.keys(fb).filter(function (k) { return fb[k] > 0; }).map(function (k) {
        return k + " " + fb[k];
      }).join(", ");
      tb.appendChild(row([p.name, reasons || "–", fmtNum(p.retries), fmtSec(p.retry_wait),
                          fbs || "0", fmtNum(p.budget_exhausted), fmtNum(p.bulkhead_rejected)]));
    });
    var llm = s.llm || [], lb = $("llm"), n = 0;
    while (lb.firstChild) lb.removeChild(lb.firstChild);
    llm.forEach(function (c) {
      (c.models || []).forEach(function (m) {
        n++;
        lb.appendChild(row([c.client, m.model, STATE_LABEL[m.breaker] || m.breaker || "–", fmtNum(m.calls),
                            fmtNum(m.failures), fmtNum(m.prompt_tokens), fmtNum(m.completion_tokens),
                            (m.cost || 0).toFixed(4)]));
      });
    });
    $("llm-section").className = n ? "" : "hidden";
  }

  function update(s) {
    var now = typeof s.time === "number" ? s.time : Date.now() / 1000;
    var list = s.breakers || [], seen = dict(), counts = dict();
    var box = $("tiles");
    list.forEach(function (b, i) {
      seen[b.name] = true;
      counts[b.state] = (counts[b.state] || 0) + 1;
      var tile = updateTile(b, now);
      if (box.children[i] !== tile.el) box.insertBefore(tile.el, box.children[i] || null);
    });
    Object.keys(tiles).forEach(function (name) {
      if (!seen[name]) { box.removeChild(tiles[name].el); delete tiles[name]; delete rings[name]; }
    });
    $("no-breakers").className = list.length ? "empty hidden" : "empty";
    var sum = $("summary");
    while (sum.firstChild) sum.removeChild(sum.firstChild);
    var total = el("span"); total.appendChild(el("b", null, String(list.length)));
    total.appendChild(document.createTextNode(" breakers"));
    sum.appendChild(total);
    ["open", "forced_open", "half_open", "closed", "disabled"].forEach(function (st) {
      if (!counts[st]) return;
      var sp = el("span"); sp.setAttribute("data-count", st);
      sp.appendChild(el("b", null, String(counts[st])));
      sp.appendChild(document.createTextNode(" " + STATE_LABEL[st]));
      sp.style.borderColor = "var(--" + st + ")";
      sum.appendChild(sp);
    });
    renderTables(s);
    var meta = "updated " + new Date(now * 1000).toLocaleTimeString();
    if (s.worker) meta += " · worker " + s.worker.id + " of " + s.worker.count + " (pid " + s.worker.pid + ")";
    $("meta").textContent = meta;
    $("span-label").textContent = "charts: up to the last " + Math.round(HISTORY / 60) + " min, sampled every " +
      refresh + " s";
  }

  function setLive(ok, msg) {
    $("live").className = ok ? "ok" : "stale";
    $("live-text").textContent = msg;
  }

  function tick() {
    var started = performance.now();
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = ctl ? setTimeout(function () { ctl.abort(); }, Math.max(2000, refresh * 2000)) : null;
    fetch(jsonUrl, { cache: "no-store", headers: { accept: "application/json" },
                     signal: ctl ? ctl.signal : undefined })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (s) {
        update(s);
        failuresInRow = 0;
        lastFetch = performance.now();
        setLive(true, "live");
      })
      .catch(function (e) {
        failuresInRow++;
        var age = lastFetch ? Math.round((performance.now() - lastFetch) / 1000) + " s old" : "no data";
        setLive(false, "stale (" + age + "): " + (e && e.message ? e.message : e));
      })
      .then(function () {
        if (timer) clearTimeout(timer);
        var wait = refresh * 1000 * Math.min(1 + failuresInRow, 5) - (performance.now() - started);
        setTimeout(tick, Math.max(50, wait));
      });
  }

  setInterval(function () { Object.keys(tiles).forEach(function (n) { renderProbe(tiles[n]); }); }, 200);
  tick();
})();
</script>
</body>
</html>
]==]

local ATTR_ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }
local function escape(s)
  return (gsub(s, "[&<>\"']", ATTR_ESC))
end

-- dashboard.render{ json_url, refresh, title } -> the page's HTML.
-- json_url: where the page polls breaker.metrics's JSON (default
-- "metrics.json", relative to the page); refresh: seconds between polls
-- (default 2); title (default "breaker dashboard"). Values are
-- HTML-escaped. Raises on a bad type.
function _M.render(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("breaker.dashboard.render: expected an options table", 2) end
  local url, refresh, title = opts.json_url or "metrics.json", opts.refresh or 2, opts.title or "breaker dashboard"
  if type(url) ~= "string" or url == "" then
    error("breaker.dashboard.render: json_url must be a non-empty string", 2)
  end
  if type(refresh) ~= "number" or not (refresh > 0) then
    error("breaker.dashboard.render: refresh must be seconds > 0", 2)
  end
  if type(title) ~= "string" then error("breaker.dashboard.render: title must be a string", 2) end
  local values = { JSON_URL = escape(url), REFRESH = tostring(tonumber(refresh)), TITLE = escape(title),
                   VERSION = escape(_M._VERSION) }
  return (gsub(_M.html, "{{([%u_]+)}}", values))
end

return _M
