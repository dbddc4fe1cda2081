-- breaker.metrics: every breaker, policy and LLM model as Prometheus text,
-- as JSON, and as a live dashboard page.
--
--   local metrics = require "breaker.metrics"
--   print(metrics.prometheus())          -- text exposition format 0.0.4
--   print(metrics.json())                -- the same data as JSON
--   metrics.register_llm(client)         -- tokens and cost of a breaker.llm client
--
--   # nginx: /breaker/metrics, /breaker/metrics.json, /breaker/ (the dashboard)
--   location /breaker/ {
--       content_by_lua_block { require("breaker.metrics").handler() }
--   }
--
-- Requiring this module subscribes it to breaker.events (retries, fallbacks,
-- exhausted budgets, full bulkheads, counted per policy) and installs a
-- latency observer on every breaker's record (a histogram per breaker name,
-- fixed buckets). metrics.disable() undoes both.
--
-- Where the numbers live: breaker state, window and lifetime counts come from
-- b:stats(), so a shared breaker (breaker.shared) shows what every worker
-- sees. The latency histogram and the policy counters are kept by this module:
-- per process by default, or, with metrics.configure{ shared_dict = "name" }
-- (a lua_shared_dict), summed over every nginx worker. LLM token and cost
-- counts come from each client's client:stats() (per process); those of a
-- client that was garbage-collected are kept, so the counters never go down.

local breaker = require "breaker"
local events = require "breaker.events"

local type, pairs, ipairs, tostring, tonumber, error, pcall, setmetatable, getmetatable, rawget =
      type, pairs, ipairs, tostring, tonumber, error, pcall, setmetatable, getmetatable, rawget
local format, gsub, byte, sub, find = string.format, string.gsub, string.byte, string.sub, string.find
local concat, sort, remove = table.concat, table.sort, table.remove

-- The keys of t (strings), sorted: series come out in a stable order.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys)
  return keys
end
local floor, huge = math.floor, math.huge

local function finite(v)
  if type(v) ~= "number" or v ~= v or v == huge or v == -huge then return nil end
  return v
end

local VERSION = require "breaker.version"
local _M = { _VERSION = VERSION }

local DEFAULT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120 }

local STATES = breaker.STATES

---------------------------------------------------------------------------
-- Storage: this process's tables, or a lua_shared_dict
---------------------------------------------------------------------------

local bounds         -- histogram upper bounds, ascending, ending with math.huge
local bounds_sig     -- the finite bounds as text: part of every shared-dict cell key
local dict           -- ngx.shared.DICT or nil
local dict_name
local epoch = 0      -- bumped by configure: breakers re-read their histogram slot
local hists = {}     -- name -> { [i] = count in bucket i (not cumulative), sum, count }
local counters = {}  -- key -> number (process mode)
local retained = {}  -- the counts of collected LLM clients (see "LLM clients")

