-- breaker.events: subscribable events from breakers and policies.
--
--   local events = require "breaker.events"
--   local off = events.on("retry", function(ev)
--     print(ev.policy, ev.attempt, ev.delay, ev.reason)
--   end)
--   events.on("*", function(ev) log(ev.type, ev) end)   -- every type
--   off()                                                -- unsubscribes
--
-- Types and payloads (every payload also has `type` and `time`, the wall
-- clock in seconds: ngx.now() under OpenResty, else os.time()):
--
--   state_change       breaker, from, to, reason, generation
--                      (reason: failure_rate, slow_call_rate, consecutive_failures,
--                      open_elapsed, probe_failed, probe_slow, probes_succeeded,
--                      probe_expired, forced_open, disabled, reset)
--   rejected           breaker, state, retry_after: b:allow() (b:call, a policy)
--                      refused because the breaker is open, forced open or its
--                      half-open probes are taken
--   retry              policy, breaker, attempt (the attempt that failed, from 1),
--                      delay (seconds it waits before the next one), reason (the
--                      failure's kind: rate_limited, http_status, timeout, ...),
--                      status (HTTP status or nil), retry_after (the server's
--                      delay or nil)
--   fallback           policy, breaker, how ("cache" | "function" | "value"),
--                      reason (the kind of the error it replaced), stop (why the
--                      retry loop ended), attempts
--   budget_exhausted   policy, breaker, attempt, reason: a retry was wanted but
--                      the retry budget had nothing left
--   bulkhead_rejected  policy, breaker, max_concurrent, reason ("bulkhead_full")
--
-- `policy` is the policy's name (its breaker's name unless given), `breaker`
-- a breaker's name; either may be nil. Handlers run synchronously, in the
-- call that caused the event, under pcall: a handler that raises does not
-- break the call (its error is kept in events.last_error, counted in
-- events.errors and logged at WARN under OpenResty). A payload is a fresh
-- table the handler may keep.
--
-- With a shared region, each process notices another process's transitions
-- the next time it uses that breaker (its stats show the shared state at once).
--
-- Cost: emitters test `events.active[type]` (true while anyone listens to
-- that type or to "*") before they build a payload, so events cost a table
-- lookup when nobody subscribes.

local type, error, pcall, tostring, rawget = type, error, pcall, tostring, rawget

local _M = { _VERSION = require "breaker.version" }

_M.TYPES = { "state_change", "rejected", "retry", "fallback", "budget_exhausted", "bulkhead_rejected" }

local KNOWN = { ["*"] = true }
for _, t in ipairs(_M.TYPES) do KNOWN[t] = true end

-- type -> true while a handler listens to it (directly or through "*").
-- Read by the emitters in breaker and breaker.policy; never replaced.
local active = {}
_M.active = active

-- type -> list of handlers. Lists are replaced, never changed in place, so
-- an emit in progress keeps the list it started with.
local handlers = {}

_M.errors = 0
_M.last_error = nil

local function refresh()
  local all = handlers["*"]
  local any = all ~= nil and #all > 0
  for _, t in ipairs(_M.TYPES) do
    local l = handlers[t]
    active[t] = any or (l ~= nil and #l > 0) or nil
  end
end

local cleared = 0 -- events.clear() calls so far

-- events.on(type, fn) -> a function that removes the subscription.
-- `type` is one of events.TYPES or "*" (every type); fn(payload).
function _M.on(t, fn)
  if not KNOWN[t] then
    error("breaker.events.on: unknown event type '" .. tostring(t) .. "' (expected one of "
          .. table.concat(_M.TYPES, ", ") .. " or \"*\")", 2)
  end
  if type(fn) ~= "function" then
    error("breaker.events.on: expected a function as #2, got " .. type(fn), 2)
  end
  local old = handlers[t] or {}
  local new = {}
  for i = 1, #old do new[i] = old[i] end
  new[#new + 1] = fn
  handlers[t] = new
  refresh()
  local removed, epoch = false, cleared
  return function()
    -- once only, and not after events.clear(): a later subscription of the
    -- same function is not this one's to remove
    if removed or epoch ~= cleared then return end
    removed = true
    local cur, keep, dropped = handlers[t] or {}, {}, false
    for i = 1, #cur do
      if cur[i] == fn and not dropped then dropped = true else keep[#keep + 1] = cur[i] end
    end
    handlers[t] = keep
    refresh()
  end
end

-- events.clear(): removes every subscription (specs).
function _M.clear()
  cleared = cleared + 1
  for k in pairs(handlers) do handlers[k] = nil end
  refresh()
end

local function wall()
  local ngx = rawget(_G, "ngx")
  if type(ngx) == "table" and ngx.now then return ngx.now() end
  return os.time()
end

local function failed(t, err)
  _M.errors = _M.errors + 1
  _M.last_error = tostring(err)
  local ngx = rawget(_G, "ngx")
  if type(ngx) == "table" and ngx.log then
    ngx.log(ngx.WARN, "breaker.events: a '", t, "' handler failed: ", tostring(err))
  end
end

local function run(list, t, ev)
  if not list then return end
  for i = 1, #list do
    local ok, err = pcall(list[i], ev)
    if not ok then failed(t, err) end
  end
end

-- events.emit(type, payload): gives payload (type and time filled in) to the
-- handlers of `type`, then to those of "*". For breaker and breaker.policy;
-- callers check events.active[type] first.
function _M.emit(t, ev)
  ev.type = t
  ev.time = wall()
  run(handlers[t], t, ev)
  run(handlers["*"], t, ev)
end

return _M
