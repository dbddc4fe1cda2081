#!/usr/bin/env node
// spec/browser/dashboard.test.js - breaker's dashboard in headless Chromium.
//
//   node spec/browser/dashboard.test.js        (spec/browser_spec.lua runs it)
//
// Starts the fake upstream (spec/support/upstream.sh) and an nginx app
// (spec/browser/nginx.conf) on free ports of 127.0.0.1, sends traffic through
// two breakers, and loads the dashboard (/breaker/) in Debian's Chromium
// driven by playwright-core. Then the fake upstream fails (a timeline phase of
// HTTP 500s): the "fake-upstream" tile must turn open, red, with a probe
// countdown, while "local-cache" stays closed; then the upstream recovers
// (control reset) and the tile must turn closed again, all without a page
// reload. Screenshots: spec/tmp/browser/dashboard-open.png and
// dashboard-closed.png. Every server started is stopped by its pid. Exit
// status 0 and a last line "dashboard browser test: N checks passed", or 1
// and the reason.
'use strict';

const fs = require('fs');
const os = require('os');
const net = require('net');
const path = require('path');
const { execFileSync, spawnSync } = require('child_process');

const REPO = path.resolve(__dirname, '..', '..');
const OUT = path.join(REPO, 'spec', 'tmp', 'browser');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const NGINX = process.env.NGINX || 'nginx';
const DEADLINE_MS = 120000; // the whole test, servers included

let checks = 0;
function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
  checks++;
  console.log('ok ' + checks + ' - ' + what);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls fn() until it returns a truthy value; raises after `ms`.
async function waitFor(what, ms, fn, step = 100) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error('timed out after ' + ms + ' ms waiting for ' + what + ' (last: ' + last + ')');
    await sleep(step);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function accepts(port) {
  return new Promise((resolve) => {
    const c = net.connect({ host: '127.0.0.1', port }, () => { c.destroy(); resolve(true); });
    c.on('error', () => resolve(false));
    c.setTimeout(500, () => { c.destroy(); resolve(false); });
  });
}

// True while process `pid` exists and is not a zombie.
function running(pid) {
  try {
    const stat = fs.readFileSync('/proc/' + pid + '/stat', 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch (e) {
    return false;
  }
}

function childPids(pid) {
  const out = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = fs.readFileSync('/proc/' + d + '/stat', 'utf8');
      const ppid = parseInt(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1], 10);
      if (ppid === pid) out.push(parseInt(d, 10));
    } catch (e) { /* gone */ }
  }
  return out;
}

// --- the fake upstream (spec/support/upstream.sh) ---------------------------

function startUpstream() {
  const dir = path.join(REPO, 'spec', 'tmp', 'browser-upstream-' + process.pid);
  const out = execFileSync(path.join(REPO, 'spec', 'support', 'upstream.sh'), ['start', dir], {
    env: Object.assign({}, process.env, { WORKERS: '1', API_KEY: 'sk-test-good' }),
    encoding: 'utf8', timeout: 20000,
  });
  const m = /(\d+) (\d+)\s*$/.exec(out);
  if (!m) throw new Error('fake upstream did not start: ' + out);
  return { dir, port: +m[1], pid: +m[2], url: 'http://127.0.0.1:' + m[1] };
}

function stopUpstream(up) {
  // upstream.sh stops the server by the pid in its pid file and waits for it.
  spawnSync(path.join(REPO, 'spec', 'support', 'upstream.sh'), ['stop', up.dir], { stdio: 'inherit', timeout: 20000 });
  if (running(up.pid)) {
    try { process.kill(up.pid, 'SIGKILL'); } catch (e) { /* gone */ }
  }
  if (!process.env.BREAKER_KEEP_NGINX) fs.rmSync(up.dir, { recursive: true, force: true });
}

async function control(up, p, body) {
  const r = await fetch(up.url + '/_control/' + p, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: body === undefined ? '' : JSON.stringify(body),
  });
  if (r.status !== 200) throw new Error('control ' + p + ': HTTP ' + r.status + ' ' + (await r.text()));
  return r.json();
}

// --- the nginx app (spec/browser/nginx.conf) --------------------------------

