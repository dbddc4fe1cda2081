-- breaker.ratelimit: a client-side token bucket that can learn from the
-- upstream's rate-limit headers, so the app slows down before the 429 arrives.
--
--   rate_limit = { rate = 500, per = "minute" }        -- 500 requests per minute
--   rate_limit = { rate = 10, per = 1, burst = 5, max_wait = 2 }
--   rate_limit = { learn = true }                      -- no own limit, only learn
--
-- rate/per: requests per period (`per` in seconds, or "second", "minute",
-- "hour"; default 1 s). burst: bucket size (default `rate`, at least 1: a
-- rate below 1 per period still lets one call through). max_wait: how long
-- a call may wait for a token (default 0: reject at once with kind
-- "rate_limited", source "client", retry_after = seconds until a token).
-- A waiting call reserves its token first, so concurrent waiters are spaced
-- out at the rate instead of waking together.
-- learn (default true): after each response
--   x-ratelimit-remaining-requests: R   -> the bucket holds at most R tokens;
--     without an own rate (learn only), with x-ratelimit-reset-requests: T,
--     until T, refilled meanwhile at (L - R) / T (L: x-ratelimit-limit-requests,
--     the server's refill), then unlimited again; R without T is ignored there
--   R == 0 with x-ratelimit-reset-requests: T ("1s", "6m0s", "20ms", or seconds)
--     -> no request until T / x-ratelimit-limit-requests (one request's worth of
--        the server's refill) or, without the limit header, until T
--   x-ratelimit-remaining-tokens: N below min_tokens (default 1), with
--   x-ratelimit-reset-tokens: T -> no request until T (an LLM provider's
--      tokens-per-minute budget is spent: a request now would get a 429)
-- and a 429 with a Retry-After pauses every call of the policy until then.
-- Header numbers must be finite, non-negative plain decimals (anything else,
-- e.g. "inf", "1e999", "0x10", "-1", is ignored), and no header or 429 pauses
-- the bucket for more than MAX_PAUSE (1 h).
-- min_tokens: set it near the tokens one request uses (prompt + max_tokens)
-- to hold calls back before the budget runs out rather than after. The
-- bucket is per Lua VM (per nginx worker).

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local retry = require "breaker.retry"
local errors = require "breaker.error"
local type, tonumber, setmetatable, pcall, error = type, tonumber, setmetatable, pcall, error
local huge = math.huge
local format, gmatch, find, match = string.format, string.gmatch, string.find, string.match
local fail, check_keys, num = retry._fail, retry._check_keys, retry._num

local KEYS = { rate = true, per = true, burst = true, max_wait = true, learn = true, min_tokens = true }
local PERIODS = { second = 1, minute = 60, hour = 3600 }
local UNITS = { h = 3600, m = 60, s = 1, ms = 1e-3, us = 1e-6, ["\194\181s"] = 1e-6, ns = 1e-9 }

-- The longest pause a header or a 429 can impose: a larger value (a typo, a
-- misbehaving proxy) is cut to this, so that one response cannot stop every
-- call of the policy for days.
_M.MAX_PAUSE = 3600

-- A header's number: a finite, non-negative plain decimal ("12", "0.5", " 3 "),
-- else nil (no sign, exponent, hex, "inf" or "nan"; a number must be finite).
local function decimal(v)
  if type(v) == "number" then
    return (v >= 0 and v < huge) and v or nil
  end
  if type(v) ~= "string" then return nil end
  local s = match(v, "^%s*(%d+%.?%d*)%s*$") or match(v, "^%s*(%.%d+)%s*$")
  local n = s and tonumber(s)
  return (n and n < huge) and n or nil
end

-- Seconds from a Go-style duration ("1s", "6m0s", "1h2m3.5s", "20ms") or a
-- plain number of seconds; nil when the value is not understood, negative
-- or not finite.
function _M.parse_duration(v)
  if type(v) ~= "string" then return decimal(v) end
  local n = decimal(v)
  if n then return n end
  if not find(v, "^%s*[%d%.]") then return nil end
  local total, consumed = 0, 0
  for num_s, unit in gmatch(v, "([%d%.]+)([%a\194\181]+)") do
    local x, u = decimal(num_s), UNITS[unit]
    if not x or not u then return nil end
    total = total + x * u
    consumed = consumed + #num_s + #unit
  end
  local trimmed = v:match("^%s*(.-)%s*$")
  if consumed ~= #trimmed or not (total < huge) then return nil end
  return total
end

-- Validates a rate_limit option and returns a limiter (nil for nil/false).
function _M.new(opt, where)
  where = where or "rate_limit"
  if opt == nil or opt == false then return nil end
  if type(opt) ~= "table" then fail(where, "(value)", "a table", opt) end
  check_keys(opt, where, KEYS)
  local per = opt.per
  if per == nil then per = 1
  elseif type(per) == "string" then
    if not PERIODS[per] then fail(where, "per", "seconds or \"second\", \"minute\", \"hour\"", per) end
    per = PERIODS[per]
  else
    per = num(opt, where, "per", 1, 0, true)
  end
  local rate = num(opt, where, "rate", nil, 0, true)
  local learn = opt.learn
  if learn ~= nil and type(learn) ~= "boolean" then fail(where, "learn", "a boolean", learn) end
  if rate == nil and learn == false then fail(where, "rate", "a number > 0 (or learn = true)", nil) end
  local rps = rate and rate / per or huge
  -- a bucket below one token would never admit a call
  local burst = num(opt, where, "burst", rate and (rate > 1 and rate or 1) or huge, 1)
  return setmetatable({
    rps = rps, burst = burst,
    max_wait = num(opt, where, "max_wait", 0, 0),
    min_tokens = num(opt, where, "min_tokens", 1, 0),
    learn_headers = learn ~= false,
    tokens = burst, last = -huge,
    pauses = 0, -- pauses so far: a waiter that slept through one checks again
    lend = -huge, lrps = 0, lcap = huge, -- learn only: the learned window (see refill)
  }, mt)
end

-- Without an own rate (learn only), the bucket is unlimited except while a
-- learned window is open (until `lend`, the server's reset): then it holds
-- what the server said remains, less what was taken since, refilled at the
-- learned rate `lrps` up to the server's limit `lcap`.
local function refill(self, now)
  local last = self.last
  if now > last then
    if self.rps == huge then
      if now >= self.lend then
        self.tokens = self.burst > self.tokens and self.burst or self.tokens
      else
        local t = self.tokens + (now - last) * self.lrps
        if t > self.lcap then t = self.lcap end
        if t > self.tokens then self.tokens = t end
      end
    elseif last == -huge then
      self.tokens = self.burst > self.tokens and self.burst or self.tokens
    else
      local t = self.tokens + (now - last) * self.rps
      self.tokens = t < self.burst and t or self.burst
    end
    self.last = now
  end
end

-- Seconds from `now` until a token is available (0 if one is).
function _M.wait_time(self, now)
  refill(self, now)
  local ready = self.last
  local tk = self.tokens
  if tk < 1 then
    if self.rps == huge then
      -- the learned refill, or the window's end (the server's bucket is full)
      local lend = self.lend > ready and self.lend or ready
      local r = self.lrps > 0 and ready + (1 - tk) / self.lrps or huge
      ready = r < lend and r or lend
    else
      ready = ready + (1 - tk) / self.rps
    end
  end
  local w = ready - now
  return w > 0 and w or 0
end

-- The wait of acquire() when no token is free now; a loop of its own, so
-- that the common call (a token is free) runs none (LuaJIT aborts traces
-- on inner loops).
local function wait_token(self, now, deadline, sleep, w)
  local waited = 0
  while true do
    if waited + w > self.max_wait or (deadline and now + w > deadline) then
      return nil, errors.new("rate_limited",
        format("client-side rate limit: next request allowed in %.3fs", w),
        { retry_after = w, source = "client" })
    end
    self.tokens = self.tokens - 1 -- reserve, then wait for it
    local pauses = self.pauses
    local ok, serr = pcall(sleep, w)
    if not ok then -- (a sleep in a phase that cannot yield) the token goes back
      if self.pauses == pauses then self.tokens = self.tokens + 1 end
      error(serr, 0)
    end
    waited, now = waited + w, now + w
    if self.pauses == pauses then return true, waited end
    -- a pause came while this call slept and voided its reservation
    w = _M.wait_time(self, now)
    if w == 0 then
      self.tokens = self.tokens - 1
      return true, waited
    end
  end
end

-- Takes a token at `now`: true, waited when one is free or becomes free within
-- max_wait and before `deadline` (then sleeps until it does), else nil, err.
-- A waiter reserves its token before it sleeps; if a pause came meanwhile (a
-- 429 to another call), the reservation is void and it checks again at its
-- wake-up time (`now` + the time slept), waiting on only if the new wait
-- still fits max_wait (counted from the first call) and the deadline.
function _M.acquire(self, now, deadline, sleep)
  local w = _M.wait_time(self, now)
  if w == 0 then
    self.tokens = self.tokens - 1
    return true, 0
  end
  return wait_token(self, now, deadline, sleep, w)
end

-- No request is admitted before `until_t` (e.g. a 429's Retry-After); the
-- bucket holds exactly one token then, so the first call at the pause's end
-- (the retry the policy sends when Retry-After has passed) goes at once, and
-- the calls after it follow at the rate instead of as a burst.
function _M.pause(self, until_t, now)
  if until_t ~= until_t then return end
  local max_t = now + _M.MAX_PAUSE
  if until_t > max_t then until_t = max_t end
  refill(self, now)
  if until_t > self.last then
    self.last = until_t
    self.tokens = 1
    self.pauses = self.pauses + 1 -- waiters asleep now must check again
  end
end

local function hdr(h, name)
  local v = h[name]
  if type(v) == "table" then v = v[1] end
  return v
end

-- Learns from a response's rate-limit headers at time `now` (see the top).
function _M.learn(self, headers, now)
  if not self.learn_headers or type(headers) ~= "table" then return end
  local r = decimal(hdr(headers, "x-ratelimit-remaining-requests"))
  if r then
    refill(self, now)
    local t = _M.parse_duration(hdr(headers, "x-ratelimit-reset-requests"))
    local l = decimal(hdr(headers, "x-ratelimit-limit-requests"))
    if self.rps == huge and t and t > 0 then
      -- learn only: R requests until the reset, refilled meanwhile at the
      -- server's rate: (L - R) requests come back over the T seconds left
      local span = t < _M.MAX_PAUSE and t or _M.MAX_PAUSE
      self.lend = now + span
      self.lrps = (l and l > r) and (l - r) / span or 0
      self.lcap = (l and l >= r) and l or huge
    end
    -- without an own rate, R counts only within a learned window: nothing
    -- else says when the requests come back
    if (self.rps ~= huge or self.lend > now) and self.tokens > r then self.tokens = r end
    if r < 1 and t then
      if l and l >= 1 then t = t / l end
      _M.pause(self, now + t, now)
    end
  end
  local rt = decimal(hdr(headers, "x-ratelimit-remaining-tokens"))
  if rt and rt < self.min_tokens then
    -- the reset is when the token budget is back in full; nothing says how
    -- fast it refills before that, so wait for it
    local t = _M.parse_duration(hdr(headers, "x-ratelimit-reset-tokens"))
    if t then _M.pause(self, now + t, now) end
  end
end

-- Tokens available at `now` (may be negative while callers wait).
function _M.available(self, now)
  refill(self, now)
  return self.tokens
end

return _M
