-- bench/curl.lua: breaker.curl against lua-socket's socket.http and the
-- other libcurl binding (Lua-cURL `cURL` when installed, else Debian's
-- lua-curl package, which is luacurl `curl`), one reused easy handle each:
-- sequential small POSTs with keep-alive to the fake upstream on loopback.
-- luacurl runs twice: as the issue's baseline (body and status only) and
-- giving what breaker.curl gives (a header table too); every client sends
-- the same headers. Then request_many with 16 in flight against the same
-- requests one by one: on loopback, with 20 ms of server latency, and over
-- https with HTTP/2 (one shared connection) and with HTTP/1.1.
-- Prints figures, asserts nothing.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;' LUA_CPATH='build/?.so;;' luajit bench/curl.lua
--
-- BENCH_N * BENCH_ROUNDS requests per client (default 2000 * 3), taken in
-- alternating blocks so a noisy neighbour skews every client alike.

local curl = require "breaker.curl"
local helper = require "helper"
local socket = require "socket"
local cjson = require "cjson"
-- the libcurl clients, shared with bench/curl_instr.lua
local libcurl_clients = dofile((arg and arg[0] or "bench/curl.lua"):gsub("[^/]*$", "") .. "clients.lua")

local N = tonumber(os.getenv("BENCH_N")) or 2000
local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 3
local WARMUP = 100
local BODY = '{"model":"text-embedding-fake","input":"hello"}'
local PATH = "/v1/embeddings"

local now = socket.gettime

-- Every client sends the same request: body, Content-Type and breaker.curl's
-- default User-Agent (read back from the server in sequential()). curl
-- formats each header byte by byte, so a client that sent one header less
-- would look 5% faster for it.
local UA

-- Runs fn() n times after `warmup` runs; returns requests per second and
-- client CPU microseconds per request.
local function measure(n, fn, warmup)
  for _ = 1, warmup or WARMUP do fn() end
  collectgarbage()
  local t0, c0 = now(), os.clock()
  for _ = 1, n do fn() end
  local wall, cpu = now() - t0, os.clock() - c0
  return n / wall, cpu / n * 1e6
end

local function check(ok, what)
  if not ok then error(what, 2) end
end

-- Each client: name, setup(url) -> one_request, teardown.
local function breaker_client(url) return libcurl_clients.breaker(url, BODY) end