async function startNginx(upstreamUrl) {
  const template = fs.readFileSync(path.join(__dirname, 'nginx.conf'), 'utf8');
  let lastErr = '';
  for (let attempt = 0; attempt < 5; attempt++) { // a free port can be taken before nginx binds it
    const port = await freePort();
    const prefix = path.join(REPO, 'spec', 'tmp', 'browser-nginx-' + port);
    fs.rmSync(prefix, { recursive: true, force: true });
    for (const d of ['conf', 'logs', 'tmp']) fs.mkdirSync(path.join(prefix, d), { recursive: true });
    const conf = template.replace(/@PREFIX@/g, prefix).replace(/@REPO@/g, REPO)
      .replace(/@PORT@/g, String(port)).replace(/@UPSTREAM@/g, upstreamUrl);
    fs.writeFileSync(path.join(prefix, 'conf', 'nginx.conf'), conf);
    const env = Object.assign({}, process.env);
    delete env.LD_PRELOAD; delete env.ASAN_OPTIONS; delete env.UBSAN_OPTIONS;
    const r = spawnSync(NGINX, ['-p', prefix + '/', '-c', 'conf/nginx.conf', '-e', 'logs/error.log', '-g', 'daemon on;'],
      { env, encoding: 'utf8', timeout: 20000 });
    const srv = { port, prefix, url: 'http://127.0.0.1:' + port, pid: null };
    try {
      srv.pid = await waitFor('the nginx pid file', 5000, () => {
        const f = path.join(prefix, 'logs', 'nginx.pid');
        return fs.existsSync(f) && parseInt(fs.readFileSync(f, 'utf8'), 10);
      }, 25);
      await waitFor('nginx to accept connections', 5000, () => accepts(port), 25);
      return srv;
    } catch (e) {
      let log = '';
      try { log = fs.readFileSync(path.join(prefix, 'logs', 'error.log'), 'utf8'); } catch (e2) { /* none */ }
      lastErr = (r.stdout || '') + (r.stderr || '') + log + String(e);
      if (srv.pid) await stopNginx(srv);
      fs.rmSync(prefix, { recursive: true, force: true });
    }
  }
  throw new Error('nginx did not start: ' + lastErr);
}

// TERM to the master by its pid; KILL (master and workers) after 5 s.
async function stopNginx(srv) {
  if (!srv || !srv.pid) return;
  const pid = srv.pid;
  srv.pid = null;
  if (running(pid)) {
    const workers = childPids(pid);
    try { process.kill(pid, 'SIGTERM'); } catch (e) { /* gone */ }
    const end = Date.now() + 5000;
    while (running(pid) && Date.now() < end) await sleep(25);
    for (const p of running(pid) ? [pid].concat(workers) : workers) {
      if (running(p)) { try { process.kill(p, 'SIGKILL'); } catch (e) { /* gone */ } }
    }
    const end2 = Date.now() + 2000;
    while ((running(pid) || workers.some(running)) && Date.now() < end2) await sleep(25);
  }
}

// --- traffic ------------------------------------------------------------------

function startTraffic(base) {
  const t = { stop: false, sent: 0, answers: {} };
  const loop = async (p) => {
    while (!t.stop) {
      try {
        const r = await fetch(base + p, { signal: AbortSignal.timeout(5000) });
        const body = (await r.text()).trim();
        const k = p + ' ' + r.status + ' ' + body;
        t.answers[k] = (t.answers[k] || 0) + 1;
      } catch (e) {
        t.answers[p + ' error'] = (t.answers[p + ' error'] || 0) + 1;
      }
      t.sent++;
      await sleep(60);
    }
  };
  t.done = Promise.all([loop('/call/upstream'), loop('/call/local')]);
  return t;
}

// --- the test ---------------------------------------------------------------

async function tileState(page, name) {
  return page.evaluate((n) => {
    const t = Array.from(document.querySelectorAll('section.tile')).find((e) => e.getAttribute('data-breaker') === n);
    return t ? t.getAttribute('data-state') : null;
  }, name);
}

async function tileInfo(page, name) {
  return page.evaluate((n) => {
    const t = Array.from(document.querySelectorAll('section.tile')).find((e) => e.getAttribute('data-breaker') === n);
    if (!t) return null;
    const q = (s) => t.querySelector(s);
    return {
      state: t.getAttribute('data-state'),
      cls: t.className,
      badge: q('.badge').textContent,
      badgeColor: getComputedStyle(q('.badge')).backgroundColor,
      border: getComputedStyle(t).borderLeftColor,
      probe: q('.probe').textContent,
      req: q('.num.req .v').textContent,
      err: q('.num.err .v').textContent,
      p50: q('.num.p50 .v').textContent,
      p99: q('.num.p99 .v').textContent,
      reqPoints: q('polyline.req').getAttribute('points') || '',
      bands: q('svg.chart g').childElementCount,
    };
  }, name);
}

