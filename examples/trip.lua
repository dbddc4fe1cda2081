-- A breaker tripping, rejecting, probing and closing, with every transition
-- printed. Run: make demo-core (or luajit examples/trip.lua with the paths set).
local breaker = require "breaker"
local clock = breaker.clock

-- A simulated upstream: fails while `down` is true. The clock is frozen and
-- moved by hand so the example runs instantly; real code does not do this.
clock.freeze(0)
local down = false
local calls_reached = 0
local function upstream()
  calls_reached = calls_reached + 1
  clock.advance(0.05)                  -- each call takes 50 ms
  if down then return nil, "503 Service Unavailable" end
  return "ok"
end

local b = breaker.new("llm-provider", {
  window_size = 10, minimum_calls = 5, failure_rate_threshold = 50,
  open_duration = 10, open_duration_factor = 2, half_open_calls = 2,
  on_state_change = function(name, from, to, reason)
    print(string.format("  t=%6.2fs  %s: %s -> %s (%s)", clock.now(), name, from, to, reason))
  end,
})

local function run(n, label)
  local ok, failed, rejected = 0, 0, 0
  for _ = 1, n do
    local res, err = b:call(upstream)
    if res then ok = ok + 1
    elseif type(err) == "table" and err.kind == "breaker_open" then rejected = rejected + 1
    else failed = failed + 1 end
    clock.advance(0.2)
  end
  print(string.format("  %-34s ok=%-3d failed=%-3d rejected=%-3d state=%s",
    label, ok, failed, rejected, b:state()))
end

print("breaker " .. breaker._VERSION .. " (" .. breaker.binding .. " binding)")
run(10, "healthy upstream")
down = true
run(20, "upstream down: trips, then rejects")
local _, err = b:allow()
print("  a rejected call says: " .. tostring(err))
clock.advance(err.retry_after)
run(3, "still down: probe fails, re-opens")
print(string.format("  open for %.0f s this time (escalated)", b:stats().open_duration))
down = false
clock.advance(b:stats().retry_after)
run(10, "recovered: probes pass, closes")
local st = b:stats()
print(string.format("  upstream saw %d calls; breaker rejected %d without calling it; %d transitions",
  calls_reached, st.total_rejected, st.transitions))
