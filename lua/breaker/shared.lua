-- breaker.shared: shared-memory regions, so that every nginx worker (or
-- every process that opens the same named region) sees one breaker state.
--
--   -- nginx: in init_by_lua_block, before the workers fork
--   local region = require("breaker.shared").new("app", { capacity = 256 })
--   -- any worker, any time after:
--   local b = breaker.new("openai", config, { shared = region })
--
--   -- plain processes: every one that opens the name joins
--   local region = assert(require("breaker.shared").open("my-app"))
--
-- A region has a fixed capacity; each slot holds one breaker whose count
-- window is at most max_window outcomes (time window: max_buckets buckets).
-- Regions are never unmapped while the process lives.

local core = require "breaker.core"

local setmetatable, type, error, pcall = setmetatable, type, error, pcall

local _M = { _VERSION = require "breaker.version" }

local R = {}
local mt = { __index = R }

local function wrap(ud)
  local info = ud:info()
  return setmetatable({ _r = ud, name = info.name, named = info.named }, mt)
end

local function check_name(fn, name)
  if type(name) ~= "string" or name == "" then
    error("breaker.shared." .. fn .. ": expected a non-empty region name", 3)
  end
  -- C keeps the name as a C string: a NUL would cut it short there.
  local nul = name:find("\0", 1, true)
  if nul then
    error(("breaker.shared.%s: the region name contains a NUL byte (byte %d of %d)")
          :format(fn, nul, #name), 3)
  end
end

-- shared.new(key, opts) -> region. An anonymous region, made in this
-- process and inherited by the processes it forks afterwards. Calling it
-- again with the same key in the same process (nginx reload runs
-- init_by_lua again in the master) returns the same region, state intact.
-- opts: capacity (1024), max_window (512), max_buckets (16).
function _M.new(key, opts)
  check_name("new", key)
  local ok, ud = pcall(core.region_anon, key, opts)
  if not ok then error(ud, 2) end
  return wrap(ud)
end

-- shared.open(name, opts) -> region, created | nil, err. A named region
-- (POSIX shared memory "/breaker.<name>"): made if absent, joined if
-- present (then the maker's layout wins). It outlives the processes until
-- shared.unlink(name); opened again after that, the name gives the region
-- it names by then (made anew, or by another process), not the old one.
function _M.open(name, opts)
  check_name("open", name)
  local ok, ud, created = pcall(core.region_named, name, opts)
  if not ok then error(ud, 2) end
  if not ud then return nil, created end
  return wrap(ud), created
end

-- shared.unlink(name) -> true | nil, err: removes a named region's name.
function _M.unlink(name)
  check_name("unlink", name)
  return core.region_unlink(name)
end

-- region:names() -> list of the breaker names it holds.
function R:names() return self._r:names() end

-- region:info() -> { name, named, capacity, used, bytes, slot_bytes }
function R:info() return self._r:info() end

-- Internal: the breaker userdata of `name` in this region (see breaker.new).
function R:_breaker(name, cfg) return self._r:breaker(name, cfg) end

mt.__tostring = function(self) return tostring(self._r) end

-- True if v is a region made by this module.
function _M.is_region(v)
  return type(v) == "table" and getmetatable(v) == mt
end

return _M
