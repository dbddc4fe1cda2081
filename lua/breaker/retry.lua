-- breaker.retry: backoff with jitter, the server's delay, and a retry budget.
--
-- The retry loop itself lives in breaker.policy (it has to interleave with
-- the breaker, the bulkhead and the deadline); this module holds what the loop
-- asks: how long to wait before retry n, whether the budget still allows a
-- retry, and how to read the clock and sleep.
--
--   local r = retry.new{ max_attempts = 4, base = 0.5, factor = 2, cap = 30 }
--   r:delay(1)        -- jittered backoff before the first retry
--   r:delay(2, 7)     -- the server asked for 7 s: 7 (replaces the computed delay)
--
-- Backoff before retry n (n = 1 is the first retry):
--   d = min(cap, base * factor^(n-1)), then jitter
--   "full" (default): uniform in [0, d)   "equal": d/2 + uniform [0, d/2)   "none": d
-- A delay the server asked for (Retry-After, retry-after-ms) is used as is,
-- never shortened, never jittered; if it exceeds `max_delay` the retry layer
-- gives up instead of waiting that long.
--
-- The retry budget (Finagle's RetryBudget, the idea behind gRPC's retry
-- throttling): over the last `ttl` seconds,
--     retries <= ratio * calls + min_per_second * ttl
-- where `calls` counts first attempts. One budget is shared by every call of a
-- policy (or of several policies, when they are given the same budget object),
-- so a 429 storm cannot multiply the load by max_attempts.

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local type, pairs, tostring, tonumber, error, pcall, require, rawget =
      type, pairs, tostring, tonumber, error, pcall, require, rawget
local setmetatable, getmetatable = setmetatable, getmetatable
local floor, min, huge, random = math.floor, math.min, math.huge, math.random
local format = string.format

local function fail(where, key, expected, got)
  error(format("%s.%s: expected %s, got %s", where, key, expected,
               type(got) == "string" and format("%q", got) or tostring(got)), 0)
end

local function check_keys(t, where, keys)
  for k in pairs(t) do
    if not keys[k] then error(format("%s: unknown key '%s'", where, tostring(k)), 0) end
  end
end

local function num(t, where, key, default, lo, lo_open, hi)
  local v = t[key]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < lo or (lo_open and v == lo) or (hi and v > hi) then
    fail(where, key, format("a number %s %s%s", lo_open and ">" or ">=", tostring(lo),
                            hi and (" and <= " .. tostring(hi)) or ""), v)
  end
  return v
end

local function int(t, where, key, default, lo)
  local v = num(t, where, key, default, lo)
  if v ~= floor(v) then fail(where, key, "an integer >= " .. lo, v) end
  return v
end

_M._fail, _M._check_keys, _M._num, _M._int = fail, check_keys, num, int

-- ---------------------------------------------------------------------------
-- Clock and sleep defaults

local bclock -- breaker.clock, false if the facade cannot load
local function breaker_clock()
  if bclock == nil then
    local ok, b = pcall(require, "breaker")
    bclock = ok and type(b) == "table" and type(b.clock) == "table" and b.clock or false
  end
  return bclock
end

local ffi_now, ffi_sleep
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, [[
      struct breaker_retry_timespec { long tv_sec; long tv_nsec; };
      int clock_gettime(int clk, struct breaker_retry_timespec *tp);
      int poll(void *fds, unsigned long nfds, int timeout);
    ]])
    local ts = ffi.new("struct breaker_retry_timespec")
    ffi_now = function()
      ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
    ffi_sleep = function(s) ffi.C.poll(nil, 0, floor(s * 1000 + 0.5)) end
  end
end

