-- raw_upstream: a small HTTP/1.1 server whose answers break the protocol in
-- the ways a broken or hostile server can, for the transport specs that
-- nginx cannot be made to answer badly (spec/cosocket_spec.lua).
--
--   luajit spec/support/raw_upstream.lua PORT     prints "ready" once listening
--
-- The request path picks the answer (see ANSWERS); GET /stats answers JSON
-- { connections = n, requests = { [path] = n } } (not counted itself). It
-- serves any number of connections at once (coroutines over socket.select)
-- and runs until it is killed by its pid.
local socket = require "socket"

local port = assert(tonumber(arg[1]), "usage: raw_upstream.lua PORT")
local server = assert(socket.bind("127.0.0.1", port))
server:settimeout(0)

local connections, requests = 0, {}

-- Coroutine helpers: yield "r" to wait until readable, a number to sleep.
local function line(c)
  local got = ""
  while true do
    local l, err, partial = c:receive("*l")
    if l then return got .. l end
    got = got .. (partial or "")
    if err ~= "timeout" then return nil end
    coroutine.yield("r")
  end
end

local function send(c, s)
  local i = 1
  while i <= #s do
    local n, err, last = c:send(s, i)
    if n then return true end
    if err ~= "timeout" then return nil end
    i = last + 1
    coroutine.yield(0)
  end
  return true
end

local function sleep(s) coroutine.yield(s) end

local function ok(body, extra)
  return "HTTP/1.1 200 OK\r\nContent-Length: " .. #body .. "\r\n" .. (extra or "") .. "\r\n" .. body
end

