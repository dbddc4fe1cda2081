-- spec/events_spec.lua: breaker.events payloads, subscription, failing handlers.
local breaker = require "breaker"
local events = require "breaker.events"
local policy = require "breaker.policy"
local shared = require "breaker.shared"

local n = 0
local function uname(prefix)
  n = n + 1
  return ("%s-%d-%d"):format(prefix, n, os.time())
end

-- Subscribes to `t` and returns the list the payloads land in.
local function collect(t)
  local got = {}
  events.on(t, function(ev) got[#got + 1] = ev end)
  return got
end

local function sleep_none() end

describe("breaker.events", function()
  local made = {}
  local function new_breaker(cfg, opts)
    local b = breaker.new(uname("ev"), cfg, opts)
    made[#made + 1] = b
    return b
  end

  before_each(function()
    breaker.clock.freeze(1000)
  end)

  after_each(function()
    events.clear()
    breaker.clock.unfreeze()
    for _, b in ipairs(made) do b:close() end
    made = {}
  end)

  describe("subscription", function()
    it("raises on an unknown type or a non-function handler", function()
      assert.has_error(function() events.on("nope", function() end) end,
        "breaker.events.on: unknown event type 'nope' (expected one of state_change, rejected, retry, "
        .. "fallback, budget_exhausted, bulkhead_rejected or \"*\")")
      assert.has_error(function() events.on("retry", 42) end,
        "breaker.events.on: expected a function as #2, got number")
    end)

    it("sets the active flag of a type while someone listens, and clears it after", function()
      assert.is_nil(events.active.retry)
      local off = events.on("retry", function() end)
      assert.is_true(events.active.retry)
      assert.is_nil(events.active.fallback)
      local off_all = events.on("*", function() end)
      for _, t in ipairs(events.TYPES) do assert.is_true(events.active[t], t) end
      off_all()
      assert.is_nil(events.active.fallback)
      assert.is_true(events.active.retry)
      off()
      off() -- idempotent
      assert.is_nil(events.active.retry)
    end)

    it("keeps a later subscription when an unsubscribe from before clear() runs", function()
      local f = function() end
      local off1 = events.on("rejected", f)
      events.clear()
      local off2 = events.on("rejected", f)
      off1()
      assert.is_true(events.active.rejected)
      off2()
      assert.is_nil(events.active.rejected)
    end)

    it("emits nothing to a handler that unsubscribed", function()
      local got = {}
      local off = events.on("state_change", function(ev) got[#got + 1] = ev end)
      local b = new_breaker({ consecutive_failures = 1 })
      b:force_open()
      assert.equal(1, #got)
      off()
      b:reset()
      assert.equal(1, #got)
    end)

    it("gives every type to a '*' handler, after the type's own handlers", function()
      local order = {}
      events.on("*", function(ev) order[#order + 1] = "*:" .. ev.type end)
      events.on("state_change", function(ev) order[#order + 1] = "own:" .. ev.type end)
      local b = new_breaker({ consecutive_failures = 1 })
      b:force_open()
      assert.same({ "own:state_change", "*:state_change" }, order)
    end)
  end)

  describe("payloads", function()
    it("state_change: breaker, from, to, reason, generation, type, time", function()
      local got = collect("state_change")
      local b = new_breaker({ consecutive_failures = 2, open_duration = 10, half_open_calls = 1 })
      local function fail() return nil, "boom" end
      b:call(fail)
      assert.equal(0, #got)
      b:call(fail)
      assert.equal(1, #got)
      local ev = got[1]
      assert.equal("state_change", ev.type)
      assert.equal(b.name, ev.breaker)
      assert.equal("closed", ev.from)
      assert.equal("open", ev.to)
      assert.equal("consecutive_failures", ev.reason)
      assert.equal(b:stats().generation, ev.generation)
      assert.is_number(ev.time)
      assert.is_true(math.abs(ev.time - os.time()) <= 2)
      breaker.clock.advance(10)
      assert.truthy(b:call(function() return "ok" end))
      assert.same({ "open", "half_open", "open_elapsed" }, { got[2].from, got[2].to, got[2].reason })
      assert.same({ "half_open", "closed", "probes_succeeded" }, { got[3].from, got[3].to, got[3].reason })
      assert.equal(3, #got)
    end)

    it("rejected: breaker, state, retry_after for open, half-open and forced-open refusals", function()
      local got = collect("rejected")
      local b = new_breaker({ consecutive_failures = 1, open_duration = 8, half_open_calls = 1 })
      b:call(function() error("x") end)
      breaker.clock.advance(3)
      local res, err = b:call(function() return 1 end)
      assert.is_nil(res)
      assert.equal("breaker_open", err.kind)
      assert.equal(1, #got)
      assert.same({ type = "rejected", breaker = b.name, state = "open", retry_after = 5, time = got[1].time },
                  got[1])
      breaker.clock.advance(5)
      local permit = assert(b:allow())          -- the only probe
      assert.is_nil((b:allow()))
      assert.equal("half_open", got[2].state)
      assert.equal(0, got[2].retry_after)
      b:record(permit, "success", 0.01)
      b:force_open()
      assert.is_nil((b:allow()))
      assert.equal("forced_open", got[3].state)
      assert.equal(math.huge, got[3].retry_after)
      assert.equal(3, #got)
    end)

    it("retry: policy, breaker, attempt, delay, reason, status, retry_after", function()
      local got = collect("retry")
      local waits = {}
      local p = policy.new{
        name = "ev-retry-policy",
        breaker = new_breaker({ consecutive_failures = 10 }),
        retry = { max_attempts = 3, base = 0.1, cap = 1, jitter = "none" },
        sleep = function(s) waits[#waits + 1] = s end,
      }
      local transport = { n = 0 }
      function transport.request(t)
        t.n = t.n + 1
        if t.n == 1 then return { status = 429, headers = { ["retry-after"] = "2" }, body = "" } end
        if t.n == 2 then return nil, require("breaker.error").new("timeout", "timed out") end
        return { status = 200, headers = {}, body = "ok" }
      end
      local res = assert(p:request(transport, { method = "GET", url = "http://x/" }))
      assert.equal(200, res.status)
      assert.equal(2, #got)
      local a, b = got[1], got[2]
      assert.equal("ev-retry-policy", a.policy)
      assert.equal(p.breaker.name, a.breaker)
      assert.equal(1, a.attempt)
      assert.equal("rate_limited", a.reason)
      assert.equal(429, a.status)
      assert.equal(2, a.retry_after)
      assert.equal(2, a.delay)                -- the server's Retry-After, not the backoff
      assert.equal(2, b.attempt)
      assert.equal("timeout", b.reason)
      assert.is_nil(b.status)
      assert.is_number(b.delay)
      assert.same(waits, { a.delay, b.delay })  -- the payload's delay is the wait
    end)

    it("fallback: how, reason, stop, attempts (value, function, cache)", function()
      local got = collect("fallback")
      local b = new_breaker({ consecutive_failures = 2, open_duration = 30 })
      local pv = policy.new{ name = "fb-value", breaker = b, fallback = { value = "v" }, sleep = sleep_none }
      assert.equal("v", pv:call(function() return nil, "down" end))
      assert.same({ "fallback", "fb-value", b.name, "value", "error", "not_retryable", 1 },
                  { got[1].type, got[1].policy, got[1].breaker, got[1].how, got[1].reason, got[1].stop,
                    got[1].attempts })
      assert.equal("v", pv:call(function() return nil, "down" end)) -- opens the breaker
      assert.equal("v", pv:call(function() return "never" end))     -- rejected, answered by the fallback
      assert.equal("breaker_open", got[3].reason)
      assert.equal("rejected", got[3].stop)
      assert.equal(0, got[3].attempts)

      local pf = policy.new{ name = "fb-fn", fallback = function(err) return "fn:" .. err.kind end,
                             sleep = sleep_none }
      assert.equal("fn:error", pf:call(function() error("x") end))
      assert.equal("function", got[4].how)
      assert.is_nil(got[4].breaker)

      local pc = policy.new{ name = "fb-cache", fallback = { cache = { size = 4 } }, sleep = sleep_none }
      local fail = false
      local function fn(k) if fail then return nil, "down" end return "answer " .. k end
      assert.equal("answer a", pc:call(fn, "a"))
      fail = true
      assert.equal("answer a", pc:call(fn, "a"))
      assert.equal("cache", got[5].how)
      assert.equal(5, #got)
    end)

    it("a fallback that raises emits no fallback event", function()
      local got = collect("fallback")
      local p = policy.new{ fallback = function() error("fallback broke") end, sleep = sleep_none }
      local res, err = p:call(function() return nil, "down" end)
      assert.is_nil(res)
      assert.equal("down", err)
      assert.matches("fallback broke", tostring(p.last.fallback_error))
      assert.equal(0, #got)
    end)

    it("budget_exhausted: policy, breaker, attempt, reason", function()
      local got = collect("budget_exhausted")
      local retries = collect("retry")
      local p = policy.new{
        name = "ev-budget",
        retry = { max_attempts = 5, base = 0.01, budget = { ratio = 0, min_per_second = 0 } },
        sleep = sleep_none,
      }
      local res, err = p:call(function() return nil, require("breaker.error").new("timeout", "slow") end)
      assert.is_nil(res)
      assert.equal("timeout", err.kind)
      assert.equal("budget", p.last.stop)
      assert.equal(0, #retries)
      assert.equal(1, #got)
      assert.same({ type = "budget_exhausted", policy = "ev-budget", attempt = 1, reason = "timeout",
                    time = got[1].time }, got[1])
    end)

    it("bulkhead_rejected: policy, breaker, max_concurrent, reason", function()
      local got = collect("bulkhead_rejected")
      local p
      p = policy.new{ name = "ev-bulkhead", bulkhead = { max_concurrent = 1, max_wait = 0 }, sleep = sleep_none }
      local inner_res, inner_err
      local outer = p:call(function()
        inner_res, inner_err = p:call(function() return "inner" end)
        return "outer"
      end)
      assert.equal("outer", outer)
      assert.is_nil(inner_res)
      assert.equal("bulkhead_full", inner_err.kind)
      assert.equal(1, #got)
      assert.same({ type = "bulkhead_rejected", policy = "ev-bulkhead", max_concurrent = 1,
                    reason = "bulkhead_full", time = got[1].time }, got[1])
    end)
  end)

  describe("a handler that raises", function()
    it("does not break the call, and is counted and kept", function()
      local before = events.errors
      events.on("state_change", function() error("handler broke") end)
      events.on("rejected", function() error({ "a table" }) end)
      local later = collect("state_change")
      local b = new_breaker({ consecutive_failures = 1 })
      local res, err = b:call(function() return nil, "fail" end)
      assert.is_nil(res)
      assert.equal("fail", err)
      assert.equal("open", b:state())
      assert.equal(1, #later)                   -- handlers after the failing one still ran
      assert.equal(before + 1, events.errors)
      assert.matches("handler broke", events.last_error)
      local r2, e2 = b:call(function() return "never" end)
      assert.is_nil(r2)
      assert.equal("breaker_open", e2.kind)
      assert.equal(before + 2, events.errors)
    end)

    it("does not break a policy's retry loop", function()
      events.on("retry", function() error("retry handler broke") end)
      local n_calls = 0
      local p = policy.new{ retry = { max_attempts = 3, base = 0.001 }, sleep = sleep_none }
      local res = p:call(function()
        n_calls = n_calls + 1
        if n_calls < 3 then return nil, require("breaker.error").new("timeout", "slow") end
        return "third"
      end)
      assert.equal("third", res)
      assert.equal(3, p.last.attempts)
      assert.matches("retry handler broke", events.last_error)
    end)
  end)

  describe("with a shared region", function()
    it("a transition made by another process shows in this one's stats at once and as an event", function()
      breaker.clock.unfreeze() -- the other process runs on the real clock
      local region_name = uname("evspec")
      local region = assert(shared.open(region_name, { capacity = 4 }))
      local name = "shared-ev"
      local cfg = { consecutive_failures = 2, open_duration = 60 }
      local b = breaker.new(name, cfg, { shared = region })
      made[#made + 1] = b
      assert.equal("closed", b:stats().state)
      local got = collect("state_change")
      -- Another process joins the region and trips the breaker.
      local script = ([[
        local breaker = require "breaker"
        local region = assert(require("breaker.shared").open(%q))
        local b = breaker.new(%q, { consecutive_failures = 2, open_duration = 60 }, { shared = region })
        for _ = 1, 2 do b:call(function() return nil, "fail" end) end
        io.write(b:state())
      ]]):format(region_name, name)
      local path = os.tmpname()
      local f = assert(io.open(path, "w"))
      f:write(script)
      f:close()
      local p = assert(io.popen("luajit " .. path .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      os.remove(path)
      assert.equal("open", out)
      -- No call here yet: stats read the shared state.
      local st = b:stats()
      assert.equal("open", st.state)
      assert.equal(2, st.total_failures)
      assert.equal(0, #got)
      -- The first use here notices the other process's transition.
      local res, err = b:call(function() return "x" end)
      assert.is_nil(res)
      assert.equal("breaker_open", err.kind)
      assert.equal(1, #got)
      assert.same({ "closed", "open", "consecutive_failures", name },
                  { got[1].from, got[1].to, got[1].reason, got[1].breaker })
      assert.is_true(shared.unlink(region_name))
    end)
  end)
end)
