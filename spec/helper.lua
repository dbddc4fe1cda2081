-- spec/helper.lua: shared helpers for breaker's specs and benchmarks.
--
--   local helper = require "helper"
--   local up = helper.upstream.start{ workers = 1, api_key = "sk-test-good" }
--   ... up.url, up:stats(), up:scenario{ { fault = "429", times = 2 } } ...
--   up:stop()
--
-- The fake upstream itself lives in spec/support/ (see its README.md).

local cjson = require "cjson"

local type, tostring, tonumber, setmetatable, error = type, tostring, tonumber, setmetatable, error
local format, concat = string.format, table.concat

local helper = {}

-- Directory of this file (the spec directory), so the helper works from any cwd.
helper.spec_dir = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "spec"
helper.support_dir = helper.spec_dir .. "/support"
helper.tmp_dir = helper.spec_dir .. "/tmp"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Returns a port on 127.0.0.1 that nothing listens on (bound with port 0,
-- then released): connecting to it is refused.
function helper.free_port()
  local socket = require "socket"
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- Monotonic-enough wall clock in seconds, for bounded waits in specs.
function helper.now()
  return require("socket").gettime()
end

-- Sleeps `s` seconds.
function helper.sleep(s)
  require("socket").sleep(s)
end

---------------------------------------------------------------------------
-- Fake upstream
---------------------------------------------------------------------------

local Upstream = {}
Upstream.__index = Upstream

local upstream = {}
helper.upstream = upstream

