-- breaker.policy: fallback ∘ deadline ∘ retry ∘ breaker ∘ bulkhead ∘ rate limit ∘ call.
--
--   local policy = require "breaker.policy"
--   local p = policy.new{
--     breaker    = { name = "openai", consecutive_failures = 5 },  -- or a breaker object
--     retry      = { max_attempts = 4, base = 0.5, cap = 20, budget = { ratio = 0.2 } },
--     deadline   = 30,                  -- seconds for the whole call, waits included
--     bulkhead   = { max_concurrent = 16 },
--     rate_limit = { rate = 500, per = "minute" },
--     fallback   = { cache = { size = 500 }, value = "busy, try later" },
--     classify   = { statuses = { [404] = "success" } },  -- or a function
--   }
--   local res, err = p:request(transport, { method = "POST", url = ..., body = ... })
--   local a, b = p:call(fn, x, y)
--   print(p.last.attempts, p.last.wait, p.last.outcome, p.last.fallback)
--
-- Each attempt passes the breaker (a rejection is never retried against the
-- same breaker: the loop stops), then the bulkhead, then the rate limiter,
-- then runs; its result is classified (breaker.classify), recorded in the
-- breaker with its latency (and the server's Retry-After, which can stretch
-- the open time), and retried while the verdict is retryable, attempts remain,
-- the breaker is not open, the retry budget allows, the server's delay is
-- within retry.max_delay, and the wait ends before the deadline. Otherwise the
-- last error goes to the fallback, if any, or back to the caller.
--
-- Report: every call fills a report table with
--   attempts  times the function / transport ran
--   wait      seconds spent waiting (backoff, bulkhead, rate limiter)
--   elapsed   seconds from the start of the call to its end
--   outcome   "success" | "failure" | "ignored" (the last attempt's verdict),
--             or "rejected" (a breaker, bulkhead, rate limiter or deadline refused)
--   stop      why the loop ended: "success", "not_retryable", "max_attempts",
--             "breaker_open", "budget", "deadline", "max_delay", "rejected"
--   fallback  nil, or "cache" | "function" | "value" when a fallback answered
--   reason    the final error's kind when the call failed (the fallback's why)
--   error     the final error (nil on success)
--   fallback_error  the fallback function's raised error, if it raised
-- The report is `p.last` unless the caller passes its own table
-- (p:call_into(report, fn, ...), p:request(t, req, report)). p.last is
-- rewritten at the end of each call, after everything that can yield, so it
-- belongs to the call that just returned until the caller yields or calls the
-- policy again; copy the fields you want to keep. No table is made per call.
--
-- Notes:
-- * `breaker = { name = ... }` makes a new breaker and raises if one of that
--   name exists; to share one breaker between policies pass the object
--   (breaker.get(name)).
-- * A cached fallback answer is the very object an earlier call returned:
--   treat responses as read-only.
-- * Bulkhead and rate-limit waits, and retries, need a sleep that lets other
--   work run to be useful for concurrency: ngx.sleep under OpenResty (the
--   default there). Plain Lua 5.1 cannot yield across pcall, so fn must not
--   yield there; LuaJIT can.
-- * On the success path p:call makes no garbage (up to 4 arguments) and
--   p:request none beyond the transport's (a `deadline` copies req once).

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local classify = require "breaker.classify"
local retry = require "breaker.retry"
local fallback = require "breaker.fallback"
local bulkhead = require "breaker.bulkhead"
local ratelimit = require "breaker.ratelimit"
local errors = require "breaker.error"
-- Events (breaker.events) fire only on slow paths (a retry, a fallback, an
-- exhausted budget, a full bulkhead) and only while someone subscribes:
-- ev_on[type] is tested before any payload is built.
local events = require "breaker.events"
local ev_on, emit = events.active, events.emit

local type, pairs, tostring, pcall, error, select, setmetatable, require =
      type, pairs, tostring, pcall, error, select, setmetatable, require
