-- Unit specs of breaker.policy: a frozen breaker.clock and a sleep that only
-- advances it, so no spec waits for real backoff.
local breaker = require "breaker"
local policy = require "breaker.policy"
local errors = require "breaker.error"
local fallback = require "breaker.fallback"
local ratelimit = require "breaker.ratelimit"
local bulkhead = require "breaker.bulkhead"
local retry = require "breaker.retry"
local cjson = require "cjson"

local clock = breaker.clock
local sleeps

local function fake_sleep(s)
  sleeps[#sleeps + 1] = s
  clock.advance(s)
end

local id = 0
local function bname()
  id = id + 1
  return "policy-spec-" .. id
end

-- A policy with the fake sleep and a deterministic random (full jitter at 1/2).
local function P(spec)
  spec.sleep = spec.sleep or fake_sleep
  if spec.retry and type(spec.retry) == "table" and spec.retry.random == nil then
    spec.retry.random = function() return 0.5 end
  end
  return policy.new(spec)
end

local function sum(t)
  local s = 0
  for i = 1, #t do s = s + t[i] end
  return s
end

-- A transport that answers from a script: each step is a response table, or
-- { err = e }, or { raise = msg }; `took` advances the clock first.
local function transport(steps)
  local t = { calls = 0, seen = {} }
  function t.request(self, req)
    self.calls = self.calls + 1
    self.seen[#self.seen + 1] = { timeout = req.timeout, req = req }
    local s = steps[math.min(self.calls, #steps)]
    if s.took then clock.advance(s.took) end
    if s.raise then error(s.raise, 0) end
    if s.err then return nil, s.err end
    return { status = s.status, headers = s.headers or {}, body = s.body or "", n = self.calls }
  end
  return t
end

local function oai_error(message, typ, code)
  return cjson.encode({ error = { message = message, type = typ, param = cjson.null, code = code or cjson.null } })
end

describe("breaker.policy", function()
  before_each(function()
    clock.freeze(1000)
    sleeps = {}
  end)
  after_each(function() clock.unfreeze() end)

  describe("new", function()
    it("raises naming an unknown key", function()
      local ok, err = pcall(function() local p = policy.new{ retyr = {} }; return p end)
      assert.is_false(ok)
      assert.matches("policy_spec.lua:%d+: policy: unknown key 'retyr'$", err)
    end)

    it("raises naming nested keys and bad values", function()
      local cases = {
        { { retry = { max_attempts = 0 } }, "policy.retry.max_attempts: expected a number >= 1, got 0" },
        { { retry = { max_atempts = 1 } }, "policy.retry: unknown key 'max_atempts'" },
        { { retry = { budget = { ratio = -1 } } }, "policy.retry.budget.ratio: expected a number >= 0, got -1" },
        { { bulkhead = {} }, "policy.bulkhead.max_concurrent: expected an integer >= 1, got nil" },
        { { bulkhead = { max_concurrent = 2, max_wiat = 1 } }, "policy.bulkhead: unknown key 'max_wiat'" },
        { { rate_limit = { rate = 5, per = "fortnight" } },
          'policy.rate_limit.per: expected seconds or "second", "minute", "hour", got "fortnight"' },
        { { fallback = { cache = { size = 0 } } }, "policy.fallback.cache.size: expected a number >= 1, got 0" },
        { { fallback = { valeu = 1 } }, "policy.fallback: unknown key 'valeu'" },
        { { fallback = { on = { "breaker_open" } } }, "policy.fallback: needs at least one of value, fn or cache" },
        { { deadline = -1 }, "policy.deadline: expected seconds > 0, got -1" },
        { { deadline = "5" }, 'policy.deadline: expected seconds > 0, got "5"' },
        { { breaker = { consecutive_failures = 3 } },
          "policy.breaker.name: expected a non-empty string (required to make a breaker), got nil" },
        { { breaker = 5 }, "policy.breaker: expected a breaker object or a config table, got 5" },
        { { clock = 5 }, "policy.clock: expected a function returning seconds, or a table with now(), got 5" },
        { { sleep = true }, "policy.sleep: expected a function(seconds), got true" },
        { { classify = 5 }, "policy.classify: expected a function or a table of classify options, got 5" },
        { { classify = { statuses = { [500] = "maybe" } } },
          'policy.classify.statuses[500]: expected "success", "failure" or "ignored", got "maybe"' },
      }
      for _, c in ipairs(cases) do
        local ok, err = pcall(policy.new, c[1])
        assert.is_false(ok)
        assert.equal(c[2], (err:gsub("^.-:%d+: ", "")))
      end
    end)

    it("passes a bad breaker config key on from the breaker, prefixed", function()
      local ok, err = pcall(policy.new, { breaker = { name = bname(), failure_rate_treshold = 5 } })
      assert.is_false(ok)
      assert.matches("policy%.breaker: ", err)
      assert.matches("failure_rate_treshold", err)
    end)

    it("makes no breaker when another key is bad, so a corrected spec can reuse the name", function()
      local name = bname()
      assert.has_error(function() policy.new{ breaker = { name = name }, retry = { max_attempts = 0 } } end)
      assert.is_nil(breaker.get(name))
      assert.equal(name, policy.new{ breaker = { name = name }, retry = { max_attempts = 2 } }.breaker.name)
    end)

    it("makes a breaker from a config table, and takes a breaker object", function()
      local name = bname()
      local p = policy.new{ breaker = { name = name, consecutive_failures = 3 } }
      assert.equal(breaker.get(name), p.breaker)
      assert.equal(name, p.name)
      local b = breaker.new(bname(), {})
      assert.equal(b, policy.new{ breaker = b }.breaker)
    end)
  end)

  describe("call", function()
    it("returns every result of fn and reports one attempt", function()
      local p = P{ breaker = { name = bname() }, retry = {}, bulkhead = 4 }
      local n, a, b, c, d = (function(...) return select("#", ...), ... end)(
        p:call(function(x, y) return x, nil, y, false end, 1, 2))
      assert.same({ 4, 1, nil, 2, false }, { n, a, b, c, d })
      local r = p.last
      assert.same({ 1, 0, "success", "success" }, { r.attempts, r.wait, r.outcome, r.stop })
      assert.is_nil(r.fallback)
      assert.is_nil(r.error)
    end)

    it("passes arguments exactly, also more than four", function()
      local p = P{ retry = {} }
      local function count(...) return select("#", ...), ... end
      for n = 0, 7 do
        local args = {}
        for i = 1, n do args[i] = i % 3 == 0 and nil or i end
        local got = { p:call(count, unpack(args, 1, n)) }
        assert.equal(n, got[1])
        for i = 1, n do assert.equal(args[i], got[i + 1]) end
      end
    end)

    it("treats `return`, `return nil` and `return nil, nil` as success", function()
      local p = P{ retry = {} }
      assert.equal(0, select("#", p:call(function() end)))
      p:call(function() return nil end)
      assert.equal("success", p.last.outcome)
      p:call(function() return nil, nil end)
      assert.equal("success", p.last.outcome)
    end)

    it("returns nil, err for `nil, err` and `false, err` without retrying unknown errors", function()
      local p = P{ retry = { max_attempts = 5 } }
      local calls = 0
      local r, e = p:call(function() calls = calls + 1; return nil, "no such user" end)
      assert.is_nil(r)
      assert.equal("no such user", e)
      assert.equal(1, calls)
      assert.same({ 1, "failure", "not_retryable", "error" },
                  { p.last.attempts, p.last.outcome, p.last.stop, p.last.reason })
      r, e = p:call(function() return false, "nope" end)
      assert.is_nil(r)
      assert.equal("nope", e)
    end)

    it("retries retryable errors with exponential backoff and full jitter", function()
      local p = P{ retry = { max_attempts = 4, base = 1, factor = 2, cap = 100, random = function() return 0.5 end } }
      local calls = 0
      local r, e = p:call(function() calls = calls + 1; return nil, "timeout" end)
      assert.is_nil(r)
      assert.equal("timeout", e)
      assert.equal(4, calls)
      assert.same({ 0.5, 1, 2 }, sleeps)
      assert.same({ 4, 3.5, "max_attempts", "timeout" }, { p.last.attempts, p.last.wait, p.last.stop, p.last.reason })
      assert.equal(3.5, p.last.elapsed)
    end)

    it("stops retrying as soon as an attempt succeeds", function()
      local p = P{ retry = { max_attempts = 5 } }
      local calls = 0
      local r = p:call(function()
        calls = calls + 1
        if calls < 3 then return nil, errors.new("reset", "connection reset") end
        return "ok"
      end)
      assert.equal("ok", r)
      assert.equal(3, calls)
      assert.same({ 3, "success" }, { p.last.attempts, p.last.outcome })
    end)

    it("turns a raised error into nil, err and does not retry it", function()
      local name = bname()
      local p = P{ breaker = { name = name, consecutive_failures = 10 }, retry = {} }
      local calls = 0
      local r, e = p:call(function() calls = calls + 1; error("boom") end)
      assert.is_nil(r)
      assert.equal("error", e.kind)
      assert.is_true(e.raised)
      assert.matches("boom", e.message)
      assert.equal(1, e.attempts)
      assert.equal(1, calls)
      assert.equal(1, breaker.get(name):stats().consecutive_failures)
    end)

    it("classifies a raised breaker.error by its kind", function()
      local p = P{ retry = { max_attempts = 2 } }
      local calls = 0
      p:call(function() calls = calls + 1; error(errors.new("timeout", "slow")) end)
      assert.equal(2, calls)
    end)

    it("uses the server's delay from an error instead of the backoff", function()
      local p = P{ retry = { max_attempts = 2 } }
      p:call(function() return nil, errors.new("rate_limited", "429", { status = 429, retry_after = 3 }) end)
      assert.same({ 3 }, sleeps)
    end)

    it("gives up rather than wait longer than retry.max_delay", function()
      local p = P{ retry = { max_attempts = 3, max_delay = 60 } }
      local _, e = p:call(function()
        return nil, errors.new("rate_limited", "429", { status = 429, retry_after = 61 })
      end)
      assert.same({}, sleeps)
      assert.equal("max_delay", p.last.stop)
      assert.equal(61, e.retry_after)
    end)

    describe("deadline", function()
      it("never sleeps past it and never shortens a long Retry-After", function()
        local p = P{ retry = { max_attempts = 5 }, deadline = 5 }
        local calls = 0
        local r, e = p:call(function()
          calls = calls + 1
          return nil, errors.new("rate_limited", "429", { status = 429, retry_after = 10 })
        end)
        assert.is_nil(r)
        assert.equal(1, calls)
        assert.same({}, sleeps)
        assert.equal("deadline", p.last.stop)
        assert.equal(10, e.retry_after)
        assert.equal(1, e.attempts)
      end)

      it("counts time spent in attempts and in backoff", function()
        local p = P{ retry = { max_attempts = 10, base = 1, jitter = "none", factor = 1 }, deadline = 5 }
        local calls = 0
        p:call(function()
          calls = calls + 1
          clock.advance(1)
          return nil, "timeout"
        end)
        -- t=1 fail, sleep 1 -> t=2, t=3 fail, sleep 1 -> 4, t=5 fail: 4+... stop
        assert.equal(3, calls)
        assert.same({ 1, 1 }, sleeps)
        assert.equal("deadline", p.last.stop)
      end)
    end)

    describe("budget", function()
      it("caps retries over the calls of the policy", function()
        local p = P{ retry = { max_attempts = 3, budget = { ratio = 0, min_per_second = 0.1, ttl = 10 } } }
        local calls = 0
        local function fail() calls = calls + 1; return nil, "timeout" end
        p:call(fail)
        assert.equal(2, calls) -- one retry: the whole budget
        assert.equal("budget", p.last.stop)
        calls = 0
        p:call(fail)
        assert.equal(1, calls)
        assert.equal("budget", p.last.stop)
        clock.advance(11)
        calls = 0
        p:call(fail)
        assert.equal(2, calls)
      end)

      it("earns retries from calls at the configured ratio", function()
        local p = P{ retry = { max_attempts = 2, budget = { ratio = 0.5, min_per_second = 0 } } }
        local retries = 0
        for _ = 1, 10 do
          p:call(function() return nil, "timeout" end)
          if p.last.attempts == 2 then retries = retries + 1 end
        end
        assert.equal(5, retries)
      end)

      it("is shared by policies given the same budget object", function()
        local b = retry.budget{ ratio = 0, min_per_second = 0.1, ttl = 10 }
        local p1 = P{ retry = { budget = b } }
        local p2 = P{ retry = { budget = b } }
        p1:call(function() return nil, "timeout" end)
        assert.equal(2, p1.last.attempts)
        p2:call(function() return nil, "timeout" end)
        assert.equal(1, p2.last.attempts)
        assert.equal("budget", p2.last.stop)
      end)
    end)

    describe("breaker", function()
      it("rejects while open without calling fn and never retries the rejection", function()
        local b = breaker.new(bname(), { consecutive_failures = 1, open_duration = 30 })
        local p = P{ breaker = b, retry = { max_attempts = 5 } }
        b:force_open()
        local calls = 0
        local r, e = p:call(function() calls = calls + 1; return "x" end)
        assert.is_nil(r)
        assert.equal("breaker_open", e.kind)
        assert.equal(0, calls)
        assert.same({}, sleeps)
        assert.same({ 0, "rejected", "rejected", "breaker_open" },
                    { p.last.attempts, p.last.outcome, p.last.stop, p.last.reason })
      end)

      it("calls allow once per call when a duck-typed breaker rejects", function()
        local allows = 0
        local fake = {
          name = "fake",
          allow = function()
            allows = allows + 1
            return nil, errors.new("breaker_open", "open", { retry_after = 0.001 })
          end,
          record = function() error("record must not be called without a permit") end,
          state = function() return "open" end,
        }
        local p = P{ breaker = fake, retry = { max_attempts = 5 } }
        local _, e = p:call(function() return 1 end)
        assert.equal("breaker_open", e.kind)
        assert.equal(1, allows)
        assert.same({}, sleeps)
      end)

      it("stops retrying once the breaker opens", function()
        local b = breaker.new(bname(), { consecutive_failures = 2, open_duration = 30 })
        local p = P{ breaker = b, retry = { max_attempts = 5 } }
        local calls = 0
        local r, e = p:call(function() calls = calls + 1; return nil, "timeout" end)
        assert.is_nil(r)
        assert.equal(2, calls)
        assert.equal("open", b:state())
        assert.equal("timeout", e)
        assert.equal("breaker_open", p.last.stop)
        assert.equal(1, #sleeps)
      end)

      it("returns the breaker's error with the last failure as cause when it opens during a wait", function()
        local b = breaker.new(bname(), { consecutive_failures = 100 })
        local p = P{ breaker = b, retry = { max_attempts = 3 },
                     sleep = function(s) fake_sleep(s); b:force_open() end }
        local calls = 0
        local _, e = p:call(function() calls = calls + 1; return nil, errors.new("timeout", "slow") end)
        assert.equal(1, calls)
        assert.equal("breaker_open", e.kind)
        assert.equal(1, e.attempts)
        assert.equal("timeout", e.cause.kind)
        assert.same({ "breaker_open", "rejected" }, { p.last.stop, p.last.outcome })
      end)

      it("records outcomes and latency, and recovers through half-open", function()
        local b = breaker.new(bname(), { consecutive_failures = 2, open_duration = 10, half_open_calls = 1 })
        local p = P{ breaker = b }
        for _ = 1, 2 do p:call(function() clock.advance(0.25); return nil, "timeout" end) end
        assert.equal("open", b:state())
        assert.equal("breaker_open", select(2, p:call(function() return 1 end)).kind)
        clock.advance(10)
        local calls = 0
        assert.equal("probe", p:call(function() calls = calls + 1; return "probe" end))
        assert.equal(1, calls)
        assert.equal("closed", b:state())
      end)

      it("does not count ignored outcomes as failures", function()
        local b = breaker.new(bname(), { consecutive_failures = 1 })
        local p = P{ breaker = b, classify = { unknown = { outcome = "ignored" } } }
        for _ = 1, 5 do p:call(function() return nil, "user not found" end) end
        assert.equal("closed", b:state())
      end)
    end)

    describe("fallback", function()
      it("answers with a static value when the breaker is open, never calling fn", function()
        local b = breaker.new(bname(), {})
        local p = P{ breaker = b, fallback = { value = "busy" } }
        b:force_open()
        local calls = 0
        assert.equal("busy", p:call(function() calls = calls + 1 end))
        assert.equal(0, calls)
        assert.same({ "value", "breaker_open", "rejected" }, { p.last.fallback, p.last.reason, p.last.outcome })
        assert.equal("breaker_open", p.last.error.kind)
      end)

      it("calls a fallback function with the error and the arguments, not with fn", function()
        local calls, got = 0, nil
        local function protected() calls = calls + 1; return nil, "timeout" end
        local p = P{ retry = { max_attempts = 2 }, fallback = function(...)
          got = { n = select("#", ...), ... }
          return "fb1", "fb2"
        end }
        local a, b2 = p:call(protected, "q", 7)
        assert.same({ "fb1", "fb2" }, { a, b2 })
        assert.equal(2, calls) -- the two attempts; the fallback added none
        assert.same({ n = 3, "timeout", "q", 7 }, got)
        for i = 1, got.n do assert.not_equal(protected, got[i]) end
        assert.same({ "function", "timeout", 2 }, { p.last.fallback, p.last.reason, p.last.attempts })
      end)

      it("serves the last good answer for the same key from the cache", function()
        local up = true
        local p = P{ fallback = { cache = { size = 2 }, value = "generic" } }
        local function get(k) if up then return "answer-" .. k end return nil, "timeout" end
        assert.equal("answer-a", p:call(get, "a"))
        assert.equal("answer-b", p:call(get, "b"))
        up = false
        assert.equal("answer-a", p:call(get, "a"))
        assert.same({ "cache", "timeout" }, { p.last.fallback, p.last.reason })
        assert.equal("generic", p:call(get, "c"))
        assert.equal("value", p.last.fallback)
      end)

      it("uses a key function, a ttl and a size bound", function()
        local up = true
        local p = P{ fallback = { cache = { size = 2, ttl = 60 },
                                  key = function(_, id2) return "user:" .. id2 end } }
        local function get(_, id2) if up then return { id = id2 } end return nil, "timeout" end
        for i = 1, 3 do p:call(get, "ignored", i) end
        up = false
        assert.is_nil(p:call(get, "x", 1)) -- evicted (size 2)
        assert.equal(2, p:call(get, "x", 2).id)
        clock.advance(61)
        assert.is_nil(p:call(get, "x", 3)) -- too old
      end)

      it("answers only the error kinds listed in `on`", function()
        local p = P{ fallback = { value = "fb", on = { "breaker_open", "timeout" } } }
        assert.equal("fb", p:call(function() return nil, "timeout" end))
        local r, e = p:call(function() return nil, "bad input" end)
        assert.is_nil(r)
        assert.equal("bad input", e)
        assert.is_nil(p.last.fallback)
        local p2 = P{ fallback = { value = "fb", on = function(err) return err == "special" end } }
        assert.equal("fb", p2:call(function() return nil, "special" end))
        assert.is_nil(p2:call(function() return nil, "other" end))
      end)

      it("returns the original error when the fallback raises", function()
        local p = P{ fallback = function() error("fallback broke") end }
        local r, e = p:call(function() return nil, "timeout" end)
        assert.is_nil(r)
        assert.equal("timeout", e)
        assert.is_nil(p.last.fallback)
        assert.matches("fallback broke", p.last.fallback_error)
      end)
    end)

    it("answers with the fallback value when the fallback function raises", function()
      local fb = { fn = function() error("broke") end, value = "static" }
      local p = P{ fallback = fb }
      assert.equal("static", p:call(function() return nil, "boom" end))
      assert.equal("value", p.last.fallback)
      assert.matches("broke", p.last.fallback_error)
    end)

    describe("bulkhead", function()
      it("rejects a call beyond max_concurrent without running it, and frees its breaker permit", function()
        local b = breaker.new(bname(), { consecutive_failures = 1 })
        local p = P{ breaker = b, bulkhead = 1 }
        local inner_calls, inner_err = 0, nil
        local r = p:call(function()
          local _, e = p:call(function() inner_calls = inner_calls + 1 end)
          inner_err = e
          return "outer"
        end)
        assert.equal("outer", r)
        assert.equal(0, inner_calls)
        assert.equal("bulkhead_full", inner_err.kind)
        assert.equal("closed", b:state())
        assert.equal(0, p.bulkhead:in_flight())
      end)

      it("frees the slot when fn raises", function()
        local p = P{ bulkhead = 1 }
        p:call(function() error("x") end)
        assert.equal(0, p.bulkhead:in_flight())
        assert.equal("ok", p:call(function() return "ok" end))
      end)

      it("waits for a slot up to max_wait when other coroutines make progress", function()
        if not rawget(_G, "jit") then
          pending("plain Lua 5.1 cannot yield across pcall")
          return
        end
        -- A sleep that yields, and a tiny round-robin scheduler.
        local p = P{ bulkhead = { max_concurrent = 1, max_wait = 1 },
                     sleep = function(s) clock.advance(s); coroutine.yield() end }
        local order = {}
        local a = coroutine.create(function()
          return p:call(function()
            order[#order + 1] = "a-in"
            coroutine.yield()
            order[#order + 1] = "a-out"
            return "a"
          end)
        end)
        local results = {}
        local b2 = coroutine.create(function()
          results.b = { p:call(function() order[#order + 1] = "b-in"; return "b" end) }
          results.b_wait = p.last.wait
        end)
        coroutine.resume(a)     -- a holds the slot
        coroutine.resume(b2)    -- b waits (its sleep yields)
        coroutine.resume(a)     -- a finishes
        while coroutine.status(b2) ~= "dead" do coroutine.resume(b2) end
        assert.same({ "a-in", "a-out", "b-in" }, order)
        assert.equal("b", results.b[1])
        assert.is_true(results.b_wait > 0 and results.b_wait < 1)
      end)

      it("takes back the slots of calls that never came back", function()
        if not rawget(_G, "jit") then
          pending("plain Lua 5.1 cannot yield across pcall")
          return
        end
        -- a call left suspended forever (a killed light thread, a request
        -- ended elsewhere), and one whose coroutine died holding its slot
        local p = P{ bulkhead = { max_concurrent = 2, reclaim = true } } -- (the default inside OpenResty)
        local left = coroutine.create(function() return p:call(function() coroutine.yield() end) end)
        coroutine.resume(left)
        local bh = p.bulkhead
        local died = coroutine.create(function() bh:try_acquire() end)
        coroutine.resume(died)
        assert.equal(2, bh:in_flight())
        -- the dead coroutine's slot comes back at once
        assert.equal("ok", p:call(function() return "ok" end))
        assert.equal(1, bh:in_flight())
        local inner
        p:call(function() inner = { p:call(function() return 1 end) } end)
        assert.equal("bulkhead_full", inner[2].kind) -- the suspended one still holds its slot
        left = nil -- luacheck: ignore 311
        collectgarbage()
        collectgarbage()
        -- its slot comes back when the bulkhead is next found full
        p:call(function() inner = { p:call(function() return 1 end) } end)
        assert.equal(1, inner[1])
        assert.equal(0, bh:in_flight())
      end)

      it("gives the slot and the permit back when a wait raises", function()
        -- bngx.sleep raises in phases that cannot yield (log, header_filter)
        local b = breaker.new(bname(), { half_open_calls = 1, consecutive_failures = 1 })
        local p = P{ breaker = b, bulkhead = 2, rate_limit = { rate = 1, burst = 1, max_wait = 1000 },
                     sleep = function() error("API disabled in the context of log_by_lua*", 0) end }
        local t = transport{ { status = 200 } }
        assert.equal(200, p:request(t, { url = "u" }).status)
        for _ = 1, 3 do
          local ok, err = pcall(p.request, p, t, { url = "u" })
          assert.is_false(ok)
          assert.matches("API disabled", err)
          ok = pcall(p.call, p, function() return 1 end)
          assert.is_false(ok)
        end
        assert.equal(0, p.bulkhead:in_flight())
        assert.equal(0, p.bulkhead.waiters)
        -- no permit was left unrecorded: a half-open breaker still has its probe
        b:force_open(); b:reset()
        assert.equal("closed", b:state())
        local st = b:stats()
        assert.equal(st.calls, st.successes + st.failures + st.ignored)
      end)

      it("wakes only waiters that still wait on the semaphore", function()
        if not rawget(_G, "jit") then
          pending("plain Lua 5.1 cannot yield across pcall")
          return
        end
        -- ngx.semaphore's count() is negative by the threads queued on it; a
        -- killed thread leaves the queue. A stand-in with that behaviour:
        local queued, posts, waits = {}, 0, 0
        local sema = {
          count = function() local n = 0; for _ in pairs(queued) do n = n + 1 end; return posts - n end,
          post = function(_, n) posts = posts + (n or 1) end,
          wait = function()
            waits = waits + 1
            if posts > 0 then posts = posts - 1; return true end
            local co = coroutine.running()
            queued[co] = true
            coroutine.yield()
            queued[co] = nil
            return nil, "timeout"
          end,
        }
        local saved_ngx = rawget(_G, "ngx")
        _G.ngx = { get_phase = function() return "content" end }
        local ok, err = pcall(function()
          local bh = bulkhead.new{ max_concurrent = 1, max_wait = 1 }
          bh.sema = sema
          local function now() return 0 end
          assert(bh:try_acquire())
          local w = coroutine.create(function() return bh:acquire(now, function() end, nil) end)
          coroutine.resume(w)            -- waits
          queued[w] = nil                -- its light thread is killed
          bh:release()
          for _ = 1, 1000 do assert(bh:try_acquire()); bh:release() end
          assert.equal(0, posts)         -- nothing posted for nobody
          assert(bh:try_acquire())
          waits = 0
          local c = coroutine.create(function() return bh:acquire(now, function() end, nil) end)
          coroutine.resume(c)
          assert.equal(1, waits)         -- it yielded at its first wait
        end)
        _G.ngx = saved_ngx
        assert(ok, err)
      end)

      it("rejects after waiting max_wait", function()
        local p = P{ bulkhead = { max_concurrent = 1, max_wait = 0.2 } }
        local inner
        p:call(function() inner = { p:call(function() return 1 end) } end)
        assert.equal("bulkhead_full", inner[2].kind)
        assert.near(0.2, sum(sleeps), 1e-6)
        assert.near(0.2, inner[2].waited, 1e-6)
      end)
    end)

    describe("rate limit", function()
      it("rejects beyond the rate with retry_after, and admits again in time", function()
        local p = P{ rate_limit = { rate = 2, per = 1 } }
        assert.equal(1, p:call(function() return 1 end))
        assert.equal(2, p:call(function() return 2 end))
        local r, e = p:call(function() return 3 end)
        assert.is_nil(r)
        assert.same({ "rate_limited", "client" }, { e.kind, e.source })
        assert.near(0.5, e.retry_after, 1e-9)
        clock.advance(0.5)
        assert.equal(4, p:call(function() return 4 end))
      end)

      it("waits for a token up to max_wait", function()
        local p = P{ rate_limit = { rate = 60, per = "minute", burst = 1, max_wait = 2 } }
        p:call(function() end)
        assert.equal("x", p:call(function() return "x" end))
        assert.same({ 1 }, sleeps)
        assert.equal(1, p.last.wait)
      end)

      it("does not wait past the deadline", function()
        local p = P{ rate_limit = { rate = 1, per = 10, burst = 1, max_wait = 60 }, deadline = 5 }
        p:call(function() end)
        local _, e = p:call(function() return "x" end)
        assert.equal("rate_limited", e.kind)
        assert.same({}, sleeps)
      end)
    end)

    it("lets a user classifier fail a result that is not an error", function()
      local p = P{ retry = { max_attempts = 3 }, classify = function(res, err)
        if err == nil and type(res) == "table" and res.busy then
          return { outcome = "failure", retryable = true, kind = "busy", retry_after = 2 }
        end
      end }
      local calls = 0
      local r = p:call(function() calls = calls + 1; return { busy = calls < 3 } end)
      assert.is_false(r.busy)
      assert.equal(3, calls)
      assert.same({ 2, 2 }, sleeps)
    end)

    it("writes the report to a caller's table with call_into, leaving p.last alone", function()
      local p = P{ retry = {} }
      p:call(function() return 1 end)
      local rep = {}
      assert.equal(5, p:call_into(rep, function(x) return x end, 5))
      assert.same({ 1, "success" }, { rep.attempts, rep.outcome })
      p:call_into(rep, function() return nil, "timeout" end)
      assert.equal(3, rep.attempts)
      assert.equal(1, p.last.attempts)
    end)

    it("raises for a missing function", function()
      local p = P{}
      assert.has_error(function() p:call(nil) end, "policy:call: expected a function as #1, got nil")
    end)
  end)

  describe("request", function()
    it("returns a 2xx response without touching the caller's request", function()
      local t = transport{ { status = 200, body = "{}" } }
      local p = P{ breaker = { name = bname() }, retry = {}, deadline = 10 }
      local req = { method = "GET", url = "http://x/v1/models", timeout = 30 }
      local res = p:request(t, req)
      assert.equal(200, res.status)
      assert.equal(30, req.timeout)
      assert.equal(10, t.seen[1].timeout)
      assert.same({ 1, "success" }, { p.last.attempts, p.last.outcome })
    end)

    it("never lengthens the transport's own timeout with a deadline", function()
      local t = transport{ { status = 200 } }
      function t.default_timeout() return 0.5 end
      local p = P{ retry = {}, deadline = 10 }
      assert(p:request(t, { url = "u" }))
      assert.equal(0.5, t.seen[1].timeout)
      function t.default_timeout() return 60 end
      assert(p:request(t, { url = "u" }))
      assert.equal(10, t.seen[2].timeout)
      function t.default_timeout() return nil end -- none: the time left
      assert(p:request(t, { url = "u" }))
      assert.equal(10, t.seen[3].timeout)
      -- a default that is not a positive number counts as none
      function t.default_timeout() return "5" end
      assert(p:request(t, { url = "u" }))
      assert.equal(10, t.seen[4].timeout)
      t.default_timeout = 5 -- a field, not a method: none either
      assert(p:request(t, { url = "u" }))
      assert.equal(10, t.seen[5].timeout)
    end)

    it("asks the transport's default timeout before taking a slot or a permit", function()
      local b = breaker.new(bname(), { consecutive_failures = 1, half_open_calls = 1, open_duration = 1 })
      local p = P{ breaker = b, bulkhead = 1, deadline = 5 }
      local t = transport{ { status = 500 }, { status = 200 } }
      assert.is_nil(p:request(t, { url = "u" }))
      clock.advance(1) -- half-open: one probe
      function t.default_timeout() error("broken transport") end
      assert.has_error(function() p:request(t, { url = "u" }) end, "broken transport")
      t.default_timeout = nil
      assert.equal(0, p.bulkhead:in_flight())
      assert.equal(200, p:request(t, { url = "u" }).status) -- the probe was still free
      assert.equal("closed", b:state())
    end)

    it("returns the error when a status override meets a transport error", function()
      -- { [200] = "success" } used to make a reset after a 200 status line
      -- a success with no response: nil, nil
      local b = breaker.new(bname(), {})
      local t = transport{ { err = errors.new("reset", "Connection reset", { status = 200 }) } }
      local p = P{ breaker = b, classify = { statuses = { [200] = "success" } } }
      local res, err = p:request(t, { url = "u" })
      assert.is_nil(res)
      assert.same({ "reset", 1 }, { err.kind, err.attempts })
      assert.equal(1, b:stats().failures)
      -- a user classifier that calls any error a success still gets nil, err
      p = P{ classify = function() return { outcome = "success" } end }
      res, err = p:request(t, { url = "u" })
      assert.is_nil(res)
      assert.equal("reset", err.kind)
    end)

    it("records the permit when a user classifier raises", function()
      local b = breaker.new(bname(), { consecutive_failures = 1, half_open_calls = 1, open_duration = 1 })
      local p = P{ breaker = b, classify = function(res) if res.status == 500 then error("bad classifier") end end }
      local t = transport{ { status = 503 }, { status = 500 }, { status = 200 } }
      assert.is_nil(p:request(t, { url = "u" }))
      assert.equal("open", b:state())
      clock.advance(1)
      assert.has_error(function() p:request(t, { url = "u" }) end, "bad classifier")
      -- the probe's permit came back (recorded as ignored): the next call probes
      assert.equal(200, p:request(t, { url = "u" }).status)
      assert.equal("closed", b:state())
    end)

    it("gives the upstream's error when the rate limiter refuses a retry", function()
      local p = P{ retry = { max_attempts = 3, base = 0.1, jitter = "none" }, rate_limit = { rate = 1 } }
      local t = transport{ { status = 503 }, { status = 200 } }
      local res, err = p:request(t, { url = "u" })
      assert.is_nil(res)
      assert.same({ "http_status", 503, 1 }, { err.kind, err.status, err.attempts })
      assert.same({ "rejected", "rejected" }, { p.last.outcome, p.last.stop })
      assert.equal(1, t.calls)
    end)

    it("lets the retry after a 429 through the limiter that the 429 paused", function()
      -- ngx.sleep cuts to whole milliseconds: a retry that woke a fraction
      -- before the pause's end was refused by the policy's own limiter
      local p = P{ retry = { max_attempts = 3 }, rate_limit = { rate = 100 },
                   sleep = function(s) sleeps[#sleeps + 1] = s; clock.advance(math.floor(s * 1000) / 1000) end }
      local t = transport{ { status = 429, headers = { ["retry-after-ms"] = "1500.5" } }, { status = 200 } }
      assert.equal(200, p:request(t, { url = "u" }).status)
      assert.equal(2, t.calls)
    end)

    it("holds a breaker and the limiter at most an hour for a huge Retry-After", function()
      local b = breaker.new(bname(), { consecutive_failures = 1, open_duration = 5, open_duration_max = 60 })
      local p = P{ breaker = b, rate_limit = { rate = 10 } }
      local t = transport{ { status = 429, headers = { ["retry-after"] = "2147483647" } }, { status = 200 } }
      local _, err = p:request(t, { url = "u" })
      assert.equal(2147483647, err.retry_after) -- the server's value is reported as it came
      assert.equal("open", b:state())
      local _, rerr = b:allow()
      assert.near(3600, rerr.retry_after, 1e-6)
      clock.advance(3600)
      assert.equal(200, p:request(t, { url = "u" }).status)
    end)

    it("retries 5xx with backoff and returns the first success", function()
      local t = transport{ { status = 503 }, { status = 502 }, { status = 200 } }
      local p = P{ retry = { max_attempts = 4, base = 1 } }
      local res = p:request(t, { url = "u" })
      assert.equal(200, res.status)
      assert.equal(3, t.calls)
      assert.same({ 0.5, 1 }, sleeps)
    end)

    it("waits exactly retry-after-ms, else Retry-After", function()
      local t = transport{ { status = 429, headers = { ["retry-after-ms"] = "1500", ["retry-after"] = "9" } },
                           { status = 429, headers = { ["retry-after"] = "2" } }, { status = 200 } }
      local p = P{ retry = { max_attempts = 3 } }
      assert.equal(200, p:request(t, { url = "u" }).status)
      assert.same({ 1.5, 2 }, sleeps)
      assert.equal(3.5, p.last.wait)
    end)

    it("returns nil, err for a failure after retries, with status, attempts and the response", function()
      local t = transport{ { status = 503, headers = { ["retry-after"] = "1" },
                             body = oai_error("The server is overloaded", "server_error") } }
      local p = P{ retry = { max_attempts = 2 } }
      local res, err = p:request(t, { url = "u" })
      assert.is_nil(res)
      assert.same({ "http_status", 503, 1, 2 }, { err.kind, err.status, err.retry_after, err.attempts })
      assert.equal(503, err.response.status)
      assert.equal("HTTP 503: The server is overloaded", err.message)
      assert.matches("http_status: HTTP 503: The server is overloaded status=503 retry_after=1 attempts=2",
                     tostring(err), 1, true)
    end)

    it("does not retry insufficient_quota and still counts it as a failure", function()
      local b = breaker.new(bname(), { consecutive_failures = 1 })
      local t = transport{ { status = 429, headers = { ["retry-after"] = "1" },
                             body = oai_error("You exceeded your current quota", "insufficient_quota",
                                              "insufficient_quota") } }
      local p = P{ breaker = b, retry = { max_attempts = 5 } }
      local _, err = p:request(t, { url = "u" })
      assert.equal(1, t.calls)
      assert.same({ "quota", 429, "insufficient_quota", 1 }, { err.kind, err.status, err.code, err.attempts })
      assert.equal("open", b:state())
    end)

    it("surfaces 401 as auth with the provider's message, without tripping the breaker", function()
      local b = breaker.new(bname(), { consecutive_failures = 2 })
      local t = transport{ { status = 401, body = oai_error("Incorrect API key provided: sk-test-bad.",
                                                            "invalid_request_error", "invalid_api_key") } }
      local p = P{ breaker = b, retry = { max_attempts = 3 } }
      for _ = 1, 5 do
        local _, err = p:request(t, { url = "u" })
        assert.equal("auth", err.kind)
        assert.equal(401, err.status)
        assert.matches("Incorrect API key provided", err.message)
        assert.not_matches("sk%-test%-bad", err.message)
      end
      assert.equal(5, t.calls)
      assert.equal("closed", b:state())
      assert.equal("ignored", p.last.outcome)
    end)

    it("returns other 4xx as errors without retrying; 3xx as responses", function()
      local p = P{ retry = { max_attempts = 3 } }
      local t = transport{ { status = 404, body = oai_error("no such model", "invalid_request_error") } }
      local _, err = p:request(t, { url = "u" })
      assert.same({ "http_status", 404, 1 }, { err.kind, err.status, t.calls })
      local t3 = transport{ { status = 304 } }
      assert.equal(304, p:request(t3, { url = "u" }).status)
    end)

    it("obeys x-should-retry: false", function()
      local p = P{ retry = { max_attempts = 3 } }
      local t = transport{ { status = 503, headers = { ["x-should-retry"] = "false" } } }
      p:request(t, { url = "u" })
      assert.equal(1, t.calls)
    end)

    it("retries retryable transport errors and returns the last one", function()
      local e1, e2 = errors.new("timeout", "timed out"), errors.new("connect", "refused")
      local t = transport{ { err = e1 }, { err = e2 } }
      local p = P{ retry = { max_attempts = 2 } }
      local res, err = p:request(t, { url = "u" })
      assert.is_nil(res)
      assert.equal(e2, err)
      assert.equal(2, err.attempts)
    end)

    it("cuts each attempt's timeout to the time left before the deadline", function()
      local t = transport{ { status = 503, took = 1 }, { status = 200 } }
      local p = P{ retry = { max_attempts = 2, base = 2, jitter = "none" }, deadline = 10 }
      p:request(t, { url = "u", timeout = 30 })
      assert.equal(10, t.seen[1].timeout)
      assert.equal(7, t.seen[2].timeout)
    end)

    it("returns the last error rather than sleep past the deadline on a long Retry-After", function()
      local t = transport{ { status = 429, headers = { ["retry-after"] = "30" } } }
      local p = P{ retry = { max_attempts = 5 }, deadline = 10, fallback = { value = "fb", on = { "breaker_open" } } }
      local res, err = p:request(t, { url = "u" })
      assert.is_nil(res)
      assert.same({ "rate_limited", 30, 1 }, { err.kind, err.retry_after, t.calls })
      assert.same({}, sleeps)
      assert.equal("deadline", p.last.stop)
    end)

    it("passes the server's delay to the breaker, stretching its open time", function()
      local b = breaker.new(bname(), { consecutive_failures = 1, open_duration = 5 })
      local t = transport{ { status = 429, headers = { ["retry-after"] = "100" } } }
      local p = P{ breaker = b }
      p:request(t, { url = "u" })
      local _, err = b:allow()
      assert.equal("breaker_open", err.kind)
      assert.is_true(err.retry_after >= 99, "retry_after " .. tostring(err.retry_after))
    end)

    it("re-raises a transport's raised error after releasing its slots", function()
      local b = breaker.new(bname(), { consecutive_failures = 1 })
      local p = P{ breaker = b, bulkhead = 1 }
      assert.has_error(function() p:request(transport{ { raise = "bad request table" } }, { url = "u" }) end,
                       "bad request table")
      assert.equal(0, p.bulkhead:in_flight())
      assert.equal("closed", b:state())
    end)

    it("serves a cached response when the upstream fails", function()
      local p = P{ fallback = { cache = { size = 10 } } }
      local good = transport{ { status = 200, body = "cached" } }
      local bad = transport{ { status = 503 } }
      local req = { method = "POST", url = "u", body = "{\"q\":1}" }
      p:request(good, req)
      local res = p:request(bad, { method = "POST", url = "u", body = "{\"q\":1}" })
      assert.equal("cached", res.body)
      assert.equal("cache", p.last.fallback)
      local r2, e2 = p:request(bad, { method = "POST", url = "u", body = "{\"q\":2}" })
      assert.is_nil(r2)
      assert.equal(503, e2.status)
    end)

    it("hands the fallback function the error and the request", function()
      local got
      local p = P{ fallback = function(err, req)
        got = { err.status, req.url }
        return { status = 200, body = "fb" }
      end }
      local res = p:request(transport{ { status = 500 } }, { url = "the-url" })
      assert.equal("fb", res.body)
      assert.same({ 500, "the-url" }, got)
    end)

    it("learns from x-ratelimit headers and pauses after a 429", function()
      local p = P{ rate_limit = { learn = true } }
      local t = transport{ { status = 200, headers = { ["x-ratelimit-remaining-requests"] = "0",
                                                      ["x-ratelimit-reset-requests"] = "6m0s",
                                                      ["x-ratelimit-limit-requests"] = "60" } } }
      p:request(t, { url = "u" })
      local _, e = p:request(t, { url = "u" })
      assert.same({ "rate_limited", "client" }, { e.kind, e.source })
      assert.near(6, e.retry_after, 1e-9)
      assert.equal(1, t.calls)
      clock.advance(6)
      local t2 = transport{ { status = 429, headers = { ["retry-after"] = "3" } } }
      p:request(t2, { url = "u" })
      local _, e2 = p:request(t2, { url = "u" })
      assert.equal("client", e2.source)
      assert.near(3, e2.retry_after, 1e-9)
      assert.equal(1, t2.calls)
    end)
    it("holds calls back while the provider's token budget is below min_tokens", function()
      local p = P{ rate_limit = { learn = true, min_tokens = 500 } }
      -- 800 tokens left: enough for a call
      local t = transport{ { status = 200, headers = { ["x-ratelimit-remaining-tokens"] = "800",
                                                      ["x-ratelimit-reset-tokens"] = "2s" } },
                           { status = 200, headers = { ["x-ratelimit-remaining-tokens"] = "300",
                                                      ["x-ratelimit-reset-tokens"] = "1.5s" } } }
      assert(p:request(t, { url = "u" }))
      assert(p:request(t, { url = "u" }))
      -- 300 left < 500: no call until the budget resets, 1.5 s later
      local _, e = p:request(t, { url = "u" })
      assert.same({ "rate_limited", "client" }, { e.kind, e.source })
      assert.near(1.5, e.retry_after, 1e-9)
      assert.equal(2, t.calls)
      clock.advance(1.5)
      assert(p:request(t, { url = "u" }))
      assert.equal(3, t.calls)
      -- the default min_tokens is 1: only an empty budget holds calls back
      local d = P{ rate_limit = { learn = true } }
      local t2 = transport{ { status = 200, headers = { ["x-ratelimit-remaining-tokens"] = "1",
                                                       ["x-ratelimit-reset-tokens"] = "9s" } },
                            { status = 200, headers = { ["x-ratelimit-remaining-tokens"] = "0",
                                                       ["x-ratelimit-reset-tokens"] = "20ms" } } }
      assert(d:request(t2, { url = "u" }))
      assert(d:request(t2, { url = "u" }))
      local _, e2 = d:request(t2, { url = "u" })
      assert.near(0.02, e2.retry_after, 1e-9)
      local ok, msg = pcall(P, { rate_limit = { min_tokens = -1, learn = true } })
      assert.is_false(ok)
      assert.matches("min_tokens", msg, 1, true)
    end)
  end)

  describe("load", function()
    local tmp = os.tmpname()
    after_each(function() os.remove(tmp) end)
    local function write(s)
      local f = assert(io.open(tmp, "w"))
      f:write(s)
      f:close()
    end

    it("loads the example policy", function()
      local p = policy.load("examples/policy.lua")
      assert.is_table(p.breaker)
      assert.is_true(p.max_attempts > 1)
      assert.is_table(p.fallback)
    end)

    it("names the file and the key on a bad policy", function()
      write("return { retry = { max_attempts = 3, bsae = 1 } }")
      local ok, err = pcall(policy.load, tmp)
      assert.is_false(ok)
      assert.matches(tmp .. ": policy.retry: unknown key 'bsae'", err, 1, true)
      write("return { deadline = 0 }")
      ok, err = pcall(policy.load, tmp)
      assert.is_false(ok)
      assert.matches(tmp .. ": policy.deadline: expected seconds > 0, got 0", err, 1, true)
    end)

    it("names the file on syntax errors, runtime errors and a wrong return", function()
      write("return {")
      local ok, err = pcall(policy.load, tmp)
      assert.is_false(ok)
      assert.matches(tmp, err, 1, true)
      write("error('oops')")
      ok, err = pcall(policy.load, tmp)
      assert.is_false(ok)
      assert.matches(tmp, err, 1, true)
      assert.matches("oops", err, 1, true)
      write("return 42")
      ok, err = pcall(policy.load, tmp)
      assert.is_false(ok)
      assert.matches(tmp .. ": must return a policy table, returned number", err, 1, true)
      ok, err = pcall(policy.load, "/nonexistent/policy.lua")
      assert.is_false(ok)
      assert.matches("/nonexistent/policy.lua", err, 1, true)
    end)

    it("keeps the script's globals to itself and lets it require modules", function()
      write("leaked = 1\nlocal classify = require 'breaker.classify'\n" ..
            "return { retry = { max_attempts = 2 }, classify = { statuses = { [404] = 'success' } } }")
      local p = policy.load(tmp)
      assert.is_nil(rawget(_G, "leaked"))
      assert.equal(2, p.max_attempts)
    end)
  end)

  describe("parts", function()
    it("lru stores nothing under a NaN or nil key, and stays whole", function()
      local c = fallback.lru(2)
      for _ = 1, 3 do c:set(0 / 0, "x", 0); c:set(nil, "y", 0) end
      assert.equal(0, c:len())
      c:set("a", 1, 0); c:set("b", 2, 0); c:set("c", 3, 0)
      assert.same({ 2, 3 }, { (c:get("b", 0)), (c:get("c", 0)) })
      local p = P{ fallback = { cache = { size = 2 }, value = "v" } }
      for _ = 1, 3 do assert.equal("ok", p:call(function() return "ok" end, 0 / 0)) end
      assert.equal("ok", p:call(function() return "ok" end, 3))
    end)

    it("lru keeps the most recently used entries", function()
      local c = fallback.lru(2)
      c:set("a", 1, 0); c:set("b", 2, 0)
      assert.equal(1, c:get("a", 0))
      c:set("c", 3, 0)
      assert.is_nil(c:get("b", 0))
      assert.equal(1, c:get("a", 0))
      assert.equal(3, c:get("c", 0))
      c:set("a", 10, 0)
      assert.equal(10, c:get("a", 0))
      assert.equal(2, c:len())
    end)

    it("parses rate-limit reset durations", function()
      local pd = ratelimit.parse_duration
      assert.equal(1, pd("1s"))
      assert.equal(360, pd("6m0s"))
      assert.near(0.02, pd("20ms"), 1e-12)
      assert.equal(3723.5, pd("1h2m3.5s"))
      assert.equal(12, pd("12"))
      assert.is_nil(pd("soon"))
      assert.is_nil(pd("1s and more"))
      assert.is_nil(pd("5 parsecs"))
    end)

    it("spaces out waiters on the token bucket instead of releasing them together", function()
      local rl = ratelimit.new{ rate = 1, per = 1, burst = 1, max_wait = 10 }
      local waits = {}
      local function sl(s) waits[#waits + 1] = s end
      for _ = 1, 4 do assert.is_true(rl:acquire(0, nil, sl)) end
      assert.same({ 1, 2, 3 }, waits)
    end)

    it("redacts API keys written as JSON, headers or parameters", function()
      for input, want in pairs{
        ['{"error":{"message":"bad","api_key":"abcd1234secret"}}'] =
          '{"error":{"message":"bad","api_key":"[redacted]"}}',
        ['{"x-api-key": "abcd1234secret"}'] = '{"x-api-key": "[redacted]"}',
        ["api-key: abcd1234secret"] = "api-key: [redacted]",
        ["?api_key=abcd1234secret&x=1"] = "?api_key=[redacted]&x=1",
      } do
        assert.equal(want, errors.redact(input))
      end
    end)

    it("bulkhead acquire/release count calls in flight", function()
      local bh = bulkhead.new(2)
      assert.is_true(bh:try_acquire())
      assert.is_true(bh:try_acquire())
      assert.is_false(bh:try_acquire())
      bh:release()
      assert.equal(1, bh:in_flight())
    end)
  end)
end)
