-- Unit specs of breaker.ratelimit: the token bucket is driven with explicit
-- times and a sleep that only records, so no spec waits for real.
local ratelimit = require "breaker.ratelimit"

local function no_sleep() end

-- Admissions of `n` calls at `now` with max_wait 0.
local function admitted(rl, n, now)
  local k = 0
  for _ = 1, n do
    if rl:acquire(now, nil, no_sleep) then k = k + 1 end
  end
  return k
end

describe("breaker.ratelimit", function()
  it("gives the reserved token back when its sleep raises", function()
    -- bngx.sleep raises in phases that cannot yield
    local rl = ratelimit.new{ rate = 1, burst = 1, max_wait = 10 }
    assert.is_true(rl:acquire(0, nil, no_sleep))
    for _ = 1, 3 do
      assert.has_error(function()
        rl:acquire(0, nil, function() error("API disabled", 0) end)
      end, "API disabled")
    end
    local ok, err = ratelimit.new{ rate = 1, burst = 1 }:acquire(0, nil, no_sleep)
    assert.is_true(ok, err and tostring(err))
    assert.near(1, rl:wait_time(0), 1e-9) -- as before the raises: one token's wait, not four
  end)

  describe("a rate below one per period", function()
    it("holds one whole token, so a call goes through at once after an idle period", function()
      local rl = ratelimit.new{ rate = 0.5 }              -- one call per 2 s
      assert.equal(1, rl.burst)
      assert.is_true(rl:acquire(100, nil, no_sleep))
      local ok, err = rl:acquire(100, nil, no_sleep)
      assert.is_nil(ok)
      assert.same({ "rate_limited", "client" }, { err.kind, err.source })
      assert.near(2, err.retry_after, 1e-9)
      assert.is_true(rl:acquire(102, nil, no_sleep))
      -- long idle: the bucket is full (one token), no wait
      local waits = {}
      local w = ratelimit.new{ rate = 0.5, max_wait = 5 }
      assert.same({ true, 0 }, { w:acquire(500, nil, function(s) waits[#waits + 1] = s end) })
      assert.same({}, waits)
      -- an explicit burst is still honoured, and still at least 1
      assert.equal(3, ratelimit.new{ rate = 0.5, burst = 3 }.burst)
      assert.is_false(pcall(ratelimit.new, { rate = 0.5, burst = 0.5 }))
      assert.equal(1, ratelimit.new{ rate = 1 }.burst)
      assert.equal(10, ratelimit.new{ rate = 10 }.burst)
      assert.equal(5, admitted(ratelimit.new{ rate = 5, per = "minute" }, 10, 0))
    end)
  end)
  describe("header values", function()
    it("are finite, non-negative plain decimals; anything else is ignored", function()
      local pd = ratelimit.parse_duration
      assert.equal(2, pd(" 2s "))
      assert.equal(1.5, pd("1.5"))
      assert.equal(0, pd("0"))
      assert.equal(7, pd(7))
      for _, v in ipairs({ "inf", "+inf", "1e999", "1e3", "0x10", "-1", "-1s", "nan", "", " ", ".", "1.5.5s",
                           string.rep("9", 400), string.rep("9", 400) .. "h" }) do
        assert.is_nil(pd(v), v)
      end
      assert.is_nil(pd(math.huge))
      assert.is_nil(pd(0 / 0))
      assert.is_nil(pd(-1))
    end)

    it("never make the bucket infinite, negative or paused forever", function()
      -- a reset of inf: ignored, the next call goes
      local a = ratelimit.new{ learn = true }
      a:learn({ ["x-ratelimit-remaining-requests"] = "0", ["x-ratelimit-reset-requests"] = "inf" }, 0)
      assert.is_true(a:acquire(1, nil, no_sleep))
      -- remaining "-inf" or "-5": ignored, the bucket is as it was
      local b = ratelimit.new{ rate = 10 }
      b:learn({ ["x-ratelimit-remaining-requests"] = "-inf" }, 0)
      b:learn({ ["x-ratelimit-remaining-requests"] = "-5" }, 0)
      assert.equal(10, b:available(0))
      assert.is_true(b:acquire(1e6, nil, no_sleep))
      -- "0x10" is not 16 remaining, "1e999" not an infinite limit
      local c = ratelimit.new{ rate = 100 }
      c:learn({ ["x-ratelimit-remaining-requests"] = "0x10" }, 0)
      assert.equal(100, c:available(0))
      c:learn({ ["x-ratelimit-remaining-tokens"] = "1e999" }, 0)
      c:learn({ ["x-ratelimit-remaining-tokens"] = "0", ["x-ratelimit-reset-tokens"] = "0x10" }, 0)
      assert.equal(100, c:available(0))
    end)

    it("cap any pause at MAX_PAUSE (1 h)", function()
      assert.equal(3600, ratelimit.MAX_PAUSE)
      local rl = ratelimit.new{ learn = true }
      rl:learn({ ["x-ratelimit-remaining-requests"] = "0", ["x-ratelimit-reset-requests"] = "1000h" }, 0)
      local _, err = rl:acquire(0, nil, no_sleep)
      assert.near(3600, err.retry_after, 1e-9)
      assert.is_true(rl:acquire(3600, nil, no_sleep))
      -- a 429's pause (policy: rl:pause(now + retry_after, now)), even an infinite one
      local p = ratelimit.new{ rate = 10 }
      p:pause(math.huge, 100)
      local _, e2 = p:acquire(100, nil, no_sleep)
      assert.near(3600, e2.retry_after, 1e-9)
      assert.is_true(p:acquire(3700, nil, no_sleep))
      p:pause(0 / 0, 3701)
      assert.near(10, p:available(3701), 1e-9)
    end)
  end)
  describe("a pause (429 Retry-After)", function()
    it("leaves one token at its end, even after a burst: the retry at Retry-After goes", function()
      local rl = ratelimit.new{ rate = 10 }
      assert.equal(10, admitted(rl, 10, 1000))       -- the burst is spent
      assert.is_true(rl:acquire(1000.1, nil, no_sleep)) -- one token back, taken by the call that gets the 429
      rl:pause(1002.1, 1000.1)                       -- Retry-After: 2
      local _, err = rl:acquire(1002, nil, no_sleep)
      assert.near(0.1, err.retry_after, 1e-9)
      assert.is_true(rl:acquire(1002.1, nil, no_sleep))
      -- and the calls after it come at the rate, not as a burst
      local _, e2 = rl:acquire(1002.1, nil, no_sleep)
      assert.near(0.1, e2.retry_after, 1e-9)
      -- a full bucket is cut to one token too
      local full = ratelimit.new{ rate = 10 }
      full:pause(5, 0)
      assert.equal(1, admitted(full, 10, 5))
    end)

    it("lets a policy's retry at the end of Retry-After through its own limiter", function()
      local breaker = require "breaker"
      local policy = require "breaker.policy"
      local clock = breaker.clock
      clock.freeze(1000)
      finally(function() clock.unfreeze() end)
      local sleeps = {}
      local p = policy.new{ retry = { max_attempts = 3, base = 0.1 }, rate_limit = { rate = 10, per = "second" },
                            sleep = function(s) sleeps[#sleeps + 1] = s; clock.advance(s) end }
      local n = 0
      local t = { request = function()
        n = n + 1
        if n == 11 then return { status = 429, headers = { ["retry-after"] = "2" }, body = "" } end
        return { status = 200, headers = {}, body = "ok" }
      end }
      for _ = 1, 10 do assert(p:request(t, { method = "GET", url = "http://x/" })) end
      clock.advance(0.1)
      local res, err = p:request(t, { method = "GET", url = "http://x/" })
      assert.is_nil(err)
      assert.equal(200, res.status)
      assert.same({ 2 }, sleeps)
      assert.equal(2, p.last.attempts)
    end)
    it("stops a call already waiting for a token when a 429 pauses the policy meanwhile", function()
      -- rate 1/s: A takes the token at t = 0, B reserves the next and sleeps 1 s;
      -- while B sleeps, A's answer is a 429 with Retry-After: 30
      local rl = ratelimit.new{ rate = 1, burst = 1, max_wait = 2 }
      assert.is_true(rl:acquire(0, nil, no_sleep))
      local slept = {}
      local ok, err = rl:acquire(0, nil, function(s)
        slept[#slept + 1] = s
        if #slept == 1 then rl:pause(0.5 + 30, 0.5) end
      end)
      assert.is_nil(ok)
      assert.same({ "rate_limited", "client" }, { err.kind, err.source })
      assert.near(29.5, err.retry_after, 1e-9)       -- from its wake-up at t = 1
      assert.same({ 1 }, slept)
      -- the pause is intact: one call at its end
      assert.is_true(rl:acquire(30.5, nil, no_sleep))
      -- with max_wait room left, the waiter sleeps on to the pause's end and goes then
      local r2 = ratelimit.new{ rate = 1, burst = 1, max_wait = 10 }
      assert.is_true(r2:acquire(0, nil, no_sleep))
      local s2 = {}
      local ok2, w2 = r2:acquire(0, nil, function(s)
        s2[#s2 + 1] = s
        if #s2 == 1 then r2:pause(5, 0.5) end
      end)
      assert.same({ true, 5 }, { ok2, w2 })
      assert.same({ 1, 4 }, s2)
      -- ... and the deadline still bounds it
      local r3 = ratelimit.new{ rate = 1, burst = 1, max_wait = 10 }
      assert.is_true(r3:acquire(0, nil, no_sleep))
      local ok3, e3 = r3:acquire(0, 3, function() r3:pause(5, 0.5) end)
      assert.is_nil(ok3)
      assert.equal("rate_limited", e3.kind)
      -- a pause that ends before the waiter wakes does not hold it up again
      local r4 = ratelimit.new{ rate = 1, burst = 1, max_wait = 10 }
      assert.is_true(r4:acquire(0, nil, no_sleep))
      local s4 = {}
      assert.is_true(r4:acquire(0, nil, function(s)
        s4[#s4 + 1] = s
        if #s4 == 1 then r4:pause(0.8, 0.5) end
      end))
      assert.same({ 1 }, s4)
    end)
  end)
  describe("learn only (no own rate, breaker.llm's default)", function()
    local function H(remaining, reset, limit)
      return { ["x-ratelimit-remaining-requests"] = remaining, ["x-ratelimit-reset-requests"] = reset,
               ["x-ratelimit-limit-requests"] = limit }
    end

    it("keeps to the requests the server says remain, refilled at the server's rate until the reset", function()
      local rl = ratelimit.new{ learn = true }
      assert.equal(math.huge, rl:available(0))
      -- 2 of 60 left; the full 60 are back in 58 s: one comes back per second
      rl:learn(H("2", "58s", "60"), 10)
      assert.equal(2, admitted(rl, 10, 10.001))
      local _, err = rl:acquire(10.002, nil, no_sleep)
      assert.same({ "rate_limited", "client" }, { err.kind, err.source })
      assert.near(0.998, err.retry_after, 1e-6)
      assert.equal(1, admitted(rl, 10, 11.002))
      assert.equal(2, admitted(rl, 10, 13.002))
      -- at the reset the server's bucket is full: no own limit any more
      assert.equal(100, admitted(rl, 100, 68))
      assert.equal(math.huge, rl:available(68))
    end)

    it("waits for the learned refill when max_wait allows, spacing the waiters", function()
      local rl = ratelimit.new{ learn = true, max_wait = 20 }
      rl:learn(H("1", "2s", "3"), 0)                  -- 1 of 3 left, 2 back in 2 s: 1/s
      local waits = {}
      for _ = 1, 4 do
        assert.is_true(rl:acquire(0, nil, function(s) waits[#waits + 1] = s end))
      end
      -- the 4th would be due at 3 s, but the window ends at 2 s: the bucket is full then
      assert.same({ 1, 2, 2 }, waits)
    end)

    it("holds the remaining count until the reset even without the limit header", function()
      local rl = ratelimit.new{ learn = true }
      rl:learn(H("3", "5s"), 0)
      assert.equal(3, admitted(rl, 10, 1))
      local _, err = rl:acquire(1, nil, no_sleep)
      assert.near(4, err.retry_after, 1e-9)
      assert.equal(10, admitted(rl, 10, 5))
      -- remaining without a reset says nothing of when calls come back: ignored
      local n = ratelimit.new{ learn = true }
      n:learn(H("1"), 0)
      assert.equal(10, admitted(n, 10, 0))
      -- a newer response lowers what remains (never raises it: calls in
      -- flight are not in its count yet) and replaces the window
      local u = ratelimit.new{ learn = true }
      u:learn(H("5", "10s", "15"), 0)
      u:learn(H("1", "1s", "6"), 0)
      assert.equal(1, admitted(u, 10, 0))
      u:learn(H("4", "1s", "6"), 0)
      assert.equal(0, admitted(u, 10, 0))
      assert.equal(10, admitted(u, 10, 1))
    end)

    it("still pauses one request's worth of the server's refill when none remain", function()
      local rl = ratelimit.new{ learn = true }
      rl:learn(H("0", "6m0s", "60"), 0)               -- 60 per 6 min: one per 6 s
      local _, err = rl:acquire(0, nil, no_sleep)
      assert.near(6, err.retry_after, 1e-9)
      assert.equal(1, admitted(rl, 10, 6))
      local _, e2 = rl:acquire(6, nil, no_sleep)
      assert.near(6, e2.retry_after, 1e-9)
    end)

    it("caps the learned window at MAX_PAUSE, without shortening the pause after the last request", function()
      local rl = ratelimit.new{ learn = true }
      rl:learn(H("0", "1000h", "2"), 0)              -- 2 per 1000 h: one per 500 h, cut to 1 h
      local _, err = rl:acquire(0, nil, no_sleep)
      assert.near(3600, err.retry_after, 1e-9)
      assert.equal(10, admitted(rl, 10, 3600))       -- the window (cut to 1 h) is over too
    end)

    it("leaves a limiter with its own rate as it was: capped by remaining, refilled at its rate", function()
      local rl = ratelimit.new{ rate = 10 }
      rl:learn(H("2", "58s", "60"), 0)
      assert.equal(2, admitted(rl, 10, 0))
      assert.equal(10, admitted(rl, 20, 5))
    end)
  end)
end)