local loadfile, setfenv, getmetatable = loadfile, setfenv, getmetatable
local unpack = unpack or table.unpack -- luacheck: ignore 143
local format = string.format
local ceil = math.ceil
local fail, check_keys = retry._fail, retry._check_keys
local is_error = errors.is

-- ---------------------------------------------------------------------------
-- Construction

-- Gives a report table every field, so that later stores (nil included) hit
-- existing slots: LuaJIT traces then never leave on a missing key.
local function shape(rep)
  rep.attempts, rep.wait, rep.elapsed = 0, 0, 0
  rep.outcome, rep.stop, rep.fallback, rep.reason = false, false, false, false
  rep.error, rep.fallback_error = false, false
  return rep
end

local KEYS = { name = true, breaker = true, retry = true, fallback = true, bulkhead = true,
               rate_limit = true, deadline = true, classify = true, clock = true, sleep = true }

local function is_breaker(v)
  return type(v) == "table" and type(v.allow) == "function" and type(v.record) == "function"
end

local function make_breaker(v, where)
  if v == nil or v == false then return nil end
  if is_breaker(v) then
    if type(v.state) ~= "function" then fail(where, "breaker", "an object with allow, record and state", v) end
    return v
  end
  if type(v) ~= "table" then fail(where, "breaker", "a breaker object or a config table", v) end
  if type(v.name) ~= "string" or v.name == "" then
    fail(where, "breaker.name", "a non-empty string (required to make a breaker)", v.name)
  end
  local cfg = {}
  for k, x in pairs(v) do if k ~= "name" then cfg[k] = x end end
  local B = require "breaker"
  local ok, b = pcall(B.new, v.name, cfg)
  if not ok then
    error(format("%s.breaker: %s", where, (tostring(b):gsub("^[^:]*:%d+: ", ""))), 0)
  end
  return b
end

local function build(spec, where)
  if type(spec) ~= "table" then fail(where, "(spec)", "a table", spec) end
  check_keys(spec, where, KEYS)
  local self = setmetatable({}, mt)

  local clock = spec.clock
  if clock == nil then
    local okb, B = pcall(require, "breaker")
    local c = okb and type(B) == "table" and B.clock
    if c and c.now_precise then
      -- Looked up on each call, so breaker.clock.freeze/advance move it too.
      self.now = function() return c.now_precise() end
    else
      self.now = retry.now
    end
  elseif type(clock) == "function" then
    self.now = clock
  elseif type(clock) == "table" and type(clock.now) == "function" then
    local now = clock.now
    self.now = function() return now() end
  else
    fail(where, "clock", "a function returning seconds, or a table with now()", clock)
  end
  local sleep = spec.sleep
  if sleep ~= nil and type(sleep) ~= "function" then fail(where, "sleep", "a function(seconds)", sleep) end
  self.sleep = sleep or retry.sleep

  self.name = spec.name
  if self.name ~= nil and type(self.name) ~= "string" then fail(where, "name", "a string", self.name) end

  local r = spec.retry
  if r ~= nil and r ~= false then
    self.retry = retry.new(r, where .. ".retry")
    self.max_attempts = self.retry.max_attempts
    self.budget = self.retry.budget
  else
    self.max_attempts = 1
  end

  local d = spec.deadline
  if d ~= nil and d ~= false and (type(d) ~= "number" or not (d > 0)) then
    fail(where, "deadline", "seconds > 0", d)
  end
  self.deadline = d or nil

  self.fallback = fallback.new(spec.fallback, where .. ".fallback")
  self.cache = self.fallback and self.fallback.cache
  self.bulkhead = bulkhead.new(spec.bulkhead, where .. ".bulkhead")
  self.rate_limit = ratelimit.new(spec.rate_limit, where .. ".rate_limit")

  if spec.classify == nil then
    self.classify = classify.default
  else
    local c = spec.classify
    if type(c) ~= "function" and type(c) ~= "table" then
      fail(where, "classify", "a function or a table of classify options", c)
    end
    self.classify = classify.from(c, where .. ".classify")
    -- A user classifier also sees successful p:call results.
    self.custom_classify = true
  end
  self.call_ctx = { mode = "call", policy = self }
  self.last = shape({})

  -- Last: a breaker made from a config is registered under its name, so
  -- nothing may fail after it (a corrected spec could not reuse the name).
  self.breaker = make_breaker(spec.breaker, where)
  if self.name == nil and self.breaker then self.name = self.breaker.name end
  return self