-- Calls a /_control/ endpoint with lua-socket (independent of breaker.curl)
-- and returns the decoded JSON answer; raises on any failure.
local function control(self, method, path, body)
  if self.stopped then error("fake upstream on port " .. self.port .. " is stopped", 3) end
  body = body or ""
  if self.ca_file then
    -- lua-socket speaks no TLS: an https upstream is controlled through
    -- breaker.curl (a transport of its own, so no spec's connection counts)
    local t = require("breaker.curl").new{ ca_file = self.ca_file, timeout = 10 }
    local res, err = t:request{ method = method, url = self.url .. "/_control/" .. path, body = body,
                                headers = { ["content-type"] = "application/json" } }
    t:close()
    if not res or res.status ~= 200 then
      error(format("fake upstream control %s %s failed: %s", method, path,
                   res and (res.status .. " " .. res.body) or tostring(err)), 3)
    end
    return cjson.decode(res.body)
  end
  local http, ltn12 = require "socket.http", require "ltn12"
  local out = {}
  local ok, code = http.request{
    url = self.url .. "/_control/" .. path,
    method = method,
    headers = { ["content-type"] = "application/json", ["content-length"] = #body },
    source = ltn12.source.string(body),
    sink = ltn12.sink.table(out),
    create = function()
      local sock = require("socket").tcp()
      sock:settimeout(10)
      return sock
    end,
  }
  local text = concat(out)
  if not ok or code ~= 200 then
    error(format("fake upstream control %s %s failed: %s %s", method, path,
                 tostring(code), text), 3)
  end
  return cjson.decode(text)
end

-- Starts a fake upstream on a free port of 127.0.0.1 and returns it once it
-- accepts connections. opts: workers (default 1), api_key (default
-- "sk-test-good"; false accepts any key), tls (true: https with a fresh
-- self-signed certificate for the name localhost only; up.url is then
-- https://localhost:PORT and up.ca_file the certificate; it offers HTTP/2
-- by ALPN, as providers do, unless http2 = false). Raises when it cannot
-- start.
function upstream.start(opts)
  opts = opts or {}
  local workers = opts.workers or 1
  local api_key = opts.api_key
  if api_key == nil then api_key = "sk-test-good" end
  if api_key == false then api_key = "" end
  assert(type(workers) == "number" and workers >= 1, "workers must be a number >= 1")
  assert(type(api_key) == "string" and not api_key:find("[^%w_.-]"),
         "api_key may only hold letters, digits, _ . -")
  local script = helper.support_dir .. "/upstream.sh"
  local last = ""
  for _ = 1, 5 do  -- a port found free can be taken before nginx binds it
    local port = helper.free_port()
    local prefix = helper.tmp_dir .. "/upstream-" .. port
    local cmd = format("WORKERS=%d API_KEY=%s TLS=%d HTTP2=%d %s start %s %d 2>&1", workers,
                       shell_quote(api_key), opts.tls and 1 or 0, opts.http2 == false and 0 or 1,
                       shell_quote(script), shell_quote(prefix), port)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    local got_port, pid = out:match("(%d+) (%d+)%s*$")
    if got_port then
      return setmetatable({
        port = tonumber(got_port),
        pid = tonumber(pid),
        prefix = prefix,
        url = (opts.tls and "https://localhost:" or "http://127.0.0.1:") .. got_port,
        ca_file = opts.tls and (prefix .. "/conf/cert.pem") or nil,
        api_key = api_key ~= "" and api_key or nil,
        workers = workers,
      }, Upstream)
    end
    last = out
    os.execute("rm -rf " .. shell_quote(prefix))
  end
  error("fake upstream did not start: " .. last, 2)
end

-- Stops the server by its pid and waits until it is gone; removes its prefix
-- directory unless BREAKER_KEEP_UPSTREAM is set. Idempotent.
function Upstream:stop()
  if self.stopped then return end
  self.stopped = true
  local script = helper.support_dir .. "/upstream.sh"
  local ok = os.execute(format("%s stop %s", shell_quote(script), shell_quote(self.prefix)))
  if ok ~= 0 and ok ~= true then error("could not stop fake upstream pid " .. self.pid, 2) end
  if not os.getenv("BREAKER_KEEP_UPSTREAM") and self.prefix:find("/tmp/upstream%-%d+$") then
    os.execute("rm -rf " .. shell_quote(self.prefix))
  end
end

-- True while the server's master process runs (a zombie counts as gone).
function Upstream:alive()
  local f = io.open("/proc/" .. self.pid .. "/stat")
  if not f then
    local rc = os.execute(format("kill -0 %d 2>/dev/null", self.pid))
    return rc == 0 or rc == true
  end
  local stat = f:read("*a") or ""
  f:close()
  local state = stat:match("%) (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- Clears counters, the scenario, the rate limit and the last request.
function Upstream:reset()
  control(self, "POST", "reset")
end

-- { requests = n, paths = { [path] = n }, connections = n, rate_limited = n,
--   scenario_left = n }: API requests received (control calls excluded),
-- per path, and distinct TCP connections that carried them.
function Upstream:stats()
  return control(self, "GET", "stats")
end

-- Scripts the next API requests: steps[i] is a fault table (same keys as the
-- x-fake-fault header, plus `times`), used one per request; afterwards the
-- server behaves normally. Replaces any previous scenario.
function Upstream:scenario(steps)
  local body = #steps == 0 and "[]" or cjson.encode(steps)
  return control(self, "POST", "scenario", body).steps
end

-- Scripts an incident by wall-clock time: phases[i] = { name =, duration =
-- seconds, ratio = share of requests faulted (default 1), mix = { fault, ... }
-- (faulted requests take these round-robin) or fault keys as in scenario, or
-- rps = N: a rate limit of N requests per second, 429 + Retry-After beyond }.
-- The timeline starts at `start` (epoch seconds, default now); requests after
-- its end behave normally. up:stats().phases counts requests per phase name
-- and up:stats().phase names the current one. Returns the number of phases.
function Upstream:timeline(phases, start)
  local body = cjson.encode({ phases = phases, start = start })
  return control(self, "POST", "timeline", body).phases
end

-- Turns on a requests-per-minute limit (nil or 0 turns it off).
function Upstream:rate_limit(rpm)
  control(self, "POST", "rate_limit?rpm=" .. (tonumber(rpm) or 0))
end

-- The last API request received: { method, path, args, headers, body }.
function Upstream:last_request()
  return control(self, "GET", "last_request")
end

---------------------------------------------------------------------------
-- nginx apps (spec/ngx_spec.lua, bench/ngx.lua)
---------------------------------------------------------------------------

local Nginx = {}
Nginx.__index = Nginx

local nginx = {}
helper.nginx = nginx

-- Prefix for external commands: a sanitizer preloaded into the specs'
-- interpreter must not reach them (curl and ps hang under a preloaded libasan).
helper.clean_env = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS "

-- Absolute path of the repository (the parent of the spec directory).
function helper.repo_dir()
  local p = assert(io.popen("cd " .. shell_quote(helper.spec_dir .. "/..") .. " && pwd"))
  local dir = p:read("*l")
  p:close()
  return dir
end

-- lua_package_path and lua_package_cpath for an nginx that runs this
-- checkout's modules and the spec support files.
function nginx.lua_paths()
  local repo = helper.repo_dir()
  return concat({ repo .. "/lua/?.lua", repo .. "/lua/?/init.lua", repo .. "/spec/support/?.lua",
                  "/usr/share/lua/5.1/?.lua", "" }, ";") .. ";",
         repo .. "/build/?.so;/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;"
end

-- Reads /proc/<pid>/stat: ppid and state letter, or nil when gone.
local function proc_stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local stat = f:read("*a") or ""
  f:close()
  local state, ppid = stat:match("%) (%a) (%d+)")
  if not state then return nil end
  return tonumber(ppid), state
end

-- True while process `pid` runs (a zombie counts as gone).
function helper.running(pid)
  local _, state = proc_stat(pid)
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- Pids of the running children of `pid`, sorted.
function helper.children(pid)
  local out = {}
  local p = assert(io.popen(helper.clean_env .. "ls /proc"))
  for d in p:lines() do
    if d:match("^%d+$") then
      local ppid, state = proc_stat(d)
      if ppid == pid and state ~= "Z" and state ~= "X" then out[#out + 1] = tonumber(d) end
    end
  end
  p:close()
  table.sort(out)
  return out
end

-- Waits until pred() is true, at most `timeout` seconds (polling every
-- `step`, default 0.05); returns pred's last value.
function helper.wait_for(timeout, pred, step)
  local deadline = helper.now() + timeout
  local v = pred()
  while not v and helper.now() < deadline do
    helper.sleep(step or 0.05)
    v = pred()
  end
  return v
end

-- Starts spec/support/raw_upstream.lua (a server that breaks HTTP/1.1 on
-- request) in a process of its own: { pid, port, url, stop = fn }; stop()
-- kills it by its pid and waits until it is gone.
function helper.raw_upstream()
  local port = helper.free_port()
  local p = assert(io.popen(("exec %ssh -c 'echo $$; exec luajit %s/spec/support/raw_upstream.lua %d'")
                            :format(helper.clean_env, helper.repo_dir(), port)))
  local raw = { pid = tonumber(p:read("*l")), port = port, url = "http://127.0.0.1:" .. port }
  assert(p:read("*l") == "ready", "raw_upstream did not start")
  function raw.stop()
    os.execute("kill " .. raw.pid)
    p:close()
    assert(helper.wait_for(5, function() return not helper.running(raw.pid) end), "raw_upstream still runs")
  end
  return raw
end

local function accepts(port)
  local sock = require("socket").tcp()
  sock:settimeout(0.2)
  local ok = sock:connect("127.0.0.1", port)
  sock:close()
  return ok ~= nil
end

-- Starts nginx on a free port of 127.0.0.1 with the config render(port,
-- prefix) returns, and returns it once the port accepts connections.
-- opts: render (function, required), name (prefix directory name, default
-- "ngx"), env (table of environment variables for nginx), workers (how many
-- worker processes the config asks for; start waits for them). Everything
-- nginx writes goes under spec/tmp/<name>-PORT/ (removed by stop). Raises
-- when it cannot start.
function nginx.start(opts)
  assert(type(opts) == "table" and type(opts.render) == "function", "nginx.start: render is required")
  local name = opts.name or "ngx"
  assert(name:match("^[%w_-]+$"), "nginx.start: name may only hold letters, digits, _ -")
  local env = {}
  for k, v in pairs(opts.env or {}) do
    assert(tostring(k):match("^[%a_][%w_]*$"), "nginx.start: bad environment variable name")
    env[#env + 1] = k .. "=" .. shell_quote(v)
  end
  local last = ""
  for _ = 1, 5 do -- a port found free can be taken before nginx binds it
    local port = helper.free_port()
    local prefix = helper.tmp_dir .. "/" .. name .. "-" .. port
    local abs = helper.repo_dir() .. "/spec/tmp/" .. name .. "-" .. port
    os.execute("rm -rf " .. shell_quote(prefix))
    assert(os.execute("mkdir -p " .. shell_quote(prefix) .. "/conf " .. shell_quote(prefix) .. "/logs "
                      .. shell_quote(prefix) .. "/tmp"))
    local rok, text = pcall(opts.render, port, abs)
    if not rok then
      os.execute("rm -rf " .. shell_quote(prefix))
      error(text, 2)
    end
    local f = assert(io.open(prefix .. "/conf/nginx.conf", "w"))
    f:write(text)
    f:close()
    -- A sanitizer preloaded into the specs' interpreter must not reach nginx.
    local cmd = format("%s%s nginx -p %s/ "
                       .. "-c conf/nginx.conf -e logs/error.log -g 'daemon on;' 2>&1",
                       helper.clean_env, concat(env, " "), shell_quote(abs))
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    local self = setmetatable({ port = port, prefix = abs, url = "http://127.0.0.1:" .. port,
                                workers_wanted = opts.workers }, Nginx)
    local pid = helper.wait_for(5, function() return self:read_pid() end)
    if pid and helper.wait_for(5, function() return accepts(port) end) then
      self.pid = pid
      if opts.workers then
        helper.wait_for(5, function() return #helper.children(pid) >= opts.workers end)
      end
      return self
    end
    if pid then self.pid = pid; self:stop(true) end
    local lf = io.open(prefix .. "/logs/error.log")
    last = out .. (lf and lf:read("*a") or "")
    if lf then lf:close() end
    os.execute("rm -rf " .. shell_quote(prefix))
  end
  error("nginx did not start: " .. last, 2)
end

-- The master's pid from the pid file, or nil.
function Nginx:read_pid()
  local f = io.open(self.prefix .. "/logs/nginx.pid")
  if not f then return nil end
  local pid = tonumber(f:read("*l") or "")
  f:close()
  return pid
end

-- Pids of the running worker processes.
function Nginx:workers()
  return helper.children(self.pid)
end

-- Sends HUP to the master and waits until every worker is a new one (the
-- old ones gone) and as many as before run. Returns the new worker pids.
function Nginx:reload()
  local old = self:workers()
  local was = {}
  for _, p in ipairs(old) do was[p] = true end
  assert(os.execute("kill -HUP " .. self.pid))
  local ok = helper.wait_for(10, function()
    local now = self:workers()
    if #now < #old then return false end
    for _, p in ipairs(now) do if was[p] then return false end end
    return true
  end)
  if not ok then error("nginx did not replace its workers within 10 s after HUP", 2) end
  return self:workers()
end

-- The error log's text.
function Nginx:log()
  local f = io.open(self.prefix .. "/logs/error.log")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

-- One HTTP/1.1 request on a new connection: status, headers (lower-case
-- names), body. Raises when no answer comes within `timeout` (default 10 s).
function Nginx:request(method, path, headers, body, timeout)
  local http, ltn12 = require "socket.http", require "ltn12"
  local out = {}
  local h = {}
  for k, v in pairs(headers or {}) do h[k] = v end
  if body then h["content-length"] = #body end
  local ok, code, rh = http.request{
    url = self.url .. path, method = method, headers = h,
    source = body and ltn12.source.string(body) or nil,
    sink = ltn12.sink.table(out),
    create = function()
      local sock = require("socket").tcp()
      sock:settimeout(timeout or 10)
      return sock
    end,
  }
  if not ok then error(format("nginx %s %s failed: %s", method, path, tostring(code)), 2) end
  return code, rh, concat(out)
end

-- GET `path` and decode the JSON answer (raises unless 200).
function Nginx:json(path)
  local code, _, body = self:request("GET", path)
  if code ~= 200 then error(format("GET %s: %s %s", path, tostring(code), body), 2) end
  return cjson.decode(body)
end

-- Stops nginx by its pid (TERM, then KILL of the master and its workers
-- after 5 s) and removes the prefix directory unless BREAKER_KEEP_NGINX is
-- set or `keep` is true. Idempotent.
function Nginx:stop(keep)
  if self.stopped then return end
  self.stopped = true
  local pid = self.pid
  if pid and helper.running(pid) then
    local workers = helper.children(pid)
    os.execute("kill -TERM " .. pid .. " 2>/dev/null")
    if not helper.wait_for(5, function() return not helper.running(pid) end) then
      os.execute("kill -KILL " .. pid .. " " .. concat(workers, " ") .. " 2>/dev/null")
      helper.wait_for(2, function() return not helper.running(pid) end)
    end
    -- Workers leave with the master; wait for any stragglers.
    helper.wait_for(5, function()
      for _, w in ipairs(workers) do if helper.running(w) then return false end end
      return true
    end)
  end
  if not keep and not os.getenv("BREAKER_KEEP_NGINX") and self.prefix:find("/spec/tmp/[%w_-]+%-%d+$") then
    os.execute("rm -rf " .. shell_quote(self.prefix))
  end
end

-- Encodes a fault table for the x-fake-fault request header.
function helper.fault(t)
  local parts = {}
  for k, v in pairs(t) do
    parts[#parts + 1] = tostring(k) .. "=" .. tostring(v):gsub("[^%w_.~-]", function(c)
      return format("%%%02X", c:byte())
    end)
  end
  table.sort(parts)
  return concat(parts, "&")
end

return helper
