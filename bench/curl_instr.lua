-- bench/curl_instr.lua: instructions per request of breaker.curl and of
-- Debian's luacurl, counted by valgrind's callgrind: the same sequential
-- keep-alive POST as bench/curl.lua, both clients sending the same headers.
-- Unlike requests per second on a shared VM, the count does not move from
-- run to run. Each client runs 200 and then 1200 requests in a process of
-- its own; the difference over 1000 is the per-request figure (start-up and
-- warm-up cancel out). Skipped when valgrind or luacurl is missing.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;' LUA_CPATH='build/?.so;;' luajit bench/curl_instr.lua

local BODY = '{"model":"text-embedding-fake","input":"hello"}'

-- Child: `curl_instr.lua --child CLIENT N URL UA` makes N requests.
if arg[1] == "--child" then
  local clients = dofile(arg[0]:gsub("[^/]*$", "") .. "clients.lua")
  local which, n, url, ua = arg[2], tonumber(arg[3]), arg[4], arg[5]
  local one
  if which == "breaker.curl" then one = clients.breaker(url, BODY)
  else one = clients.luacurl(url, BODY, ua, false) end
  for _ = 1, n do one() end
  os.exit(0)
end

local function have(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  return ok == true or ok == 0
end

if not have("command -v valgrind") then
  print("valgrind is not installed: instruction counts skipped")
  os.exit(0)
end
local ok_luacurl, luacurl = pcall(require, "curl")
if not ok_luacurl or type(luacurl) ~= "table" or not luacurl.easy_init then
  print("Debian's lua-curl (luacurl) is not installed: instruction counts skipped")
  os.exit(0)
end

local helper = require "helper"
local cjson = require "cjson"
local interp = arg[-1] or "luajit"

-- Instructions of one child run, from callgrind's summary line.
local function count(which, n, url, ua)
  local cmd = ("valgrind --tool=callgrind --callgrind-out-file=/dev/null %s %s --child %s %d %s %q 2>&1")
              :format(interp, arg[0], which, n, url, ua)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local got = out:match("Collected : (%d+)")
  if not got then error(which .. " under callgrind: " .. out) end
  return tonumber(got)
end

local up = helper.upstream.start{ api_key = false, workers = 1 }
local ok, err = pcall(function()
  local url = up.url .. "/v1/embeddings"
  local probe = require("breaker.curl").new()
  local ua = cjson.decode(assert(probe:request{ url = up.url .. "/echo" }).body).headers["user-agent"]
  probe:close()
  print("instructions per sequential keep-alive POST (callgrind; 1200 requests minus 200, / 1000), " ..
        "same request headers")
  local per = {}
  for _, which in ipairs{ "breaker.curl", "luacurl" } do
    per[which] = (count(which, 1200, url, ua) - count(which, 200, url, ua)) / 1000
  end
  print(("  breaker.curl %8.0f   luacurl %8.0f   luacurl/breaker.curl = %.3f (target >= 1: fewer for breaker.curl)")
        :format(per["breaker.curl"], per.luacurl, per.luacurl / per["breaker.curl"]))
end)
up:stop()
if not ok then
  io.stderr:write("bench/curl_instr.lua: ", tostring(err), "\n")
  os.exit(1)
end
