-- bench/llm.lua: what breaker.llm adds to a chat round trip.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;' LUA_CPATH='build/?.so;;' luajit bench/llm.lua [N] [ROUNDS]
--
-- client:chat{...} (default policy: breaker, retry, rate-limit learning,
-- deadline; JSON encode of the request and decode of the answer; usage
-- accounting) against raw transport requests (breaker.curl t:request with the
-- same JSON body, already encoded, answer not decoded) to the fake upstream on
-- loopback, in the same run, rounds interleaved; a third row decodes the raw
-- answer too, to show how much of the difference is JSON. Figures: median over ROUNDS
-- of N calls, wall time and client CPU per call; the overhead is the client's
-- extra wall time per call over the raw request's. Prints figures; asserts
-- nothing.

local helper = require "helper"
local curl = require "breaker.curl"
local llm = require "breaker.llm"
local cjson = require "cjson"

local N = tonumber(arg and arg[1]) or 3000
local ROUNDS = tonumber(arg and arg[2]) or 7
local KEY = "sk-bench-key"
local now = require("breaker").clock.now_precise
local format = string.format

local function median(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c[math.floor((#c + 1) / 2)]
end

local REQ = {
  model = "gpt-fake", temperature = 0.2, max_tokens = 64,
  messages = {
    { role = "system", content = "You are a helpful assistant that answers in one sentence." },
    { role = "user", content = "What is a circuit breaker, in the sense of distributed systems?" },
  },
}

-- us wall and us CPU per call of fn over n calls.
local function measure(n, fn)
  collectgarbage()
  local c0, t0 = os.clock(), now()
  for _ = 1, n do fn() end
  return (now() - t0) / n * 1e6, (os.clock() - c0) / n * 1e6
end

local up = helper.upstream.start{ workers = 1, api_key = KEY }
local ok, err = pcall(function()
  local client = llm.new{ base_url = up.url .. "/v1", api_key = KEY, model = "gpt-fake", timeout = 10 }
  local t = curl.new{ timeout = 10 }
  local body = cjson.encode(REQ)
  local raw_req = { method = "POST", url = up.url .. "/v1/chat/completions", body = body, timeout = 10,
                    headers = { authorization = "Bearer " .. KEY, ["content-type"] = "application/json",
                                accept = "application/json" } }
  local function raw()
    local res = t:request(raw_req)
    if not res or res.status ~= 200 then error("raw request failed") end
  end
  local function raw_decode()
    local res = t:request(raw_req)
    if not res or res.status ~= 200 or type(cjson.decode(res.body)) ~= "table" then
      error("raw request failed")
    end
  end
  local function chat()
    local res, e = client:chat(REQ)
    if not res then error("client:chat failed: " .. tostring(e)) end
  end
  -- Warm up both (connections, traces).
  measure(N / 5, raw)
  measure(N / 5, chat)
  local rw, rc, dw, dc, cw, cc, over = {}, {}, {}, {}, {}, {}, {}
  for r = 1, ROUNDS do
    rw[r], rc[r] = measure(N, raw)
    dw[r], dc[r] = measure(N, raw_decode)
    cw[r], cc[r] = measure(N, chat)
    over[r] = (cw[r] - rw[r]) / rw[r] * 100
  end
  -- Call by call: raw and chat alternate, each call timed on its own, so
  -- both meet the same machine at the same moments (this VM's wall-clock
  -- figures drift by tens of percent between rounds).
  local pr, pc = {}, {}
  local sr, sc = 0, 0
  for i = 1, N * ROUNDS do
    local t0 = now()
    raw()
    local t1 = now()
    chat()
    local t2 = now()
    pr[i], pc[i] = t1 - t0, t2 - t1
    sr, sc = sr + pr[i], sc + pc[i]
  end
  local mr, mc = median(pr) * 1e6, median(pc) * 1e6
  local ar, ac = sr / #pr * 1e6, sc / #pc * 1e6
  local stats = client:stats()
  print(format("chat round trips to the fake upstream on loopback (1 nginx worker): %d calls x %d rounds, " ..
               "medians", N, ROUNDS))
  print(format("  raw t:request (same body)   %7.1f us/call  %6.1f us client CPU/call", median(rw), median(rc)))
  print(format("  raw t:request + cjson.decode %6.1f us/call  %6.1f us client CPU/call", median(dw), median(dc)))
  print(format("  client:chat (default policy) %6.1f us/call  %6.1f us client CPU/call", median(cw), median(cc)))
  print(format("  rounds: client overhead %+.1f %% wall (median of per-round ratios), %+.1f us CPU per call",
               median(over), median(cc) - median(rc)))
  print(format("  call by call (%d pairs, alternating): raw median %.1f us, mean %.1f us; " ..
               "client:chat median %.1f us, mean %.1f us", #pr, mr, ar, mc, ac))
  print(format("  client overhead: %+.1f %% (median), %+.1f %% (mean)   (target <= 10 %%)",
               (mc - mr) / mr * 100, (ac - ar) / ar * 100))
  print(format("  (%d chat calls, %d tokens counted, breaker %s; upstream saw %d requests on %d connection(s))",
               stats.calls, stats.total_tokens, stats.models["gpt-fake"].breaker,
               up:stats().requests, up:stats().connections))
  client:close()

  -- The same comparison with 5 ms of server latency (x-fake-fault on both,
  -- through the client's `headers` option): a provider is never this fast,
  -- so this is still a floor for what the client costs in real use.
  local slow = { ["x-fake-fault"] = "fault=slow&delay=0.005" }
  local sclient = llm.new{ base_url = up.url .. "/v1", api_key = KEY, model = "gpt-fake", timeout = 10,
                           headers = slow }
  local sraw = { method = "POST", url = raw_req.url, body = body, timeout = 10, headers = {} }
  for k, v in pairs(raw_req.headers) do sraw.headers[k] = v end
  sraw.headers["x-fake-fault"] = slow["x-fake-fault"]
  local SN = math.max(20, math.floor(N / 30))
  local function sraw_call()
    local res = t:request(sraw)
    if not res or res.status ~= 200 then error("raw request failed") end
  end
  local function schat()
    local res, e = sclient:chat(REQ)
    if not res then error("client:chat failed: " .. tostring(e)) end
  end
  measure(5, sraw_call); measure(5, schat)
  local sw, scw, sover = {}, {}, {}
  for r = 1, ROUNDS do
    sw[r] = measure(SN, sraw_call)
    scw[r] = measure(SN, schat)
    sover[r] = (scw[r] - sw[r]) / sw[r] * 100
  end
  print(format("  with 5 ms server latency (%d calls x %d rounds): raw %.1f us/call, client:chat %.1f us/call, " ..
               "overhead %+.1f %%", SN, ROUNDS, median(sw), median(scw), median(sover)))
  sclient:close()
  t:close()
end)
up:stop()
if not ok then
  io.stderr:write("bench/llm.lua failed: ", tostring(err), "\n")
  os.exit(1)
end
