-- breaker.bulkhead: at most N calls in flight through one policy.
--
--   bulkhead = 10                                  -- shorthand for max_concurrent
--   bulkhead = { max_concurrent = 10, max_wait = 0.5 }
--
-- A call that finds N in flight is rejected at once with kind "bulkhead_full",
-- or, with `max_wait` > 0, waits up to that long (and never past the call's
-- deadline) for a slot. Waiting needs other calls to make progress meanwhile:
-- OpenResty request handlers (ngx.sleep / ngx.semaphore yield) or coroutines
-- driven by a scheduler whose sleep yields. In a plain blocking LuaJIT process
-- nothing else runs while a call waits, so max_wait only delays the rejection.
-- Under OpenResty an ngx.semaphore wakes a waiter as soon as a slot frees;
-- elsewhere waiters poll with the policy's sleep (1 ms doubling to 50 ms).
-- The count is per Lua VM (per nginx worker), not shared between processes.

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local retry = require "breaker.retry"
local errors = require "breaker.error"
local type, pcall, require, rawget, setmetatable = type, pcall, require, rawget, setmetatable
local min, format = math.min, string.format
local fail, check_keys, num, int = retry._fail, retry._check_keys, retry._num, retry._int

local KEYS = { max_concurrent = true, max_wait = true }

local function semaphore()
  local ngx = rawget(_G, "ngx")
  if not (ngx and ngx.get_phase) then return nil end
  local ok, sema = pcall(require, "ngx.semaphore")
  return ok and sema or nil
end

local YIELDABLE = retry.YIELDABLE

-- Validates a bulkhead option and returns a bulkhead (nil for nil/false).
function _M.new(opt, where)
  where = where or "bulkhead"
  if opt == nil or opt == false then return nil end
  if type(opt) == "number" then opt = { max_concurrent = opt } end
  if type(opt) ~= "table" then fail(where, "(value)", "a number or a table", opt) end
  check_keys(opt, where, KEYS)
  if opt.max_concurrent == nil then fail(where, "max_concurrent", "an integer >= 1", nil) end
  return setmetatable({
    max = int(opt, where, "max_concurrent", nil, 1),
    max_wait = num(opt, where, "max_wait", 0, 0),
    active = 0,
    waiters = 0,
    sema = false, -- made on first wait under OpenResty
  }, mt)
end

-- Takes a slot without waiting: true, or false when all are in use.
function _M.try_acquire(self)
  local a = self.active
  if a < self.max then
    self.active = a + 1
    return true
  end
  return false
end

-- Gives a slot back and wakes one waiter, if any.
function _M.release(self)
  self.active = self.active - 1
  if self.waiters > 0 and self.sema then self.sema:post(1) end
end

-- Takes a slot, waiting up to max_wait (and not past `deadline`) when full.
-- Returns true, waited_seconds or nil, err (kind "bulkhead_full").
function _M.acquire(self, now, sleep, deadline)
  if _M.try_acquire(self) then return true, 0 end
  local t0 = now()
  local limit = t0 + self.max_wait
  if deadline and deadline < limit then limit = deadline end
  local t, step = t0, 0.001
  if limit > t0 then
    self.waiters = self.waiters + 1
    local ngx = rawget(_G, "ngx")
    if self.sema == false and ngx and YIELDABLE[ngx.get_phase()] then
      local s = semaphore()
      self.sema = s and s.new(0) or nil
    end
    while t < limit do
      local s = self.sema
      if s and ngx and YIELDABLE[ngx.get_phase()] then
        s:wait(limit - t)
      else
        sleep(min(step, limit - t))
        step = min(step * 2, 0.05)
      end
      t = now()
      if _M.try_acquire(self) then
        self.waiters = self.waiters - 1
        return true, t - t0
      end
    end
    self.waiters = self.waiters - 1
  end
  return nil, errors.new("bulkhead_full",
    format("bulkhead full: %d calls in flight", self.active),
    { max_concurrent = self.max, waited = t - t0 })
end

-- Calls in flight now.
function _M.in_flight(self) return self.active end

return _M