-- Monotonic seconds: breaker.clock.now_precise() (so specs that freeze the
-- breaker's clock move this one too), else clock_gettime through the FFI,
-- else os.time().
function _M.now()
  local c = breaker_clock()
  if c then return (c.now_precise or c.now)() end
  if ffi_now then return ffi_now() end
  return os.time()
end

-- Phases of OpenResty in which ngx.sleep and cosockets may yield (shared
-- with breaker.bulkhead and breaker.cosocket).
local YIELDABLE = { rewrite = true, access = true, content = true, timer = true,
                    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
                    preread = true }
_M.YIELDABLE = YIELDABLE

-- Sleeps `seconds`: ngx.sleep when running in a yieldable OpenResty phase
-- (the worker keeps serving others), else breaker.clock.sleep (a C sleep that
-- blocks this process), else poll() through the FFI.
function _M.sleep(seconds)
  if seconds <= 0 then return end
  local ngx = rawget(_G, "ngx")
  if ngx and ngx.sleep and ngx.get_phase and YIELDABLE[ngx.get_phase()] then
    return ngx.sleep(seconds)
  end
  local c = breaker_clock()
  if c and c.sleep then return c.sleep(seconds) end
  if ffi_sleep then return ffi_sleep(seconds) end
  error("breaker.retry: no way to sleep here; pass a `sleep` function", 2)
end

-- ---------------------------------------------------------------------------
-- Retry budget

local budget_mt = { __index = {} }
local budget = budget_mt.__index
local NBUCKETS = 10

local BUDGET_KEYS = { ratio = true, min_per_second = true, ttl = true }

-- Makes a retry budget: over the last `ttl` seconds (default 10), retries may
-- not exceed `ratio` (default 0.2) times the calls plus `min_per_second`
-- (default 1) times `ttl`. `where` names the option in error messages.
function _M.budget(opts, where)
  where = where or "budget"
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(where, "(options)", "a table", opts) end
  check_keys(opts, where, BUDGET_KEYS)
  local ttl = num(opts, where, "ttl", 10, 0, true)
  local b = setmetatable({
    ratio = num(opts, where, "ratio", 0.2, 0),
    min_per_second = num(opts, where, "min_per_second", 1, 0),
    ttl = ttl,
    width = ttl / NBUCKETS,
    epoch = {}, calls = {}, retries = {},
  }, budget_mt)
  for i = 1, NBUCKETS do b.epoch[i], b.calls[i], b.retries[i] = -1, 0, 0 end
  return b
end

-- True when `v` is a budget made by _M.budget.
function _M.is_budget(v)
  return type(v) == "table" and getmetatable(v) == budget_mt
end

local function slot(b, now)
  local e = floor(now / b.width)
  local i = e % NBUCKETS + 1
  if b.epoch[i] ~= e then
    b.epoch[i], b.calls[i], b.retries[i] = e, 0, 0
  end
  return i, e
end

-- Counts one call (a first attempt) at time `now`.
function budget.deposit(b, now)
  local i = slot(b, now)
  b.calls[i] = b.calls[i] + 1
end

local function sums(b, now)
  local _, e = slot(b, now)
  local calls, retries = 0, 0
  local epoch = b.epoch
  for i = 1, NBUCKETS do
    if epoch[i] > e - NBUCKETS then
      calls, retries = calls + b.calls[i], retries + b.retries[i]
    end
  end
  return calls, retries
end

-- Retries the budget still allows at `now` (may be fractional, never negative).
function budget.available(b, now)
  local calls, retries = sums(b, now)
  local a = b.ratio * calls + b.min_per_second * b.ttl - retries
  return a > 0 and a or 0
end

-- Takes one retry from the budget at `now`: true if allowed (and counted).
function budget.withdraw(b, now)
  if budget.available(b, now) < 1 then return false end
  local i = slot(b, now)
  b.retries[i] = b.retries[i] + 1
  return true
end

-- { calls =, retries =, available = } over the current window.
function budget.stats(b, now)
  local calls, retries = sums(b, now)
  return { calls = calls, retries = retries, available = budget.available(b, now) }
end

-- ---------------------------------------------------------------------------
-- Retry settings

local JITTER = { full = true, equal = true, none = true }
local KEYS = { max_attempts = true, base = true, factor = true, cap = true,
               jitter = true, max_delay = true, random = true, budget = true }

-- Validates retry settings and returns a retry object. Keys (all optional):
--   max_attempts (3, total attempts including the first), base (0.5 s),
--   factor (2), cap (30 s, ceiling of the computed backoff), jitter ("full"),
--   max_delay (60 s: a server delay longer than this is not waited for; false
--   for no limit), random (function() -> [0,1), default math.random),
--   budget (a budget object to share, a table of budget options, or false
--   for none; default: a fresh budget with the default options).
-- `true` means all defaults. `where` names the option in error messages.
function _M.new(opts, where)
  where = where or "retry"
  if opts == true or opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(where, "(value)", "a table, true or false", opts) end
  check_keys(opts, where, KEYS)
  local self = setmetatable({
    max_attempts = int(opts, where, "max_attempts", 3, 1),
    base = num(opts, where, "base", 0.5, 0),
    factor = num(opts, where, "factor", 2, 1),
    cap = num(opts, where, "cap", 30, 0),
    jitter = opts.jitter or "full",
    random = opts.random or random,
  }, mt)
  if not JITTER[self.jitter] then fail(where, "jitter", "\"full\", \"equal\" or \"none\"", opts.jitter) end
  if type(self.random) ~= "function" then fail(where, "random", "a function", opts.random) end
  if opts.max_delay == false then self.max_delay = huge
  else self.max_delay = num(opts, where, "max_delay", 60, 0) end
  local b = opts.budget
  if b == false then self.budget = false -- not nil: that would find _M.budget
  elseif _M.is_budget(b) then self.budget = b
  else self.budget = _M.budget(b, where .. ".budget") end
  return self
end

-- Computed backoff before retry `n` (1 = first retry), jitter applied.
function _M.backoff(self, n)
  local d = min(self.cap, self.base * self.factor ^ (n - 1))
  local j = self.jitter
  if j == "full" then return d * self.random()
  elseif j == "equal" then return d / 2 + d / 2 * self.random() end
  return d
end

-- Delay before retry `n`: the server's delay when given (never shortened),
-- else the jittered backoff. Returns nil when the server asks for more than
-- max_delay (the caller should stop rather than wait).
function _M.delay(self, n, server_delay)
  if server_delay then
    if server_delay > self.max_delay then return nil end
    return server_delay
  end
  return _M.backoff(self, n)
end

return _M
