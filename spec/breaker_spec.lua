-- Specs for the breaker core (src/breaker.c) through the Lua facade. They run
-- three times: LuaJIT with FFI, LuaJIT with the classic binding
-- (BREAKER_NO_FFI=1) and plain Lua 5.1, so they use nothing LuaJIT-only.
local breaker = require "breaker"
local clock = breaker.clock

local seq = 0
local function name()
  seq = seq + 1
  return "spec-" .. seq
end

-- Records n outcomes through allow/record.
local function feed(b, n, outcome, latency)
  for _ = 1, n do
    local p = assert(b:allow())
    b:record(p, outcome, latency or 0.01)
  end
end

-- The specs-only brk_debug_count (LuaJIT's FFI; nil under plain Lua):
-- counts n outcomes into b's window at once, as n calls would. what: 0
-- success, 1 failure (time window only), 2 ignored, 3 rejected, 4 late.
local debug_count
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, "int brk_debug_count(void *b, int what, uint64_t n);")
    local lib = ffi.load(package.searchpath("breaker.core", package.cpath))
    debug_count = function(b, what, n)
      assert(lib.brk_debug_count(b._ud:pointer(), what, n) == 0, "brk_debug_count refused")
    end
  end
end
local it_ffi = debug_count and it or pending

local function transitions_of(b)
  local seen = {}
  b:on_state_change(function(n, from, to, reason)
    seen[#seen + 1] = { name = n, from = from, to = to, reason = reason }
  end)
  return seen
end

describe("breaker", function()
  before_each(function() clock.freeze(1000) end)
  after_each(function() clock.unfreeze() end)

  describe("config", function()
    it("has documented defaults", function()
      local d = breaker.defaults()
      assert.same({
        window_type = "count", window_size = 20, window_buckets = 10, minimum_calls = 10,
        failure_rate_threshold = 50, slow_call_rate_threshold = false, slow_call_duration = 60,
        consecutive_failures = 5, half_open_calls = 3, open_duration = 30,
        open_duration_factor = 1, open_duration_max = 600, open_duration_jitter = 0,
        probe_timeout = 120,
      }, d)
    end)

    it("fills a time window's size in seconds", function()
      local c = breaker.new(name(), { window_type = "time" }):config()
      assert.equal("time", c.window_type)
      assert.equal(60, c.window_size)
      assert.equal(10, c.window_buckets)
    end)

    local bad = {
      { { colour = "red" }, "unknown key 'colour'" },
      { { window_size = 0 }, "window_size" },
      { { window_size = "10" }, "'window_size' %(expected an integer" },
      { { window_size = 2.5 }, "window_size" },
      { { window_type = "sliding" }, "window_type" },
      { { failure_rate_threshold = 101 }, "failure_rate_threshold" },
      { { failure_rate_threshold = 0 }, "failure_rate_threshold" },
      { { failure_rate_threshold = -5 }, "failure_rate_threshold" },
      { { slow_call_rate_threshold = 150 }, "slow_call_rate_threshold" },
      { { slow_call_duration = -1 }, "slow_call_duration" },
      { { slow_call_duration = 0 }, "slow_call_duration" },
      { { open_duration = -1 }, "open_duration" },
      { { open_duration = 0 / 0 }, "open_duration" },
      { { open_duration_factor = 0.5 }, "open_duration_factor" },
      { { open_duration = 60, open_duration_max = 10 }, "open_duration_max" },
      { { open_duration_jitter = 1 }, "open_duration_jitter" },
      { { half_open_calls = 0 }, "half_open_calls" },
      { { minimum_calls = 50, window_size = 10 }, "minimum_calls" },
      { { minimum_calls = -1 }, "minimum_calls" },
      { { consecutive_failures = "five" }, "consecutive_failures" },
      { { probe_timeout = 0 }, "probe_timeout" },
      { { probe_timeout = 1e10 }, "probe_timeout" },
      { { open_duration = 2e9, open_duration_max = 3e9 }, "open_duration" },
      { { slow_call_duration = math.huge }, "slow_call_duration" },
      { { open_duration_factor = 1e6 }, "open_duration_factor" },
      { { window_type = "time", window_size = 1, window_buckets = 2000 }, "window_buckets" },
      { { on_state_change = "print" }, "on_state_change" },
      { { [1] = 5 }, "keys must be strings" },
    }
    for _, case in ipairs(bad) do
      it("rejects " .. case[2]:gsub("%%", ""), function()
        local ok, err = pcall(breaker.new, name(), case[1])
        assert.is_false(ok)
        assert.matches(case[2], err)
      end)
    end

    it("names the caller's line in a config error", function()
      local ok, err = pcall(function() breaker.new(name(), { window_size = 0 }) end)
      assert.is_false(ok)
      assert.matches("breaker_spec.lua", err)
    end)

    it("rejects a bad name and a non-table config", function()
      assert.has_error(function() breaker.new("", {}) end)
      assert.has_error(function() breaker.new(nil, {}) end)
      assert.has_error(function() breaker.new(name(), 5) end)
    end)

    it("accepts false to turn a rule off", function()
      local b = breaker.new(name(), { failure_rate_threshold = false, consecutive_failures = false,
                                      window_size = 4, minimum_calls = 1 })
      feed(b, 20, "failure")
      assert.equal("closed", b:state())
      assert.equal(4, b:stats().failures)
    end)

    it("validate() returns the filled config and raises like new", function()
      assert.equal(7, breaker.validate({ half_open_calls = 7 }).half_open_calls)
      assert.has_error(function() breaker.validate({ nope = 1 }) end)
    end)
  end)

  describe("registry", function()
    it("get returns the same object for a name", function()
      local n = name()
      local b = breaker.new(n)
      assert.equal(b, breaker.get(n))
      assert.is_nil(breaker.get(name()))
    end)

    it("refuses a second breaker of the same name", function()
      local n = name()
      local _b = breaker.new(n)
      assert.has_error(function() breaker.new(n) end)
      assert.truthy(_b)
    end)

    it("holds thousands of named breakers", function()
      local keep = {}
      for i = 1, 5000 do keep[i] = breaker.new("many-" .. i, { window_size = 10 }) end
      for i = 1, 5000, 97 do
        assert.equal(keep[i], breaker.get("many-" .. i))
        feed(keep[i], 5, "failure")
        assert.equal("open", keep[i]:state())
      end
      assert.equal("closed", keep[2]:state())
      local n = 0
      for k in breaker.each() do if k:match("^many%-") then n = n + 1 end end
      assert.equal(5000, n)
      for i = 1, 5000 do keep[i]:close() end
    end)

    it("lets the GC collect an unreferenced breaker and its C block", function()
      local weak = setmetatable({}, { __mode = "v" })
      local n = name()
      do
        local b = breaker.new(n)
        feed(b, 3, "success")
        weak[1] = b
      end
      collectgarbage(); collectgarbage()
      assert.is_nil(weak[1])
      assert.is_nil(breaker.get(n))
      -- the name is free again
      assert.truthy(breaker.new(n))
    end)

    it("close() is idempotent and later use raises", function()
      local n = name()
      local b = breaker.new(n)
      b:close()
      b:close()
      assert.is_nil(breaker.get(n))
      assert.has_error(function() b:allow() end, nil)
      assert.matches("closed", tostring(b))
    end)
  end)

  describe("count window", function()
    it("trips on the failure rate once minimum_calls is reached", function()
      local b = breaker.new(name(), { window_size = 10, minimum_calls = 10, consecutive_failures = false })
      local seen = transitions_of(b)
      feed(b, 4, "success")
      feed(b, 5, "failure")
      assert.equal("closed", b:state())       -- 9 calls < minimum_calls
      assert.equal(9, b:stats().calls)
      assert.is_nil(b:stats().failure_rate)   -- no rate below minimum_calls
      feed(b, 1, "success")                    -- 10th call: 5/10 = 50 %
      assert.equal("open", b:state())
      assert.same({ name = b.name, from = "closed", to = "open", reason = "failure_rate" }, seen[1])
    end)

    it("stays closed just under the threshold", function()
      local b = breaker.new(name(), { window_size = 10, minimum_calls = 10, consecutive_failures = false,
                                      failure_rate_threshold = 50 })
      feed(b, 6, "success")
      feed(b, 4, "failure")
      assert.equal("closed", b:state())
      assert.equal(40, b:stats().failure_rate)
    end)

    it("forgets outcomes that slide out of the window", function()
      local b = breaker.new(name(), { window_size = 4, minimum_calls = 4, consecutive_failures = false,
                                      failure_rate_threshold = 75 })
      feed(b, 2, "failure")
      feed(b, 2, "success")       -- 2/4 = 50 %
      feed(b, 2, "success")       -- the two failures slid out
      local st = b:stats()
      assert.equal(4, st.calls)
      assert.equal(0, st.failures)
      feed(b, 2, "failure")       -- 2/4
      assert.equal("closed", b:state())
      feed(b, 1, "failure")       -- 3/4 = 75 %
      assert.equal("open", b:state())
    end)

    it("does not count ignored outcomes in the rules", function()
      local b = breaker.new(name(), { window_size = 4, minimum_calls = 2, consecutive_failures = 2,
                                      failure_rate_threshold = 60 })
      feed(b, 1, "failure")
      feed(b, 10, "ignored")
      feed(b, 1, "success")
      local st = b:stats()
      assert.equal(2, st.calls)
      assert.equal(10, st.ignored)
      assert.equal("closed", b:state())
    end)

    it("trips on consecutive failures without minimum_calls", function()
      local b = breaker.new(name(), { window_size = 100, minimum_calls = 100, consecutive_failures = 3 })
      local seen = transitions_of(b)
      feed(b, 2, "failure")
      feed(b, 1, "success")   -- breaks the run
      feed(b, 2, "failure")
      assert.equal("closed", b:state())
      assert.equal(2, b:stats().consecutive_failures)
      feed(b, 1, "failure")
      assert.equal("open", b:state())
      assert.equal("consecutive_failures", seen[1].reason)
    end)

    it("trips on the slow-call rate; slow means latency >= slow_call_duration", function()
      local b = breaker.new(name(), { window_size = 4, minimum_calls = 4, slow_call_duration = 2,
                                      slow_call_rate_threshold = 50 })
      local seen = transitions_of(b)
      feed(b, 2, "success", 0.5)
      feed(b, 1, "success", 1.999)
      feed(b, 1, "success", 2)      -- exactly the duration: slow; 1/4
      assert.equal(1, b:stats().slow)
      assert.equal("closed", b:state())
      feed(b, 1, "success", 3)      -- 2/4 = 50 %
      assert.equal("open", b:state())
      assert.equal("slow_call_rate", seen[1].reason)
    end)
  end)

  describe("time window", function()
    local cfg = { window_type = "time", window_size = 10, window_buckets = 10,
                  minimum_calls = 4, consecutive_failures = false, failure_rate_threshold = 50 }

    it("counts outcomes of the last window_size seconds only", function()
      local b = breaker.new(name(), { window_type = "time", window_size = 10, minimum_calls = 4,
                                      consecutive_failures = false, failure_rate_threshold = 80 })
      feed(b, 3, "failure")
      clock.advance(5)
      feed(b, 3, "success")
      assert.equal(6, b:stats().calls)
      clock.advance(5)            -- the failures' bucket (t=1000) has rolled out
      local st = b:stats()
      assert.equal(3, st.calls)
      assert.equal(0, st.failures)
      assert.equal("closed", b:state())
    end)

    it("rolls over at exact bucket boundaries", function()
      local b = breaker.new(name(), cfg)
      clock.freeze(2000.999)
      feed(b, 2, "failure")        -- bucket 2000
      clock.freeze(2001.0)
      feed(b, 1, "failure")        -- bucket 2001
      clock.freeze(2009.999)
      assert.equal(3, b:stats().calls)   -- window = buckets 2000..2009
      clock.freeze(2010.0)
      assert.equal(1, b:stats().calls)   -- window = 2001..2010: bucket 2000 out
      clock.freeze(2011.0)
      assert.equal(0, b:stats().calls)
    end)

    it("trips on the failure rate inside the window", function()
      local b = breaker.new(name(), cfg)
      feed(b, 2, "success")
      clock.advance(3)
      feed(b, 1, "failure")
      assert.equal("closed", b:state())   -- 3 calls < 4
      clock.advance(3)
      feed(b, 1, "failure")               -- 2/4
      assert.equal("open", b:state())
    end)

    it("trips once old buckets left, whoever moved the window (stats, an ignored result)", function()
      for _, between in ipairs({ "nothing", "stats", "ignored" }) do
        clock.freeze(1000)
        local b = breaker.new(name(), { window_type = "time", window_size = 10, window_buckets = 10,
                                        minimum_calls = 5, failure_rate_threshold = 50,
                                        consecutive_failures = false })
        local seen = transitions_of(b)
        feed(b, 100, "success")
        clock.advance(5)
        feed(b, 20, "failure")              -- 20 of 120: closed
        assert.equal("closed", b:state())
        clock.advance(5.5)                  -- the successes' bucket has left: 20 of 20
        if between == "stats" then
          assert.equal(20, b:stats().calls)
        elseif between == "ignored" then
          b:record(assert(b:allow()), "ignored", 0.01)
        end
        b:record(assert(b:allow()), "success", 0.01)
        assert.equal("open", b:state(), "with " .. between .. " in between")
        assert.equal("failure_rate", seen[1].reason)
        b:close()
      end
    end)

    it("clears everything after a long gap", function()
      local b = breaker.new(name(), cfg)
      feed(b, 3, "failure")
      clock.advance(1e6)
      assert.equal(0, b:stats().calls)
      feed(b, 1, "failure")
      assert.equal(1, b:stats().calls)
    end)

    it_ffi("counts past 2^32 calls in the window without wrapping", function()
      -- 32-bit totals wrapped here: calls 5 beside failures 10, a failure
      -- rate of 200 % and a false trip
      local b = breaker.new(name(), { window_type = "time", window_size = 86400, window_buckets = 1,
                                      minimum_calls = 1, consecutive_failures = false })
      debug_count(b, 0, 2^32 - 5)
      feed(b, 10, "failure")
      local st = b:stats()
      assert.equal("closed", b:state())
      assert.equal(2^32 + 5, st.calls)
      assert.equal(10, st.failures)
      assert.equal(2^32 - 5, st.successes)
      assert.is_true(st.failure_rate < 1e-6)
      assert.equal(2^32 + 5, st.total_calls)
      -- the bucket leaves the window with all of it
      clock.advance(86400)
      st = b:stats()
      assert.equal(0, st.calls)
      assert.equal(0, st.failures)
      feed(b, 1, "success")
      assert.equal(1, b:stats().calls)
    end)

    it_ffi("stops a bucket's stats-only counts at 2^32 - 1, and its total with it", function()
      local b = breaker.new(name(), cfg)
      b:force_open()
      debug_count(b, 3, 2^32 + 10)
      assert.is_nil(b:allow())
      assert.equal(2^32 - 1, b:stats().rejected)
      clock.advance(1)                      -- another bucket counts again
      debug_count(b, 3, 5)
      assert.is_nil(b:allow())
      assert.equal(2^32 + 5, b:stats().rejected)
      clock.advance(9)                      -- the first bucket has left
      assert.equal(6, b:stats().rejected)
      clock.advance(1)
      assert.equal(0, b:stats().rejected)
    end)

    it("keeps rejected and ignored counts per bucket", function()
      local b = breaker.new(name(), cfg)
      feed(b, 2, "ignored")
      b:force_open()
      assert.is_nil(b:allow())
      local st = b:stats()
      assert.equal(2, st.ignored)
      assert.equal(1, st.rejected)
      clock.advance(11)
      st = b:stats()
      assert.equal(0, st.ignored)
      assert.equal(0, st.rejected)
    end)
  end)

  describe("open", function()
    it_ffi("counts rejections past 2^32 while forced open (count window)", function()
      local b = breaker.new(name())
      b:force_open()
      debug_count(b, 3, 2^32 - 1)
      assert.is_nil(b:allow())
      assert.equal(2^32, b:stats().rejected)
    end)

    it("rejects at once with retry_after, without calling fn", function()
      local b = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 30 })
      feed(b, 2, "failure")
      clock.advance(10)
      local called = false
      local res, err = b:call(function() called = true end)
      assert.is_nil(res)
      assert.is_false(called)
      assert.equal("breaker_open", err.kind)
      assert.equal("open", err.state)
      assert.equal(b.name, err.breaker)
      assert.near(20, err.retry_after, 1e-6)
      assert.matches("breaker_open", tostring(err))
      local p, e2 = b:allow()
      assert.is_nil(p)
      assert.near(20, e2.retry_after, 1e-6)
      assert.equal(2, b:stats().rejected)
    end)

    it("moves to half_open when the open duration ran out", function()
      local b = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 30 })
      local seen = transitions_of(b)
      feed(b, 2, "failure")
      clock.advance(29.99)
      assert.is_nil(b:allow())
      clock.advance(0.01)
      assert.truthy(b:allow())
      assert.equal("half_open", b:state())
      assert.same({ name = b.name, from = "open", to = "half_open", reason = "open_elapsed" }, seen[2])
    end)

    it("escalates the open duration on consecutive re-opens, up to the cap", function()
      local b = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 10,
                                      open_duration_factor = 2, open_duration_max = 35,
                                      half_open_calls = 1 })
      feed(b, 2, "failure")
      local durations = { b:stats().open_duration }
      for _ = 1, 4 do
        clock.advance(durations[#durations])
        local p = assert(b:allow())          -- probe
        b:record(p, "failure", 0.1)          -- re-open
        durations[#durations + 1] = b:stats().open_duration
      end
      assert.same({ 10, 20, 35, 35, 35 }, durations)
      assert.equal(4, b:stats().reopen_level)
      -- closing resets the escalation
      clock.advance(35)
      b:record(assert(b:allow()), "success", 0.1)
      assert.equal("closed", b:state())
      feed(b, 2, "failure")
      assert.equal(10, b:stats().open_duration)
    end)

    it("keeps an escalated duration finite and capped after very many re-opens", function()
      -- factor^level overflows to inf after about 100 re-opens at factor 1000:
      -- open_duration 0 must stay 0 (not 0 * inf = NaN), any other one the cap
      for _, c in ipairs({ { od = 0, want = 0 }, { od = 1, want = 10 } }) do
        local b = breaker.new(name(), { open_duration = c.od, open_duration_factor = 1000,
                                        open_duration_max = 10, consecutive_failures = 1,
                                        half_open_calls = 1 })
        feed(b, 1, "failure")
        for i = 1, 150 do
          clock.advance(c.od == 0 and 0 or 10)
          local p, err = b:allow()
          assert.truthy(p, "re-open " .. i .. ": rejected, retry_after "
                           .. tostring(err and err.retry_after))
          b:record(p, "failure", 0)
        end
        local st = b:stats()
        assert.equal(150, st.reopen_level)
        assert.equal(c.want, st.open_duration)
        assert.equal("open", b:state())
      end
    end)

    it("adds jitter within the configured fraction", function()
      local seen = {}
      for _ = 1, 40 do
        local b = breaker.new(name(), { window_size = 1, minimum_calls = 1, open_duration = 100,
                                        open_duration_jitter = 0.2 })
        feed(b, 1, "failure")
        local d = b:stats().open_duration
        assert.is_true(d >= 80 and d <= 120, "duration " .. d)
        seen[string.format("%.3f", d)] = true
        b:close()
      end
      local distinct = 0
      for _ in pairs(seen) do distinct = distinct + 1 end
      assert.is_true(distinct > 5)
    end)

    it("is stretched by a caller-given retry-after", function()
      local b = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 5 })
      feed(b, 1, "failure")
      b:record(assert(b:allow()), "failure", 0.1, 120)   -- e.g. a 429's Retry-After: 120
      assert.equal("open", b:state())
      local _, err = b:allow()
      assert.near(120, err.retry_after, 1e-6)
      -- a shorter retry-after never shortens the configured duration
      local b2 = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 30 })
      feed(b2, 1, "failure")
      b2:record(assert(b2:allow()), "failure", 0.1, 2)
      assert.equal(30, b2:stats().open_duration)
      -- and a huge one holds it open an hour at most
      local b3 = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 5 })
      feed(b3, 1, "failure")
      b3:record(assert(b3:allow()), "failure", 0.1, 2147483647)
      local _, e3 = b3:allow()
      assert.near(3600, e3.retry_after, 1e-6)
    end)
  end)

  describe("half_open", function()
    local function opened(cfg)
      cfg.window_size, cfg.minimum_calls = 2, 2
      cfg.open_duration = cfg.open_duration or 10
      local b = breaker.new(name(), cfg)
      feed(b, 2, "failure")
      clock.advance(cfg.open_duration)
      return b
    end

    it("admits exactly half_open_calls probes when callers race", function()
      local b = opened({ half_open_calls = 3 })
      -- many callers ask before any result comes back
      local permits, rejected = {}, 0
      for _ = 1, 50 do
        local p, err = b:allow()
        if p then permits[#permits + 1] = p else
          rejected = rejected + 1
          assert.equal("half_open", err.state)
        end
      end
      assert.equal(3, #permits)
      assert.equal(47, rejected)
      local st = b:stats()
      assert.equal(3, st.half_open_granted)
    end)

    it("admits exactly N probes from interleaved coroutines", function()
      local b = opened({ half_open_calls = 4 })
      local granted, cos = 0, {}
      for i = 1, 20 do
        cos[i] = coroutine.create(function()
          local p = b:allow()
          coroutine.yield()
          if p then granted = granted + 1; b:record(p, "success", 0.01) end
        end)
      end
      for i = 1, 20 do coroutine.resume(cos[i]) end   -- all ask first
      for i = 1, 20 do coroutine.resume(cos[i]) end   -- then all answer
      assert.equal(4, granted)
      assert.equal("closed", b:state())
    end)

    it("closes after half_open_calls successes", function()
      local b = opened({ half_open_calls = 2 })
      local seen = transitions_of(b)
      local p1, p2 = b:allow(), b:allow()
      b:record(p1, "success", 0.01)
      assert.equal("half_open", b:state())
      b:record(p2, "success", 0.01)
      assert.equal("closed", b:state())
      assert.same({ name = b.name, from = "half_open", to = "closed", reason = "probes_succeeded" },
                  seen[#seen])
      assert.equal(0, b:stats().calls)   -- a fresh window
    end)

    it("re-opens on one failed probe", function()
      local b = opened({ half_open_calls = 3 })
      local seen = transitions_of(b)
      local p1, p2 = b:allow(), b:allow()
      b:record(p1, "success", 0.01)
      b:record(p2, "failure", 0.01)
      assert.equal("open", b:state())
      assert.equal("probe_failed", seen[#seen].reason)
    end)

    it("re-opens on a slow probe when the slow rule is on", function()
      local b = opened({ half_open_calls = 1, slow_call_duration = 1, slow_call_rate_threshold = 50 })
      b:record(b:allow(), "success", 5)
      assert.equal("open", b:state())
    end)

    it("hands back the permit of an ignored probe", function()
      local b = opened({ half_open_calls = 1 })
      local p = b:allow()
      assert.is_nil(b:allow())
      b:record(p, "ignored", 0.01)
      assert.truthy(b:allow())
    end)

    it("expires probes whose results never come back", function()
      local b = opened({ half_open_calls = 1, probe_timeout = 60 })
      local seen = transitions_of(b)
      local lost = b:allow()       -- its caller crashed
      assert.truthy(lost)
      clock.advance(59)
      assert.is_nil(b:allow())
      clock.advance(1)
      local p = b:allow()
      assert.truthy(p)
      assert.equal("probe_expired", seen[#seen].reason)
      b:record(lost, "failure", 0.01)        -- the lost one is late now
      assert.equal("half_open", b:state())
      b:record(p, "success", 0.01)
      assert.equal("closed", b:state())
    end)
  end)

  describe("generations", function()
    it("a result from an earlier state never moves the state", function()
      local b = breaker.new(name(), { window_size = 2, minimum_calls = 2, open_duration = 10,
                                      half_open_calls = 1 })
      local old = {}
      for i = 1, 5 do old[i] = b:allow() end   -- in flight while closed
      b:record(old[1], "failure", 0.01)
      b:record(old[2], "failure", 0.01)
      assert.equal("open", b:state())
      local gen = b:stats().generation
      clock.advance(10)
      local probe = b:allow()
      b:record(old[3], "failure", 0.01)        -- late: must not re-open
      assert.equal("half_open", b:state())
      b:record(probe, "success", 0.01)
      assert.equal("closed", b:state())
      b:record(old[4], "failure", 0.01)        -- late in the new closed state
      b:record(old[5], "failure", 0.01)
      assert.equal("closed", b:state())
      local st = b:stats()
      assert.equal(0, st.calls)
      assert.equal(2, st.late)
      assert.is_true(st.generation > gen)
    end)

    it("only a probe permit's result counts while half-open", function()
      -- A closed permit of the half-open generation can only come from a
      -- reader that saw the generation and the state out of order; it must
      -- neither close nor re-open the breaker.
      local b = breaker.new(name(), { window_size = 1, minimum_calls = 1, open_duration = 5,
                                      half_open_calls = 1 })
      b:record(b:allow(), "failure", 0.01)
      clock.advance(5)
      local probe = b:allow()
      assert.equal("half_open", b:state())
      local forged = b:stats().generation * 4 + 1
      b:record(forged, "success", 0.01)
      b:record(forged, "failure", 0.01)
      assert.equal("half_open", b:state())
      assert.equal(2, b:stats().late)
      b:record(probe, "success", 0.01)
      assert.equal("closed", b:state())
    end)
  end)

  describe("operator calls", function()
    it("force_open rejects everything until reset", function()
      local b = breaker.new(name())
      local seen = transitions_of(b)
      b:force_open()
      assert.equal("forced_open", b:state())
      local _, err = b:allow()
      assert.equal("forced_open", err.state)
      assert.equal(math.huge, err.retry_after)
      clock.advance(1e5)
      assert.is_nil(b:allow())
      b:reset()
      assert.equal("closed", b:state())
      assert.truthy(b:allow())
      assert.equal("forced_open", seen[1].reason)
      assert.equal("reset", seen[2].reason)
    end)

    it("disable admits everything and still records", function()
      local b = breaker.new(name(), { window_size = 4, minimum_calls = 1 })
      b:disable()
      feed(b, 20, "failure")
      assert.equal("disabled", b:state())
      local st = b:stats()
      assert.equal(4, st.failures)
      assert.equal(20, st.total_failures)
      b:reset()
      assert.equal("closed", b:state())
      assert.equal(0, b:stats().calls)
    end)
  end)

  describe("call", function()
    it("returns fn's results and records a success", function()
      local b = breaker.new(name())
      local a, c, d = b:call(function(x, y) return x + y, "two", nil end, 1, 2)
      assert.equal(3, a)
      assert.equal("two", c)
      assert.is_nil(d)
      assert.equal(1, b:stats().successes)
    end)

    it("turns a raised error into nil, err and a failure", function()
      local b = breaker.new(name())
      local res, err = b:call(function() error({ code = 7 }) end)
      assert.is_nil(res)
      assert.equal("error", err.kind)
      assert.equal(7, err.cause.code)
      assert.equal(1, b:stats().failures)
    end)

    it("counts a nil, err return as a failure and passes it through", function()
      local b = breaker.new(name())
      local res, err = b:call(function() return nil, "upstream down" end)
      assert.is_nil(res)
      assert.equal("upstream down", err)
      assert.equal(1, b:stats().failures)
      -- a lone nil is a success
      b:call(function() return nil end)
      assert.equal(1, b:stats().successes)
    end)

    it("raises on a function that is not one, counting nothing", function()
      local b = breaker.new(name(), { consecutive_failures = 1 })
      assert.has_error(function() b:call(nil) end, "b:call: expected a function as #1, got nil")
      assert.has_error(function() b:call({}) end)
      assert.equal("closed", b:state())
      assert.equal(0, b:stats().calls)
      local callable = setmetatable({}, { __call = function(_, x) return x end })
      assert.equal(4, b:call(callable, 4))
      local hidden = setmetatable({}, { __call = function() return 5 end, __metatable = "locked" })
      assert.equal(5, b:call(hidden))
      local okffi, ffi = pcall(require, "ffi")
      if okffi then -- a C function pointer is callable too
        pcall(ffi.cdef, "int getpid(void);")
        assert.is_true(b:call(ffi.cast("int (*)(void)", ffi.C.getpid)) > 0)
      end
    end)

    it("records a latency of 0 when fn moves the clock back", function()
      clock.freeze(1000)
      local b = breaker.new(name())
      assert.equal("ok", b:call(function() clock.freeze(900); return "ok" end))
      clock.unfreeze()
      assert.equal(1, b:stats().successes)
    end)

    it("measures latency with the clock", function()
      local b = breaker.new(name(), { slow_call_duration = 2 })
      b:call(function() clock.advance(3) end)
      local st = b:stats()
      assert.equal(1, st.slow)
      assert.is_true(st.latency.p50 > 2.5 and st.latency.p50 < 3.5)
    end)
  end)

  describe("record", function()
    it("raises on a bad outcome, permit or latency", function()
      local b = breaker.new(name())
      local p = b:allow()
      assert.has_error(function() b:record(p, "meh", 0) end)
      assert.has_error(function() b:record(nil, "success", 0) end)
      assert.has_error(function() b:record(p, "success", -1) end)
      assert.has_error(function() b:record(p, "success", 0, -3) end)
      assert.has_error(function() b:record(0 / 0, "success", 0) end)
      assert.has_error(function() b:record(-5, "success", 0) end)
      assert.has_error(function() b:record(p + 0.5, "success", 0) end)
    end)

    it("takes only numbers for latency and retry_after, in every binding", function()
      local b = breaker.new(name(), { consecutive_failures = 1, open_duration = 1 })
      local p = b:allow()
      assert.has_error(function() b:record(p, "failure", "0.5") end, "record: latency must be seconds >= 0")
      assert.has_error(function() b:record(p, "failure", 0.5, "120") end,
                       "record: retry_after must be seconds >= 0")
      assert.has_error(function() b:record(math.huge, "success", 0) end)
      assert.equal("closed", b:state())
    end)
  end)

  describe("stats", function()
    it("reports every field", function()
      local b = breaker.new(name(), { window_size = 10, minimum_calls = 5, consecutive_failures = false })
      for i = 1, 100 do b:record(b:allow(), "success", i / 1000) end
      feed(b, 2, "failure", 0.2)
      local st = b:stats()
      assert.equal(b.name, st.name)
      assert.equal("closed", st.state)
      assert.equal(1, st.generation)
      assert.equal(0, st.transitions)
      assert.equal(10, st.calls)
      assert.equal(8, st.successes)
      assert.equal(2, st.failures)
      assert.equal(20, st.failure_rate)
      assert.equal(0, st.slow_rate)
      assert.equal(2, st.consecutive_failures)
      assert.equal(102, st.total_calls)
      -- latencies 1..100 ms: p50 about 50 ms, p99 about 99 ms (buckets are ~19 % wide)
      assert.is_true(math.abs(st.latency.p50 - 0.051) < 0.051 * 0.2, "p50 " .. st.latency.p50)
      assert.is_true(math.abs(st.latency.p90 - 0.092) < 0.092 * 0.2, "p90 " .. st.latency.p90)
      assert.is_true(st.latency.p99 >= 0.09 and st.latency.p99 <= 0.24, "p99 " .. st.latency.p99)
      assert.equal(102, st.latency.samples)
      clock.advance(7)
      assert.equal(7, b:stats().time_in_state)
    end)

    it("halves the latency histogram whenever it holds 16384 samples, however spread", function()
      local b = breaker.new(name(), { slow_call_duration = 1000, failure_rate_threshold = false,
                                      consecutive_failures = false })
      local lat = {}
      for i = 0, 15 do lat[i] = 0.5 * 2 ^ (i / 4) end   -- 16 buckets, 0.5 s .. 6 s
      for i = 1, 40000 do b:record(b:allow(), "success", lat[i % 16]) end
      -- no bucket ever held 16384 (about 2500 each), yet it halved
      local l = b:stats().latency
      assert.is_true(l.samples >= 8000 and l.samples < 16384, "samples " .. l.samples)
      -- so the recent calls outweigh the old ones
      for _ = 1, 16000 do b:record(b:allow(), "success", 0.010) end
      l = b:stats().latency
      assert.is_true(l.samples >= 8000 and l.samples < 16384, "samples " .. l.samples)
      assert.is_true(math.abs(l.p50 - 0.010) < 0.002, "p50 " .. l.p50)
      -- a histogram that halved on a full bucket would have stayed on the
      -- old spread: 16000 of 56000 samples
    end)

    it("keeps the slow call that made the histogram halve", function()
      local b = breaker.new(name(), { slow_call_duration = 1000, failure_rate_threshold = false,
                                      consecutive_failures = false })
      for _ = 1, 16383 do b:record(b:allow(), "success", 0.001) end
      b:record(b:allow(), "success", 5) -- the 16384th sample: the histogram halves now
      -- 16383 fast ones halve to 8191; the slow one stays (it would round to 0)
      assert.equal(8192, b:stats().latency.samples)
    end)

    it("keeps a breaker under 1 KiB with the default windows", function()
      assert.is_true(breaker.new(name()):stats().memory <= 1024)
      assert.is_true(breaker.new(name(), { window_type = "time" }):stats().memory <= 1024)
    end)
  end)

  describe("state-change callbacks", function()
    it("a raising callback does not break the call", function()
      local b = breaker.new(name(), { window_size = 1, minimum_calls = 1,
                                      on_state_change = function() error("listener bug") end })
      local res, err = b:call(function() return nil, "bad" end)
      assert.is_nil(res)
      assert.equal("bad", err)
      assert.equal("open", b:state())
      assert.matches("listener bug", b.last_callback_error)
    end)

    it("global listeners see every breaker and can be removed", function()
      local got = {}
      local off = breaker.on_state_change(function(n, from, to) got[#got + 1] = n .. ":" .. from .. ">" .. to end)
      local b = breaker.new(name(), { window_size = 1, minimum_calls = 1 })
      feed(b, 1, "failure")
      off()
      b:reset()
      assert.same({ b.name .. ":closed>open" }, got)
    end)

    it("tells every callback of a transition before the one a callback made", function()
      local order = {}
      local off = breaker.on_state_change(function(_, from, to) order[#order + 1] = from .. ">" .. to end)
      local b
      b = breaker.new(name(), { consecutive_failures = 1, on_state_change = function(_, _, to)
        if to == "open" then b:reset() end
      end })
      feed(b, 1, "failure")
      off()
      assert.same({ "closed>open", "open>closed" }, order)
      assert.equal("closed", b:state())
    end)

    it("keeps telling callbacks after one yielded and was never resumed", function()
      local seen = {}
      local b
      b = breaker.new(name(), { on_state_change = function(_, from, to)
        seen[#seen + 1] = from .. ">" .. to
        if #seen == 1 then coroutine.yield() end -- e.g. a webhook whose request was aborted
      end })
      local co = coroutine.create(function() b:force_open() end)
      coroutine.resume(co)
      co = nil -- luacheck: ignore 311
      b:reset()
      b:force_open()
      assert.same({ "closed>forced_open", "forced_open>closed", "closed>forced_open" }, seen)
      b:reset()
    end)

    it("stops telling callbacks when one closed the breaker", function()
      local b
      b = breaker.new(name(), { consecutive_failures = 1, on_state_change = function(_, _, to)
        if to == "open" then b:reset(); b:close() end
      end })
      local res, err = b:call(function() return nil, "down" end)
      assert.is_nil(res)
      assert.equal("down", err)
    end)

    it("lets a listener remove itself without skipping the next one", function()
      local got = {}
      local off_a
      off_a = breaker.on_state_change(function() got[#got + 1] = "a"; off_a() end)
      local off_b = breaker.on_state_change(function() got[#got + 1] = "b" end)
      local b = breaker.new(name(), { consecutive_failures = 1 })
      feed(b, 1, "failure")
      b:reset()
      off_b()
      off_a() -- again: nothing
      assert.same({ "a", "b", "b" }, got)
      assert.is_nil(b.last_callback_error)
    end)

    it("reports a transition made while it reads the transition log", function()
      -- Another process (a shared breaker) may make a transition between the
      -- facade's read of the log and its read of the generation: here the
      -- userdata's transitions() makes one right after taking its list.
      local b = breaker.new(name(), { consecutive_failures = 1 })
      local seen = transitions_of(b)
      local methods = debug.getmetatable(b._ud).__index
      local orig = methods.transitions
      local armed = true
      methods.transitions = function(ud, since)
        local list = orig(ud, since)
        if armed then
          armed = false
          ud:force_open()            -- the C call alone: no notice of its own
        end
        return list
      end
      local ok, err = pcall(feed, b, 1, "failure")   -- closed -> open, noticed
      methods.transitions = orig
      assert(ok, err)
      b:reset()
      local got = {}
      for i, t in ipairs(seen) do got[i] = t.from .. ">" .. t.to end
      assert.same({ "closed>open", "open>forced_open", "forced_open>closed" }, got)
    end)
  end)

  describe("clock", function()
    it("refuses a frozen time it cannot represent", function()
      assert.has_error(function() clock.freeze(1e10) end)
      assert.has_error(function() clock.freeze(-1) end)
    end)

        it("advance needs a frozen clock", function()
      clock.unfreeze()
      assert.has_error(function() clock.advance(1) end)
      assert.is_false(clock.frozen())
      local t1 = clock.now_precise()
      local t2 = clock.now_precise()
      assert.is_true(t2 >= t1)
    end)
  end)
end)