end

-- Makes a policy from `spec` (see the top of this file). Raises, naming the
-- key, on an unknown key or a bad value.
function _M.new(spec)
  local ok, p = pcall(build, spec, "policy")
  if not ok then error(tostring(p), 2) end
  return p
end

-- Runs the Lua script at `path` (it returns a policy spec table; it may
-- require modules) and makes a policy of it. Raises naming the file and key.
function _M.load(path)
  if type(path) ~= "string" then error("policy.load: expected a file path", 2) end
  local chunk, lerr = loadfile(path)
  if not chunk then error("policy.load: " .. tostring(lerr), 2) end
  -- Globals the script sets stay in its own environment.
  if setfenv then setfenv(chunk, setmetatable({}, { __index = _G })) end
  local ok, spec = pcall(chunk)
  if not ok then error("policy.load: " .. tostring(spec), 2) end
  if type(spec) ~= "table" then
    error(format("policy.load: %s: must return a policy table, returned %s", path, type(spec)), 2)
  end
  local pok, p = pcall(build, spec, "policy")
  if not pok then error(format("policy.load: %s: %s", path, tostring(p)), 2) end
  return p
end

-- ---------------------------------------------------------------------------
-- Events (only called when ev_on[type] is set)

local function breaker_name(self)
  local b = self.breaker
  return b and b.name or nil
end

local function retry_event(self, attempt, delay, verdict, err)
  emit("retry", {
    policy = self.name, breaker = breaker_name(self), attempt = attempt, delay = delay,
    reason = type(err) == "table" and type(err.kind) == "string" and err.kind or verdict.kind or "error",
    status = verdict.status, retry_after = verdict.retry_after,
  })
end

local function fallback_event(self, how, kind, stop, attempts)
  emit("fallback", { policy = self.name, breaker = breaker_name(self), how = how, reason = kind,
                     stop = stop, attempts = attempts })
end

-- ---------------------------------------------------------------------------
-- Shared pieces of the loop

local function fill(rep, attempts, wait, elapsed, outcome, stop, how, reason, err)
  rep.attempts, rep.wait, rep.elapsed = attempts, wait, elapsed
  rep.outcome, rep.stop, rep.fallback = outcome, stop, how
  rep.reason, rep.error, rep.fallback_error = reason, err, nil
end

local function kind_of(err, verdict)
  if type(err) == "table" and type(err.kind) == "string" then return err.kind end
  return verdict and verdict.kind or "error"
end

-- After a failed attempt: the delay before the next one, or nil, stop reason.
local function plan(self, verdict, attempt, deadline, now)
  if not verdict.retryable then return nil, "not_retryable" end
  if attempt >= self.max_attempts then return nil, "max_attempts" end
  local b = self.breaker
  if b then
    local s = b:state()
    if s == "open" or s == "forced_open" then return nil, "breaker_open" end
  end
  local d = self.retry:delay(attempt, verdict.retry_after)
  if not d then return nil, "max_delay" end
  -- Whole milliseconds, rounded up: ngx.sleep cuts to them, and a retry that
  -- woke a fraction early would find the rate limiter still paused until the
  -- server's Retry-After and be refused by it.
  if self.rate_limit then d = ceil(d * 1000 - 1e-9) / 1000 end
  if deadline and now + d >= deadline then return nil, "deadline" end
  local bu = self.budget
  if bu and not bu:withdraw(now) then
    if ev_on.budget_exhausted then
      emit("budget_exhausted", { policy = self.name, breaker = breaker_name(self), attempt = attempt,
                                 reason = verdict.kind })
    end
    return nil, "budget"
  end
  return d
