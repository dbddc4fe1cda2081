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
--
-- A slot is given back when its call returns or raises. A call that never
-- comes back (a light thread killed with ngx.thread.kill, a request ended
-- by ngx.exit elsewhere, a coroutine left suspended) cannot give it back:
-- with `reclaim` (on by default inside OpenResty) each slot remembers the
-- coroutine that took it, and a full bulkhead takes back the slots of
-- coroutines that are dead or have been collected.

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local retry = require "breaker.retry"
local errors = require "breaker.error"
local type, pcall, require, rawget, setmetatable, pairs, error =
      type, pcall, require, rawget, setmetatable, pairs, error
local min, format = math.min, string.format
local running, costatus = coroutine.running, coroutine.status
local fail, check_keys, num, int = retry._fail, retry._check_keys, retry._num, retry._int

local KEYS = { max_concurrent = true, max_wait = true, reclaim = true }

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
  local track = opt.reclaim
  if track == nil then
    -- on inside OpenResty, where light threads get killed and requests end
    -- under a call; elsewhere off: coroutine.running() is a call LuaJIT does
    -- not compile, and it would cost the plain p:call path ~800 ns
    local ngx = rawget(_G, "ngx")
    track = type(ngx) == "table" and ngx.get_phase ~= nil
  elseif type(track) ~= "boolean" then
    fail(where, "reclaim", "a boolean", track)
  end
  return setmetatable({
    max = int(opt, where, "max_concurrent", nil, 1),
    max_wait = num(opt, where, "max_wait", 0, 0),
    active = 0,
    waiters = 0,
    sema = false, -- made on first wait under OpenResty
    -- with `reclaim`: slots held per coroutine (weak: a collected
    -- coroutine's entry goes), and those of the main thread, never collected
    holders = track and setmetatable({}, { __mode = "k" }) or false,
    main_held = 0,
  }, mt)
end

-- Takes back the slots of coroutines that are dead or were collected:
-- `active` becomes what the living holders hold.
local function reclaim(self)
  local holders, held = self.holders, self.main_held
  for co, n in pairs(holders) do
    if costatus(co) == "dead" then holders[co] = nil else held = held + n end
  end
  if held < self.active then self.active = held end
end

-- Takes a slot without waiting: true, or false when all are in use.
function _M.try_acquire(self)
  local a = self.active
  local h = self.holders
  if a >= self.max then
    if not h then return false end
    reclaim(self)
    a = self.active
    if a >= self.max then return false end
  end
  self.active = a + 1
  if h then
    local co = running()
    if co then
      h[co] = (h[co] or 0) + 1
    else
      self.main_held = self.main_held + 1
    end
  end
  return true
end

-- Gives a slot back and wakes one waiter, if any.
function _M.release(self)
  local h = self.holders
  if h then
    local co = running()
    local n = co and h[co]
    if n then
      if n > 1 then h[co] = n - 1 else h[co] = nil end
    elseif self.main_held > 0 then
      self.main_held = self.main_held - 1
    end
  end
  if self.active > 0 then self.active = self.active - 1 end
  -- wake one waiter if one really waits: a waiter whose light thread was
  -- killed leaves the semaphore's queue but not `waiters`, and posts made
  -- for nobody would let a later waiter spin through them without yielding
  local s = self.sema
  if s and s:count() < 0 then s:post(1) end
end

-- Waits for a slot until `limit`: true, t when one was taken, else false, t.
local function wait_slot(self, now, sleep, t0, limit)
  local t, step = t0, 0.001
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
    if _M.try_acquire(self) then return true, t end
  end
  return false, t
end

-- Takes a slot, waiting up to max_wait (and not past `deadline`) when full.
-- Returns true, waited_seconds or nil, err (kind "bulkhead_full"). A sleep
-- that raises (a phase that cannot yield) raises from here, counted out.
function _M.acquire(self, now, sleep, deadline)
  if _M.try_acquire(self) then return true, 0 end
  local t0 = now()
  local limit = t0 + self.max_wait
  if deadline and deadline < limit then limit = deadline end
  local t = t0
  if limit > t0 then
    self.waiters = self.waiters + 1
    local ok, got, t1 = pcall(wait_slot, self, now, sleep, t0, limit)
    self.waiters = self.waiters - 1
    if not ok then error(got, 0) end
    if got then return true, t1 - t0 end
    t = t1
  end
  return nil, errors.new("bulkhead_full",
    format("bulkhead full: %d calls in flight", self.active),
    { max_concurrent = self.max, waited = t - t0 })
end

-- Calls in flight now.
function _M.in_flight(self) return self.active end

return _M
