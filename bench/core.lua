-- Benchmark of the breaker core (make bench). Prints figures; asserts nothing.
-- Median of several runs, LuaJIT with the JIT on, with an empty loop and a
-- plain Lua function call as baselines in the same run.
local breaker = require "breaker"
local now = breaker.clock.now_precise

local N = tonumber(os.getenv("BENCH_N")) or 5000000
local RUNS = tonumber(os.getenv("BENCH_RUNS")) or 7

local function median(t)
  table.sort(t)
  return t[math.ceil(#t / 2)]
end

-- ns per iteration of f(n), median over RUNS runs (after one warm-up).
local function measure(f)
  f(N / 10)
  local r = {}
  for i = 1, RUNS do
    local t0 = now()
    f(N)
    r[i] = (now() - t0) * 1e9 / N
  end
  return median(r)
end

-- bytes of garbage per iteration of f, with the GC stopped; the cost of
-- measuring (an empty f) is taken off.
local function raw_garbage(f)
  f(1000)
  collectgarbage(); collectgarbage("stop")
  local before = collectgarbage("count")
  f(100000)
  local after = collectgarbage("count")
  collectgarbage("restart")
  return (after - before) * 1024 / 100000
end
local empty_cost = raw_garbage(function(n) for _ = 1, n do end end)
local function garbage(f)
  local g = raw_garbage(f) - empty_cost
  return g > 0 and g or 0
end

-- Results land here so the loops are not dead code; the total is printed.
local blackhole = {}
local function plain(x) return x + 1 end

local cases = {}
local function case(name, f, target)
  cases[#cases + 1] = { name = name, f = f, target = target }
end

case("empty loop (baseline)", function(n)
  local s = 0
  for i = 1, n do s = i end
  blackhole[1] = s
end)

case("plain Lua function call (baseline)", function(n)
  local s = 0
  for _ = 1, n do s = plain(s) end
  blackhole[1] = s
end)

local count = breaker.new("bench-count", { window_size = 100, minimum_calls = 100 })
case("allow + record(success), count window", function(n)
  local b = count
  for _ = 1, n do
    local p = b:allow()
    b:record(p, "success", 0.001)
  end
end, 10)

local timew = breaker.new("bench-time", { window_type = "time", window_size = 60 })
case("allow + record(success), time window", function(n)
  local b = timew
  for _ = 1, n do
    local p = b:allow()
    b:record(p, "success", 0.001)
  end
end, 20)

local open = breaker.new("bench-open", { window_size = 1, minimum_calls = 1, open_duration = 1e6 })
open:record(open:allow(), "failure", 0.001)
case("rejection while open: allow() -> nil, err", function(n)
  local b = open
  local r
  for _ = 1, n do r = b:allow() end
  blackhole[1] = r
end, 8)

local callb = breaker.new("bench-call", { window_size = 100 })
local function fn(x) return x end
case("bare fn() (baseline for call)", function(n)
  local s
  for i = 1, n do s = fn(i) end
  blackhole[1] = s
end)
case("b:call(fn)", function(n)
  local b = callb
  local s
  for i = 1, n do s = b:call(fn, i) end
  blackhole[1] = s
end)

print(string.format("breaker core benchmark (%s binding, %s, N=%d, median of %d)",
  breaker.binding, jit and jit.version or _VERSION, N, RUNS))
local results = {}
for _, c in ipairs(cases) do
  results[c.name] = measure(c.f)
  print(string.format("  %-46s %8.2f ns/op%s", c.name, results[c.name],
    c.target and string.format("   (target <= %d ns)", c.target) or ""))
end
local extra = results["b:call(fn)"] - results["bare fn() (baseline for call)"]
print(string.format("  %-46s %8.2f ns        (target <= 150 ns)", "b:call(fn) over bare fn()", extra))
print(string.format("  (loop results kept: %s)", tostring(blackhole[1])))

local g = garbage(cases[3].f)
print(string.format("  %-46s %8.2f bytes     (target 0)", "garbage per allow/record pair (count)", g))
print(string.format("  %-46s %8.2f bytes     (target 0)", "garbage per allow/record pair (time)",
  garbage(cases[4].f)))
print(string.format("  %-46s %8.2f bytes", "garbage per rejection (allow -> nil, err)", garbage(cases[5].f)))

local mc = count:stats().memory
local mdef = breaker.new("bench-mem", {}):stats().memory
local mt = breaker.new("bench-mem-t", { window_type = "time" }):stats().memory
print(string.format("  memory per breaker: %d bytes default count window (20 outcomes), %d bytes with "
  .. "100 outcomes, %d bytes default time window (10 buckets)  (target <= 1024)", mdef, mc, mt))
local per_bucket = breaker.new("bench-mem-t11", { window_type = "time", window_buckets = 11 }):stats().memory - mt
print("    of which: latency histogram 192 bytes (96 x uint16), transition log 128 bytes,"
  .. " count window 1 byte/outcome, time window " .. per_bucket .. " bytes/bucket")