end

-- Errors this module made (or the transport made for this call) get the
-- attempt count; a breaker's rejection is copied first (not ours to change).
local function annotate(err, attempts, cause)
  if not is_error(err) then return err end
  if err.kind == "breaker_open" then
    if attempts == 0 or err.attempts == attempts then return err end
    local e = errors.new("breaker_open", err.message, err)
    e.attempts, e.cause = attempts, cause
    return e
  end
  err.attempts = attempts
  return err
end

-- Takes bulkhead and rate-limit slots: waited, or nil, err (and releases).
local function admit(self, deadline, now_t)
  local waited = 0
  local bh = self.bulkhead
  if bh and not bh:try_acquire() then
    local ok, w = bh:acquire(self.now, self.sleep, deadline)
    if not ok then
      if ev_on.bulkhead_rejected then
        emit("bulkhead_rejected", { policy = self.name, breaker = breaker_name(self),
                                    max_concurrent = bh.max,
                                    reason = type(w) == "table" and w.kind or "bulkhead_full" })
      end
      return nil, w
    end
    waited = w
  end
  local rl = self.rate_limit
  if rl then
    -- the wait may raise (a sleep in a phase that cannot yield): the slot
    -- taken above goes back before the error does
    local okr, ok, w = pcall(rl.acquire, rl, waited == 0 and now_t or self.now(), deadline, self.sleep)
    if not okr then
      if bh then bh:release() end
      error(ok, 0)
    end
    if not ok then
      if bh then bh:release() end
      return nil, w
    end
    waited = waited + w
  end
  return waited
end

-- Admission of an attempt holding `permit`: waited, or nil, err. A raise
-- while waiting records the permit as ignored, then goes on up; a refusal
-- of a retry gives the previous attempt's error (the upstream's failure is
-- why the call failed, not the local limit that stopped the retry).
local function admit_attempt(self, permit, deadline, now_t, last_err)
  local ok, w, aerr = pcall(admit, self, deadline, now_t)
  if not ok then
    if permit then self.breaker:record(permit, "ignored", 0) end
    error(w, 0)
  end
  if not w then
    if permit then self.breaker:record(permit, "ignored", 0) end
    return nil, last_err or aerr
  end
  return w
end

-- The verdict on an attempt. Only a user classifier can raise: the permit
-- is then recorded as ignored before the error goes on up, so a half-open
-- breaker does not wait out its probe timeout for it.
local function judge(self, permit, latency, res, err, ctx)
  if not self.custom_classify then return self.classify(res, err, ctx) end
  local ok, v = pcall(self.classify, res, err, ctx)
  if ok then return v end
  if permit then self.breaker:record(permit, "ignored", latency) end
  error(v, 0)
end

-- ---------------------------------------------------------------------------
-- p:call

local call_attempt

local function invoke(fn, n, a1, a2, a3, a4)
  if n == 0 then return pcall(fn)
  elseif n == 1 then return pcall(fn, a1)
  elseif n == 2 then return pcall(fn, a1, a2)
  elseif n == 3 then return pcall(fn, a1, a2, a3)
  elseif n == 4 then return pcall(fn, a1, a2, a3, a4) end
  return pcall(fn, unpack(a1, 1, n))
end

local function invoke_fallback(f, err, n, a1, a2, a3, a4)
  if n == 0 then return pcall(f, err)
  elseif n == 1 then return pcall(f, err, a1)
  elseif n == 2 then return pcall(f, err, a1, a2)
  elseif n == 3 then return pcall(f, err, a1, a2, a3)
  elseif n == 4 then return pcall(f, err, a1, a2, a3, a4) end
  return pcall(f, err, unpack(a1, 1, n))
