-- bench/policy.lua: what a policy costs on the success path.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' luajit bench/policy.lua [N] [RUNS]
--   (`--case K N RUNS` is how it runs one case in a child process)
--
-- p:call(fn, i) with breaker + retry (with its budget) + fallback + bulkhead,
-- and a few other shapes, against a bare fn(i) in the same run; LuaJIT's JIT
-- stays on. Each figure is the median of RUNS runs of N calls: ns per call
-- and bytes of garbage per call (collectgarbage("count") before and after,
-- with the collector stopped). Prints figures; asserts nothing.

local breaker = require "breaker"
local policy = require "breaker.policy"

local case_mode = arg and arg[1] == "--case"
local N = tonumber(arg and arg[case_mode and 3 or 1]) or 2000000
local RUNS = tonumber(arg and arg[case_mode and 4 or 2]) or 7
local now = breaker.clock.now_precise
local format = string.format

local function median(t)
  table.sort(t)
  return t[math.floor((#t + 1) / 2)]
end

local sink = 0
local function fn(x) return x + 1 end

-- Runs `loop(n)` RUNS times; returns median ns/call and median bytes/call.
local function measure(loop)
  loop(N / 10) -- warm up, let the traces compile
  local ns, bytes = {}, {}
  for r = 1, RUNS do
    collectgarbage()
    collectgarbage()
    collectgarbage("stop")
    local m0 = collectgarbage("count")
    local t0 = now()
    loop(N)
    local t1 = now()
    local m1 = collectgarbage("count")
    collectgarbage("restart")
    ns[r] = (t1 - t0) / N * 1e9
    bytes[r] = (m1 - m0) * 1024 / N
  end
  return median(ns), median(bytes)
end

local id = 0
local function bname()
  id = id + 1
  return "bench-policy-" .. id
end

local function call_loop(p)
  return function(n)
    local s = 0
    for i = 1, n do s = s + p:call(fn, i) end
    sink = sink + s
  end
end

local cases = {
  { "bare fn(i)", function(n)
      local s = 0
      for i = 1, n do s = s + fn(i) end
      sink = sink + s
    end },
  { "breaker b:allow()+b:record() around fn", (function()
      local b = breaker.new(bname(), {})
      return function(n)
        local s = 0
        for i = 1, n do
          local permit = b:allow()
          local t0 = now()
          s = s + fn(i)
          b:record(permit, "success", now() - t0)
        end
        sink = sink + s
      end
    end)() },
  { "p:call, no layers", call_loop(policy.new{}) },
  { "p:call, breaker", call_loop(policy.new{ breaker = { name = bname() } }) },
  { "p:call, breaker+retry+fallback+bulkhead", call_loop(policy.new{
      breaker = { name = bname() },
      retry = { max_attempts = 3 },
      fallback = function() return 0 end,
      bulkhead = { max_concurrent = 64 },
    }) },
  { "  same, + deadline + rate_limit", call_loop(policy.new{
      breaker = { name = bname() },
      retry = { max_attempts = 3 },
      fallback = function() return 0 end,
      bulkhead = { max_concurrent = 64 },
      deadline = 30,
      rate_limit = { rate = 1e12 },
    }) },
  { "  same, fallback cache (key = the argument)", call_loop(policy.new{
      breaker = { name = bname() },
      retry = { max_attempts = 3 },
      fallback = { cache = { size = 16 }, key = function(x) return x % 16 end },
      bulkhead = { max_concurrent = 64 },
    }) },
  { "  same, p:call_into(report, fn, i)", (function()
      local p = policy.new{
        breaker = { name = bname() }, retry = { max_attempts = 3 },
        fallback = function() return 0 end, bulkhead = { max_concurrent = 64 },
      }
      local rep = {}
      return function(n)
        local s = 0
        for i = 1, n do s = s + p:call_into(rep, fn, i) end
        sink = sink + s
      end
    end)() },
  { "p:request, full policy, in-memory transport", (function()
      local res = { status = 200, headers = {}, body = "{}" }
      local transport = { request = function() return res end }
      local p = policy.new{
        breaker = { name = bname() }, retry = { max_attempts = 3 },
        fallback = { value = res }, bulkhead = { max_concurrent = 64 },
      }
      local req = { method = "GET", url = "http://127.0.0.1/v1/models" }
      return function(n)
        local s = 0
        for _ = 1, n do s = s + p:request(transport, req).status end
        sink = sink + s
      end
    end)() },
}

-- Each case runs in its own process (with the bare loop measured in that
-- same process), so that traces compiled for one policy shape do not slow
-- down the next case: a long-running app settles on its own traces too.
local jit = rawget(_G, "jit")
if arg and arg[1] == "--case" then
  local k = tonumber(arg[2])
  local bare_ns = measure(cases[1][2])
  local ns, b = measure(cases[k][2])
  io.write(format("%.3f %.3f %.3f\n", bare_ns, ns, b))
  if sink == 0 then io.write("") end -- keep the loops' results alive
  return
end

local function shell_quote(v) return "'" .. tostring(v):gsub("'", "'\\''") .. "'" end
local interp = arg and arg[-1] or "luajit"
print(format("%s, JIT %s, binding %s, N = %d, median of %d runs, one process per case",
             jit and jit.version or _VERSION, jit and (jit.status() and "on" or "off") or "n/a",
             breaker.binding, N, RUNS))
print(format("%-48s %9s %9s %9s %14s", "case", "bare ns", "ns/call", "+ns", "garbage B/call"))
for k = 2, #cases do
  local cmd = format("%s %s --case %d %d %d", shell_quote(interp), shell_quote(arg[0]), k, N, RUNS)
  local f = assert(io.popen(cmd))
  local out = f:read("*a")
  f:close()
  local bare_ns, ns, b = out:match("^(%S+) (%S+) (%S+)")
  if not bare_ns then
    print(format("%-48s failed: %s", cases[k][1], out))
  else
    bare_ns, ns, b = tonumber(bare_ns), tonumber(ns), tonumber(b)
    print(format("%-48s %9.1f %9.1f %9.1f %14.2f", cases[k][1], bare_ns, ns, ns - bare_ns, b))
  end
end
