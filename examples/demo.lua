-- examples/demo.lua (`make demo`): replays a 429 incident against the fake
-- upstream, once through a bare client and once through breaker.llm with
-- its default policy, and prints what the app saw side by side.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;' LUA_CPATH='build/?.so;;' luajit examples/demo.lua
--
-- The incident (the fake upstream's timeline, by wall-clock time):
--   normal -> a provider rate limit (429 + Retry-After beyond it) -> calm ->
--   outage (503s, and requests that never answer within the client's
--   timeout) -> recovered.
-- The workload: WORKERS client processes, each making RATE chat calls per
-- second on a fixed schedule for the whole timeline (a client held up by a
-- slow call falls behind and catches up as fast as it can), picking prompts
-- from a small pool so that identical requests recur. Both runs use the same
-- schedule. The bare client is breaker.curl + cjson: one request per call, no
-- retries, no breaker. The breaker.llm client uses the default policy, its
-- breakers in one named shared region (breaker.shared) that every client
-- process joins, so they share one breaker per model as nginx workers would,
-- and nothing else; with BREAKER_DEMO_CACHE=1 it also keeps a cache of last good
-- answers (`fallback = { cache = ... }`), whose answers are counted apart.
--
-- `--worker MODE URL START ID OUT` is how the script runs one client process.
-- Every process it starts ends by itself within the run's time bound, and the
-- fake upstream is stopped by its pid (and the shared region unlinked) when
-- the demo ends or fails.

local cjson = require "cjson.safe"
local ffi = require "ffi"
local socket = require "socket"

local now = socket.gettime
local format, concat = string.format, table.concat

local WORKERS = 16        -- client processes
local RATE = 5            -- chat calls per second per client
local TIMEOUT = 2         -- seconds per request, both clients
local PROMPTS = 20        -- distinct prompts per client
local KEY = "sk-demo-" .. string.rep("x", 8) .. "-never-printed"
local MODEL = "gpt-fake"
local CACHE = (os.getenv("BREAKER_DEMO_CACHE") or "") == "1"

-- The incident. `mix` faults are taken round-robin by the faulted requests.
local SLO = 5             -- seconds after it was due that an answer is still useful
local LIMIT = 50           -- requests per second the upstream allows in the 429 phase
local PHASES = {
  { name = "normal", duration = 3 },
  { name = "rate_limited", duration = 8, rps = LIMIT },
  { name = "calm", duration = 3 },
  { name = "outage", duration = 10,
    mix = { { fault = "503" }, { fault = "503" }, { fault = "slow", delay = 5 } } },
  { name = "recovered", duration = 10 },
}
local SHORT = { normal = "n", rate_limited = "R", calm = "n", outage = "D", recovered = "r" }

local function phase_start(name)
  local t = 0
  for _, p in ipairs(PHASES) do
    if p.name == name then return t end
    t = t + p.duration
  end
  error("no phase " .. name)
end

-- The phase a time (seconds from the start) falls in.
local function phase_at(t)
  local acc = 0
  for _, p in ipairs(PHASES) do
    acc = acc + p.duration
    if t < acc then return p.name end
  end
  return PHASES[#PHASES].name
end

local DURATION = 0
for _, p in ipairs(PHASES) do DURATION = DURATION + p.duration end

---------------------------------------------------------------------------
-- Worker process
---------------------------------------------------------------------------

local function region_name(url)
  return "breaker-demo-" .. url:match("(%d+)$")
end

-- The breaker.llm client of the demo: the default policy, the breakers in
-- the demo's shared region.
local function llm_client(url)
  local region = assert(require("breaker.shared").open(region_name(url)))
  return require("breaker.llm").new{
    base_url = url .. "/v1", api_key = KEY, model = MODEL, timeout = TIMEOUT, shared = region,
    fallback = CACHE and { cache = { size = 100 } } or nil }
end

local function prompt(id, k)
  return { { role = "user", content = format("Question %d: what is the status of order %d?",
                                             (id * 7 + k) % PROMPTS, (id * 7 + k) % PROMPTS) } }
end

local function worker(mode, url, start, id, out_path)
  ffi.cdef "int getpid(void);"
  io.stdout:write("pid ", ffi.C.getpid(), "\n")
  io.stdout:flush()
  local breaker = require "breaker"
  local sleep = breaker.clock.sleep
  local lines = {}

  local call
  if mode == "bare" then
    local t = require("breaker.curl").new{ timeout = TIMEOUT }
    local headers = { authorization = "Bearer " .. KEY, ["content-type"] = "application/json" }
    call = function(messages)
      local res, err = t:request{ method = "POST", url = url .. "/v1/chat/completions",
                                  headers = headers, timeout = TIMEOUT,
                                  body = cjson.encode({ model = MODEL, messages = messages }) }
      if not res then return "err", err.kind end
      if res.status ~= 200 then return "err", "http_" .. res.status end
      local doc = cjson.decode(res.body)
      if type(doc) ~= "table" then return "err", "decode" end
      return "ok"
    end
  else
    -- Every client process joins one named shared region: one breaker per
    -- (base_url, model) for all of them, as nginx workers would share one.
    local client = llm_client(url)
    call = function(messages)
      local res, err = client:chat{ messages = messages }
      if not res then return "err", err.kind end
      if client.last.fallback then return client.last.fallback, "-" end
      return "ok"
    end
  end

  -- Calls follow the schedule start + offset + k / RATE; offsets spread the
  -- clients over the first interval.
  local offset = (id - 1) / (WORKERS * RATE)
  local k = 0
  local hard_stop = start + DURATION + 15
  while true do
    local sched = start + offset + k / RATE
    if sched >= start + DURATION then break end
    local t = now()
    if t >= hard_stop then break end
    if sched > t then sleep(sched - t) end
    local t0 = now()
    local result, kind = call(prompt(id, k))
    local t1 = now()
    lines[#lines + 1] = format("C %.4f %.4f %.6f %s %s", sched - start, t0 - start, t1 - t0,
                               result, kind or "-")
    k = k + 1
  end
  local f = assert(io.open(out_path, "w"))
  f:write(concat(lines, "\n"), "\n")
  f:close()
  io.stdout:write("done\n")
end

if arg[1] == "--worker" then
  worker(arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5]), arg[6])
  return