-- Each answer writes to c (n: the request's number on its connection);
-- returning "close" closes the connection after it.
local ANSWERS = {
  ["/ok"] = function(c) send(c, ok("fine")) end,
  -- answers, then closes the connection the client keeps alive
  ["/ok_then_close"] = function(c) send(c, ok("fine")); return "close" end,
  -- a status line only, then the connection closes: nothing to resend
  ["/status_then_close"] = function(c) send(c, "HTTP/1.1 200 OK\r\n"); return "close" end,
  ["/bad_chunk"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
    return "close"
  end,
  ["/chunk_0x"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n")
    return "close"
  end,
  ["/chunk_ext"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=\"v\"\r\nhello\r\n6 ; e\r\n"
            .. " world\r\n0;last\r\nX-Trailer: 1\r\n\r\n")
  end,
  ["/no_colon"] = function(c) send(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nno colon here\r\n\r\nhi") end,
  ["/status_2000"] = function(c) send(c, "HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi") end,
  ["/status_099"] = function(c) send(c, "HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nhi") end,
  ["/garbage"] = function(c) send(c, "hello there, no status line\r\n"); return "close" end,
  ["/lengths_differ"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nhello")
  end,
  -- a chunked body whose trailers repeat a header and add others
  ["/trailers"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: head\r\n\r\n" ..
            "2\r\nhi\r\n0\r\nX-A: trailer\r\nX-T: 1\r\nContent-Length: 99\r\n\r\n")
  end,
  -- 40k repeats of one header (about 200 KB of head)
  ["/header_flood"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" .. ("X: a\r\n"):rep(40000) .. "\r\nhi")
  end,
  ["/empty_200"] = function(c) send(c, ok("")) end,
  -- trailers that look like a status line, then like headers
  ["/trailer_status"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: head\r\n\r\n" ..
            "2\r\nhi\r\n0\r\nHTTP/1.1: x\r\nLocation: http://evil/\r\n\r\n")
  end,
  ["/lengths_long_same"] = function(c)
    local cl = "Content-Length: 000000000000000000000000002\r\n"
    send(c, "HTTP/1.1 200 OK\r\n" .. cl .. cl .. "\r\nhi")
  end,
  -- one header value continued on 20k folded lines
  ["/folded_flood"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\r\n" .. (" b\r\n"):rep(20000) .. "\r\nhi")
  end,
  ["/two_lengths"] = function(c) send(c, ok("hello", "Content-Length: 5\r\n")) end,
  -- 100000 chunks of one byte: a long stream in small pieces
  ["/many_chunks"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" .. ("1\r\nx\r\n"):rep(100000)
            .. "0\r\n\r\n")
  end,
  ["/chunk_16_digits"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000005\r\nhello\r\n0\r\n\r\n")
  end,
  ["/te_xchunked"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    return "close"
  end,
  ["/upgrade_101"] = function(c)
    send(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
    return "close"
  end,
  -- a second request on a connection gets a reset (RST), nothing else
  ["/ok_then_rst"] = function(c, n)
    if n == 1 then send(c, ok("fine")); return end
    c:setoption("linger", { on = true, timeout = 0 })
    return "close"
  end,
  -- framed by chunks; the Content-Length beside it makes the connection suspect
  ["/length_and_chunked"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
  end,
  -- more bytes than Content-Length said: the rest must not reach a later request
  ["/length_short"] = function(c) send(c, ok("hello") .. ok("EVIL!")) end,
  -- the head one byte every 0.1 s for about 3 s, then a proper answer
  ["/trickle_head"] = function(c)
    local head = "HTTP/1.1 200 OK\r\nX-Slow: " .. ("s"):rep(26) .. "\r\nContent-Length: 2\r\n\r\n"
    for i = 1, #head do
      if not send(c, head:sub(i, i)) then return "close" end
      sleep(0.1)
    end
    send(c, "ok")
  end,
  ["/many_interim"] = function(c)
    for _ = 1, 20 do send(c, "HTTP/1.1 100 Continue\r\n\r\n") end
    send(c, ok("late"))
  end,
  -- a 300 KB header line that never ends
  ["/huge_line"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nX-Big: " .. ("b"):rep(300 * 1024))
    sleep(3)
    return "close"
  end,
}

local function stats_json()
  local parts = {}
  for path, n in pairs(requests) do parts[#parts + 1] = ("%q:%d"):format(path, n) end
  return ('{"connections":%d,"requests":{%s}}'):format(connections, table.concat(parts, ","))
end

local function serve(c)
  local n = 0
  while true do
    local request_line = line(c)
    if not request_line then break end
    local path = request_line:match("^%u+ (%S+) HTTP/1%.1$") or "?"
    local length = 0
    while true do   -- headers
      local h = line(c)
      if not h then return end
      if h == "" then break end
      length = tonumber(h:lower():match("^content%-length:%s*(%d+)")) or length
    end
    if length > 0 then
      local got = ""
      while #got < length do
        local d, err, partial = c:receive(length - #got)
        got = got .. (d or partial or "")
        if not d then
          if err ~= "timeout" then return end
          coroutine.yield("r")
        end
      end
    end
    local result
    if path == "/stats" then
      local body = stats_json()
      send(c, ok(body, "Content-Type: application/json\r\n"))
    else
      requests[path] = (requests[path] or 0) + 1
      n = n + 1
      local answer = ANSWERS[path]
      if answer then
        result = answer(c, n)
      else
        send(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
      end
    end
    if result == "close" then break end
  end
end

-- The loop: accept, and resume each connection's coroutine when its socket
-- is readable or its sleep is over.
local tasks = {}   -- { co, sock, wake (time or nil: waiting to read) }
print("ready")
io.stdout:flush()
while true do
  local readable = { server }
  local timeout = 1
  local t = socket.gettime()
  for _, task in ipairs(tasks) do
    if task.wake then timeout = math.min(timeout, math.max(0, task.wake - t))
    else readable[#readable + 1] = task.sock end
  end
  local ready = socket.select(readable, nil, timeout)
  local is_ready = {}
  for _, s in ipairs(ready) do is_ready[s] = true end
  if is_ready[server] then
    local c = server:accept()
    if c then
      c:settimeout(0)
      connections = connections + 1
      tasks[#tasks + 1] = { co = coroutine.create(serve), sock = c, wake = 0 }
    end
  end
  t = socket.gettime()
  local keep = {}
  for _, task in ipairs(tasks) do
    local run = (task.wake and task.wake <= t) or (not task.wake and is_ready[task.sock])
    if run then
      local okr, why = coroutine.resume(task.co, task.sock)
      if not okr or coroutine.status(task.co) == "dead" then
        task.sock:close()
        task = nil
      elseif why == "r" then
        task.wake = nil
      else
        task.wake = socket.gettime() + why
      end
    end
    if task then keep[#keep + 1] = task end
  end
  tasks = keep
end