end

local function cache_key(fb, n, a1, a2, a3, a4)
  if fb.key then
    if n > 4 then return fb.key(unpack(a1, 1, n)) end
    return fb.key(a1, a2, a3, a4)
  end
  if n > 4 then return a1[1] end
  return a1
end

-- Writes the report of a failed call once the fallback (which may yield) ran.
local function fb_done(self, rep, attempts, waited, t_start, outcome, stop, kind, err, ok, ...)
  fill(rep, attempts, waited, self.now() - t_start, outcome, stop, ok and "function" or nil, kind, err)
  if ok then
    if ev_on.fallback then fallback_event(self, "function", kind, stop, attempts) end
    return ...
  end
  rep.fallback_error = (...)
  local fb = self.fallback
  if fb.has_value then -- cache, then function, then value
    rep.fallback = "value"
    if ev_on.fallback then fallback_event(self, "value", kind, stop, attempts) end
    return fb.value
  end
  return nil, err
end

-- Final failure of p:call: the fallback answers, or nil, err.
local function call_final(self, rep, n, a1, a2, a3, a4, attempts, waited, t_start,
                          err, outcome, stop, verdict)
  err = annotate(err, attempts)
  local kind = kind_of(err, verdict)
  local fb = self.fallback
  local how
  if fb and fb:applies(err, kind) then
    local c = fb.cache
    if c then
      local key = cache_key(fb, n, a1, a2, a3, a4)
      if key ~= nil then
        local v = c:get(key, self.now())
        if v ~= nil then
          fill(rep, attempts, waited, self.now() - t_start, outcome, stop, "cache", kind, err)
          if ev_on.fallback then fallback_event(self, "cache", kind, stop, attempts) end
          return v
        end
      end
    end
    local f = fb.fn
    if f then
      return fb_done(self, rep, attempts, waited, t_start, outcome, stop, kind, err,
                     invoke_fallback(f, err, n, a1, a2, a3, a4))
    end
    if fb.has_value then how = "value" end
  end
  fill(rep, attempts, waited, self.now() - t_start, outcome, stop, how, kind, err)
  if how then
    if ev_on.fallback then fallback_event(self, how, kind, stop, attempts) end
    return fb.value
  end
  return nil, err
end

local function call_success(self, rep, n, a1, a2, a3, a4, attempt, waited, t_start, t1, ...)
  local c = self.cache
  if c then
    local key = cache_key(self.fallback, n, a1, a2, a3, a4)
    if key ~= nil then c:set(key, (...), t1) end
  end
  local r = rep
  r.attempts, r.wait, r.elapsed, r.outcome, r.stop = attempt, waited, t1 - t_start, "success", "success"
  r.fallback, r.reason, r.error, r.fallback_error = nil, nil, nil, nil
  return ...
end