local function lua_curl_client(url)
  local cURL = require "cURL"
  local sink = {}
  local e = cURL.easy{
    url = url, post = true, postfields = BODY,
    httpheader = { "Content-Type: application/json", "User-Agent: " .. UA, "Expect:" },
    writefunction = function(s) sink[#sink + 1] = s; return true end,
    timeout = 10,
  }
  return function()
    sink = {}
    e:perform()
    check(e:getinfo_response_code() == 200, "Lua-cURL request failed")
    local _ = table.concat(sink)
  end, function() e:close() end
end

local function luacurl_maker(with_headers)
  return function(url) return libcurl_clients.luacurl(url, BODY, UA, with_headers) end
end

local function socket_http_client(url)
  local http, ltn12 = require "socket.http", require "ltn12"
  return function()
    local out = {}
    local _, code = http.request{
      url = url, method = "POST", source = ltn12.source.string(BODY), sink = ltn12.sink.table(out),
      headers = { ["content-type"] = "application/json", ["content-length"] = #BODY, ["user-agent"] = UA },
    }
    check(code == 200, "socket.http request failed")
  end, function() end
end

local clients = { { name = "breaker.curl", make = breaker_client } }
if pcall(require, "cURL") then
  clients[#clients + 1] = { name = "Lua-cURL", make = lua_curl_client }
else
  local ok, m = pcall(require, "curl")
  if ok and type(m) == "table" and m.easy_init then
    clients[#clients + 1] = { name = "luacurl", make = luacurl_maker(false) }
    clients[#clients + 1] = { name = "luacurl+hdrs", make = luacurl_maker(true) }
  end
end
clients[#clients + 1] = { name = "socket.http", make = socket_http_client }

-- Sequential: the clients take turns in blocks of BLOCK requests (the order
-- rotating), so all of them meet the same machine; each one's figure is its
-- total over every block. (This VM's speed drifts by tens of percent within
-- seconds: separate runs, even best-of-n, compare one client's good moment
-- with another's bad one.) Connections are counted in a short run of each
-- client alone first.
local function sequential(up)
  local url = up.url .. PATH
  local total = N * ROUNDS
  local probe = curl.new()
  UA = cjson.decode(assert(probe:request{ url = up.url .. "/echo" }).body).headers["user-agent"]
  probe:close()
  local sent
  for _, c in ipairs(clients) do
    up:reset()
    local one, close = c.make(url)
    for _ = 1, WARMUP do one() end
    close()
    c.conns = up:stats().connections
    -- the libcurl clients send the same header names and values (socket.http
    -- frames its own: Connection: close, TE instead of Accept)
    if c.name ~= "socket.http" then
      local names = {}
      for k, v in pairs(up:last_request().headers) do names[#names + 1] = k:lower() .. "=" .. v end
      table.sort(names)
      names = table.concat(names, " ")
      if sent and names ~= sent then error(c.name .. " sends other headers: " .. names .. " vs " .. sent) end
      sent = names
    end
    c.one, c.close = c.make(url)
    for _ = 1, WARMUP do c.one() end
    c.wall, c.cpu_s, c.n, c.rounds = 0, 0, 0, {}
  end
  local block = math.max(50, math.floor(N / 10))
  local k = 0
  while clients[1].n < total do
    k = k + 1
    for j = 1, #clients do
      local c = clients[(j + k - 2) % #clients + 1]
      local n = c.name == "socket.http" and math.ceil(block / 2) or block
      collectgarbage()
      local t0, c0 = now(), os.clock()
      for _ = 1, n do c.one() end
      local dt = now() - t0
      c.wall, c.cpu_s, c.n = c.wall + dt, c.cpu_s + os.clock() - c0, c.n + n
      c.rounds[k] = n / dt
    end
  end
  for _, c in ipairs(clients) do
    c.close()
    c.rps, c.cpu = c.n / c.wall, c.cpu_s / c.n * 1e6
  end
  print(("sequential POST %s: %d requests each (socket.http half), clients alternating in blocks of %d, " ..
         "fake upstream with %d nginx worker(s) on loopback"):format(PATH, total, block, up.workers))
  print("  ratio: the median over rounds of breaker.curl's rate / the client's rate in the same round " ..
        "(quartiles in brackets)")
  local ours = clients[1]
  for _, c in ipairs(clients) do
    local ratio = ""
    if c ~= ours then
      -- each round ran every client once, back to back: comparing within a
      -- round keeps a slow moment of the machine out of the ratio
      local r = {}
      for i, rate in ipairs(ours.rounds) do r[i] = rate / c.rounds[i] end
      table.sort(r)
      local function q(f) return r[math.max(1, math.floor(#r * f + 0.5))] end
      ratio = ("breaker.curl/%s = %.2f [%.2f-%.2f]%s")
              :format(c.name, q(0.5), q(0.25), q(0.75), c.name == "socket.http" and " (target >= 2)"
                      or c.name == "luacurl+hdrs" and "  (same output as breaker.curl)" or " (target >= 1)")
    end
    print(("  %-14s %8.0f req/s  %6.1f us client CPU/req  %5d conn/%d req  %s")
          :format(c.name, c.rps, c.cpu, c.conns, WARMUP, ratio))
  end
end

-- request_many with 16 in flight against one by one, same transport.
local function parallel(up, label, fault, n, warmup)
  local t = curl.new{ timeout = 10, ca_file = up.ca_file }
  local req = { method = "POST", url = up.url .. PATH, body = BODY,
                headers = { ["content-type"] = "application/json", ["x-fake-fault"] = fault } }
  local batch = {}
  for i = 1, 16 do batch[i] = req end
  local seq, par = 0, 0
  up:reset()
  for _ = 1, ROUNDS do
    seq = math.max(seq, (measure(n, function()
      local res = t:request(req)
      check(res and res.status == 200, "sequential request failed")
    end, warmup)))
    par = math.max(par, 16 * measure(math.ceil(n / 16), function()
      for _, r in ipairs(t:request_many(batch)) do
        check(r.res and r.res.status == 200, "parallel request failed")
      end
    end, math.ceil(warmup / 16)))
  end
  t:close()
  print(("  %-32s sequential %7.0f req/s  parallel %7.0f req/s  ratio %5.2f  %3d connections")
        :format(label, seq, par, par / seq, up:stats().connections))
end

local ups = {}
local ok, err = pcall(function()
  ups[1] = helper.upstream.start{ api_key = false, workers = 1 }
  sequential(ups[1])
  ups[2] = helper.upstream.start{ api_key = false, workers = 2 }
  print("request_many, 16 in flight, vs one by one (target: parallel >= 2x sequential)")
  parallel(ups[1], "loopback, 1 worker, no delay", nil, N, WARMUP)
  parallel(ups[2], "loopback, 2 workers, no delay", nil, N, WARMUP)
  parallel(ups[1], "20 ms server latency", "fault=slow&delay=0.02", math.min(N, 160), 16)
  -- as providers answer: https, by ALPN HTTP/2 (all 16 share one
  -- connection) or HTTP/1.1 (a connection each)
  ups[3] = helper.upstream.start{ api_key = false, workers = 1, tls = true }
  ups[4] = helper.upstream.start{ api_key = false, workers = 1, tls = true, http2 = false }
  parallel(ups[3], "https, HTTP/2, 1 worker", nil, N, WARMUP)
  parallel(ups[4], "https, HTTP/1.1, 1 worker", nil, N, WARMUP)
end)
for _, up in ipairs(ups) do up:stop() end
if not ok then
  io.stderr:write("bench/curl.lua: ", tostring(err), "\n")
  os.exit(1)
end
