-- make bench: runs every benchmark script in its own LuaJIT process, so one
-- cannot warm up or slow down another.
local interp = arg[-1] or "luajit"
local scripts = { "bench/core.lua", "bench/curl.lua", "bench/curl_instr.lua", "bench/policy.lua", "bench/ngx.lua",
                  "bench/llm.lua" }
local failed = 0
for _, s in ipairs(scripts) do
  local f = io.open(s)
  if f then
    f:close()
    print(("=== %s"):format(s))
    io.stdout:flush()
    local ok = os.execute(interp .. " " .. s)
    if ok ~= true and ok ~= 0 then failed = failed + 1 end
    print()
  end
end
os.exit(failed == 0 and 0 or 1)