local function set_bounds(list)
  local b, sig = {}, {}
  for i, v in ipairs(list) do
    b[i] = v
    local t = format("%.15g", v)
    if tonumber(t) ~= v then t = format("%.17g", v) end
    sig[i] = t
  end
  b[#b + 1] = huge
  bounds, bounds_sig = b, concat(sig, ",")
end
set_bounds(DEFAULT_BUCKETS)

-- Key of a histogram cell in the shared dict. The key names the bounds, so
-- that counts kept under other bounds (a reload with other buckets: the dict
-- outlives it) are never read as counts under these.
local function hkey(name, cell)
  return "bh\0" .. name .. "\0" .. bounds_sig .. "\0" .. cell
end

-- A breaker's histogram slot, cached on the breaker object (b._mh).
local function slot_for(b)
  local name = b.name
  local h
  if dict then
    local keys = {}
    for i = 1, #bounds do keys[i] = hkey(name, i) end
    h = { dict = dict, keys = keys, sum_key = hkey(name, "sum") }
  else
    h = hists[name]
    if not h then
      h = { sum = 0 }
      for i = 1, #bounds do h[i] = 0 end
      hists[name] = h
    end
  end
  h.epoch = epoch
  b._mh = h
  return h
end

-- The observer breaker.record calls: outcome 0 success, 1 failure, 2 ignored
-- (not observed). Makes no garbage once the breaker has its slot. An infinite
-- latency counts in the +Inf bucket but not in the sum, which stays a finite
-- number (the same in the Prometheus text and in JSON, which has no +Inf).
local function observe(b, outcome, latency)
  if outcome == 2 then return end
  local h = b._mh
  if h == nil or h.epoch ~= epoch then h = slot_for(b) end
  local bs = bounds
  local i = 1
  while latency > bs[i] do i = i + 1 end
  local d = h.dict
  if latency == huge then latency = 0 end
  if d then
    d:incr(h.keys[i], 1, 0)
    d:incr(h.sum_key, latency, 0)
  else
    h[i] = h[i] + 1
    h.sum = h.sum + latency
  end
end

-- Reads a breaker's histogram: cumulative counts per bound, sum, count.
-- Every observation lands in exactly one bucket (the last bound is +Inf),
-- so the count is the buckets' total: the +Inf bucket.
local function read_hist(name)
  local cum, acc = {}, 0
  local sum = 0
  if dict then
    for i = 1, #bounds do
      acc = acc + (dict:get(hkey(name, i)) or 0)
      cum[i] = acc
    end
    sum = dict:get(hkey(name, "sum")) or 0
  else
    local h = hists[name]
    for i = 1, #bounds do
      acc = acc + (h and h[i] or 0)
      cum[i] = acc
    end
    if h then sum = h.sum end
  end
  return cum, sum, acc
end

-- Policy counters: family -> label names.
local POLICY_FAMILIES = {
  retries = { "policy", "reason" },
  retry_wait = { "policy" },
  fallbacks = { "policy", "how" },
  budget_exhausted = { "policy" },
  bulkhead_rejected = { "policy" },
}

local function ckey(fam, a, b)
  if b then return "bc\0" .. fam .. "\0" .. a .. "\0" .. b end
  return "bc\0" .. fam .. "\0" .. a
end

local function count(fam, a, b, n)
  local k = ckey(fam, a, b)
  if dict then
    dict:incr(k, n or 1, 0)
  else
    counters[k] = (counters[k] or 0) + (n or 1)
  end
end

-- Every policy counter as { fam, a, b, value }.
local function each_counter()
  local out = {}
  local function add(k, v)
    local fam, rest = k:match("^bc%z([^%z]+)%z(.*)$")
    if fam and POLICY_FAMILIES[fam] then
      local a, b = rest, nil
      if #POLICY_FAMILIES[fam] == 2 then
        local i = find(rest, "\0", 1, true)
        if not i then return end
        a, b = sub(rest, 1, i - 1), sub(rest, i + 1)
      end
      out[#out + 1] = { fam = fam, a = a, b = b, value = v }
    end
  end
  if dict then
    for _, k in ipairs(dict:get_keys(0)) do
      if sub(k, 1, 3) == "bc\0" then
        local v = dict:get(k)
        if type(v) == "number" then add(k, v) end
      end
    end
  else
    for k, v in pairs(counters) do add(k, v) end
  end
  return out
end

---------------------------------------------------------------------------
-- Event subscriptions
---------------------------------------------------------------------------

-- Names with NUL would break the counter keys; they are rare enough to mangle.
local function label(v)
  if v == nil then return "anonymous" end
  v = tostring(v)
  if find(v, "\0", 1, true) then v = gsub(v, "%z", "?") end
  return v
end

local HANDLERS = {
  retry = function(ev)
    local p = label(ev.policy)
    count("retries", p, label(ev.reason))
    if type(ev.delay) == "number" and ev.delay > 0 then count("retry_wait", p, nil, ev.delay) end
  end,
  fallback = function(ev) count("fallbacks", label(ev.policy), label(ev.how)) end,
  budget_exhausted = function(ev) count("budget_exhausted", label(ev.policy)) end,
  bulkhead_rejected = function(ev) count("bulkhead_rejected", label(ev.policy)) end,
}

local unsubscribe

-- metrics.enable(): subscribes to breaker.events and observes latencies
-- (done when the module loads). Idempotent.
function _M.enable()
  if unsubscribe then return end
  local offs = {}
  for t, fn in pairs(HANDLERS) do offs[#offs + 1] = events.on(t, fn) end
  unsubscribe = function()
    for _, off in ipairs(offs) do off() end
  end
  breaker._set_observer(observe)
end

-- metrics.disable(): stops counting events and observing latencies; what
-- was counted stays readable. Idempotent.
function _M.disable()
  if not unsubscribe then return end
  unsubscribe()
  unsubscribe = nil
  breaker._set_observer(nil)
end

-- metrics.configure{ shared_dict = "name" | false, buckets = { ... } }:
-- shared_dict keeps the histograms and policy counters in that
-- lua_shared_dict (every worker adds to the same numbers; call it in
-- init_by_lua or init_worker_by_lua); buckets are the histogram's upper
-- bounds in seconds, ascending (+Inf is added). Starts this process's counts
-- afresh. A shared dict outlives a reload, and its histogram cells are keyed
-- by the bounds: the same buckets go on counting where the dict was, other
-- buckets start from zero (cells of other bounds are never read; they stay
-- until metrics.reset() or the dict evicts them). Raises on a bad value or a
-- missing dict.
function _M.configure(opts)
  if type(opts) ~= "table" then error("breaker.metrics.configure: expected an options table", 2) end
  for k in pairs(opts) do
    if k ~= "shared_dict" and k ~= "buckets" then
      error("breaker.metrics.configure: unknown option '" .. tostring(k) .. "'", 2)
    end
  end
  local sd, list = opts.shared_dict, opts.buckets
  local new_dict
  if sd ~= nil and sd ~= false then
    if type(sd) ~= "string" then error("breaker.metrics.configure: shared_dict must be a lua_shared_dict name", 2) end
    local ngx = rawget(_G, "ngx")
    new_dict = type(ngx) == "table" and ngx.shared and ngx.shared[sd]
    if not new_dict then
      error("breaker.metrics.configure: no lua_shared_dict named '" .. sd .. "' (add `lua_shared_dict "
            .. sd .. " 1m;` to the http block)", 2)
    end
  end
  if list ~= nil then
    if type(list) ~= "table" or #list == 0 then
      error("breaker.metrics.configure: buckets must be a non-empty list of seconds", 2)
    end
    for i, v in ipairs(list) do
      if type(v) ~= "number" or not (v > 0) or v == huge or (i > 1 and not (v > list[i - 1])) then
        error("breaker.metrics.configure: buckets must be finite seconds > 0 in ascending order (at #"
              .. i .. ")", 2)
      end
    end
    set_bounds(list)
  end
  if sd ~= nil then dict, dict_name = new_dict or nil, new_dict and sd or nil end
  hists, counters = {}, {}
  epoch = epoch + 1
end

-- metrics.reset(): forgets the histograms and policy counters of this
-- process (and, with a shared dict, the dict's), and the counts kept from
-- collected LLM clients. For specs.
function _M.reset()
  retained = {}
  if dict then
    for _, k in ipairs(dict:get_keys(0)) do
      if sub(k, 1, 3) == "bc\0" or sub(k, 1, 3) == "bh\0" then dict:delete(k) end
    end
  end
  hists, counters = {}, {}
  epoch = epoch + 1
end

-- metrics.buckets() -> the histogram's finite upper bounds (a copy).
function _M.buckets()
  local out = {}
  for i = 1, #bounds - 1 do out[i] = bounds[i] end
  return out
end

---------------------------------------------------------------------------
-- LLM clients
---------------------------------------------------------------------------

local LLM_MODEL_FIELDS = { "calls", "successes", "failures", "rejected", "context_length",
                           "prompt_tokens", "completion_tokens", "total_tokens", "cost" }
local LLM_TOTAL_FIELDS = { "calls", "successes", "failures", "fallbacks", "fallback_cache",
                           "fallback_fn", "fallback_value", "context_routed" }

local function num0(v)
  return finite(tonumber(v)) or 0
end

-- Registered clients are held weakly, yet their counts must outlive them:
-- the breaker_llm_*_total counters may never go down. Each registered client
-- has a record (in `records`, held strongly) that knows where its numbers
-- are without holding the client:
--   name     label of the client's name
--   ref      weak table, ref[1] the client while it lives
--   totals, models   a breaker.llm client's own counter tables (its _totals,
--            and each model's stats table, followed as models are added);
--   last     for another object: its stats() as of the last snapshot
--   armed    registered and not folded yet
-- The client holds a userdata proxy whose finalizer moves the record's
-- numbers into `retained` (label -> { totals, models }) once the client is
-- collected. The finalizer reaches only the record and plain number tables:
-- it must not bring the client back to life, since that would bring back its
-- breakers too, which the breaker registry (weak) would then hand out with
-- their C blocks already freed.
local records = {}
local scraping = 0    -- > 0 while a snapshot reads the clients
local deferred = {}   -- records collected meanwhile: folded in after it

local function zeros(fields)
  local t = {}
  for _, k in ipairs(fields) do t[k] = 0 end
  return t
end

-- The numbers of a record whose client is gone, in the shape of stats().
local function record_stats(rec)
  if rec.totals then
    local s = { models = rec.models }
    for _, k in ipairs(LLM_TOTAL_FIELDS) do s[k] = rec.totals[k] end
    return s
  end
  return rec.last
end

-- Adds a collected client's numbers to `retained` (in a finalizer, or after
-- a snapshot with `scraping` still set: never interleaved with another fold).
local function fold(rec)
  records[rec] = nil
  local s = record_stats(rec)
  if not s then return end
  local r = retained[rec.name]
  if not r then
    r = { totals = zeros(LLM_TOTAL_FIELDS), models = {} }
    retained[rec.name] = r
  end
  local rt = r.totals
  for _, k in ipairs(LLM_TOTAL_FIELDS) do rt[k] = rt[k] + num0(s[k]) end
  for model, ms in pairs(type(s.models) == "table" and s.models or {}) do
    if type(ms) == "table" then
      local rm = r.models[model]
      if not rm then
        rm = zeros(LLM_MODEL_FIELDS)
        r.models[model] = rm
      end
      for _, k in ipairs(LLM_MODEL_FIELDS) do rm[k] = rm[k] + num0(ms[k]) end
    end
  end
end

-- The finalizer of a client's proxy. Finalizers run with the collector held
-- back, so a fold here is never interleaved with another one; while a
-- snapshot reads the records, the record is queued instead (the snapshot
-- counts it once, from the record) and folded when the snapshot is done.
local function collected(rec)
  if not rec.armed then return end
  if scraping > 0 then
    deferred[#deferred + 1] = rec
  else
    rec.armed = false
    pcall(fold, rec)
  end
end

local newproxy = rawget(_G, "newproxy")
local WEAK_V = { __mode = "v" }
local GC_KEY = "_breaker_metrics" -- the registered client's field: { rec, proxy }

-- Notes the stats table of one model of a breaker.llm client, or of each.
local function see_model(rec, model, m)
  if type(m) == "table" and type(m.stats) == "table" then rec.models[model] = m.stats end
end

local function see_models(rec, models)
  for model, m in pairs(models) do see_model(rec, model, m) end
end

-- Follows a breaker.llm client's counter tables: its totals, each model's
-- stats table, and (through its model table's __newindex, set only if that
-- table has no metatable) the models it adds later.
local function follow_llm(rec, c)
  local totals, models = rawget(c, "_totals"), rawget(c, "_models")
  if type(totals) ~= "table" or type(models) ~= "table" then return end
  rec.totals, rec.models = totals, {}
  see_models(rec, models)
  if getmetatable(models) == nil then
    setmetatable(models, { __newindex = function(t, k, v)
      rawset(t, k, v)
      see_model(rec, k, v)
    end })
  end
end

local function check_client(c, where)
  if type(c) ~= "table" or type(c.stats) ~= "function" then
    error(where .. ": expected a breaker.llm client (an object with a stats method)", 3)
  end
end

local function record_of(c)
  local h = rawget(c, GC_KEY)
  return type(h) == "table" and h.rec or nil
end

-- metrics.register_llm(client): includes a breaker.llm client's per-model
-- calls, tokens and cost. Held weakly; when the client is garbage-collected,
-- its counts are kept (added to the series of its name), so the counters
-- never go down. For an object other than a breaker.llm client, what is kept
-- is its stats() as of the last snapshot.
function _M.register_llm(client)
  check_client(client, "breaker.metrics.register_llm")
  local rec = record_of(client)
  if rec then
    if not rec.armed then
      rec.armed = true
      records[rec] = true
    end
    return client
  end
  rec = { name = label(client.name), ref = setmetatable({ client }, WEAK_V), armed = true }
  follow_llm(rec, client)
  local proxy = newproxy and newproxy(true)
  if proxy then getmetatable(proxy).__gc = function() collected(rec) end end
  rawset(client, GC_KEY, { rec = rec, proxy = proxy })
  records[rec] = true
  return client
end

-- metrics.unregister_llm(client): leaves the client out from now on, with
-- its counts (they are not kept, as a collected client's are).
function _M.unregister_llm(client)
  if type(client) ~= "table" then return end
  local rec = record_of(client)
  if rec then
    rec.armed = false
    records[rec] = nil
  end
end

---------------------------------------------------------------------------
-- Snapshot
---------------------------------------------------------------------------

-- Lists in the snapshot carry this metatable so that the JSON encoder
-- writes them as arrays even when empty.
local ARRAY = { __name = "breaker.metrics array" }
local function array(t) return setmetatable(t or {}, ARRAY) end

local function wall()
  local ngx = rawget(_G, "ngx")
  if type(ngx) == "table" and ngx.now then
    if ngx.update_time then ngx.update_time() end
    return ngx.now()
  end
  local ok, socket = pcall(require, "socket")
  if ok and socket.gettime then return socket.gettime() end
  return os.time()
end

local BREAKER_FIELDS = {
  "generation", "time_in_state", "transitions", "opened", "calls", "successes", "failures",
  "slow", "ignored", "rejected", "late", "failure_rate", "slow_rate", "consecutive_failures",
  "half_open_granted", "half_open_succeeded", "reopen_level", "open_duration",
  "total_calls", "total_failures", "total_rejected", "lock_takeovers",
}

local function breaker_entry(name, b)
  local st = b:stats()
  local e = { name = name, state = st.state or b:state(), shared = b.shared ~= nil }
  for _, k in ipairs(BREAKER_FIELDS) do e[k] = finite(st[k]) end
  local ra = st.retry_after
  if ra ~= nil then
    e.retry_after = finite(ra)
    e.probe_never = ra == huge or nil  -- forced open: no probe until reset
  end
  local okc, cfg = pcall(b.config, b)
  if okc and type(cfg) == "table" then
    e.half_open_calls = finite(cfg.half_open_calls)
    e.minimum_calls = finite(cfg.minimum_calls)
  end
  local lat = st.latency
  if type(lat) == "table" and (lat.samples or 0) > 0 then
    e.latency = { p50 = finite(lat.p50), p90 = finite(lat.p90), p99 = finite(lat.p99),
                  samples = finite(lat.samples) }
  end
  local cum, sum, cnt = read_hist(name)
  e.histogram = { counts = array(cum), sum = sum, count = cnt }
  return e
end

local function by_name(a, b) return a.name < b.name end

local function policies_entry()
  local map, list = {}, array()
  for _, c in ipairs(each_counter()) do
    local p = map[c.a]
    if not p then
      p = { name = c.a, retries = 0, retry_wait = 0, retry_reasons = {},
            fallbacks = { cache = 0, ["function"] = 0, value = 0 },
            budget_exhausted = 0, bulkhead_rejected = 0 }
      map[c.a] = p
      list[#list + 1] = p
    end
    if c.fam == "retries" then
      p.retries = p.retries + c.value
      p.retry_reasons[c.b] = (p.retry_reasons[c.b] or 0) + c.value
    elseif c.fam == "fallbacks" then
      p.fallbacks[c.b] = (p.fallbacks[c.b] or 0) + c.value
    else
      p[c.fam] = p[c.fam] + c.value
    end
  end
  sort(list, by_name)
  return list
end

-- Clients of one name are added up: one series per (client, model), with
-- the counts kept from the collected clients of that name.
local function read_llm(extra)
  local map, list = {}, array()
  local function entry(name)
    local e = map[name]
    if not e then
      -- token and cost totals are summed from the models below: a client
      -- object only has to report per-model figures
      e = { client = name, models = array(), prompt_tokens = 0, completion_tokens = 0,
            total_tokens = 0, cost = 0, _models = {} }
      for _, k in ipairs(LLM_TOTAL_FIELDS) do e[k] = 0 end
      map[name] = e
      list[#list + 1] = e
    end
    return e
  end
  local function add(e, s)
    for _, k in ipairs(LLM_TOTAL_FIELDS) do e[k] = e[k] + num0(s[k]) end
    for model, ms in pairs(type(s.models) == "table" and s.models or {}) do
      local m = e._models[model]
      if not m then
        m = { model = label(model) }
        for _, k in ipairs(LLM_MODEL_FIELDS) do m[k] = 0 end
        e._models[model] = m
        e.models[#e.models + 1] = m
      end
      for _, k in ipairs(LLM_MODEL_FIELDS) do m[k] = m[k] + num0(ms[k]) end
      if type(ms.breaker) == "string" then m.breaker = ms.breaker end
      e.prompt_tokens = e.prompt_tokens + num0(ms.prompt_tokens)
      e.completion_tokens = e.completion_tokens + num0(ms.completion_tokens)
      e.total_tokens = e.total_tokens + num0(ms.total_tokens)
      e.cost = e.cost + num0(ms.cost)
    end
  end
  local recs = {}
  for rec in pairs(records) do recs[#recs + 1] = rec end
  for _, rec in ipairs(recs) do
    local c = rec.ref[1]
    if c then
      local s = c:stats()
      if rec.totals then
        -- the models it has now (in case its model table could not be followed)
        local models = rawget(c, "_models")
        if type(models) == "table" then see_models(rec, models) end
      else
        -- another object: its numbers as of now, kept if it is collected
        local last = { models = {} }
        for _, k in ipairs(LLM_TOTAL_FIELDS) do last[k] = num0(s[k]) end
        for model, ms in pairs(type(s.models) == "table" and s.models or {}) do
          if type(ms) == "table" then
            local m = {}
            for _, k in ipairs(LLM_MODEL_FIELDS) do m[k] = num0(ms[k]) end
            last.models[model] = m
          end
        end
        rec.last = last
      end
      add(entry(label(c.name)), s)
    else
      local s = record_stats(rec) -- collected, not folded yet
      if s then add(entry(rec.name), s) end
      -- without newproxy no finalizer folds it: fold it after this snapshot
      if not newproxy and rec.armed then deferred[#deferred + 1] = rec end
    end
  end
  for _, c in ipairs(extra) do
    local rec = record_of(c)
    if not (rec and rec.armed) then add(entry(label(c.name)), c:stats()) end
  end
  for name, r in pairs(retained) do
    local t = { models = r.models }
    for _, k in ipairs(LLM_TOTAL_FIELDS) do t[k] = r.totals[k] end
    add(entry(name), t)
  end
  for _, e in ipairs(list) do
    e._models = nil
    sort(e.models, function(a, b) return a.model < b.model end)
  end
  sort(list, function(a, b) return a.client < b.client end)
  return list
end

local function llm_entries(extra)
  if extra ~= nil then
    if type(extra) ~= "table" then error("breaker.metrics: opts.llm must be a list of breaker.llm clients", 3) end
    for _, c in ipairs(extra) do check_client(c, "breaker.metrics") end
  end
  -- A record collected while this runs is queued (see collected), then
  -- folded in, still under `scraping` so that a finalizer meanwhile queues too.
  scraping = scraping + 1
  local ok, list = pcall(read_llm, extra or {})
  while deferred[1] do
    local rec = remove(deferred)
    if rec.armed then -- not unregistered meanwhile
      rec.armed = false
      pcall(fold, rec)
    end
  end
  scraping = scraping - 1
  if not ok then error(list, 0) end
  return list
end

local function check_opts(opts, where)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(where .. ": expected an options table", 3) end
  for k in pairs(opts) do
    if k ~= "llm" then error(where .. ": unknown option '" .. tostring(k) .. "'", 3) end
  end
  return opts
end

local function build_snapshot(opts)
  local list = array()
  for name, b in breaker.each() do list[#list + 1] = breaker_entry(name, b) end
  sort(list, by_name)
  local snap = {
    version = VERSION,
    time = wall(),
    buckets = array(_M.buckets()),
    shared_dict = dict_name,
    breakers = list,
    policies = policies_entry(),
    llm = llm_entries(opts.llm),
  }
  local ngx = rawget(_G, "ngx")
  if type(ngx) == "table" and type(ngx.worker) == "table" and ngx.worker.id then
    snap.worker = { id = ngx.worker.id(), pid = ngx.worker.pid(), count = ngx.worker.count() }
  end
  return snap
end

-- metrics.snapshot([opts]) -> the table metrics.json() encodes (see
-- the README, "Seeing the breakers"). opts.llm: a list of breaker.llm clients to include
-- besides the registered ones.
function _M.snapshot(opts)
  return build_snapshot(check_opts(opts, "breaker.metrics.snapshot"))
end

---------------------------------------------------------------------------
-- JSON
---------------------------------------------------------------------------

-- A small encoder: cjson 2.1.0 writes an empty list as {} and has no way to
-- mark a table as an array; this one writes ARRAY tables as arrays, keys in
-- sorted order, and non-finite numbers as null.
local JSON_ESC = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                   ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }

local function json_string(s)
  return '"' .. gsub(s, '[%c"\\]', function(c)
    return JSON_ESC[c] or format("\\u%04x", byte(c))
  end) .. '"'
end

local function json_number(v)
  if v ~= v or v == huge or v == -huge then return "null" end
  if v == floor(v) and v > -2^53 and v < 2^53 then return format("%d", v) end
  local s = format("%.15g", v)
  if tonumber(s) ~= v then s = format("%.17g", v) end
  return s
end

local function encode(v, out)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = json_string(v)
  elseif t == "number" then
    out[#out + 1] = json_number(v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "nil" then
    out[#out + 1] = "null"
  elseif t == "table" then
    if getmetatable(v) == ARRAY then
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = "," end
        encode(v[i], out)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = json_string(k)
        out[#out + 1] = ":"
        local x = v[k]
        if x == nil then x = v[tonumber(k)] end
        encode(x, out)
      end
      out[#out + 1] = "}"
    end
  else
    error("breaker.metrics: cannot encode a " .. t .. " as JSON", 0)
  end
end

-- metrics.json([opts]) -> JSON text of metrics.snapshot(opts).
function _M.json(opts)
  local out = {}
  encode(build_snapshot(check_opts(opts, "breaker.metrics.json")), out)
  return concat(out)
end

---------------------------------------------------------------------------
-- Prometheus text exposition format (version 0.0.4)
---------------------------------------------------------------------------

local function prom_number(v)
  if v ~= v then return "NaN" end
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  return json_number(v)
end

local LABEL_ESC = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }
local function label_value(s)
  return (gsub(s, '[\\"\n]', LABEL_ESC))
end

local HELP_ESC = { ["\\"] = "\\\\", ["\n"] = "\\n" }

-- Collects the families in order; samples of one family stay together.
local Writer = {}
Writer.__index = Writer

local function writer()
  return setmetatable({ out = {}, fams = {}, order = {} }, Writer)
end

function Writer:family(name, kind, help)
  local f = self.fams[name]
  if not f then
    f = { name = name, kind = kind, help = help, lines = {} }
    self.fams[name] = f
    self.order[#self.order + 1] = f
  end
  return f
end

-- labels: list of { name, value } pairs.
local function series(name, labels, value)
  local parts = {}
  for i, l in ipairs(labels) do parts[i] = l[1] .. '="' .. label_value(tostring(l[2])) .. '"' end
  local lab = #parts > 0 and ("{" .. concat(parts, ",") .. "}") or ""
  return name .. lab .. " " .. prom_number(value)
end

function Writer:sample(fam, suffix, labels, value)
  local f = self.fams[fam]
  f.lines[#f.lines + 1] = series(fam .. (suffix or ""), labels, value)
end

function Writer:text()
  local out = {}
  for _, f in ipairs(self.order) do
    if #f.lines > 0 then
      out[#out + 1] = "# HELP " .. f.name .. " " .. gsub(f.help, "[\\\n]", HELP_ESC)
      out[#out + 1] = "# TYPE " .. f.name .. " " .. f.kind
      for _, l in ipairs(f.lines) do out[#out + 1] = l end
    end
  end
  return concat(out, "\n") .. "\n"
end

-- Families of per-breaker numbers: name, type, help, snapshot field, scale.
local BREAKER_SERIES = {
  { "breaker_calls_total", "counter", "Calls recorded as success or failure by the breaker.", "total_calls" },
  { "breaker_failures_total", "counter", "Calls recorded as failures.", "total_failures" },
  { "breaker_rejected_total", "counter", "Calls the breaker rejected without running them.", "total_rejected" },
  { "breaker_transitions_total", "counter", "State transitions.", "transitions" },
  { "breaker_opened_total", "counter", "Times the breaker opened.", "opened" },
  { "breaker_lock_takeovers_total", "counter",
    "Shared breakers: locks taken over from a process that died holding them.", "lock_takeovers" },
  { "breaker_window_calls", "gauge", "Successes and failures in the current window.", "calls" },
  { "breaker_window_failures", "gauge", "Failures in the current window.", "failures" },
  { "breaker_window_slow_calls", "gauge", "Slow calls in the current window.", "slow" },
  { "breaker_window_ignored", "gauge", "Ignored outcomes in the current window.", "ignored" },
  { "breaker_failure_ratio", "gauge",
    "Failures / calls in the window (absent below minimum_calls).", "failure_rate", 0.01 },
  { "breaker_slow_call_ratio", "gauge",
    "Slow calls / calls in the window (absent below minimum_calls).", "slow_rate", 0.01 },
  { "breaker_consecutive_failures", "gauge", "Failures in a row.", "consecutive_failures" },
  { "breaker_open_duration_seconds", "gauge", "How long the next open period lasts.", "open_duration" },
  { "breaker_time_in_state_seconds", "gauge", "Seconds since the last transition.", "time_in_state" },
}

local LLM_SERIES = {
  { "breaker_llm_calls_total", "counter", "Calls of an LLM model.", "calls" },
  { "breaker_llm_failures_total", "counter", "Failed calls of an LLM model.", "failures" },
  { "breaker_llm_rejected_total", "counter", "Calls of an LLM model its breaker rejected.", "rejected" },
  { "breaker_llm_cost_total", "counter", "Cost of an LLM model's tokens, in the unit of the client's prices.",
    "cost" },
}

local function prometheus(snap)
  local w = writer()
  w:family("breaker_info", "gauge", "breaker library version.")
  w:sample("breaker_info", nil, { { "version", snap.version } }, 1)

  w:family("breaker_state", "gauge", "1 for the breaker's current state, 0 for the others.")
  for _, b in ipairs(snap.breakers) do
    for _, s in ipairs(STATES) do
      w:sample("breaker_state", nil, { { "breaker", b.name }, { "state", s } }, b.state == s and 1 or 0)
    end
  end
  for _, d in ipairs(BREAKER_SERIES) do
    w:family(d[1], d[2], d[3])
    for _, b in ipairs(snap.breakers) do
      local v = b[d[4]]
      if v ~= nil then w:sample(d[1], nil, { { "breaker", b.name } }, v * (d[5] or 1)) end
    end
  end
  w:family("breaker_retry_after_seconds", "gauge",
           "Seconds until an open breaker admits a probe (+Inf while forced open).")
  for _, b in ipairs(snap.breakers) do
    local v = b.retry_after or (b.probe_never and huge)
    if v then w:sample("breaker_retry_after_seconds", nil, { { "breaker", b.name } }, v) end
  end
  w:family("breaker_recent_latency_seconds", "gauge",
           "Latency quantiles of the breaker's recent calls (its own decaying histogram).")
  for _, b in ipairs(snap.breakers) do
    local l = b.latency
    if l then
      for _, q in ipairs({ { "0.5", l.p50 }, { "0.9", l.p90 }, { "0.99", l.p99 } }) do
        if q[2] then
          w:sample("breaker_recent_latency_seconds", nil, { { "breaker", b.name }, { "quantile", q[1] } }, q[2])
        end
      end
    end
  end
  local hf = "breaker_call_duration_seconds"
  w:family(hf, "histogram", "Latency of the calls recorded as success or failure.")
  for _, b in ipairs(snap.breakers) do
    local h = b.histogram
    for i, c in ipairs(h.counts) do
      local le = i <= #snap.buckets and prom_number(snap.buckets[i]) or "+Inf"
      w:sample(hf, "_bucket", { { "breaker", b.name }, { "le", le } }, c)
    end
    w:sample(hf, "_sum", { { "breaker", b.name } }, h.sum)
    w:sample(hf, "_count", { { "breaker", b.name } }, h.count)
  end

  w:family("breaker_policy_retries_total", "counter", "Retries a policy made, by the failure's kind.")
  w:family("breaker_policy_retry_wait_seconds_total", "counter", "Seconds a policy waited before retries.")
  w:family("breaker_policy_fallbacks_total", "counter", "Calls a policy's fallback answered, by how.")
  w:family("breaker_policy_budget_exhausted_total", "counter", "Retries the retry budget refused.")
  w:family("breaker_policy_bulkhead_rejected_total", "counter", "Calls a full bulkhead rejected.")
  for _, p in ipairs(snap.policies) do
    local lp = { "policy", p.name }
    for _, r in ipairs(sorted_keys(p.retry_reasons)) do
      w:sample("breaker_policy_retries_total", nil, { lp, { "reason", r } }, p.retry_reasons[r])
    end
    w:sample("breaker_policy_retry_wait_seconds_total", nil, { lp }, p.retry_wait)
    for _, h in ipairs(sorted_keys(p.fallbacks)) do
      w:sample("breaker_policy_fallbacks_total", nil, { lp, { "how", h } }, p.fallbacks[h])
    end
    w:sample("breaker_policy_budget_exhausted_total", nil, { lp }, p.budget_exhausted)
    w:sample("breaker_policy_bulkhead_rejected_total", nil, { lp }, p.bulkhead_rejected)
  end

  for _, d in ipairs(LLM_SERIES) do w:family(d[1], d[2], d[3]) end
  w:family("breaker_llm_tokens_total", "counter", "Tokens an LLM model used, by kind (prompt, completion).")
  for _, c in ipairs(snap.llm) do
    for _, m in ipairs(c.models) do
      local base = { { "client", c.client }, { "model", m.model } }
      for _, d in ipairs(LLM_SERIES) do w:sample(d[1], nil, base, m[d[4]]) end
      w:sample("breaker_llm_tokens_total", nil, { base[1], base[2], { "kind", "prompt" } }, m.prompt_tokens)
      w:sample("breaker_llm_tokens_total", nil, { base[1], base[2], { "kind", "completion" } },
               m.completion_tokens)
    end
  end
  return w:text()
end

-- metrics.prometheus([opts]) -> the text exposition format (0.0.4) of every
-- breaker, policy counter and registered LLM client (opts.llm adds clients).
-- Serve it with CONTENT_TYPE.
function _M.prometheus(opts)
  return prometheus(build_snapshot(check_opts(opts, "breaker.metrics.prometheus")))
end

_M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

---------------------------------------------------------------------------
-- nginx handler
---------------------------------------------------------------------------

local SERVE = { prometheus = true, json = true, dashboard = true }
local HANDLER_KEYS = { serve = true, json_url = true, refresh = true, title = true, llm = true }

-- What a URI asks for, by its last segment.
local function route(uri)
  local last = uri:match("([^/]*)$") or ""
  if last == "metrics" then return "prometheus" end
  if last == "metrics.json" then return "json" end
  if last == "" or last == "dashboard" or last == "dashboard.html" then return "dashboard" end
  return nil
end

-- metrics.handler([opts]) serves, in content_by_lua, by the request URI's
-- last segment: .../metrics (Prometheus), .../metrics.json (JSON),
-- .../ or .../dashboard (the dashboard page). opts: serve = "prometheus" |
-- "json" | "dashboard" (ignore the URI), json_url (where the page fetches
-- the JSON; default "metrics.json" relative to the page), refresh (seconds
-- between the page's updates, default 2), title, llm (clients to include).
-- GET and HEAD only (405 otherwise); 404 for another segment.
function _M.handler(opts)
  local ngx = rawget(_G, "ngx")
  if type(ngx) ~= "table" or not ngx.say then
    error("breaker.metrics.handler: runs inside nginx (content_by_lua)", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("breaker.metrics.handler: expected an options table", 2) end
  for k in pairs(opts) do
    if not HANDLER_KEYS[k] then error("breaker.metrics.handler: unknown option '" .. tostring(k) .. "'", 2) end
  end
  if opts.serve ~= nil and not SERVE[opts.serve] then
    error("breaker.metrics.handler: serve must be \"prometheus\", \"json\" or \"dashboard\"", 2)
  end
  local method = ngx.req.get_method()
  if method ~= "GET" and method ~= "HEAD" then
    ngx.header["Allow"] = "GET, HEAD"
    return ngx.exit(405)
  end
  local what = opts.serve or route(ngx.var.uri or "")
  if not what then return ngx.exit(404) end
  local body
  if what == "prometheus" then
    ngx.header["Content-Type"] = _M.CONTENT_TYPE
    body = _M.prometheus({ llm = opts.llm })
  elseif what == "json" then
    ngx.header["Content-Type"] = "application/json"
    body = _M.json({ llm = opts.llm })
  else
    ngx.header["Content-Type"] = "text/html; charset=utf-8"
    -- Nothing but this page and its JSON: no external script, style or font.
    ngx.header["Content-Security-Policy"] = "default-src 'none'; script-src 'unsafe-inline'; "
      .. "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
    body = require("breaker.dashboard").render{
      json_url = opts.json_url, refresh = opts.refresh, title = opts.title,
    }
  end
  ngx.header["Cache-Control"] = "no-store"
  ngx.header["X-Content-Type-Options"] = "nosniff"
  ngx.print(body)
end

_M.enable()

-- Internal, for specs.
_M._route = route

return _M
