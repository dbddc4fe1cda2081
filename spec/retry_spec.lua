local retry = require "breaker.retry"

-- A random source that returns the given values in turn.
local function seq(...)
  local v, i = { ... }, 0
  return function()
    i = i % #v + 1
    return v[i]
  end
end

describe("breaker.retry", function()
  describe("backoff", function()
    it("grows exponentially from base by factor, capped, with full jitter", function()
      local r = retry.new{ base = 0.5, factor = 2, cap = 3, random = seq(1 - 1e-9) }
      local got = {}
      for n = 1, 6 do got[n] = r:backoff(n) end
      local want = { 0.5, 1, 2, 3, 3, 3 }
      for n = 1, 6 do assert.near(want[n], got[n], 1e-6) end
    end)

    it("draws full jitter uniformly below the computed delay", function()
      local r = retry.new{ base = 1, factor = 2, cap = 100, random = seq(0, 0.25, 0.5) }
      assert.equal(0, r:backoff(3))
      assert.equal(1, r:backoff(3))
      assert.equal(2, r:backoff(3))
    end)

    it("supports equal jitter and no jitter", function()
      local eq = retry.new{ base = 1, factor = 2, jitter = "equal", random = seq(0, 0.5) }
      assert.equal(2, eq:backoff(3))
      assert.equal(3, eq:backoff(3))
      local none = retry.new{ base = 1, factor = 3, jitter = "none" }
      assert.equal(9, none:backoff(3))
    end)

    it("uses math.random by default and stays within [0, d)", function()
      local r = retry.new{ base = 1, factor = 2, cap = 4 }
      for _ = 1, 200 do
        local d = r:backoff(10)
        assert.is_true(d >= 0 and d < 4)
      end
    end)
  end)

  describe("delay", function()
    local r = retry.new{ base = 1, jitter = "none", max_delay = 60 }

    it("uses the server's delay instead of the computed one", function()
      assert.equal(1, r:delay(1))
      assert.equal(7, r:delay(1, 7))
      assert.equal(0.25, r:delay(5, 0.25)) -- even when shorter than the backoff
    end)

    it("never shortens a long server delay: it gives up instead", function()
      assert.equal(60, r:delay(1, 60))
      assert.is_nil(r:delay(1, 61))
      local nolimit = retry.new{ max_delay = false }
      assert.equal(3600, nolimit:delay(1, 3600))
    end)
  end)

  describe("budget", function()
    it("allows min_per_second * ttl retries with no calls", function()
      local b = retry.budget{ ratio = 0, min_per_second = 0.5, ttl = 10 }
      local n = 0
      while b:withdraw(0) do n = n + 1 end
      assert.equal(5, n)
    end)

    it("allows ratio * calls more", function()
      local b = retry.budget{ ratio = 0.25, min_per_second = 0, ttl = 10 }
      for _ = 1, 20 do b:deposit(1) end
      local n = 0
      while b:withdraw(1) do n = n + 1 end
      assert.equal(5, n)
      b:deposit(1); b:deposit(1); b:deposit(1)
      assert.is_false(b:withdraw(1))
      b:deposit(1)
      assert.is_true(b:withdraw(1))
    end)

    it("forgets calls and retries older than ttl", function()
      local b = retry.budget{ ratio = 0, min_per_second = 0.2, ttl = 10 }
      assert.is_true(b:withdraw(0))
      assert.is_true(b:withdraw(0.5))
      assert.is_false(b:withdraw(5))
      assert.is_false(b:withdraw(9.9))
      assert.is_true(b:withdraw(10.5)) -- the retries at 0 and 0.5 left the window
      local s = b:stats(10.5)
      assert.equal(1, s.retries)
      assert.near(1, s.available, 1e-9)
    end)

    it("forgets deposits older than ttl", function()
      local b = retry.budget{ ratio = 1, min_per_second = 0, ttl = 1 }
      for _ = 1, 3 do b:deposit(0) end
      assert.equal(3, b:available(0.5))
      assert.equal(0, b:available(2))
    end)

    it("is made by default for a retry and can be shared or turned off", function()
      local r = retry.new{}
      assert.is_true(retry.is_budget(r.budget))
      assert.equal(0.2, r.budget.ratio)
      local shared = retry.budget{ ratio = 0.1 }
      assert.equal(shared, retry.new{ budget = shared }.budget)
      assert.is_false(retry.new{ budget = false }.budget)
      assert.equal(0.5, retry.new{ budget = { ratio = 0.5 } }.budget.ratio)
    end)
  end)

  describe("settings", function()
    it("has documented defaults", function()
      local r = retry.new()
      assert.same({ 3, 0.5, 2, 30, "full", 60 }, { r.max_attempts, r.base, r.factor, r.cap, r.jitter, r.max_delay })
      assert.equal(3, retry.new(true).max_attempts)
    end)

    it("raises naming the key", function()
      assert.has_error(function() retry.new{ max_attempts = 0 } end,
        "retry.max_attempts: expected a number >= 1, got 0")
      assert.has_error(function() retry.new{ max_attempts = 2.5 } end,
        "retry.max_attempts: expected an integer >= 1, got 2.5")
      assert.has_error(function() retry.new{ base = -1 } end, "retry.base: expected a number >= 0, got -1")
      assert.has_error(function() retry.new{ factor = 0.5 } end, "retry.factor: expected a number >= 1, got 0.5")
      assert.has_error(function() retry.new{ jitter = "half" } end,
        'retry.jitter: expected "full", "equal" or "none", got "half"')
      assert.has_error(function() retry.new{ random = 4 } end, "retry.random: expected a function, got 4")
      assert.has_error(function() retry.new{ max_atempts = 3 } end, "retry: unknown key 'max_atempts'")
      assert.has_error(function() retry.new({ budget = { ratoi = 1 } }, "policy.retry") end,
        "policy.retry.budget: unknown key 'ratoi'")
      assert.has_error(function() retry.budget{ ttl = 0 } end, "budget.ttl: expected a number > 0, got 0")
    end)
  end)

  describe("clock and sleep", function()
    local breaker = require "breaker"

    after_each(function() breaker.clock.unfreeze() end)

    it("reads breaker.clock, so freezing it moves retry.now", function()
      breaker.clock.freeze(1000)
      assert.equal(1000, retry.now())
      breaker.clock.advance(2.5)
      assert.equal(1002.5, retry.now())
    end)

    it("sleeps with breaker.clock.sleep outside OpenResty", function()
      local orig, slept = breaker.clock.sleep, nil
      breaker.clock.sleep = function(s) slept = s end
      local ok, err = pcall(retry.sleep, 0.25)
      breaker.clock.sleep = orig
      assert.is_true(ok, err)
      assert.equal(0.25, slept)
    end)

    it("sleeps with ngx.sleep in a yieldable OpenResty phase only", function()
      local slept, phase = nil, "content"
      _G.ngx = { sleep = function(s) slept = s end, get_phase = function() return phase end }
      local orig, blocked = breaker.clock.sleep, nil
      breaker.clock.sleep = function(s) blocked = s end
      local ok, err = pcall(function()
        retry.sleep(0.5)
        phase = "log"
        retry.sleep(0.75)
      end)
      _G.ngx = nil
      breaker.clock.sleep = orig
      assert.is_true(ok, err)
      assert.equal(0.5, slept)
      assert.equal(0.75, blocked)
    end)

    it("does not sleep for zero or less", function()
      local orig, called = breaker.clock.sleep, false
      breaker.clock.sleep = function() called = true end
      retry.sleep(0)
      retry.sleep(-1)
      breaker.clock.sleep = orig
      assert.is_false(called)
    end)
  end)
end)
