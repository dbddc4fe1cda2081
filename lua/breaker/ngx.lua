-- breaker.ngx: OpenResty glue.
--
--   # nginx.conf, main context: the threads that run blocking HTTP calls
--   thread_pool breaker threads=16;
--
--   local bngx = require "breaker.ngx"
--   local t = bngx.transport{ pool = "breaker", timeout = 60 }   -- breaker.curl options
--   local p = bngx.policy{ breaker = b, retry = { max_attempts = 3 } }
--   local res, err = p:request(t, { method = "POST", url = ..., headers = ..., body = ... })
--
-- * bngx.transport runs breaker.curl in nginx's thread pool through
--   ngx.run_worker_thread: the request handler yields while a pool thread
--   waits on the network, so a slow upstream never stalls the event loop.
--   t:request has breaker.curl's contract (below), so p:request(t, req) works.
-- * bngx.sleep sleeps with ngx.sleep (the worker keeps serving others);
--   bngx.policy is policy.new with that sleep.
-- * bngx.now is the breakers' own monotonic clock. ngx.now() is not used for
--   latencies: it is wall-clock time cached per event-loop turn, so it can
--   jump and it misses the time spent inside a handler.
-- * bngx.stats() is every breaker of this worker as a JSON-safe table, for a
--   stats location.
--
-- Transport contract (breaker.curl's, and the interface for your own
-- transport, e.g. one on cosockets): an object with
--     t:request(req) -> res | nil, err
-- req = { method, url, headers = { [name] = value }, body, timeout,
-- connect_timeout, max_body, on_chunk }; res = { status, headers (names
-- lower-case), body, timing = { connect, first_byte, total } }; any complete
-- HTTP answer, 4xx and 5xx included, is a response; only a failure to get one
-- is nil, err, with err a breaker.error whose kind is one of timeout,
-- connect, dns, tls, reset, too_large, invalid, aborted, protocol (these are
-- what breaker.classify knows). Caller mistakes raise. bngx.check_transport
-- verifies the shape.
--
-- Streaming: a function cannot cross to a pool thread, so on_chunk cannot be
-- called while the body arrives. The transport option on_chunk says what
-- happens to a request with on_chunk: "error" (default) raises, naming the
-- option; "buffer" runs the request to the end and then hands a 2xx body to
-- on_chunk in one piece (res.body = "", res.streamed = true, as breaker.curl
-- does). For true streaming inside nginx use breaker.cosocket.

local errors = require "breaker.error"

local type, pairs, tostring, error, rawget, setmetatable, getmetatable, next =
      type, pairs, tostring, error, rawget, setmetatable, getmetatable, next
local sort, concat = table.sort, table.concat
local format = string.format
local huge = math.huge

local _M = { _VERSION = require "breaker.version" }

local WORKER_MODULE = "breaker.ngx_worker"

local function ngx_api()
  local ngx = rawget(_G, "ngx")
  if type(ngx) ~= "table" then return nil end
  return ngx
end

-- Phases where ngx.run_worker_thread and ngx.sleep may yield.
local YIELDABLE = { rewrite = true, access = true, content = true, timer = true }
_M.YIELDABLE = YIELDABLE

---------------------------------------------------------------------------
-- Clock and sleep
---------------------------------------------------------------------------

local bclock -- breaker.clock
local function clock()
  if not bclock then bclock = require("breaker").clock end
  return bclock
end

-- bngx.now() -> seconds of the breakers' monotonic clock (frozen with
-- breaker.clock.freeze in specs).
function _M.now()
  return clock().now_precise()
end

-- bngx.sleep(seconds): ngx.sleep in the phases that can yield (rewrite,
-- access, content, timer), so the worker keeps serving other requests. In
-- init and init_worker (no request is served yet) it blocks with the
-- breaker clock's sleep. Elsewhere (log, header_filter, body_filter, set,
-- balancer, ...) sleeping would stall every request of the worker: raises.
-- Outside nginx it blocks.
function _M.sleep(seconds)
  if type(seconds) ~= "number" or not (seconds >= 0) then
    error("breaker.ngx.sleep: expected seconds >= 0", 2)
  end
  if seconds == 0 then return end
  local ngx = ngx_api()
  if not ngx or not ngx.get_phase then return clock().sleep(seconds) end
  local phase = ngx.get_phase()
  if YIELDABLE[phase] then return ngx.sleep(seconds) end
  if phase == "init" or phase == "init_worker" then return clock().sleep(seconds) end
  error(format("breaker.ngx.sleep: cannot sleep in the '%s' phase without blocking the worker", phase), 2)
