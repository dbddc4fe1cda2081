-- breaker.ngx_worker: the half of breaker.ngx's thread-pool transport that
-- runs inside nginx's thread pool, called by ngx.run_worker_thread.
--
-- Each task runs in a Lua VM of lua-nginx-module's worker-thread VM pool
-- (lua_worker_thread_vm_pool_size, default 100 per worker). A VM serves one
-- task at a time and is reused afterwards, so this module's state (one
-- breaker.curl transport per option set, with its kept-alive connections)
-- lives as long as the VM and is never used by two threads at once.
--
-- Only plain values cross between the VMs (nil, booleans, numbers, strings
-- and tables of those): no functions, no userdata, no metatables. So the
-- functions here take plain tables and return plain tables, and never let an
-- error escape (lua-nginx-module cannot copy a table raised as an error).
--
-- Not for direct use: call breaker.ngx.

local _M = { _VERSION = require "breaker.version" }

local pcall, type, tostring, pairs = pcall, type, tostring, pairs

local curl -- breaker.curl, loaded on first use (a load failure is reported)

-- option-set key -> breaker.curl transport of this VM
local transports = {}

local function transport_for(key, opts)
  local t = transports[key]
  if t then return t end
  curl = curl or require "breaker.curl"
  t = curl.new(opts)
  transports[key] = t
  return t
end

-- A breaker.error (or anything else) as a plain table.
local function plain_error(e)
  if type(e) ~= "table" then
    return { kind = "error", message = tostring(e) }
  end
  local p = {}
  for k, v in pairs(e) do
    local tv = type(v)
    if type(k) == "string" and (tv == "string" or tv == "number" or tv == "boolean") then
      p[k] = v
    end
  end
  p.kind = p.kind or "error"
  p.message = p.message or p.kind
  return p
end

local function run(key, opts, req)
  local t = transport_for(key, opts)
  local res, err = t:request(req)
  if res then return res end
  return nil, plain_error(err)
end

local function run_many(key, opts, reqs)
  local t = transport_for(key, opts)
  local out = t:request_many(reqs)
  for i = 1, #out do
    local o = out[i]
    if o.err then o.err = plain_error(o.err) end
  end
  return out
end

local function finish(ok, a, b)
  if ok then return a, b end
  -- A raised error: a caller mistake caught by breaker.curl (bad header,
  -- unknown option) or a module that failed to load. It goes back as a
  -- string in the third result; breaker.ngx raises it again.
  return nil, nil, tostring(a)
end

-- request(key, opts, req) -> res | nil, err | nil, nil, raised_message.
-- key names the option set (breaker.ngx makes it from opts); opts are
-- breaker.curl.new options; req a breaker.curl request without on_chunk.
function _M.request(key, opts, req)
  return finish(pcall(run, key, opts, req))
end

-- request_many(key, opts, reqs) -> { {res=}|{err=}, ... } | nil, nil, raised_message.
function _M.request_many(key, opts, reqs)
  return finish(pcall(run_many, key, opts, reqs))
end

-- How many transports this VM holds (for specs and debugging).
function _M.count()
  local n = 0
  for _ in pairs(transports) do n = n + 1 end
  return n
end

return _M
