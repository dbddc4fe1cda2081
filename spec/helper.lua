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
  local http, ltn12 = require "socket.http", require "ltn12"
  body = body or ""
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
-- https://localhost:PORT and up.ca_file the certificate). Raises when it
-- cannot start.
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
    local cmd = format("WORKERS=%d API_KEY=%s TLS=%d %s start %s %d 2>&1", workers,
                       shell_quote(api_key), opts.tls and 1 or 0, shell_quote(script), shell_quote(prefix), port)
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
  local p = assert(io.popen(format("ps -o stat= -p %d 2>/dev/null", self.pid)))
  local stat = p:read("*a")
  p:close()
  return stat:match("^%s*[^%sZ]") ~= nil
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
-- (faulted requests take these round-robin) or fault keys as in scenario }.
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