-- The slow path after an attempt: classify, record, retry or finish.
local function call_settle(self, rep, fn, n, a1, a2, a3, a4, attempt, deadline, waited,
                           t_start, permit, latency, t1, ok, ...)
  local r1, r2 = ...
  local err, verdict
  if not ok then
    err = r1
    if not is_error(err) and type(err) ~= "table" then
      err = errors.new("error", tostring(err), { raised = true })
    end
    verdict = judge(self, permit, latency, nil, err, self.call_ctx)
  elseif (r1 == nil or r1 == false) and r2 ~= nil then
    err = r2
    verdict = judge(self, permit, latency, nil, err, self.call_ctx)
  else
    verdict = judge(self, permit, latency, r1, nil, self.call_ctx)
  end
  local b = self.breaker
  local outcome = verdict.outcome
  if outcome == "success" then
    if permit then b:record(permit, "success", latency) end
    if not ok then return call_success(self, rep, n, a1, a2, a3, a4, attempt, waited, t_start, t1) end
    return call_success(self, rep, n, a1, a2, a3, a4, attempt, waited, t_start, t1, ...)
  end
  if permit then
    b:record(permit, outcome, latency, outcome == "failure" and verdict.retry_after or nil)
  end
  if err == nil then -- a user classifier failed a result that is not an error
    err = errors.new(verdict.kind or "error", verdict.message or "classified as " .. outcome,
                     { retry_after = verdict.retry_after, status = verdict.status })
  end
  local now = self.now()
  local delay, stop = plan(self, verdict, attempt, deadline, now)
  if not delay then
    return call_final(self, rep, n, a1, a2, a3, a4, attempt, waited, t_start, err, outcome, stop, verdict)
  end
  if ev_on.retry then retry_event(self, attempt, delay, verdict, err) end
  if delay > 0 then self.sleep(delay) end
  return call_attempt(self, rep, fn, n, a1, a2, a3, a4, attempt + 1, deadline, waited + delay, t_start, err)
end

local function call_done(self, rep, fn, n, a1, a2, a3, a4, attempt, deadline, waited,
                         t_start, permit, t0, ok, ...)
  local t1 = self.now()
  local bh = self.bulkhead
  if bh then bh:release() end
  if ok and not self.custom_classify then
    local r1, r2 = ...
    if r1 or r2 == nil then
      if permit then self.breaker:record(permit, "success", t1 - t0) end
      return call_success(self, rep, n, a1, a2, a3, a4, attempt, waited, t_start, t1, ...)
    end
  end
  return call_settle(self, rep, fn, n, a1, a2, a3, a4, attempt, deadline, waited, t_start,
                     permit, t1 - t0, t1, ok, ...)
end

-- One attempt of p:call (attempt >= 1); last_err is the previous attempt's error.
call_attempt = function(self, rep, fn, n, a1, a2, a3, a4, attempt, deadline, waited, t_start, last_err)
  local b = self.breaker
  local permit
  if b then
    local berr
    permit, berr = b:allow()
    if not permit then
      return call_final(self, rep, n, a1, a2, a3, a4, attempt - 1, waited, t_start,
                        annotate(berr, attempt - 1, last_err), "rejected",
                        attempt == 1 and "rejected" or "breaker_open")
    end
  end
  if self.bulkhead or self.rate_limit then
    local w, aerr = admit_attempt(self, permit, deadline, attempt == 1 and t_start or self.now(), last_err)
    if not w then
      return call_final(self, rep, n, a1, a2, a3, a4, attempt - 1, waited, t_start,
                        aerr, "rejected", "rejected")
    end
    waited = waited + w
  end
  local t0 = (attempt == 1 and waited == 0) and t_start or self.now()
  return call_done(self, rep, fn, n, a1, a2, a3, a4, attempt, deadline, waited, t_start,
                   permit, t0, invoke(fn, n, a1, a2, a3, a4))
end

local function start_call(self, rep, fn, ...)
  if type(fn) ~= "function" then
    local m = getmetatable(fn)
    if not (m and m.__call) then error("policy:call: expected a function as #1, got " .. type(fn), 3) end
  end
  local t_start = self.now()
  local d = self.deadline
  local bu = self.budget
  if bu then bu:deposit(t_start) end
  local n = select("#", ...)
  if n > 4 then
    return call_attempt(self, rep, fn, n, { ... }, nil, nil, nil, 1, d and t_start + d, 0, t_start)
  end
  local a1, a2, a3, a4 = ...
  return call_attempt(self, rep, fn, n, a1, a2, a3, a4, 1, d and t_start + d, 0, t_start)
end

