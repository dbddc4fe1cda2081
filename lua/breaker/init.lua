-- breaker: circuit breakers for Lua and OpenResty.
--
--   local breaker = require "breaker"
--   local b = breaker.new("openai", { failure_rate_threshold = 50 })
--   local res, err = b:call(fn, ...)      -- err.kind == "breaker_open" when open
--
-- The state machine lives in C (src/breaker.c). Under LuaJIT the hot calls
-- (allow, record) go through FFI so that traces compile; elsewhere, or with
-- BREAKER_NO_FFI=1 in the environment, the classic binding serves them.

local core = require "breaker.core"
local errors = require "breaker.error"
-- Events (breaker.events): emitted only while someone subscribes; the hot
-- paths test ev_on[type], a table lookup, before building a payload.
local events = require "breaker.events"
local ev_on, emit = events.active, events.emit

local type, pairs, ipairs, pcall, select, setmetatable, tostring, error =
      type, pairs, ipairs, pcall, select, setmetatable, tostring, error

local floor = math.floor
local VERSION = require "breaker.version"

local _M = { _VERSION = VERSION }

local STATE_NAMES = { [0] = "closed", "open", "half_open", "forced_open", "disabled" }
local OUTCOMES = { success = 0, failure = 1, ignored = 2 }

---------------------------------------------------------------------------
-- FFI fast path (LuaJIT)
---------------------------------------------------------------------------

local ffi, C
do
  local want = not (os.getenv("BREAKER_NO_FFI") or "" ):match("^[1ty]")
  local ok, f = pcall(require, "ffi")
  if want and ok and package.searchpath then
    local path = package.searchpath("breaker.core", package.cpath)
    if path then
      if not pcall(f.typeof, "struct breaker_head") then
        f.cdef [[
          struct breaker_block;
          struct breaker_head { int32_t state; uint32_t gen; };
          double brk_allow(struct breaker_block *b);
          void brk_record(struct breaker_block *b, double permit, int outcome,
                          double latency, double retry_after);
          double brk_now_precise(void);
        ]]
      end
      -- The same file `require` loaded: dlopen hands back the same library,
      -- so both bindings see one clock and one set of breakers.
      local lok, lib = pcall(f.load, path)
      if lok then ffi, C = f, lib end
    end
  end
end

-- Which binding serves allow/record: "ffi" or "classic".
_M.binding = ffi and "ffi" or "classic"

---------------------------------------------------------------------------
-- Clock
---------------------------------------------------------------------------

local now_precise = C and C.brk_now_precise or core.now_precise

-- breaker.clock: the monotonic clock every breaker uses, in seconds.
-- Specs replace it with freeze/advance instead of sleeping.
local clock = {
  now = core.now,                 -- coarse (timers, windows)
  now_precise = now_precise,      -- precise (latency)
  sleep = core.sleep,             -- blocks the thread; ngx.sleep under OpenResty
}

-- Freezes the clock at `t` seconds (default: now).
function clock.freeze(t)
  core.clock_set(true, t or core.now_precise())
end

-- Moves a frozen clock forward by `dt` seconds.
function clock.advance(dt)
  if type(dt) ~= "number" or dt < 0 then
    error("clock.advance: expected seconds >= 0", 2)
  end
  if not core.clock_frozen() then
    error("clock.advance: the clock is not frozen (call clock.freeze first)", 2)
  end
  core.clock_set(true, core.now_precise() + dt)
end

-- Returns to the real clock.
function clock.unfreeze()
  core.clock_set(false)
end

clock.frozen = core.clock_frozen
_M.clock = clock

---------------------------------------------------------------------------
-- State-change listeners
---------------------------------------------------------------------------

local listeners = {}

