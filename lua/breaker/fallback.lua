-- breaker.fallback: what a policy answers when the protected call failed.
--
--   fallback = "sorry"                         -- shorthand for { value = "sorry" }
--   fallback = function(err, ...) ... end      -- shorthand for { fn = ... }
--   fallback = { value = v }                   -- a static answer
--   fallback = { fn = function(err, ...) }     -- computed from the error and the
--                                              -- call's arguments (req for requests);
--                                              -- it never receives the protected fn
--   fallback = { cache = { size = 100, ttl = 600 }, key = function(...) }
--                                              -- the last good answer for the key
--   fallback = { on = { "breaker_open", "rate_limited" } | function(err) -> bool }
--                                              -- which final errors it answers (default all)
-- `cache`, `fn` and `value` combine, tried in that order: a cached answer,
-- else the function, else the static value.
--
-- The cache keeps the first result of each successful call under `key(...)`
-- (for p:request: key(req), default method .. " " .. url .. "\n" .. body; for
-- p:call the default key is the first argument). It is a bounded LRU: at most
-- `size` keys, entries older than `ttl` seconds (if set) are not served.

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local retry = require "breaker.retry"
local type, pairs, tostring, error, setmetatable = type, pairs, tostring, error, setmetatable
local format = string.format
local fail, check_keys, num, int = retry._fail, retry._check_keys, retry._num, retry._int

-- ---------------------------------------------------------------------------
-- Bounded LRU. Nodes are recycled on eviction, so a full cache updated with
-- known keys makes no garbage.

local lru_mt = { __index = {} }
local lru = lru_mt.__index

-- A cache of at most `size` entries; entries live `ttl` seconds (nil: forever).
function _M.lru(size, ttl)
  local head = {}
  head.prev, head.next = head, head
  return setmetatable({ size = size, ttl = ttl, count = 0, map = {}, head = head }, lru_mt)
end

local function unlink(n)
  n.prev.next, n.next.prev = n.next, n.prev
end

local function push_front(c, n)
  local h = c.head
  n.prev, n.next = h, h.next
  h.next.prev = n
  h.next = n
end

-- The value stored under `key`, or nil when absent or older than ttl at `now`.
function lru.get(c, key, now)
  local n = c.map[key]
  if not n then return nil end
  if c.ttl and now - n.stored > c.ttl then return nil end
  unlink(n); push_front(c, n)
  return n.value, now - n.stored
end

-- Stores `value` under `key` at time `now`, evicting the least recently used.
-- A nil or NaN key (no table can hold one) stores nothing.
function lru.set(c, key, value, now)
  if key == nil or key ~= key then return end
  local map = c.map
  local n = map[key]
  if n then
    n.value, n.stored = value, now
    if c.head.next ~= n then unlink(n); push_front(c, n) end
    return
  end
  if c.count >= c.size then
    n = c.head.prev
    unlink(n)
    map[n.key] = nil
  else
    n = {}
    c.count = c.count + 1
  end
  n.key, n.value, n.stored = key, value, now
  map[key] = n
  push_front(c, n)
end

-- Number of entries.
function lru.len(c) return c.count end

-- ---------------------------------------------------------------------------

local KEYS = { value = true, fn = true, cache = true, key = true, on = true }
local CACHE_KEYS = { size = true, ttl = true }

-- Validates a fallback option and returns a fallback object (or nil for nil/false).
function _M.new(opt, where)
  where = where or "fallback"
  if opt == nil or opt == false then return nil end
  local t = type(opt)
  if t == "function" then opt = { fn = opt }
  elseif t ~= "table" then opt = { value = opt } end
  check_keys(opt, where, KEYS)
  local self = setmetatable({ fn = opt.fn, value = opt.value, has_value = opt.value ~= nil,
                              key = opt.key }, mt)
  if self.fn ~= nil and type(self.fn) ~= "function" then fail(where, "fn", "a function", self.fn) end
  if self.key ~= nil and type(self.key) ~= "function" then fail(where, "key", "a function", self.key) end
  local c = opt.cache
  if c ~= nil and c ~= false then
    if c == true then c = {} end
    if type(c) ~= "table" then fail(where, "cache", "a table, true or false", c) end
    check_keys(c, where .. ".cache", CACHE_KEYS)
    self.cache = _M.lru(int(c, where .. ".cache", "size", 100, 1),
                        num(c, where .. ".cache", "ttl", nil, 0, true))
  elseif self.key then
    error(format("%s.key: only meaningful with %s.cache", where, where), 0)
  end
  local on = opt.on
  if on ~= nil then
    if type(on) == "table" then
      local set = {}
      for k, v in pairs(on) do
        if type(k) == "number" and type(v) == "string" then set[v] = true
        elseif type(k) == "string" and type(v) == "boolean" then set[k] = v or nil
        else fail(where, "on", "a list of error kinds or a function", v) end
      end
      self.on_kinds = set
    elseif type(on) == "function" then
      self.on_fn = on
    else
      fail(where, "on", "a list of error kinds or a function", on)
    end
  end
  if not (self.fn or self.has_value or self.cache) then
    error(format("%s: needs at least one of value, fn or cache", where), 0)
  end
  return self
end

-- True when this fallback should answer the final error `err` of kind `kind`.
function _M.applies(self, err, kind)
  if self.on_fn then return self.on_fn(err) and true or false end
  if self.on_kinds then return self.on_kinds[kind] == true end
  return true
end

-- The default cache key of a transport request.
function _M.request_key(req)
  return tostring(req.method or "GET") .. " " .. tostring(req.url) .. "\n" .. tostring(req.body or "")
end

return _M
