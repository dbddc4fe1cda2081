-- make valgrind: exercises the C core (local and shared breakers, config
-- errors, close and GC) under valgrind; any definite leak or memory error fails.
local breaker = require "breaker"
local shared = require "breaker.shared"
for i = 1, 200 do
  local b = breaker.new("vg" .. i, { window_type = i % 2 == 0 and "time" or "count" })
  for _ = 1, 50 do local p = b:allow(); if p then b:record(p, "failure", 0.01) end end
  b:stats(); b:config(); b:force_open(); b:reset()
  if i % 3 == 0 then b:close() end
end
local r = shared.new("vg", { capacity = 8 })
local sb = breaker.new("svg", {}, { shared = r })
sb:record(sb:allow(), "success", 0.1)
pcall(breaker.new, "bad", { window_size = 0 })
collectgarbage(); collectgarbage()
print("done")
