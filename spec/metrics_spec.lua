-- spec/metrics_spec.lua: breaker.metrics (Prometheus text parsed back with a
-- strict parser, JSON shape, policy and LLM counters), breaker.dashboard and
-- the nginx handler.
local breaker = require "breaker"
local metrics = require "breaker.metrics"
local dashboard = require "breaker.dashboard"
local policy = require "breaker.policy"
local errors = require "breaker.error"
local cjson = require "cjson"
local helper = require "helper"

---------------------------------------------------------------------------
-- A strict parser of the text exposition format (0.0.4)
---------------------------------------------------------------------------

local TYPES = { counter = true, gauge = true, histogram = true, summary = true, untyped = true }

local function parse_value(s)
  if s == "+Inf" then return math.huge end
  if s == "-Inf" then return -math.huge end
  if s == "NaN" then return 0 / 0 end
  if not s:match("^[+-]?%d+%.?%d*[eE]?[+-]?%d*$") and not s:match("^[+-]?%.%d+[eE]?[+-]?%d*$") then
    error("bad value '" .. s .. "'", 0)
  end
  local v = tonumber(s)
  if not v then error("bad value '" .. s .. "'", 0) end
  return v
end

-- Parses `{a="x",b="y"}` at position i of line: labels table, next position.
local function parse_labels(line, i)
  local labels, names = {}, {}
  i = i + 1
  if line:sub(i, i) == "}" then return labels, names, i + 1 end
  while true do
    local name = line:match("^[%a_][%w_]*", i)
    if not name then error("bad label name at " .. i .. " in: " .. line, 0) end
    if name:sub(1, 2) == "__" then error("reserved label name " .. name, 0) end
    i = i + #name
    if line:sub(i, i + 1) ~= '="' then error("expected =\" after label " .. name, 0) end
    i = i + 2
    local buf = {}
    while true do
      local c = line:sub(i, i)
      if c == "" then error("unterminated label value in: " .. line, 0) end
      if c == '"' then i = i + 1; break end
      if c == "\\" then
        local e = line:sub(i + 1, i + 1)
        if e == "\\" then buf[#buf + 1] = "\\"
        elseif e == '"' then buf[#buf + 1] = '"'
        elseif e == "n" then buf[#buf + 1] = "\n"
        else error("bad escape \\" .. e .. " in: " .. line, 0) end
        i = i + 2
      else
        buf[#buf + 1] = c
        i = i + 1
      end
    end
    if labels[name] then error("repeated label " .. name, 0) end
    labels[name] = table.concat(buf)
    names[#names + 1] = name
    local c = line:sub(i, i)
    if c == "}" then return labels, names, i + 1 end
    if c ~= "," then error("expected , or } in: " .. line, 0) end
    i = i + 1
  end
end

local function series_key(name, labels, skip)
  local ks = {}
  for k in pairs(labels) do if k ~= skip then ks[#ks + 1] = k end end
  table.sort(ks)
  local parts = { name }
  for _, k in ipairs(ks) do parts[#parts + 1] = k .. "=" .. labels[k] end
  return table.concat(parts, "\0")
end

-- Returns { [family] = { help, type, samples = { { name, labels, value } } } }
-- or raises naming the first rule the text breaks.
local function parse_prometheus(text)
  assert(type(text) == "string", "text expected")
  if text:sub(-1) ~= "\n" then error("text must end with a newline", 0) end
  local fams, seen, done, current = {}, {}, {}, nil
  for line in text:gmatch("([^\n]*)\n") do
    if line == "" then error("empty line", 0) end
    if line:sub(1, 1) == "#" then
      local kw, name, rest = line:match("^# (%u+) ([%a_:][%w_:]*) (.*)$")
      if not kw then error("bad comment line: " .. line, 0) end
      local f = fams[name]
      if f and (#f.samples > 0) then error(kw .. " of " .. name .. " after its samples", 0) end
      f = f or { samples = {} }
      fams[name] = f
      if kw == "HELP" then
        if f.help then error("second HELP for " .. name, 0) end
        if rest:find("\\[^\\n]") then error("bad escape in HELP of " .. name, 0) end
        f.help = rest:gsub("\\n", "\n"):gsub("\\\\", "\\")
      elseif kw == "TYPE" then
        if f.type then error("second TYPE for " .. name, 0) end
        if not TYPES[rest] then error("bad TYPE " .. rest, 0) end
        f.type = rest
        if rest == "counter" and not name:match("_total$") then error("counter " .. name .. " lacks _total", 0) end
      else
        error("unknown keyword " .. kw, 0)
      end
    else
      local name = line:match("^[%a_:][%w_:]*")
      if not name then error("bad sample line: " .. line, 0) end
      local i = #name + 1
      local labels, order = {}, {}
      if line:sub(i, i) == "{" then labels, order, i = parse_labels(line, i) end
      local value, ts = line:sub(i):match("^ (%S+)( ?%S*)$")
      if not value then error("bad sample line: " .. line, 0) end
      if ts ~= "" and not ts:match("^ %-?%d+$") then error("bad timestamp in: " .. line, 0) end
      local v = parse_value(value)
      local fam = name
      if not fams[fam] or not fams[fam].type then
        local base, suffix = name:match("^(.*)_(%a+)$")
        if base and fams[base] and (suffix == "bucket" or suffix == "sum" or suffix == "count")
           and (fams[base].type == "histogram" or fams[base].type == "summary") then
          fam = base
        end
      end
      local f = fams[fam]
      if not f or not f.type or not f.help then error("sample " .. name .. " without HELP and TYPE", 0) end
      if fam ~= current then
        if done[fam] then error("samples of " .. fam .. " are not together", 0) end
        if current then done[current] = true end
        current = fam
      end
      if labels.le and not name:match("_bucket$") then error("le label outside a bucket: " .. line, 0) end
      if name:match("_bucket$") and f.type == "histogram" and not labels.le then
        error("bucket without le: " .. line, 0)
      end
      if f.type == "counter" and not (v >= 0) then error("negative counter: " .. line, 0) end
      local key = series_key(name, labels)
      if seen[key] then error("duplicate series: " .. line, 0) end
      seen[key] = true
      f.samples[#f.samples + 1] = { name = name, labels = labels, order = order, value = v }
    end
  end
  -- Histograms: per series, le ascending, cumulative, ending in +Inf = _count, with _sum.
  for fname, f in pairs(fams) do
    if f.type == "histogram" then
      local groups = {}
      for _, s in ipairs(f.samples) do
        local g = series_key(fname, s.labels, "le")
        groups[g] = groups[g] or { buckets = {} }
        if s.name == fname .. "_bucket" then
          local le = parse_value(s.labels.le)
          local b = groups[g].buckets
          if #b > 0 then
            if not (le > b[#b].le) then error(fname .. ": le not ascending", 0) end
            if s.value < b[#b].count then error(fname .. ": buckets not cumulative", 0) end
          end
          b[#b + 1] = { le = le, count = s.value }
        elseif s.name == fname .. "_sum" then groups[g].sum = s.value
        elseif s.name == fname .. "_count" then groups[g].count = s.value
        else error(fname .. ": unexpected sample " .. s.name, 0) end
      end
      for g, grp in pairs(groups) do
        local b = grp.buckets
        if #b == 0 or b[#b].le ~= math.huge then error(fname .. ": no +Inf bucket (" .. g .. ")", 0) end
        if grp.count == nil or grp.sum == nil then error(fname .. ": _sum or _count missing", 0) end
        if grp.count ~= b[#b].count then error(fname .. ": +Inf bucket differs from _count", 0) end
      end
    end
  end
  return fams
end

-- The value of `family`'s sample `name` whose labels include `want`.
local function find_sample(fams, family, want, name)
  local f = fams[family]
  if not f then return nil end
  local hits = {}
  for _, s in ipairs(f.samples) do
    local ok = (name == nil or s.name == name)
    for k, v in pairs(want) do if s.labels[k] ~= v then ok = false end end
    if ok then hits[#hits + 1] = s end
  end
  assert(#hits <= 1, "more than one sample matches in " .. family)
  return hits[1] and hits[1].value
end

---------------------------------------------------------------------------

local n = 0
local function uname(prefix)
  n = n + 1
  return ("%s-%d"):format(prefix, n)
end

local function by_name(list, name)
  for _, e in ipairs(list) do if e.name == name then return e end end
end

describe("breaker.metrics", function()
  local made = {}
  local function new_breaker(name, cfg)
    local b = breaker.new(name, cfg)
    made[#made + 1] = b
    return b
  end

  before_each(function()
    metrics.enable()
    metrics.reset()
  end)
  after_each(function()
    for _, b in ipairs(made) do b:close() end
    made = {}
    breaker.clock.unfreeze()
  end)
  -- Other spec files must not pay for the observer and the subscriptions.
  lazy_teardown(function()
    metrics.disable()
  end)

  describe("the strict exposition parser of this spec", function()
    local good = "# HELP x_total A counter.\n# TYPE x_total counter\nx_total{a=\"1\"} 3\n"
    it("accepts valid text", function()
      local fams = parse_prometheus(good)
      assert.equal(3, fams.x_total.samples[1].value)
    end)
    local bad = {
      ["no newline at the end"] = "# HELP x_total A.\n# TYPE x_total counter\nx_total 1",
      ["a sample without TYPE"] = "# HELP x A.\nx 1\n",
      ["a counter without _total"] = "# HELP x A.\n# TYPE x counter\nx 1\n",
      ["a bad escape"] = "# HELP x A.\n# TYPE x gauge\nx{a=\"\\t\"} 1\n",
      ["an unescaped quote"] = "# HELP x A.\n# TYPE x gauge\nx{a=\"\"\"} 1\n",
      ["a duplicate series"] = "# HELP x A.\n# TYPE x gauge\nx{a=\"1\"} 1\nx{a=\"1\"} 2\n",
      ["a family split in two"] = "# HELP x A.\n# TYPE x gauge\n# HELP y B.\n# TYPE y gauge\nx 1\ny 1\nx{a=\"2\"} 1\n",
      ["a bad value"] = "# HELP x A.\n# TYPE x gauge\nx one\n",
      ["non-cumulative buckets"] = "# HELP h A.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
        .. "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
      ["no +Inf bucket"] = "# HELP h A.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
      ["+Inf differing from _count"] = "# HELP h A.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n",
      ["a TYPE after samples"] = "# HELP x A.\nx 1\n# TYPE x gauge\n",
    }
    for what, text in pairs(bad) do
      it("rejects " .. what, function()
        assert.has_error(function() parse_prometheus(text) end)
      end)
    end
  end)

  describe("prometheus()", function()
    it("is valid, with HELP and TYPE for every family and the version info", function()
      new_breaker(uname("prom"), {})
      local fams = parse_prometheus(metrics.prometheus())
      for name, f in pairs(fams) do
        assert.is_string(f.help, name)
        assert.is_string(f.type, name)
      end
      assert.equal(1, find_sample(fams, "breaker_info", { version = breaker._VERSION }))
      assert.equal("histogram", fams.breaker_call_duration_seconds.type)
      assert.equal("counter", fams.breaker_calls_total.type)
      assert.equal("gauge", fams.breaker_state.type)
    end)

    it("labels by breaker name, escaping quotes, backslashes and newlines", function()
      local name = uname('we"ird\\name\nline two')
      local b = new_breaker(name, {})
      b:record(assert(b:allow()), "success", 0.01)
      local text = metrics.prometheus()
      assert.truthy(text:find('breaker="we\\"ird\\\\name\\nline two', 1, true))
      local fams = parse_prometheus(text)
      assert.equal(1, find_sample(fams, "breaker_calls_total", { breaker = name }))
    end)

    it("counts calls, failures and rejections, and gives the state one-hot", function()
      breaker.clock.freeze(500)
      local name = uname("counts")
      local b = new_breaker(name, { consecutive_failures = 3, open_duration = 20 })
      b:record(assert(b:allow()), "success", 0.001)
      for _ = 1, 3 do b:record(assert(b:allow()), "failure", 0.002) end
      assert.is_nil((b:allow()))
      assert.is_nil((b:allow()))
      breaker.clock.advance(5)
      local fams = parse_prometheus(metrics.prometheus())
      local L = { breaker = name }
      assert.equal(4, find_sample(fams, "breaker_calls_total", L))
      assert.equal(3, find_sample(fams, "breaker_failures_total", L))
      assert.equal(2, find_sample(fams, "breaker_rejected_total", L))
      assert.equal(1, find_sample(fams, "breaker_opened_total", L))
      assert.equal(0, find_sample(fams, "breaker_lock_takeovers_total", L))
      assert.equal(1, find_sample(fams, "breaker_transitions_total", L))
      assert.equal(3, find_sample(fams, "breaker_consecutive_failures", L))
      assert.equal(15, find_sample(fams, "breaker_retry_after_seconds", L))
      assert.equal(20, find_sample(fams, "breaker_open_duration_seconds", L))
      for _, s in ipairs(breaker.STATES) do
        assert.equal(s == "open" and 1 or 0, find_sample(fams, "breaker_state", { breaker = name, state = s }), s)
      end
    end)

    it("gives a failure ratio once the window holds minimum_calls, and +Inf retry_after when forced open", function()
      local name = uname("ratio")
      local b = new_breaker(name, { minimum_calls = 4, window_size = 4, failure_rate_threshold = 100,
                                    consecutive_failures = false })
      b:record(assert(b:allow()), "failure", 0.001)
      local fams = parse_prometheus(metrics.prometheus())
      assert.is_nil(find_sample(fams, "breaker_failure_ratio", { breaker = name }))
      for _ = 1, 3 do b:record(assert(b:allow()), "success", 0.001) end
      fams = parse_prometheus(metrics.prometheus())
      assert.equal(0.25, find_sample(fams, "breaker_failure_ratio", { breaker = name }))
      assert.is_nil(find_sample(fams, "breaker_retry_after_seconds", { breaker = name }))
      b:force_open()
      fams = parse_prometheus(metrics.prometheus())
      assert.equal(math.huge, find_sample(fams, "breaker_retry_after_seconds", { breaker = name }))
      assert.equal(1, find_sample(fams, "breaker_state", { breaker = name, state = "forced_open" }))
    end)

    it("has a cumulative latency histogram of successes and failures (ignored ones left out)", function()
      local name = uname("hist")
      local b = new_breaker(name, { consecutive_failures = false, failure_rate_threshold = false })
      local lat = { 0.003, 0.02, 0.2, 3, 200, 0.02 }
      for i, l in ipairs(lat) do b:record(assert(b:allow()), i % 2 == 0 and "failure" or "success", l) end
      b:record(assert(b:allow()), "ignored", 50)
      local fams = parse_prometheus(metrics.prometheus())
      local H = "breaker_call_duration_seconds"
      local function bucket(le) return find_sample(fams, H, { breaker = name, le = le }, H .. "_bucket") end
      assert.equal(1, bucket("0.005"))
      assert.equal(1, bucket("0.01"))
      assert.equal(3, bucket("0.025"))
      assert.equal(4, bucket("0.25"))
      assert.equal(5, bucket("5"))
      assert.equal(5, bucket("120"))
      assert.equal(6, bucket("+Inf"))
      assert.equal(6, find_sample(fams, H, { breaker = name }, H .. "_count"))
      assert.near(203.243, find_sample(fams, H, { breaker = name }, H .. "_sum"), 1e-9)
      -- the breaker's own quantiles are there too
      assert.is_number(find_sample(fams, "breaker_recent_latency_seconds", { breaker = name, quantile = "0.99" }))
    end)

    it("uses the buckets given to configure, and starts afresh", function()
      local name = uname("buckets")
      local b = new_breaker(name, {})
      b:record(assert(b:allow()), "success", 0.5)
      metrics.configure{ buckets = { 0.1, 1 } }
      finally(function() metrics.configure{ buckets = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                          10, 30, 60, 120 } } end)
      assert.same({ 0.1, 1 }, metrics.buckets())
      b:record(assert(b:allow()), "success", 0.05)
      b:record(assert(b:allow()), "success", 2)
      local fams = parse_prometheus(metrics.prometheus())
      local H = "breaker_call_duration_seconds"
      local les = {}
      for _, s in ipairs(fams[H].samples) do
        if s.labels.breaker == name and s.name == H .. "_bucket" then les[#les + 1] = s.labels.le .. "=" .. s.value end
      end
      assert.same({ "0.1=1", "1=1", "+Inf=2" }, les)
    end)

    it("counts policy retries by reason with their waits, fallbacks by how, budgets and bulkheads", function()
      local pname = uname("pol")
      local p = policy.new{
        name = pname,
        retry = { max_attempts = 3, base = 0.25, factor = 2, jitter = "none",
                  budget = { ratio = 0, min_per_second = 0.1, ttl = 10 } },
        fallback = { value = "fallback" },
        bulkhead = { max_concurrent = 1, max_wait = 0 },
        sleep = function() end,
      }
      -- budget: 0.1/s x 10 s = 1 retry; the second retry wanted is refused
      local res = p:call(function() return nil, errors.new("timeout", "slow") end)
      assert.equal("fallback", res)
      assert.equal("budget", p.last.stop)
      -- bulkhead: a nested call finds the only slot taken
      p:call(function() return p:call(function() return "inner" end) end)
      local fams = parse_prometheus(metrics.prometheus())
      assert.equal(1, find_sample(fams, "breaker_policy_retries_total", { policy = pname, reason = "timeout" }))
      assert.equal(0.25, find_sample(fams, "breaker_policy_retry_wait_seconds_total", { policy = pname }))
      assert.equal(1, find_sample(fams, "breaker_policy_budget_exhausted_total", { policy = pname }))
      assert.equal(1, find_sample(fams, "breaker_policy_bulkhead_rejected_total", { policy = pname }))
      assert.equal(2, find_sample(fams, "breaker_policy_fallbacks_total", { policy = pname, how = "value" }))
      assert.equal(0, find_sample(fams, "breaker_policy_fallbacks_total", { policy = pname, how = "cache" }))
    end)

    it("stops counting after disable() and keeps what it counted", function()
      local name = uname("disabled")
      local b = new_breaker(name, {})
      b:record(assert(b:allow()), "success", 0.01)
      metrics.disable()
      b:record(assert(b:allow()), "success", 0.01)
      local fams = parse_prometheus(metrics.prometheus())
      local H = "breaker_call_duration_seconds"
      assert.equal(1, find_sample(fams, H, { breaker = name }, H .. "_count"))
      assert.equal(2, find_sample(fams, "breaker_calls_total", { breaker = name }))
      metrics.enable()
      b:record(assert(b:allow()), "success", 0.01)
      fams = parse_prometheus(metrics.prometheus())
      assert.equal(2, find_sample(fams, H, { breaker = name }, H .. "_count"))
    end)
  end)

  describe("LLM clients", function()
    local function stub(name, models)
      return { name = name, stats = function() return { calls = 1, successes = 1, failures = 0, models = models } end }
    end

    it("reports tokens and cost per model of clients passed in, adding up clients of one name", function()
      local a = stub("stub-client", { m1 = { calls = 2, failures = 1, prompt_tokens = 10, completion_tokens = 5,
                                             total_tokens = 15, cost = 0.5, breaker = "closed" } })
      local b = stub("stub-client", { m1 = { calls = 1, prompt_tokens = 1, completion_tokens = 2, total_tokens = 3,
                                             cost = 0.25 },
                                      m2 = { calls = 4, prompt_tokens = 7, completion_tokens = 0, total_tokens = 7 } })
      local fams = parse_prometheus(metrics.prometheus{ llm = { a, b } })
      local function tok(model, kind)
        return find_sample(fams, "breaker_llm_tokens_total", { client = "stub-client", model = model, kind = kind })
      end
      assert.equal(11, tok("m1", "prompt"))
      assert.equal(7, tok("m1", "completion"))
      assert.equal(7, tok("m2", "prompt"))
      assert.equal(0.75, find_sample(fams, "breaker_llm_cost_total", { client = "stub-client", model = "m1" }))
      assert.equal(3, find_sample(fams, "breaker_llm_calls_total", { client = "stub-client", model = "m1" }))
      assert.equal(1, find_sample(fams, "breaker_llm_failures_total", { client = "stub-client", model = "m1" }))
      local snap = metrics.snapshot{ llm = { a, b } }
      assert.equal(1, #snap.llm)
      assert.equal(18, snap.llm[1].prompt_tokens)
      assert.same({ "m1", "m2" }, { snap.llm[1].models[1].model, snap.llm[1].models[2].model })
      assert.equal("closed", snap.llm[1].models[1].breaker)
      assert.has_error(function() metrics.prometheus{ llm = { {} } } end)
      assert.has_error(function() metrics.prometheus{ nope = 1 } end,
                       "breaker.metrics.prometheus: unknown option 'nope'")
    end)

    it("keeps the counts of a collected client: the llm counters never go down", function()
      local llm = require "breaker.llm"
      local body = cjson.encode{ id = "x", object = "chat.completion", model = "m",
        choices = { { index = 0, message = { role = "assistant", content = "hi" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 3, completion_tokens = 2, total_tokens = 5 } }
      local t = { request = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = body }
      end }
      local name = uname("gc-client")
      local function new()
        return llm.new{ base_url = "http://gc-spec.example/v1", api_key = "k", model = "m", name = name,
                        transport = t, prices = { m = { prompt = 2, completion = 8 } }, policy = { retry = false } }
      end
      local function chat(c) assert(c:chat{ messages = { { role = "user", content = "x" } } }) end
      local L = { client = name, model = "m" }
      local function read()
        local fams = parse_prometheus(metrics.prometheus())
        local function tok(kind)
          return find_sample(fams, "breaker_llm_tokens_total", { client = name, model = "m", kind = kind })
        end
        return { find_sample(fams, "breaker_llm_calls_total", L), tok("prompt"), tok("completion"),
                 find_sample(fams, "breaker_llm_cost_total", L) * 1e6 }
      end
      local keep = new()
      chat(keep)
      local function per_request() chat(new()) end  -- e.g. one client per request
      for _ = 1, 3 do per_request() end
      local before = read()
      assert.equal(4, before[1])
      -- one more client, whose calls come after that scrape: they count too
      local function late() local c = new(); chat(c); chat(c) end
      late()
      collectgarbage(); collectgarbage()
      local after = read()
      assert.equal(6, after[1])
      assert.equal(18, after[2])
      assert.equal(12, after[3])
      assert.near(6 * 22, after[4], 1e-6)
      local e = by_name((function()
        local l = {}
        for _, c in ipairs(metrics.snapshot().llm) do l[#l + 1] = { name = c.client, c = c } end
        return l
      end)(), name).c
      assert.same({ 6, 6, 30, 1 }, { e.calls, e.successes, e.total_tokens, #e.models })
      assert.equal("closed", e.models[1].breaker)   -- from the live client
      -- a model the client adds later (named by the request) counts too
      local function other_model()
        local c = new()
        assert(c:chat{ model = "m-other", messages = { { role = "user", content = "x" } } })
      end
      other_model()
      collectgarbage(); collectgarbage()
      local fams = parse_prometheus(metrics.prometheus())
      assert.equal(1, find_sample(fams, "breaker_llm_calls_total", { client = name, model = "m-other" }))
      -- the collected clients' breakers are gone, not handed out again half-freed
      local fresh = new()
      chat(fresh)
      assert.equal(7, read()[1])
      -- unregistering takes the client's own counts out, not the collected ones
      metrics.unregister_llm(keep)
      metrics.unregister_llm(fresh)
      assert.equal(5, read()[1])
      -- a client unregistered before it is collected is not kept
      local function gone() local c = new(); chat(c); metrics.unregister_llm(c) end
      gone()
      collectgarbage(); collectgarbage()
      assert.equal(5, read()[1])
      -- another object with a stats method: its numbers as of the last snapshot
      local function stub_gone()
        metrics.register_llm({ name = name, stats = function()
          return { calls = 7, models = { m = { calls = 7, prompt_tokens = 1 } } }
        end })
        assert.equal(12, read()[1])
      end
      stub_gone()
      collectgarbage(); collectgarbage()
      assert.equal(12, read()[1])
      assert.equal(5 * 3 + 1, read()[2])
    end)

    it("includes a registered breaker.llm client's real usage against the fake upstream", function()
      local llm = require "breaker.llm"
      local up = helper.upstream.start{ api_key = "sk-test-good" }
      local client
      -- busted keeps one finally per test (the last one given): one for all.
      finally(function()
        if client then metrics.unregister_llm(client); client:close() end
        up:stop()
      end)
      client = llm.new{ base_url = up.url .. "/v1", api_key = "sk-test-good", model = "gpt-fake",
                        name = uname("llm-client"), prices = { ["gpt-fake"] = { prompt = 2, completion = 8 } },
                        policy = { retry = false } }
      metrics.register_llm(client)
      local res = assert(client:chat{ messages = { { role = "user", content = "hello there metrics" } } })
      local usage = res.usage
      local fams = parse_prometheus(metrics.prometheus())
      local L = { client = client.name, model = "gpt-fake" }
      assert.equal(usage.prompt_tokens, find_sample(fams, "breaker_llm_tokens_total",
                                                    { client = L.client, model = L.model, kind = "prompt" }))
      assert.equal(usage.completion_tokens, find_sample(fams, "breaker_llm_tokens_total",
                                                        { client = L.client, model = L.model, kind = "completion" }))
      local cost = (usage.prompt_tokens * 2 + usage.completion_tokens * 8) / 1e6
      assert.near(cost, find_sample(fams, "breaker_llm_cost_total", L), 1e-12)
      assert.equal(1, find_sample(fams, "breaker_llm_calls_total", L))
      -- the model's breaker is a breaker like any other
      local bname = llm.breaker_name(up.url .. "/v1", "gpt-fake")
      assert.equal(1, find_sample(fams, "breaker_calls_total", { breaker = bname }))
      metrics.unregister_llm(client)
      fams = parse_prometheus(metrics.prometheus())
      assert.is_nil(find_sample(fams, "breaker_llm_calls_total", L))
      client:breaker("gpt-fake"):close()
    end)
  end)

  describe("json()", function()
    it("holds the same data as prometheus(), with lists as JSON arrays", function()
      breaker.clock.freeze(100)
      local name = uname("json")
      local b = new_breaker(name, { consecutive_failures = 2, open_duration = 30 })
      b:record(assert(b:allow()), "success", 0.004)
      b:record(assert(b:allow()), "failure", 0.3)
      b:record(assert(b:allow()), "failure", 0.3)
      local text = metrics.json()
      assert.truthy(text:find('"llm":[]', 1, true))       -- an empty list is an array, not {}
      local snap = cjson.decode(text)
      assert.equal(breaker._VERSION, snap.version)
      assert.is_number(snap.time)
      assert.same(metrics.buckets(), snap.buckets)
      assert.is_table(snap.breakers)
      assert.is_table(snap.policies)
      local e = by_name(snap.breakers, name)
      assert.is_table(e)
      assert.equal("open", e.state)
      assert.equal(false, e.shared)
      assert.equal(30, e.retry_after)
      for _, k in ipairs({ "total_calls", "total_failures", "total_rejected", "calls", "failures", "generation",
                           "opened", "transitions", "consecutive_failures", "half_open_calls" }) do
        assert.is_number(e[k], k)
      end
      assert.same({ "p50", "p90", "p99", "samples" }, (function()
        local ks = {}
        for k in pairs(e.latency) do ks[#ks + 1] = k end
        table.sort(ks)
        return ks
      end)())
      assert.equal(3, e.histogram.count)
      assert.equal(#snap.buckets + 1, #e.histogram.counts)
      assert.near(0.604, e.histogram.sum, 1e-12)
      -- the breakers are sorted by name
      for i = 2, #snap.breakers do assert.is_true(snap.breakers[i - 1].name < snap.breakers[i].name) end
      -- the same numbers as the exposition
      local fams = parse_prometheus(metrics.prometheus())
      assert.equal(e.total_calls, find_sample(fams, "breaker_calls_total", { breaker = name }))
      local H = "breaker_call_duration_seconds"
      for i, le in ipairs(snap.buckets) do
        local leS = string.format("%.15g", le)
        assert.equal(e.histogram.counts[i], find_sample(fams, H, { breaker = name, le = leS }, H .. "_bucket"))
      end
    end)

    it("leaves out infinite numbers: a forced-open breaker says probe_never instead", function()
      local name = uname("forced")
      local b = new_breaker(name, {})
      b:force_open()
      local e = by_name(cjson.decode(metrics.json()).breakers, name)
      assert.equal("forced_open", e.state)
      assert.is_nil(e.retry_after)
      assert.is_true(e.probe_never)
    end)

    it("keeps the histogram's sum finite, the same number as the Prometheus text, after an infinite latency", function()
      local name = uname("inf-latency")
      local b = new_breaker(name, {})
      b:record(assert(b:allow()), "success", 0.25)
      b:record(assert(b:allow()), "failure", math.huge)
      local e = by_name(cjson.decode(metrics.json()).breakers, name)
      assert.equal(0.25, e.histogram.sum)
      assert.equal(2, e.histogram.count)
      assert.equal(2, e.histogram.counts[#e.histogram.counts])   -- +Inf
      assert.equal(1, e.histogram.counts[#e.histogram.counts - 1])
      local fams = parse_prometheus(metrics.prometheus())
      local H = "breaker_call_duration_seconds"
      assert.equal(0.25, find_sample(fams, H, { breaker = name }, H .. "_sum"))
      assert.equal(2, find_sample(fams, H, { breaker = name }, H .. "_count"))
    end)

    it("escapes strings so that any breaker name round-trips", function()
      local name = uname("q\"\\\1\n\tÿ")
      new_breaker(name, {})
      assert.is_table(by_name(cjson.decode(metrics.json()).breakers, name))
    end)
  end)

  describe("configure()", function()
    it("raises on bad options", function()
      assert.has_error(function() metrics.configure{ nope = 1 } end, "breaker.metrics.configure: unknown option 'nope'")
      assert.has_error(function() metrics.configure{ buckets = { 1, 0.5 } } end)
      assert.has_error(function() metrics.configure{ buckets = {} } end)
      assert.has_error(function() metrics.configure{ buckets = { 0.1, math.huge } } end)
      assert.has_error(function() metrics.configure{ shared_dict = "metrics" } end,
        "breaker.metrics.configure: no lua_shared_dict named 'metrics' (add `lua_shared_dict metrics 1m;` "
        .. "to the http block)")
    end)

    it("never reads a shared dict's histogram counts kept under other buckets (a reload that changed them)", function()
      -- a lua_shared_dict stand-in: it outlives a reload, as the real one does
      local store = {}
      local D = {}
      function D.incr(_, k, by, init) store[k] = (store[k] or init) + by; return store[k] end
      function D.get(_, k) return store[k] end
      function D.get_keys() local t = {} for k in pairs(store) do t[#t + 1] = k end return t end
      function D.delete(_, k) store[k] = nil end
      local saved = rawget(_G, "ngx")
      rawset(_G, "ngx", { shared = { spec_metrics = D } })
      finally(function()
        metrics.configure{ shared_dict = false, buckets = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                             10, 30, 60, 120 } }
        rawset(_G, "ngx", saved)
      end)
      local name = uname("reload")
      local H = "breaker_call_duration_seconds"
      local function hist()
        local out = {}
        for _, smp in ipairs(parse_prometheus(metrics.prometheus())[H].samples) do
          if smp.labels.breaker == name then
            out[#out + 1] = smp.name:sub(#H + 2) .. (smp.labels.le and ("{" .. smp.labels.le .. "}") or "")
                            .. "=" .. smp.value
          end
        end
        return table.concat(out, " ")
      end
      metrics.configure{ shared_dict = "spec_metrics", buckets = { 0.1, 1, 10 } }
      local b = new_breaker(name, {})
      for _ = 1, 4 do b:record(assert(b:allow()), "success", 5) end
      assert.equal("bucket{0.1}=0 bucket{1}=0 bucket{10}=4 bucket{+Inf}=4 sum=20 count=4", hist())
      -- the reload: other bounds, the same dict; the four 5 s calls are not in the 0.5 s bucket
      metrics.configure{ shared_dict = "spec_metrics", buckets = { 0.05, 0.1, 0.5, 1, 2 } }
      assert.equal("bucket{0.05}=0 bucket{0.1}=0 bucket{0.5}=0 bucket{1}=0 bucket{2}=0 bucket{+Inf}=0 sum=0 count=0",
                   hist())
      b:record(assert(b:allow()), "success", 0.3)
      assert.equal("bucket{0.05}=0 bucket{0.1}=0 bucket{0.5}=1 bucket{1}=1 bucket{2}=1 bucket{+Inf}=1 sum=0.3 count=1",
                   hist())
      -- a reload with the buckets unchanged keeps counting where it was
      metrics.configure{ shared_dict = "spec_metrics", buckets = { 0.1, 1, 10 } }
      b:record(assert(b:allow()), "success", 0.5)
      assert.equal("bucket{0.1}=0 bucket{1}=1 bucket{10}=5 bucket{+Inf}=5 sum=20.5 count=5", hist())
      -- reset() forgets every bounds' counts
      metrics.reset()
      local left = 0
      for k in pairs(store) do if k:sub(1, 3) == "bh\0" then left = left + 1 end end
      assert.equal(0, left)
    end)
  end)

  describe("dashboard", function()
    it("renders one self-contained page: nothing fetched from elsewhere, options escaped", function()
      local html = dashboard.render{ json_url = "/x/metrics.json?a=1&b=\"2\"", refresh = 0.5, title = "<b>ops</b>" }
      assert.truthy(html:find('data-json-url="/x/metrics.json?a=1&amp;b=&quot;2&quot;"', 1, true))
      assert.truthy(html:find('data-refresh="0.5"', 1, true))
      assert.truthy(html:find("<title>&lt;b&gt;ops&lt;/b&gt;</title>", 1, true))
      assert.falsy(html:find("{{", 1, true))
      -- the only URL in the page is the SVG namespace: no script, style, font or image from elsewhere
      for url in html:gmatch("https?://[^\"'%s)]+") do assert.equal("http://www.w3.org/2000/svg", url) end
      assert.falsy(html:find("<script src", 1, true))
      assert.falsy(html:find("<link", 1, true))
      assert.falsy(html:find("@import", 1, true))
      assert.has_error(function() dashboard.render{ refresh = 0 } end)
    end)

    it("routes URIs by their last segment", function()
      assert.equal("prometheus", metrics._route("/breaker/metrics"))
      assert.equal("json", metrics._route("/breaker/metrics.json"))
      assert.equal("dashboard", metrics._route("/breaker/"))
      assert.equal("dashboard", metrics._route("/dashboard"))
      assert.is_nil(metrics._route("/breaker/other"))
      assert.has_error(function() metrics.handler() end, "breaker.metrics.handler: runs inside nginx (content_by_lua)")
    end)
  end)

  describe("handler in nginx", function()
    local up, ngx_srv
    local repo = helper.repo_dir()

    local function render(port, prefix)
      return ([[
load_module /usr/share/nginx/modules/ndk_http_module.so;
load_module /usr/share/nginx/modules/ngx_http_lua_module.so;
worker_processes 2;
pid %s/logs/nginx.pid;
error_log %s/logs/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path %s/tmp/client_body;
  proxy_temp_path %s/tmp/proxy;
  fastcgi_temp_path %s/tmp/fastcgi;
  uwsgi_temp_path %s/tmp/uwsgi;
  scgi_temp_path %s/tmp/scgi;
  lua_package_path "%s/lua/?.lua;%s/lua/?/init.lua;/usr/share/lua/5.1/?.lua;;";
  lua_package_cpath "%s/build/?.so;;";
  lua_shared_dict breaker_metrics 1m;
  init_by_lua_block {
    local breaker = require "breaker"
    local region = require("breaker.shared").new("metrics-spec", { capacity = 8 })
    -- the registry holds breakers weakly: the app keeps its own reference
    package.loaded.app = {
      b = breaker.new("upstream", { consecutive_failures = 3, open_duration = 60 }, { shared = region }),
    }
    local m = require "breaker.metrics"
    m.configure{ shared_dict = "breaker_metrics" }
  }
  server {
    listen 127.0.0.1:%d;
    location = /call {
      content_by_lua_block {
        local b = require("app").b
        local res = ngx.location.capture("/up/")
        local permit = b:allow()
        if permit then b:record(permit, res.status == 200 and "success" or "failure", 0.01 * (ngx.var.arg_ms or 1)) end
        ngx.say(ngx.worker.id())
      }
    }
    location /up/ {
      internal;
      rewrite ^ /v1/models break;
      proxy_pass %s;
      proxy_set_header authorization "Bearer sk-test-good";
      proxy_set_header x-fake-fault $fault;
    }
    location /breaker/ {
      content_by_lua_block { require("breaker.metrics").handler() }
    }
    location = /prom {
      content_by_lua_block { require("breaker.metrics").handler{ serve = "prometheus" } }
    }
  }
  # a subrequest's $request_uri is the main request's
  map $request_uri $fault { ~fail=1 "fault=500"; default ""; }
}
]]):format(prefix, prefix, prefix, prefix, prefix, prefix, prefix, repo, repo, repo, port, up.url)
    end

    lazy_setup(function()
      up = helper.upstream.start{ api_key = "sk-test-good" }
      ngx_srv = helper.nginx.start{ render = render, name = "metrics", workers = 2 }
    end)
    lazy_teardown(function()
      if ngx_srv then ngx_srv:stop() end
      if up then up:stop() end
    end)

    it("serves Prometheus, JSON and the dashboard; 404 and 405 otherwise", function()
      local code, h, body = ngx_srv:request("GET", "/breaker/metrics")
      local _
      assert.equal(200, code)
      assert.equal("text/plain; version=0.0.4; charset=utf-8", h["content-type"])
      assert.equal("no-store", h["cache-control"])
      parse_prometheus(body)
      code, h, body = ngx_srv:request("GET", "/breaker/metrics.json")
      assert.equal(200, code)
      assert.equal("application/json", h["content-type"])
      local snap = cjson.decode(body)
      assert.equal("breaker_metrics", snap.shared_dict)
      assert.equal(2, snap.worker.count)
      code, h, body = ngx_srv:request("GET", "/breaker/")
      assert.equal(200, code)
      assert.equal("text/html; charset=utf-8", h["content-type"])
      assert.matches("default%-src 'none'", h["content-security-policy"])
      assert.truthy(body:find('data-json-url="metrics.json"', 1, true))
      code, _, body = ngx_srv:request("GET", "/prom")
      assert.equal(200, code)
      assert.truthy(body:find("# TYPE breaker_state gauge", 1, true))
      assert.equal(404, (ngx_srv:request("GET", "/breaker/nothing")))
      code, h = ngx_srv:request("POST", "/breaker/metrics", nil, "x")
      assert.equal(405, code)
      assert.equal("GET, HEAD", h["allow"])
    end)

    it("adds up the histogram of every worker in the shared dict and shows the shared state", function()
      local workers = {}
      local N = 40
      for i = 1, N do
        local code, _, body = ngx_srv:request("GET", "/call?ms=" .. (i % 2 == 0 and 3 or 30))
        assert.equal(200, code)
        workers[body:match("%d+")] = true
      end
      local fams = parse_prometheus(select(3, ngx_srv:request("GET", "/breaker/metrics")))
      local H = "breaker_call_duration_seconds"
      assert.equal(N, find_sample(fams, H, { breaker = "upstream" }, H .. "_count"))
      assert.equal(N / 2, find_sample(fams, H, { breaker = "upstream", le = "0.05" }, H .. "_bucket"))
      assert.equal(N, find_sample(fams, H, { breaker = "upstream", le = "0.5" }, H .. "_bucket"))
      assert.equal(N, find_sample(fams, "breaker_calls_total", { breaker = "upstream" }))
      -- three failures through whichever workers: the region's state is open for all
      for _ = 1, 3 do ngx_srv:request("GET", "/call?fail=1") end
      for _ = 1, 6 do
        local snap = cjson.decode(select(3, ngx_srv:request("GET", "/breaker/metrics.json")))
        local e = by_name(snap.breakers, "upstream")
        assert.equal("open", e.state)
        assert.is_true(e.shared)
        assert.equal(3, e.total_failures)
      end
      -- (both workers took part unless the kernel sent every connection to one)
      assert.is_true(next(workers) ~= nil)
    end)
  end)
end)