end

-- bngx.policy(spec) -> policy: breaker.policy.new(spec) with `sleep`
-- defaulting to bngx.sleep.
function _M.policy(spec)
  if type(spec) ~= "table" then error("breaker.ngx.policy: expected a policy spec table", 2) end
  local s = {}
  for k, v in pairs(spec) do s[k] = v end
  if s.sleep == nil then s.sleep = _M.sleep end
  local policy = require "breaker.policy"
  local ok, p = pcall(policy.new, s)
  if not ok then error(p, 2) end
  return p
end

---------------------------------------------------------------------------
-- Thread-pool transport
---------------------------------------------------------------------------

local T = {}
local tmt = { __index = T, __metatable = "breaker.ngx transport" }

-- breaker.curl.new options, passed through to the pool threads.
local CURL_KEYS = {
  insecure_skip_verify = "boolean", ca_file = "string", ca_path = "string",
  timeout = "number", connect_timeout = "number", max_body = "number",
  user_agent = true, max_connections = "number",
}

-- A stable string naming an option set: the pool side keeps one curl
-- transport per VM and per key.
local function options_key(opts)
  local keys = {}
  for k in pairs(opts) do keys[#keys + 1] = k end
  sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = k .. "=" .. tostring(opts[k]) end
  return concat(parts, "\0")
end

-- bngx.transport(opts) -> transport whose request runs breaker.curl in the
-- thread pool opts.pool (default "breaker"; nginx.conf needs `thread_pool
-- <pool> threads=N;` in the main context). opts.on_chunk: "error" (default)
-- or "buffer" (see the top of this file). The other options are
-- breaker.curl.new's (timeout, connect_timeout, max_body, ca_file, ca_path,
-- insecure_skip_verify, user_agent, max_connections); they are checked here,
-- by breaker.curl itself, and raise naming the key.
function _M.transport(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then error("breaker.ngx.transport: expected an options table", 2) end
  local pool, mode = opts.pool, opts.on_chunk
  if pool == nil then pool = "breaker" end
  if type(pool) ~= "string" or pool == "" then
    error("breaker.ngx.transport: pool must be the name of a thread_pool, got " .. tostring(pool), 2)
  end
  if mode == nil then mode = "error" end
  if mode ~= "error" and mode ~= "buffer" then
    error("breaker.ngx.transport: on_chunk must be \"error\" or \"buffer\", got " .. tostring(mode), 2)
  end
  local copts = {}
  for k, v in pairs(opts) do
    if k ~= "pool" and k ~= "on_chunk" then
      local want = CURL_KEYS[k]
      if not want then
        error("breaker.ngx.transport: unknown option '" .. tostring(k) .. "'", 2)
      end
      if want ~= true and type(v) ~= want then
        error(format("breaker.ngx.transport: option '%s' must be a %s, got %s", k, want, type(v)), 2)
      end
      copts[k] = v
    end
  end
  -- Let breaker.curl judge the values once, here, where a mistake is seen
  -- at startup rather than in a pool thread at the first request.
  local curl = require "breaker.curl"
  local ok, t = pcall(curl.new, copts)
  if not ok then error("breaker.ngx.transport: " .. tostring(t), 2) end
  local default_timeout = t:default_timeout()
  t:close()
  return setmetatable({
    pool = pool,
    on_chunk = mode,
    _opts = copts,
    _key = options_key(copts),
    _default_timeout = default_timeout,
  }, tmt)
end

-- True when v is a thread-pool transport made by bngx.transport.
function _M.is_thread_transport(v)
  return type(v) == "table" and getmetatable(v) == "breaker.ngx transport"
end

local PLAIN = { string = true, number = true, boolean = true }

-- Copies a value that must cross to the pool VM; raises on functions and
-- userdata, naming the field.
local function plain(v, where, depth)
  local tv = type(v)
  if PLAIN[tv] then return v end
  if tv ~= "table" then
    error(format("breaker.ngx transport: %s is a %s, which cannot cross to a pool thread", where, tv), 4)
  end
  if depth > 8 then error("breaker.ngx transport: " .. where .. " nests too deep", 4) end
  local c = {}
  for k, x in pairs(v) do
    if not PLAIN[type(k)] then
      error(format("breaker.ngx transport: %s has a %s key", where, type(k)), 4)
    end
    c[k] = plain(x, where .. "." .. tostring(k), depth + 1)
  end
  return c
end

local function check_phase(ngx, what)
  if not ngx or not ngx.run_worker_thread then
    error("breaker.ngx transport: " .. what .. " needs OpenResty with ngx.run_worker_thread "
          .. "(lua-nginx-module >= 0.10.21 built with threads)", 3)
  end
  local phase = ngx.get_phase()
  if not YIELDABLE[phase] then
    error(format("breaker.ngx transport: %s cannot run in the '%s' phase "
                 .. "(ngx.run_worker_thread needs rewrite, access, content or timer)", what, phase), 3)
  end
end

-- Turns ngx.run_worker_thread's failure (ok == false) into nil, err for a
-- full pool, or raises for a configuration problem.
local function pool_failure(self, msg)
  msg = tostring(msg)
  if msg == "no available Lua vm" then
    return nil, errors.new("bulkhead_full",
      "breaker.ngx: every Lua VM of the thread pool is busy (lua_worker_thread_vm_pool_size)",
      { pool = self.pool })
  elseif msg:find("ngx_thread_task_post", 1, true) then
    return nil, errors.new("bulkhead_full",
      "breaker.ngx: the queue of thread pool '" .. self.pool .. "' is full (thread_pool max_queue)",
      { pool = self.pool })
  elseif msg:find("not found", 1, true) and msg:find("^thread[_ ]pool") then
    -- 0.10.23 says "thread pool NAME not found", later ones "thread_pool not found"
    error(format("breaker.ngx transport: thread pool '%s' not found: add `thread_pool %s threads=16;` "
                 .. "to the main context of nginx.conf", self.pool, self.pool), 3)
  end
  error("breaker.ngx transport: the pool thread failed: " .. msg, 3)
end

local function rebuild_error(e)
  if type(e) ~= "table" then return errors.new("error", tostring(e)) end
  return errors.new(e.kind or "error", e.message, e)
end

-- Delivers a buffered 2xx body to on_chunk, as breaker.curl would have.
local function deliver(res, fn)
  if res.status < 200 or res.status >= 300 then return res end
  local body = res.body
  if body ~= "" and fn(body) == false then
    return nil, errors.new("aborted", "on_chunk returned false", { status = res.status })
  end
  res.body, res.streamed = "", true
  return res
end

local function finish(t0, res, err, raised)
  if raised then error("breaker.ngx transport: " .. raised, 3) end
  if not res then return nil, rebuild_error(err) end
  local timing = res.timing
  if type(timing) == "table" and type(timing.total) == "number" then
    -- Time spent waiting for a pool thread and crossing between VMs.
    local q = _M.now() - t0 - timing.total
    timing.queued = q > 0 and q or 0
  end
  return res
end

-- t:request(req) -> res | nil, err: breaker.curl's t:request, run in a pool
-- thread while this request handler yields. Raises on caller mistakes (bad
-- request fields, a function or userdata in req, the wrong phase, a missing
-- thread_pool). A busy pool gives nil, err with err.kind "bulkhead_full"
-- (the request was not sent). res.timing.queued is the time spent waiting
-- for a thread.
function T:request(req)
  if getmetatable(self) ~= "breaker.ngx transport" then
    error("breaker.ngx transport: use t:request(req)", 2)
  end
  if self.closed then error("breaker.ngx transport: transport is closed", 2) end
  if type(req) ~= "table" then error("breaker.ngx transport: request must be a table, got " .. type(req), 2) end
  local fn = req.on_chunk
  if fn ~= nil and self.on_chunk ~= "buffer" then
    error("breaker.ngx transport: on_chunk cannot run in a pool thread; make the transport with "
          .. "on_chunk = \"buffer\" to get the body in one piece at the end, or use a cosocket "
          .. "transport to stream", 2)
  end
  if fn ~= nil and type(fn) ~= "function" then
    local m = getmetatable(fn)
    if not (type(m) == "table" and m.__call) then
      error("breaker.ngx transport: request.on_chunk must be a function", 2)
    end
  end
  local r = {}
  for k, v in pairs(req) do
    if k ~= "on_chunk" then r[k] = plain(v, "request." .. tostring(k), 1) end
  end
  local ngx = ngx_api()
  check_phase(ngx, "t:request")
  local t0 = _M.now()
  local ok, res, err, raised = ngx.run_worker_thread(self.pool, WORKER_MODULE, "request",
                                                     self._key, self._opts, r)
  if not ok then return pool_failure(self, res) end
  res, err = finish(t0, res, err, raised)
  if res and fn ~= nil then return deliver(res, fn) end
  return res, err
end

-- t:request_many(reqs) -> { { res = } | { err = }, ... }: breaker.curl's
-- request_many (parallel over curl multi) in one pool thread. on_chunk is
-- not accepted here. A busy pool or a pool-side problem raises like request.
function T:request_many(reqs)
  if getmetatable(self) ~= "breaker.ngx transport" then
    error("breaker.ngx transport: use t:request_many(reqs)", 2)
  end
  if self.closed then error("breaker.ngx transport: transport is closed", 2) end
  if type(reqs) ~= "table" then error("breaker.ngx transport: expected a list of requests", 2) end
  local list = {}
  for i = 1, #reqs do
    if type(reqs[i]) ~= "table" then error(format("breaker.ngx transport: requests[%d] must be a table", i), 2) end
    if reqs[i].on_chunk ~= nil then
      error(format("breaker.ngx transport: requests[%d].on_chunk cannot run in a pool thread", i), 2)
    end
    list[i] = plain(reqs[i], format("requests[%d]", i), 1)
  end
  local ngx = ngx_api()
  check_phase(ngx, "t:request_many")
  local ok, out, _, raised = ngx.run_worker_thread(self.pool, WORKER_MODULE, "request_many",
                                                   self._key, self._opts, list)
  if not ok then
    local _, e = pool_failure(self, out)
    error("breaker.ngx transport: " .. tostring(e), 2)
  end
  if raised then error("breaker.ngx transport: " .. raised, 2) end
  for i = 1, #out do
    if out[i].err then out[i].err = rebuild_error(out[i].err) end
  end
  return out
end

-- t:default_timeout() -> breaker.curl's: the seconds a request without its
-- own `timeout` may take, or nil for none.
function T:default_timeout()
  return self._default_timeout
end

-- t:close(): later requests raise. The pool threads' connections belong to
-- their VMs and close with them (when nginx stops). Idempotent.
function T:close()
  self.closed = true
end

tmt.__tostring = function(self)
  return format("breaker.ngx transport (pool %s%s)", self.pool, self.closed and ", closed" or "")
end

-- bngx.check_transport(t) -> t: raises unless t has the plug-in shape (a
-- table or userdata whose request field is callable). It cannot check what
-- request returns; see the contract at the top of this file.
function _M.check_transport(t)
  local tt = type(t)
  if tt ~= "table" and tt ~= "userdata" then
    error("breaker.ngx.check_transport: expected an object with a request method, got " .. tt, 2)
  end
  local f = t.request
  if type(f) ~= "function" then
    local m = getmetatable(f)
    if not (type(m) == "table" and m.__call) then
      error("breaker.ngx.check_transport: transport.request must be a function (t:request(req) -> res | nil, err)", 2)
    end
  end
  return t
end

---------------------------------------------------------------------------
-- Stats
---------------------------------------------------------------------------

-- JSON has no infinities or NaN: such numbers become nil (a forced-open
-- breaker's retry_after is infinite; its state says why).
local function finite(t)
  for k, v in pairs(t) do
    if type(v) == "number" and (v ~= v or v == huge or v == -huge) then
      t[k] = nil
    elseif type(v) == "table" then
      finite(v)
    end
  end
  return t
end

-- bngx.stats([names]) -> { worker = { id, pid, count }, breakers = { [name]
-- = b:stats() plus state and shared } } for the breakers of this worker
-- (every live one, or those in the list `names`; an unknown name is left
-- out). Shared breakers show the state every worker sees. JSON-safe:
-- infinite numbers are left out.
function _M.stats(names)
  local B = require "breaker"
  local out = { breakers = {} }
  local ngx = ngx_api()
  if ngx and ngx.worker then
    out.worker = { id = ngx.worker.id(), pid = ngx.worker.pid(), count = ngx.worker.count() }
  end
  local function add(name, b)
    local st = b:stats()
    st.state = st.state or b:state()
    st.shared = b.shared ~= nil
    out.breakers[name] = finite(st)
  end
  if names == nil then
    for name, b in B.each() do add(name, b) end
  else
    if type(names) ~= "table" then error("breaker.ngx.stats: expected a list of names or nil", 2) end
    for _, name in ipairs(names) do
      local b = B.get(name)
      if b then add(name, b) end
    end
  end
  if next(out.breakers) == nil then
    -- an empty object, not an empty array, once encoded by cjson
    local ok, cjson = pcall(require, "cjson")
    if ok and cjson.empty_table_mt then setmetatable(out.breakers, cjson.empty_table_mt) end
  end
  return out
end

-- bngx.metrics_handler(opts): the content handler of breaker.metrics
-- (Prometheus text, JSON and the dashboard); see metrics.handler.
function _M.metrics_handler(opts)
  return require("breaker.metrics").handler(opts)
end

return _M
