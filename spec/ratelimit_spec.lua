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
end)