-- breaker.on_state_change(fn): fn(name, from, to, reason) runs after every
-- transition of every breaker. Returns a function that removes it.
function _M.on_state_change(fn)
  if type(fn) ~= "function" then
    error("breaker.on_state_change: expected a function", 2)
  end
  -- The list is replaced, never changed in place: a notice running over it
  -- (a listener that removes itself or adds one) keeps the list it began.
  local new = {}
  for i = 1, #listeners do new[i] = listeners[i] end
  new[#new + 1] = fn
  listeners = new
  local removed = false
  return function()
    if removed then return end
    removed = true
    local keep, dropped = {}, false
    for i = 1, #listeners do
      if listeners[i] == fn and not dropped then dropped = true else keep[#keep + 1] = listeners[i] end
    end
    listeners = keep
  end
end

local function report_callback_error(b, err)
  b.last_callback_error = tostring(err)
  local ngx = _G.ngx
  if ngx and ngx.log then
    ngx.log(ngx.WARN, "breaker '", b.name, "': state-change callback failed: ", tostring(err))
  end
end

---------------------------------------------------------------------------
-- Breaker objects
---------------------------------------------------------------------------

local B = {}
local mt = { __index = B }

-- Weak values: the registry never keeps a breaker alive.
local registry = setmetatable({}, { __mode = "v" })

-- Fires the callbacks for transitions since the generation this object saw.
-- The generation is read before the list: a transition another process
-- makes between the two reads is either in the list or newer than what
-- this object then records as seen, so the next notice reports it.
-- record()'s checks of its permit, latency and retry_after, the same in
-- both bindings: raise at record's caller; return latency and retry_after
-- with their defaults. (floor, not `% 1`: the modulo compiles to a
-- division on the hot path.)
local function record_args(permit, latency, retry_after)
  if type(permit) ~= "number" or not (permit > 0 and permit < 2 ^ 53) or floor(permit) ~= permit then
    error("record: expected the permit returned by allow(), got " .. tostring(permit), 3)
  end
  latency = latency or 0
  if type(latency) ~= "number" or not (latency >= 0) then
    error("record: latency must be seconds >= 0", 3)
  end
  retry_after = retry_after or 0
  if type(retry_after) ~= "number" or not (retry_after >= 0) then
    error("record: retry_after must be seconds >= 0", 3)
  end
  return latency, retry_after
end

local function notice_once(self)
  local ud = rawget(self, "_ud")
  if ud == nil then return end -- a callback closed the breaker
  local g = ud:generation()
  local list = ud:transitions(self._gen)
  local last = list[#list]
  self._gen = last and last.generation or g
  for _, t in ipairs(list) do
    local cb = self._on_change
    if cb then
      local ok, err = pcall(cb, self.name, t.from, t.to, t.reason)
      if not ok then report_callback_error(self, err) end
    end
    local ls = listeners
    for i = 1, #ls do
      local ok, err = pcall(ls[i], self.name, t.from, t.to, t.reason)
      if not ok then report_callback_error(self, err) end
    end
    if ev_on.state_change then
      emit("state_change", { breaker = self.name, from = t.from, to = t.to, reason = t.reason,
                             generation = t.generation })
    end
  end
end

-- A callback may move the breaker itself (reset() on open, say): its own
-- notice waits until every callback has heard of the transition that ran
-- it, and then reports what came after, so all of them see transitions in
-- order. Bounded: callbacks that keep moving it get 8 rounds.
-- The coroutine running a notice is the one that defers: another one (the
-- first may have yielded in a callback and never come back) runs its own.
local MAIN, running = {}, coroutine.running
local function notice(self)
  local co = running() or MAIN
  if self._noticing == co then
    self._renotice = true
    return
  end
  self._noticing = co
  local ok, err
  for _ = 1, 8 do
    self._renotice = false
    ok, err = pcall(notice_once, self)
    if not ok or not self._renotice or rawget(self, "_ud") == nil then break end
  end
  self._noticing = false
  if not ok then error(err, 0) end
end

-- breaker.events "rejected" (called only while someone subscribes).
local function rejected_event(self, st, retry_after)
  emit("rejected", { breaker = self.name, state = STATE_NAMES[st], retry_after = retry_after })
end

-- Latency observer for breaker.metrics: observer(b, outcome, latency) after
-- each record, outcome 0 success, 1 failure, 2 ignored. nil (the default)
-- costs one upvalue test per record.
local observer = nil

-- Internal: breaker.metrics installs (or with nil removes) its observer.
function _M._set_observer(fn)
  if fn ~= nil and type(fn) ~= "function" then error("breaker._set_observer: expected a function or nil", 2) end
  observer = fn
end

local err_mt = errors.mt

-- The rejection error. Built with a table constructor (no string work, no
-- redaction: the message only holds the breaker's name), so that LuaJIT can
-- sink the allocation when the caller drops the error.
local function open_error(self, st, retry_after)
  return setmetatable({
    kind = "breaker_open",
    message = self._msg[st],
    breaker = self.name,
    state = STATE_NAMES[st],
    retry_after = retry_after,
  }, err_mt)
end

-- Messages of the rejection errors, per state, made once per breaker.
local function open_messages(name)
  local q = "breaker '" .. name .. "'"
  -- positional, so the rejection path indexes the array part, not a hash
  return {
    q .. " is open",                                  -- [1]
    q .. " is half-open and all its probes are taken", -- [2]
    q .. " is forced open",                           -- [3]
  }
end

local allow, record, state

-- Shared breakers also take the inline closed allow where aligned loads
-- keep their program order (x86, x64); elsewhere they ask C, which uses
-- acquire loads.
local inline_shared = ffi and jit and (jit.arch == "x64" or jit.arch == "x86") or false

-- A store through a pointer LuaJIT cannot tell apart from the breaker's
-- head, made after the loads. Inside a compiled loop with no C call (say,
-- one that polls allow() until another process opens the breaker), LuaJIT
-- would otherwise load the state and generation once before the loop and
-- never again; the store makes the next round load them afresh. (LuaJIT
-- ignores `volatile` on FFI loads; spec/shared_spec.lua checks this.)
local load_fence = ffi and ffi.new("uint32_t[1]")

if C then
  allow = function(self)
    local h = self._h
    -- Closed admits without side effects: the permit is computed here, as
    -- brk_allow would (generation * 4 + 1), and no C call is made. The
    -- generation is read before the state (a transition publishes the
    -- state first): if another process moves a shared breaker in between,
    -- the permit is merely stale and its result counts as late. C also
    -- refuses a closed permit's result while half-open, so no ordering
    -- slip can pass for a probe.
    if self._inline then
      local g = h.gen
      local st = h.state
      load_fence[0] = g
      if g == self._gen and st == 0 then return g * 4 + 1 end
    end
    local p = C.brk_allow(self._p)
    if h.gen ~= self._gen then notice(self) end
    if p > 0 then return p end
    if ev_on.rejected then rejected_event(self, h.state, -p - 1) end
    return nil, open_error(self, h.state, -p - 1)
  end

  record = function(self, permit, outcome, latency, retry_after)
    local o = OUTCOMES[outcome]
    if not o then
      error("record: outcome must be \"success\", \"failure\" or \"ignored\", got "
            .. tostring(outcome), 2)
    end
    latency, retry_after = record_args(permit, latency, retry_after)
    C.brk_record(self._p, permit, o, latency, retry_after)
    if self._h.gen ~= self._gen then notice(self) end
    if observer then observer(self, o, latency) end
  end

  state = function(self)
    return STATE_NAMES[self._h.state]
  end
else
  allow = function(self)
    local ud = self._ud
    local p, ra = ud:allow()
    if ud:generation() ~= self._gen then notice(self) end
    if p then return p end
    local st = ud:state()
    st = st == "half_open" and 2 or st == "forced_open" and 3 or 1
    if ev_on.rejected then rejected_event(self, st, ra) end
    return nil, open_error(self, st, ra)
  end

  record = function(self, permit, outcome, latency, retry_after)
    if OUTCOMES[outcome] == nil then
      error("record: outcome must be \"success\", \"failure\" or \"ignored\", got "
            .. tostring(outcome), 2)
    end
    latency, retry_after = record_args(permit, latency, retry_after)
    self._ud:record(permit, outcome, latency, retry_after)
    if self._ud:generation() ~= self._gen then notice(self) end
    if observer then observer(self, OUTCOMES[outcome], latency) end
  end

  state = function(self)
    return self._ud:state()
  end
end

-- b:allow() -> permit, or nil, err (err.kind "breaker_open", err.retry_after
-- seconds until a probe may go, err.state). Never raises for a rejection.
B.allow = allow

-- b:record(permit, outcome, latency [, retry_after]): outcome is "success",
-- "failure" or "ignored"; latency in seconds; retry_after (seconds, e.g. an
-- upstream's Retry-After) stretches the open time if this result opens it.
B.record = record

-- b:state() -> "closed" | "open" | "half_open" | "forced_open" | "disabled"
B.state = state

local function finish(self, permit, t0, ok, ...)
  local latency = now_precise() - t0
  if not (latency >= 0) then latency = 0 end -- a clock frozen back in time by fn
  if not ok then
    record(self, permit, "failure", latency)
    local e = ...
    if errors.is(e) then return nil, e end
    return nil, errors.new("error", tostring(e), { breaker = self.name, cause = e })
  end
  if (...) == nil and select("#", ...) > 1 and select(2, ...) ~= nil then
    record(self, permit, "failure", latency)   -- the Lua convention: nil, err
  else
    record(self, permit, "success", latency)
  end
  return ...
end

-- b:call(fn, ...) -> fn's results, or nil, err. Rejects at once while open
-- (err.kind "breaker_open"). A raised error or a `nil, err` return counts as
-- a failure; a raised error comes back as nil, err (kind "error" unless it
-- was already a breaker.error).
function B:call(fn, ...)
  local tf = type(fn)
  if tf ~= "function" and tf ~= "cdata" and tf ~= "userdata" then -- a caller's mistake
    local m = tf == "table" and getmetatable(fn) -- (a protected metatable may hide __call)
    if not m or (type(m) == "table" and not m.__call) then
      error("b:call: expected a function as #1, got " .. tf, 2)
    end
  end
  local permit, err = allow(self)
  if not permit then return nil, err end
  return finish(self, permit, now_precise(), pcall(fn, ...))
end

-- Operator overrides. force_open() rejects everything until reset();
-- disable() admits everything (outcomes still recorded, no transitions);
-- reset() returns to closed with an empty window.
function B:force_open() self._ud:force_open(); notice(self) end
function B:disable() self._ud:disable(); notice(self) end
function B:reset() self._ud:reset(); notice(self) end

-- b:stats() -> table; see the README's "stats" section.
function B:stats()
  local st = self._ud:stats()
  st.name = self.name
  return st
end

-- b:config() -> the effective config (every key filled).
function B:config()
  return self._ud:config()
end

-- b:on_state_change(fn): fn(name, from, to, reason) after this breaker's
-- transitions (replaces the one given in the config).
function B:on_state_change(fn)
  if fn ~= nil and type(fn) ~= "function" then
    error("on_state_change: expected a function or nil", 2)
  end
  self._on_change = fn
end

-- A closed breaker keeps its name; every method raises.
local closed_mt = {
  __index = function(_, k)
    if k == "close" then return function() end end
    error("breaker: attempt to use a closed breaker (method '" .. tostring(k) .. "')", 2)
  end,
  __tostring = function(self) return "breaker '" .. self.name .. "' (closed)" end,
}

-- b:close(): frees the C block and forgets the name; idempotent, and any
-- other use afterwards raises.
function B:close()
  if registry[self.name] == self then registry[self.name] = nil end
  local ud = self._ud
  self._p, self._h, self._ud = nil, nil, nil
  setmetatable(self, closed_mt)
  ud:close()
end

mt.__tostring = function(self)
  return "breaker '" .. self.name .. "' (" .. state(self) .. ")"
end

-- Lua-side config keys; the rest is validated by the C binding.
local LUA_KEYS = { on_state_change = "function" }

-- Splits a config into what C validates and the Lua-side keys, checking
-- those; raises at `level` (as breaker.new and breaker.validate do).
local function split_config(config, level)
  local cfg, extra = {}, {}
  for k, v in pairs(config or {}) do
    if LUA_KEYS[k] then
      if type(v) ~= LUA_KEYS[k] then
        error("breaker config: bad value for '" .. k .. "' (expected a "
              .. LUA_KEYS[k] .. ", got " .. type(v) .. ")", level + 1)
      end
      extra[k] = v
    else
      cfg[k] = v
    end
  end
  return cfg, extra
end

local shared_mod

-- breaker.new(name, config [, opts]) -> breaker. Raises on a bad name or
-- config (naming the key), or if this process has a breaker of that name.
-- opts.shared = region (breaker.shared) puts the breaker in shared memory:
-- every process using the region and the name sees one state; a second
-- process joining with a different config gets an error naming the key.
function _M.new(name, config, opts)
  if type(name) ~= "string" or name == "" then
    error("breaker.new: expected a non-empty name string as #1", 2)
  end
  -- A shared breaker's name is a C string in its region slot, where a NUL
  -- would cut it short (and name another breaker); no name may hold one.
  local nul = name:find("\0", 1, true)
  if nul then
    error(("breaker.new: the name contains a NUL byte (byte %d of %d)"):format(nul, #name), 2)
  end
  if config ~= nil and type(config) ~= "table" then
    error("breaker.new: expected a config table as #2, got " .. type(config), 2)
  end
  if registry[name] then
    error("breaker.new: a breaker named '" .. name .. "' exists (use breaker.get)", 2)
  end
  local cfg, extra = split_config(config, 2)
  local region
  if opts ~= nil then
    if type(opts) ~= "table" then error("breaker.new: expected an options table as #3", 2) end
    for k in pairs(opts) do
      if k ~= "shared" then error("breaker.new: unknown option '" .. tostring(k) .. "'", 2) end
    end
    region = opts.shared
    if region ~= nil then
      shared_mod = shared_mod or require "breaker.shared"
      if not shared_mod.is_region(region) then
        error("breaker.new: opts.shared must be a region from breaker.shared", 2)
      end
    end
  end
  local ok, ud
  if region then
    ok, ud = pcall(region._breaker, region, name, cfg)
  else
    ok, ud = pcall(core.new, cfg)
  end
  if not ok then error(ud, 2) end
  local self = setmetatable({
    name = name,
    _ud = ud,
    _gen = ud:generation(),
    _on_change = extra.on_state_change,
    _noticing = false, _renotice = false,
    _msg = open_messages(name),
    shared = region,
    _inline = region == nil or inline_shared,
  }, mt)
  if ffi then
    self._p = ffi.cast("struct breaker_block *", ud:pointer())
    self._h = ffi.cast("struct breaker_head *", self._p)
  end
  registry[name] = self
  return self
end

-- breaker.get(name) -> the breaker of that name, or nil.
function _M.get(name)
  return registry[name]
end

-- breaker.each() -> iterator over (name, breaker) of the live breakers.
function _M.each()
  return pairs(registry)
end

-- breaker.defaults() -> the default config table.
_M.defaults = core.defaults

-- breaker.validate(config) -> the config with defaults filled; raises like new.
function _M.validate(config)
  if config ~= nil and type(config) ~= "table" then
    error("breaker.validate: expected a config table, got " .. type(config), 2)
  end
  local cfg = split_config(config, 2)
  local ok, res = pcall(core.validate, cfg)
  if not ok then error(res, 2) end
  return res
end

_M.STATES = { "closed", "open", "half_open", "forced_open", "disabled" }

return _M