end

---------------------------------------------------------------------------
-- Parent: runs both modes and prints the table
---------------------------------------------------------------------------

local helper = require "helper"
local breaker = require "breaker"
local interp = arg[-1] or "luajit"
local script = arg[0]

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function percentile(sorted, p)
  if #sorted == 0 then return 0 end
  local i = math.max(1, math.min(#sorted, math.ceil(p * #sorted)))
  return sorted[i]
end

local running = {} -- pid -> true for the worker processes alive

-- One run of the workload in `mode`; returns its measurements.
local function run(up, mode, tmp, watch)
  up:reset()
  if watch then watch:reset() end
  local start = now() + 1.5 -- time for every worker to start and load
  up:timeline(PHASES, start)
  local procs = {}
  for id = 1, WORKERS do
    local out = format("%s/%s-%d.txt", tmp, mode, id)
    local cmd = format("exec %s %s --worker %s %s %.6f %d %s", shell_quote(interp), shell_quote(script),
                       mode, shell_quote(up.url), start, id, shell_quote(out))
    local p = assert(io.popen(cmd, "r"))
    local first = p:read("*l") or ""
    local pid = tonumber(first:match("^pid (%d+)"))
    if not pid then error("worker " .. id .. " did not start: " .. first) end
    running[pid] = true
    procs[id] = { p = p, pid = pid, out = out }
  end
  -- The shared breaker's state, sampled every 50 ms while the clients run
  -- (they write their results to files, so no pipe fills up meanwhile).
  local samples = {}
  if watch then
    while now() < start + DURATION + 0.5 do
      samples[#samples + 1] = { t = now() - start, state = watch:state() }
      breaker.clock.sleep(0.05)
    end
  end
  for _, w in ipairs(procs) do
    local rest = w.p:read("*a")
    w.p:close()
    running[w.pid] = nil
    if not rest:find("done") then error("worker " .. w.pid .. " failed: " .. rest) end
  end
  local wall = now() - start
  local ustats = up:stats()

  local m = { mode = mode, calls = 0, ok = 0, cache = 0, errors = 0, in_time = 0, kinds = {}, lat = {}, late = {},
              samples = samples, wall = wall, phases = ustats.phases or {}, by_phase = {} }
  local rec_start = phase_start("recovered")
  local buckets = {}
  for _, w in ipairs(procs) do
    for line in io.lines(w.out) do
      local tag, a, b, c, result, kind = line:match("^(%a) (%S+) ?(%S*) ?(%S*) ?(%S*) ?(%S*)")
      if tag == "C" then
        m.calls = m.calls + 1
        m.lat[#m.lat + 1] = tonumber(c)
        -- From when the app wanted the answer: includes waiting behind stuck calls.
        local late = tonumber(b) + tonumber(c) - tonumber(a)
        m.late[#m.late + 1] = late
        if (result == "ok" or result == "cache") and late <= SLO then m.in_time = m.in_time + 1 end
        local ph = phase_at(tonumber(a))
        local bp = m.by_phase[ph] or { n = 0, err = 0 }
        m.by_phase[ph] = bp
        bp.n = bp.n + 1
        if result ~= "ok" and result ~= "cache" then bp.err = bp.err + 1 end
        if result == "ok" then m.ok = m.ok + 1
        elseif result == "cache" then m.cache = m.cache + 1
        else
          m.errors = m.errors + 1
          m.kinds[kind] = (m.kinds[kind] or 0) + 1
        end
        local t0 = tonumber(b)
        if t0 >= rec_start then
          local i = math.floor((t0 - rec_start) / 0.5) + 1
          local bk = buckets[i] or { n = 0, ok = 0 }
          buckets[i] = bk
          bk.n = bk.n + 1
          if result == "ok" then bk.ok = bk.ok + 1 end
        end
      end
    end
  end
  table.sort(m.lat)
  table.sort(m.late)
  -- Recovery: the first half-second (by call start, after the upstream came
  -- back) from which on at least 90 % of the calls got a fresh answer.
  local last = 0
  for i in pairs(buckets) do if i > last then last = i end end
  m.recovery = nil
  for i = last, 1, -1 do
    local bk = buckets[i]
    if bk and bk.n > 0 and bk.ok / bk.n < 0.9 then break end
    m.recovery = (i - 1) * 0.5
  end
  return m
end

-- One character per second of the timeline: the worst state sampled in it.
local function strip(samples)
  local RANK = { closed = 0, disabled = 0, half_open = 1, open = 2, forced_open = 2 }
  local CH = { [0] = ".", "h", "O" }
  local worst = {}
  for _, smp in ipairs(samples) do
    local sec = math.floor(smp.t)
    if sec >= 0 and sec < DURATION then
      worst[sec] = math.max(worst[sec] or 0, RANK[smp.state] or 0)
    end
  end
  local chars = {}
  for sec = 0, DURATION - 1 do chars[#chars + 1] = worst[sec] and CH[worst[sec]] or " " end
  return concat(chars)
end

-- Seconds after `from` until the sampled state was last seen changing to
-- closed, or nil.
local function closed_after(samples, from)
  local prev
  for _, smp in ipairs(samples) do
    if smp.t >= from and smp.state == "closed" and prev and prev ~= "closed" then return smp.t - from end
    prev = smp.state
  end
  return nil
end

local function main()
  local up = helper.upstream.start{ workers = 2, api_key = KEY }
  local shared = require "breaker.shared"
  local tmp = helper.tmp_dir .. "/demo-" .. up.port
  os.execute("mkdir -p " .. shell_quote(tmp))
  local ok, res = pcall(function()
    local t_demo = now()
    io.stdout:write(format("breaker.llm demo: a 429 incident replayed against the fake upstream (%d client " ..
                           "processes x %d chat calls/s, %d s per run)\n", WORKERS, RATE, DURATION))
    local desc = {}
    local t = 0
    for _, p in ipairs(PHASES) do
      local what = p.name
      if p.name == "rate_limited" then
        what = format("rate limit of %d requests/s (the app offers %d): 429 + Retry-After beyond it",
                      p.rps, WORKERS * RATE)
      elseif p.name == "outage" then
        what = format("outage (2/3 answer 503, 1/3 hang past the %d s timeout)", TIMEOUT)
      end
      desc[#desc + 1] = format("  %2d-%2d s  %s", t, t + p.duration, what)
      t = t + p.duration
    end
    io.stdout:write(concat(desc, "\n"), "\n\n")
    io.stdout:write("run 1/2: bare client (breaker.curl + cjson, no policy) ...\n")
    io.stdout:flush()
    local bare = run(up, "bare", tmp)
    io.stdout:write(CACHE and "run 2/2: breaker.llm, default policy + cache of last good answers ...\n\n"
                    or "run 2/2: breaker.llm, default policy ...\n\n")
    io.stdout:flush()
    local brk = run(up, "llm", tmp, llm_client(up.url):breaker(MODEL))

    local function pct(n, d) return d > 0 and format("%.1f %%", 100 * n / d) or "-" end
    local function ms(sorted, p) return format("%.0f ms", percentile(sorted, p) * 1000) end
    local function ph(m, name)
      local bp = m.by_phase[name] or { n = 0, err = 0 }
      return format("%d of %d (%s)", bp.err, bp.n, pct(bp.err, bp.n))
    end
    local function rec(m)
      return m.recovery and format("%.1f s", m.recovery) or "not within the run"
    end
    local function kinds(m)
      local list = {}
      for k, n in pairs(m.kinds) do list[#list + 1] = { k, n } end
      table.sort(list, function(a, b) return a[2] > b[2] end)
      local out = {}
      for i = 1, math.min(3, #list) do out[i] = format("%s %d", list[i][1], list[i][2]) end
      return #out > 0 and concat(out, ", ") or "-"
    end
    local rows = {
      { "chat calls made by the app", bare.calls, brk.calls },
      { "answered by the upstream", bare.ok, brk.ok },
      CACHE and { "answered from the cache of good answers", bare.cache, brk.cache } or false,
      { "errors seen by the app", bare.errors, brk.errors },
      { "error rate seen by the app", pct(bare.errors, bare.calls), pct(brk.errors, brk.calls) },
      { format("answered within %d s of being due", SLO), pct(bare.in_time, bare.calls),
        pct(brk.in_time, brk.calls) },
      { "  most frequent errors", kinds(bare), kinds(brk) },
      { "  calls due in the rate-limit phase: errors", ph(bare, "rate_limited"), ph(brk, "rate_limited") },
      { "  calls due while it was down: errors", ph(bare, "outage"), ph(brk, "outage") },
      { "  calls due after it came back: errors", ph(bare, "recovered"), ph(brk, "recovered") },
      { "latency p50 / p99 (time in the call)", ms(bare.lat, 0.50) .. " / " .. ms(bare.lat, 0.99),
        ms(brk.lat, 0.50) .. " / " .. ms(brk.lat, 0.99) },
      { "answer p50 / p99 after it was due", ms(bare.late, 0.50) .. " / " .. ms(bare.late, 0.99),
        ms(brk.late, 0.50) .. " / " .. ms(brk.late, 0.99) },
      { "upstream requests in the rate-limit phase", bare.phases.rate_limited or 0,
        brk.phases.rate_limited or 0 },
      { "upstream requests while it was down", bare.phases.outage or 0, brk.phases.outage or 0 },
      { "time to recover after it came back", rec(bare), rec(brk) },
    }
    io.stdout:write(format("%-42s %-34s %s\n", "", "bare client", "breaker.llm"))
    for _, r in ipairs(rows) do
      if r then io.stdout:write(format("%-42s %-34s %s\n", r[1], tostring(r[2]), tostring(r[3]))) end
    end

    io.stdout:write(format("\nthe breaker of (%s, %s), shared by the %d breaker.llm client processes, " ..
                           "one column per second\n", "127.0.0.1:" .. up.port .. "/v1", MODEL, WORKERS))
    local marks = {}
    for _, p in ipairs(PHASES) do marks[#marks + 1] = string.rep(SHORT[p.name], p.duration) end
    io.stdout:write(format("  upstream %s   (n normal, R rate-limited, D down, r recovered)\n", concat(marks)))
    io.stdout:write(format("  breaker  %s   (. closed, h half-open, O open)\n", strip(brk.samples)))
    local opened
    for _, smp in ipairs(brk.samples) do
      if smp.state == "open" then opened = smp.t; break end
    end
    local back = closed_after(brk.samples, phase_start("recovered"))
    io.stdout:write(format("  opened %s after the outage began; closed again %s after the upstream came back\n",
                           opened and format("%.1f s", opened - phase_start("outage")) or "never",
                           back and format("%.1f s", back) or "not within the run"))
    return t_demo
  end)
  for pid in pairs(running) do os.execute("kill " .. pid .. " 2>/dev/null") end
  up:stop()
  shared.unlink(region_name(up.url))
  os.execute("rm -rf " .. shell_quote(tmp))
  if not ok then
    io.stderr:write("demo failed: ", tostring(res), "\n")
    os.exit(1)
  end
  io.stdout:write(format("\ndemo took %.0f s; the fake upstream (pid %d) is stopped.\n", now() - res, up.pid))
end

main()