// The tile once its colours have settled (the border colour eases in over
// 0.3 s after a state change, to the badge's colour).
async function settledTile(page, name, what) {
  return waitFor(what, 3000, async () => {
    const i = await tileInfo(page, name);
    return i && i.border === i.badgeColor ? i : null;
  }, 50);
}

async function main() {
  let up, srv, context, traffic;
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'breaker-chromium-'));
  const cleanup = async () => {
    if (traffic) { traffic.stop = true; await Promise.race([traffic.done, sleep(6000)]); traffic = null; }
    if (context) { await context.close().catch(() => {}); context = null; }
    if (srv) {
      const s = srv;
      srv = null;
      await stopNginx(s);
      if (!process.env.BREAKER_KEEP_NGINX) fs.rmSync(s.prefix, { recursive: true, force: true });
    }
    if (up) { const u = up; up = null; stopUpstream(u); }
    fs.rmSync(userDataDir, { recursive: true, force: true });
  };
  const onSignal = (sig) => {
    console.error('interrupted by ' + sig);
    cleanup().finally(() => process.exit(1));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const watchdog = setTimeout(() => {
    console.error('dashboard browser test: overall deadline of ' + DEADLINE_MS + ' ms passed');
    cleanup().finally(() => process.exit(1));
  }, DEADLINE_MS);

  try {
    if (!fs.existsSync(CHROMIUM)) throw new Error(CHROMIUM + ' is missing (make deps installs Debian\'s chromium)');
    let chromium;
    try {
      ({ chromium } = require('playwright-core'));
    } catch (e) {
      throw new Error('playwright-core is missing: run make deps (npm ci in spec/browser)');
    }
    fs.mkdirSync(OUT, { recursive: true });
    for (const f of ['dashboard-open.png', 'dashboard-closed.png']) fs.rmSync(path.join(OUT, f), { force: true });

    up = startUpstream();
    srv = await startNginx(up.url);
    console.log('# fake upstream ' + up.url + ' (pid ' + up.pid + '), nginx ' + srv.url + ' (pid ' + srv.pid + ')');
    console.log('# dirs: ' + path.relative(REPO, up.dir) + ' ' + path.relative(REPO, srv.prefix));
    console.log('# pids: ' + up.pid + ' ' + srv.pid);

    traffic = startTraffic(srv.url);
    await waitFor('healthy traffic', 10000, () => traffic.answers['/call/upstream 200 ok'] >= 3 &&
      traffic.answers['/call/local 200 ok'] >= 3);

    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
             '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1200, height: 760 },
      timeout: 30000,
    });
    const page = context.pages()[0] || await context.newPage();
    const requests = [], problems = [];
    page.on('request', (r) => requests.push(r.url()));
    page.on('pageerror', (e) => problems.push('page error: ' + e.message));
    page.on('console', (m) => { if (m.type() === 'error') problems.push('console error: ' + m.text()); });

    const url = srv.url + '/breaker/?refresh=0.3';
    const resp = await page.goto(url, { waitUntil: 'load', timeout: 15000 });
    check(resp && resp.status() === 200, 'the dashboard loads from nginx (HTTP 200)');
    await page.evaluate(() => { window.__noReload = 'still here'; });

    await waitFor('both tiles', 10000, async () =>
      (await tileState(page, 'fake-upstream')) === 'closed' && (await tileState(page, 'local-cache')) === 'closed');
    check(true, 'one tile per breaker, both closed while the upstream is healthy');
    check((await tileState(page, 'constructor')) === 'closed' && (await tileState(page, '__proto__')) === 'closed',
      'breakers named "constructor" and "__proto__" get their tiles like any other');
    const healthy = await waitFor('rates on the tile', 10000, async () => {
      const i = await tileInfo(page, 'fake-upstream');
      return i && /\d/.test(i.req) && /\d/.test(i.p50) ? i : null;
    });
    check(parseFloat(healthy.req) > 0, 'the healthy tile shows a request rate (' + healthy.req + ' req/s)');
    check(healthy.badgeColor === 'rgb(47, 179, 107)', 'a closed breaker\'s badge is green (' + healthy.badgeColor + ')');

    await sleep(2500); // a few healthy seconds on the charts before the outage

    // The outage: every API request of the fake upstream answers 500.
    await control(up, 'timeline', { phases: [{ name: 'outage', duration: 600, fault: '500' }] });
    await waitFor('the fake-upstream tile to turn open', 20000, async () =>
      (await tileState(page, 'fake-upstream')) === 'open', 50);
    const open = await settledTile(page, 'fake-upstream', 'the open tile\'s colours');
    check(open.state === 'open' && /\bstate-open\b/.test(open.cls), 'the failing breaker\'s tile turns open');
    check(open.badge === 'open', 'its badge says open');
    check(open.badgeColor === 'rgb(229, 72, 77)' && open.border === 'rgb(229, 72, 77)',
      'an open tile is red (' + open.badgeColor + ', border ' + open.border + ')');
    check(/^next probe in \d+\.\d s$|^probe due$/.test(open.probe), 'an open tile counts down to the next probe ("' +
      open.probe + '")');
    check((await tileState(page, 'local-cache')) === 'closed', 'the healthy breaker stays closed');
    await waitFor('the error rate to show', 5000, async () => {
      const i = await tileInfo(page, 'fake-upstream');
      return i && parseFloat(i.err) > 0 && i.bands > 0;
    });
    check(true, 'the tile shows errors per second and marks the open period on its chart');
    const openShot = path.join(OUT, 'dashboard-open.png');
    await page.screenshot({ path: openShot, fullPage: true });
    check(fs.statSync(openShot).size > 10000, 'screenshot of the open breaker saved: ' + path.relative(REPO, openShot));
    check(traffic.answers['/call/upstream 200 fallback'] > 0, 'the app answered from its fallback during the outage');

    // Recovery: the fake upstream behaves again; the probes succeed.
    await control(up, 'reset');
    await waitFor('the fake-upstream tile to turn closed again', 25000, async () =>
      (await tileState(page, 'fake-upstream')) === 'closed', 50);
    const closed = await settledTile(page, 'fake-upstream', 'the closed tile\'s colours');
    check(closed.state === 'closed' && closed.badgeColor === 'rgb(47, 179, 107)' && closed.probe === '',
      'after recovery the tile is closed and green again, with no probe countdown');
    check(closed.reqPoints.split(' ').length >= 5, 'the tile\'s chart has drawn the last samples');
    check(await page.evaluate(() => window.__noReload === 'still here'), 'the page updated itself without reloading');
    await sleep(1200); // a few more samples on the chart after recovery
    const closedShot = path.join(OUT, 'dashboard-closed.png');
    await page.screenshot({ path: closedShot, fullPage: true });
    check(fs.statSync(closedShot).size > 10000, 'screenshot after recovery saved: ' + path.relative(REPO, closedShot));

    const foreign = requests.filter((u) => !u.startsWith(srv.url + '/'));
    check(foreign.length === 0, 'the page fetched nothing but its own server (' + requests.length + ' requests)' +
      (foreign.length ? ': ' + foreign.join(', ') : ''));
    check(requests.some((u) => u.startsWith(srv.url + '/breaker/metrics.json')), 'the page polled metrics.json');
    check(problems.length === 0, 'no script errors in the page' + (problems.length ? ': ' + problems.join('; ') : ''));

    // The JSON the page reads says the same as the tiles.
    const snap = await (await fetch(srv.url + '/breaker/metrics.json')).json();
    const fu = snap.breakers.find((b) => b.name === 'fake-upstream');
    check(fu && fu.shared === true && fu.opened >= 1 && fu.state === 'closed',
      'metrics.json: fake-upstream shared, opened ' + (fu && fu.opened) + ' time(s), closed now');
    const pol = snap.policies.find((p) => p.name === 'upstream-policy');
    check(pol && pol.fallbacks.value > 0, 'metrics.json counts the policy\'s fallbacks (' + (pol && pol.fallbacks.value) + ')');
  } finally {
    clearTimeout(watchdog);
    await cleanup();
  }
  console.log('dashboard browser test: ' + checks + ' checks passed');
}

main().then(() => process.exit(0), (e) => {
  console.error('dashboard browser test FAILED after ' + checks + ' checks: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