-- p:call(fn, ...) -> fn's results, a fallback's results, or nil, err.
-- fn fails when it raises (err is then a breaker.error of kind "error" with
-- `raised = true`, or the raised table) or returns nil/false, err; anything
-- else is a success. The report goes to p.last. Makes no garbage on the
-- success path for up to 4 arguments (more are packed in a table).
function _M.call(self, fn, ...)
  return start_call(self, self.last, fn, ...)
end

-- p:call_into(report, fn, ...): p:call, with the report written to `report`
-- (a table the caller owns and may reuse) instead of p.last.
function _M.call_into(self, report, fn, ...)
  if type(report) ~= "table" then error("policy:call_into: expected a report table as #1", 2) end
  if report.stop == nil then shape(report) end
  return start_call(self, report, fn, ...)
end

-- ---------------------------------------------------------------------------
-- p:request

local function http_error(verdict, res, attempts)
  local status = res.status
  local msg = verdict.message
  msg = msg and format("HTTP %s: %s", tostring(status), msg) or format("HTTP %s", tostring(status))
  return errors.new(verdict.kind or "http_status", msg, {
    status = status, retry_after = verdict.retry_after, code = verdict.code,
    type = verdict.type, attempts = attempts, response = res,
  })
end

local function request_final(self, rep, req, attempts, waited, t_start, err, outcome, stop, verdict)
  err = annotate(err, attempts)
  local kind = kind_of(err, verdict)
  local fb = self.fallback
  local how, v, e2, ferr
  if fb and fb:applies(err, kind) then
    local c = fb.cache
    if c then
      local key = (fb.key or fallback.request_key)(req)
      if key ~= nil then
        v = c:get(key, self.now())
        if v ~= nil then how = "cache" end
      end
    end
    if not how and fb.fn then
      local ok
      ok, v, e2 = pcall(fb.fn, err, req)
      if ok then how = "function" else ferr, v, e2 = v, nil, nil end
    end
    if not how and fb.has_value then how, v = "value", fb.value end
  end
  fill(rep, attempts, waited, self.now() - t_start, outcome, stop, how, kind, err)
  rep.fallback_error = ferr
  if how then
    if ev_on.fallback then fallback_event(self, how, kind, stop, attempts) end
    return v, e2
  end
  return nil, err
end

-- One attempt of p:request; retries are tail calls (a loop here would keep
-- LuaJIT from compiling the common single-attempt path).
local function request_attempt(self, transport, req, r, rep, ctx, attempt, deadline, waited, t_start, last_err,
                                base_to)
  local now = self.now
  local b, bh, rl = self.breaker, self.bulkhead, self.rate_limit
  local permit
  if b then
    local berr
    permit, berr = b:allow()
    if not permit then
      return request_final(self, rep, req, attempt - 1, waited, t_start,
                           annotate(berr, attempt - 1, last_err), "rejected",
                           attempt == 1 and "rejected" or "breaker_open")
    end
  end
  if bh or rl then
    local w, aerr = admit_attempt(self, permit, deadline, now(), last_err)
    if not w then
      return request_final(self, rep, req, attempt - 1, waited, t_start, aerr, "rejected", "rejected")
    end
    waited = waited + w
  end
  local t0 = now()
  if deadline then
    local left = deadline - t0
    if left <= 0 then
      if bh then bh:release() end
      if permit then b:record(permit, "ignored", 0) end
      local e = last_err or errors.new("deadline", "deadline reached before the request", {})
      return request_final(self, rep, req, attempt - 1, waited, t_start, e, "rejected", "deadline")
    end
    -- the time left caps the attempt's timeout (base_to: the request's
    -- own, else the transport's default; a deadline never lengthens one)
    r.timeout = (base_to and base_to < left) and base_to or left
  end
  local ok, res, terr = pcall(transport.request, transport, r)
  local t1 = now()
  if bh then bh:release() end
  if not ok then
    if permit then b:record(permit, "ignored", t1 - t0) end
    error(res, 0)
  end
  if res and rl then rl:learn(res.headers, t1) end
  if ctx then ctx.attempt = attempt end
  local v = judge(self, permit, t1 - t0, res, terr, ctx)
  local outcome = v.outcome
  local status = res and res.status
  -- (a user classifier that calls an error a success still gets nil, err)
  if res and (outcome == "success" or (outcome == "ignored" and type(status) == "number" and status < 400)) then
    if permit then b:record(permit, outcome, t1 - t0) end
    local c = self.cache
    if c and outcome == "success" then
      local key = (self.fallback.key or fallback.request_key)(req)
      if key ~= nil then c:set(key, res, t1) end
    end
    fill(rep, attempt, waited, t1 - t_start, outcome, "success", nil, nil, nil)
    return res
  end
  local retry_after = v.retry_after
  if permit then b:record(permit, outcome, t1 - t0, outcome == "failure" and retry_after or nil) end
  if rl and retry_after and (status == 429 or v.kind == "rate_limited") then
    rl:pause(t1 + retry_after, t1)
  end
  local err
  if res then
    err = http_error(v, res, attempt)
  else
    err = terr
    if is_error(err) and err.retry_after == nil then err.retry_after = retry_after end
    if err == nil then err = errors.new(v.kind or "error", v.message or "request failed") end
  end
  local delay, stop = plan(self, v, attempt, deadline, t1)
  if not delay then
    return request_final(self, rep, req, attempt, waited, t_start, err, outcome, stop, v)
  end
  if ev_on.retry then retry_event(self, attempt, delay, v, err) end
  if delay > 0 then self.sleep(delay) end
  return request_attempt(self, transport, req, r, rep, ctx, attempt + 1, deadline, waited + delay, t_start, err,
                         base_to)
