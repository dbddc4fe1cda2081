-- bench/clients.lua: the libcurl clients bench/curl.lua and
-- bench/curl_instr.lua compare, each sending the same POST with the same
-- headers. make(url, body, ua) -> one_request, close.
local curl = require "breaker.curl"

local _M = {}

local function check(ok, what)
  if not ok then error(what, 3) end
end

-- breaker.curl, one transport (its default User-Agent is `ua`).
function _M.breaker(url, body)
  local t = curl.new{ timeout = 10 }
  local req = { method = "POST", url = url, headers = { ["content-type"] = "application/json" },
                body = body }
  return function()
    local res = t:request(req)
    check(res and res.status == 200, "breaker.curl request failed")
  end, function() t:close() end
end

-- Debian's luacurl with one reused easy handle. It collects the body and the
-- status (as breaker.curl gives it); with `with_headers` also a table of
-- headers, names lower-cased and repeats joined: then it gives what
-- breaker.curl gives.
function _M.luacurl(url, body, ua, with_headers)
  local luacurl = require "curl"
  local sink, status, headers = {}, nil, nil
  local e = luacurl.easy_init()
  e:setopt(luacurl.OPT_URL, url)
  e:setopt(luacurl.OPT_POSTFIELDS, body)
  e:setopt(luacurl.OPT_HTTPHEADER, { "Content-Type: application/json", "User-Agent: " .. ua, "Expect:" })
  e:setopt(luacurl.OPT_TIMEOUT, 10)
  e:setopt(luacurl.OPT_WRITEFUNCTION, function(buf, n) sink[#sink + 1] = buf; return n end)
  e:setopt(luacurl.OPT_HEADERFUNCTION, function(buf, n)
    local name, value
    if with_headers then name, value = buf:match("^([^:%s]+):%s*(.-)%s*$") end
    if name then
      name = name:lower()
      local old = headers[name]
      headers[name] = old and (old .. ", " .. value) or value
    else
      local code = buf:match("^HTTP/%S+ (%d+)")
      if code then status, headers = tonumber(code), {} end
    end
    return n
  end)
  return function()
    sink, status, headers = {}, nil, {}
    check(e:perform() == 0 and status == 200 and (not with_headers or headers["content-type"]),
          "luacurl request failed")
    local _ = table.concat(sink)
  end, function() end
end

return _M