end

-- p:request(transport, req [, report]) -> res, or nil, err.
-- `transport` is anything with transport:request(req) -> res | nil, err
-- (breaker.curl). With a deadline, each attempt's req.timeout is cut to the
-- time left (on a copy of req). A response whose verdict is success, or an
-- ignored 1xx-3xx, is returned; other HTTP statuses become nil, err with
-- err.kind (rate_limited, quota, auth, http_status, ...), err.status,
-- err.retry_after, err.code/type/message from the provider's error body,
-- err.attempts and err.response (the last response).
function _M.request(self, transport, req, rep)
  if type(transport) ~= "table" and type(transport) ~= "userdata" then
    error("policy:request: expected a transport as #1, got " .. type(transport), 2)
  end
  if type(req) ~= "table" then error("policy:request: expected a request table as #2", 2) end
  if rep ~= nil and type(rep) ~= "table" then error("policy:request: report (#3) must be a table", 2) end
  rep = rep or self.last
  if rep.stop == nil then shape(rep) end
  local t_start = self.now()
  local deadline = self.deadline and t_start + self.deadline
  local r, base_to = req, nil
  if deadline then
    r = {}
    for k, v in pairs(req) do r[k] = v end
    base_to = req.timeout
    if base_to == nil then
      -- asked here, before any slot or permit is taken: a transport whose
      -- method raises raises with nothing to give back; a value that is
      -- not a positive number counts as none
      local dt = transport.default_timeout
      if type(dt) == "function" then
        local v = dt(transport)
        if type(v) == "number" and v > 0 then base_to = v end
      end
    end
  end
  -- Only a user classifier looks at the context: the default one is spared the table.
  local ctx = self.custom_classify and { mode = "request", request = req, attempt = 0, policy = self } or nil
  if self.budget then self.budget:deposit(t_start) end
  return request_attempt(self, transport, req, r, rep, ctx, 1, deadline, 0, t_start, nil, base_to)
end

-- Drops what the fallback cache holds (e.g. after a config change).
function _M.clear_cache(self)
  local fb = self.fallback
  if fb and fb.cache then fb.cache = fallback.lru(fb.cache.size, fb.cache.ttl); self.cache = fb.cache end
end

return _M
