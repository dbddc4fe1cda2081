-- breaker.cosocket: an HTTP/1.1 transport on OpenResty's cosockets, with
-- breaker.curl's contract, for handlers that must stream.
--
--   local cosocket = require "breaker.cosocket"
--   local t = cosocket.new{ timeout = 60 }
--   local res, err = t:request{ method = "POST", url = "https://api.example.com/v1/chat/completions",
--                               headers = { authorization = "Bearer ..." }, body = body,
--                               on_chunk = function(chunk) ngx.print(chunk); ngx.flush(true) end }
--
-- breaker.ngx's thread-pool transport runs libcurl in a pool thread, so a
-- function (on_chunk) cannot see the body while it arrives, and every call
-- pays a hop to the thread and back. This one runs in the request's own
-- coroutine: the socket calls yield to nginx's event loop, on_chunk gets each
-- piece of a 2xx body as it is read (Server-Sent Events pass straight
-- through to the client), and idle connections go back to nginx's
-- per-worker keepalive pool. It speaks HTTP/1.1 only (no HTTP/2).
--
-- new{ timeout = 60, connect_timeout = 10, max_body = 16 MiB, user_agent,
-- insecure_skip_verify = false, pool_size = 32, keepalive_timeout = 60,
-- resolve = { [host] = "address" } }: https verifies the certificate and the
-- host name against nginx's lua_ssl_trusted_certificate (without it every
-- https request fails as tls) unless insecure_skip_verify = true says
-- otherwise. Host names are resolved by nginx's `resolver` directive; an IP
-- address needs none, and `resolve` maps a host to an address the way
-- curl's --resolve does (the name still goes in Host, SNI and the
-- certificate check).
--
-- t:request(req) takes and returns what breaker.curl's does: req = { method,
-- url, headers, body, timeout, connect_timeout, max_body, on_chunk }; res =
-- { status, headers (names lower-case, repeats joined with ", ", set-cookie a
-- list), body, timing = { connect, first_byte, total } }, or nil and a
-- breaker.error of kind timeout, connect, dns, tls, reset, too_large,
-- aborted or protocol. Bad input raises. t:request_many(list) runs the
-- requests in light threads of the current request and returns { res } or
-- { err } for each, in order. Usable wherever cosockets are: rewrite,
-- access, content, ngx.timer, ssl_certificate and the like.

local errors = require "breaker.error"
local version = require "breaker.version"

local type, tostring, tonumber, pairs, error, pcall, rawget, setmetatable =
      type, tostring, tonumber, pairs, error, pcall, rawget, setmetatable
local concat = table.concat
local lower, find, sub, format, match, gsub = string.lower, string.find, string.sub, string.format,
                                             string.match, string.gsub
local floor, huge, min = math.floor, math.huge, math.min

local _M = { _VERSION = version }

local DEFAULTS = {
  timeout = 60, connect_timeout = 10, max_body = 16 * 1024 * 1024,
  user_agent = "breaker/" .. version .. " cosocket", insecure_skip_verify = false,
  pool_size = 32, keepalive_timeout = 60, resolve = false,
}
local REQUEST_KEYS = { method = true, url = true, headers = true, body = true, timeout = true,
                       connect_timeout = true, max_body = true, on_chunk = true }
local HEADER_BYTES_MAX = 256 * 1024
local READ_MAX = 65536   -- bytes asked of the socket at a time

-- Phases where cosockets work (ngx.get_phase names).
local COSOCKET_PHASES = { rewrite = true, access = true, content = true, timer = true,
                          ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
                          preread = true }

local function raise(fmt, ...)
  error("breaker.cosocket: " .. format(fmt, ...), 3)
end

local function ngx_api()
  local n = rawget(_G, "ngx")
  if type(n) ~= "table" or not n.socket or not n.socket.tcp then
    error("breaker.cosocket: needs OpenResty (ngx.socket.tcp)", 3)
  end
  return n
end

-- A monotonic clock in seconds (breaker.ngx's), for deadlines and timing.
local now = require("breaker.ngx").now

local function seconds(v, what, key)
  if type(v) ~= "number" or v ~= v or v <= 0 then
    raise("%s.%s must be a positive number of seconds (math.huge for none), got %s", what, key,
          tostring(v))
  end
  return v
end

local function byte_count(v, what, key)
  if type(v) ~= "number" or v ~= v or v < 0 or v == huge or floor(v) ~= v then
    raise("%s.%s must be a whole number of bytes >= 0, got %s", what, key, tostring(v))
  end
  return v
end

-- RFC 9110 token: a method or a header name.
local function is_token(s)
  return type(s) == "string" and s ~= "" and not find(s, "[^%w!#$%%&'*+%-.^_`|~]")
end

local function is_field_value(s)
  return not find(s, "[\r\n%z]")
end

function _M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then raise("new: options must be a table, got a %s", type(opts)) end
  for k in pairs(opts) do
    if DEFAULTS[k] == nil then raise("new: unknown option '%s'", tostring(k)) end
  end
  local o = {}
  for k, v in pairs(DEFAULTS) do
    if opts[k] == nil then o[k] = v else o[k] = opts[k] end
  end
  seconds(o.timeout, "new", "timeout")
  seconds(o.connect_timeout, "new", "connect_timeout")
  byte_count(o.max_body, "new", "max_body")
  seconds(o.keepalive_timeout, "new", "keepalive_timeout")
  if type(o.pool_size) ~= "number" or o.pool_size < 1 or floor(o.pool_size) ~= o.pool_size then
    raise("new.pool_size must be a whole number >= 1, got %s", tostring(o.pool_size))
  end
  if o.user_agent ~= false and (type(o.user_agent) ~= "string" or not is_field_value(o.user_agent)) then
    raise("new.user_agent must be a string without CR, LF or NUL, or false")
  end
  if type(o.insecure_skip_verify) ~= "boolean" then
    raise("new.insecure_skip_verify must be a boolean")
  end
  if o.resolve ~= false then
    if type(o.resolve) ~= "table" then raise("new.resolve must be a table of host = address") end
    for host, addr in pairs(o.resolve) do
      if type(host) ~= "string" or type(addr) ~= "string" then
        raise("new.resolve must map host names to address strings")
      end
    end
  end
  return setmetatable({ opts = o }, { __index = _M.T })
end

local T = {}
_M.T = T

-- Reads and checks one request table; raises on any mistake, naming it.
local function read_request(self, req, what)
  if type(req) ~= "table" then raise("%s must be a table, got a %s", what, type(req)) end
  for k in pairs(req) do
    if not REQUEST_KEYS[k] then raise("%s: unknown key '%s'", what, tostring(k)) end
  end
  local url = req.url
  if type(url) ~= "string" then raise("%s.url must be a string, got a %s", what, type(url)) end
  local scheme, authority, rest = match(url, "^([hH][tT][tT][pP][sS]?)://([^/?#]+)(.*)$")
  if not scheme or find(url, "[%z\1-\32\127]") or find(authority, "@", 1, true) then
    raise("%s.url must be an http:// or https:// URL without spaces, control characters or "
          .. "user info", what)
  end
  scheme = lower(scheme)
  local host, port = match(authority, "^%[([%x:.]+)%]:?(%d*)$")
  if not host then host, port = match(authority, "^([^:]+):?(%d*)$") end
  if not host then raise("%s.url has a bad host or port", what) end
  port = tonumber(port) or (scheme == "https" and 443 or 80)
  if port < 1 or port > 65535 then raise("%s.url has a bad port", what) end
  local path = match(rest, "^[^#]*")
  if path == "" then path = "/" elseif sub(path, 1, 1) == "?" then path = "/" .. path end

  local method = req.method
  if method ~= nil and (not is_token(method) or #method > 32) then
    raise("%s.method must be an HTTP method token", what)
  end
  local body = req.body
  if body ~= nil and type(body) ~= "string" then
    raise("%s.body must be a string, got a %s", what, type(body))
  end
  method = method or (body and "POST" or "GET")
  if body and method == "HEAD" then raise("%s.body is not allowed with method HEAD", what) end

  local lines, has = {}, {}
  if req.headers ~= nil then
    if type(req.headers) ~= "table" then
      raise("%s.headers must be a table, got a %s", what, type(req.headers))
    end
    for name, value in pairs(req.headers) do
      if type(name) ~= "string" then raise("%s.headers: names must be strings", what) end
      if not is_token(name) or #name > 255 then
        raise("%s.headers: invalid header name (empty, too long, or with characters such as "
              .. "CR, LF, NUL, ':' or space)", what)
      end
      if type(value) == "number" then value = tostring(value) end
      if type(value) ~= "string" then
        raise("%s.headers['%s'] must be a string, got a %s", what, name, type(value))
      end
      if not is_field_value(value) then raise("%s.headers['%s'] contains CR, LF or NUL", what, name) end
      local l = lower(name)
      if l == "host" or l == "content-length" or l == "transfer-encoding" or l == "connection" then
        raise("%s.headers['%s'] is set by the transport", what, name)
      end
      has[l] = true
      lines[#lines + 1] = name .. ": " .. value .. "\r\n"
    end
  end
  local on_chunk = req.on_chunk
  if on_chunk ~= nil and type(on_chunk) ~= "function" then
    raise("%s.on_chunk must be a function, got a %s", what, type(on_chunk))
  end
  local o = self.opts
  return {
    scheme = scheme, host = host, port = port, path = path, method = method, body = body,
    lines = lines, has = has, on_chunk = on_chunk,
    timeout = req.timeout ~= nil and seconds(req.timeout, what, "timeout") or o.timeout,
    connect_timeout = req.connect_timeout ~= nil and seconds(req.connect_timeout, what, "connect_timeout")
                      or o.connect_timeout,
    max_body = req.max_body ~= nil and byte_count(req.max_body, what, "max_body") or o.max_body,
  }
end

local function fail(kind, message, status)
  return nil, errors.new(kind, message, status and { status = status } or nil)
end

-- The kind of a cosocket error string while connecting or reading.
local function kind_of(err, connecting)
  if err == "timeout" then return "timeout" end
  if find(err, "resolve", 1, true) or find(err, "resolver", 1, true) then return "dns" end
  if connecting then return "connect" end
  return "reset"
end

-- Milliseconds left before the deadline (at least 1), or nil when it passed.
local function left_ms(deadline)
  if deadline == huge then return 2 ^ 31 - 1 end
  local ms = floor((deadline - now()) * 1000)
  if ms <= 0 then return nil end
  return ms
end

-- Reads the status line and headers of the final response (1xx skipped).
-- Returns status, headers (table), keepalive (bool), or nil, kind, message.
local function read_head(sock)
  local bytes = 0
  while true do
    local line, err = sock:receive("*l")
    if not line then return nil, kind_of(err), "reading the status line: " .. err end
    local v, status = match(line, "^HTTP/(%d%.%d) (%d%d%d)")
    status = tonumber(status)
    if not status then return nil, "protocol", "not an HTTP status line" end
    local headers, last, keepalive = {}, nil, v == "1.1"
    while true do
      line, err = sock:receive("*l")
      if not line then return nil, kind_of(err), "reading headers: " .. err end
      bytes = bytes + #line + 2
      if bytes > HEADER_BYTES_MAX then
        return nil, "too_large", format("response headers exceed %d bytes", HEADER_BYTES_MAX)
      end
      if line == "" then break end
      if find(line, "^[ \t]") and last then   -- obsolete line folding
        local folded = gsub(line, "^[ \t]+", "")
        local cur = headers[last]
        if type(cur) == "table" then cur[#cur] = cur[#cur] .. " " .. folded
        else headers[last] = cur .. " " .. folded end
      else
        local name, value = match(line, "^([^:%s]+):[ \t]*(.-)[ \t]*$")
        if name then
          name = lower(name)
          local cur = headers[name]
          if name == "set-cookie" then
            if cur then cur[#cur + 1] = value else headers[name] = { value } end
          elseif cur then
            headers[name] = cur .. ", " .. value
          else
            headers[name] = value
          end
          last = name
        end
      end
    end
    local conn = headers.connection and lower(headers.connection) or ""
    if find(conn, "close", 1, true) then keepalive = false
    elseif find(conn, "keep-alive", 1, true) then keepalive = true end
    if status >= 200 or status == 101 then return status, headers, keepalive end
    bytes = 0   -- an interim 1xx: the final response follows
  end
end

-- Reads the body; hands it to sink(piece) as it comes. Returns true,
-- reusable or nil, kind, message. sink returns nil, kind, msg to stop.
local function read_body(sock, q, status, headers, sink)
  local max = q.max_body
  local te = headers["transfer-encoding"]
  if q.method == "HEAD" or status == 204 or status == 304 or (status >= 100 and status < 200) then
    return true, true
  end
  if te and find(lower(te), "chunked", 1, true) then
    while true do
      local line, err = sock:receive("*l")
      if not line then return nil, kind_of(err), "reading a chunk size: " .. err end
      local size = tonumber(match(line, "^%s*(%x+)"), 16)
      if not size then return nil, "protocol", "bad chunk size line" end
      if size == 0 then
        repeat   -- trailers, up to the blank line
          line, err = sock:receive("*l")
          if not line then return nil, kind_of(err), "reading trailers: " .. err end
        until line == ""
        return true, true
      end
      while size > 0 do
        local piece, err2 = sock:receiveany(min(size, READ_MAX))
        if not piece then return nil, kind_of(err2), "reading the body: " .. err2 end
        size = size - #piece
        local ok, kind, msg = sink(piece)
        if not ok then return nil, kind, msg end
      end
      line, err = sock:receive(2)
      if line ~= "\r\n" then
        return nil, line and "protocol" or kind_of(err), "chunk not followed by CRLF"
      end
    end
  end
  local len = headers["content-length"]
  if len then
    len = tonumber(match(len, "^%s*(%d+)%s*$"))
    if not len then return nil, "protocol", "bad Content-Length" end
    if len > max then
      return nil, "too_large", format("response body exceeds max_body (%d bytes): Content-Length too large", max)
    end
    while len > 0 do
      local piece, err = sock:receiveany(min(len, READ_MAX))
      if not piece then return nil, kind_of(err), "reading the body: " .. err end
      len = len - #piece
      local ok, kind, msg = sink(piece)
      if not ok then return nil, kind, msg end
    end
    return true, true
  end
  while true do   -- no framing: the body ends when the server closes
    local piece, err = sock:receiveany(READ_MAX)
    if not piece then
      if err == "closed" then return true, false end
      return nil, kind_of(err), "reading the body: " .. err
    end
    local ok, kind, msg = sink(piece)
    if not ok then return nil, kind, msg end
  end
end

-- Runs one checked request. Returns res, or nil, err; raises what on_chunk raises.
local function perform(self, q)
  local ngx = ngx_api()
  local o = self.opts
  local t0 = now()
  local deadline = q.timeout == huge and huge or t0 + q.timeout
  local sock = ngx.socket.tcp()
  local https = q.scheme == "https"
  local verify = not o.insecure_skip_verify
  local pool = format("breaker:%s:%d:%s%s", q.host, q.port, q.scheme, verify and "" or ":noverify")

  local ms = left_ms(deadline)
  if not ms then return fail("timeout", "timed out before connecting") end
  sock:settimeouts(min(ms, floor(q.connect_timeout * 1000)), ms, ms)
  local addr = o.resolve and o.resolve[q.host] or q.host
  local ok, err = sock:connect(addr, q.port, { pool = pool, pool_size = o.pool_size })
  if not ok then return fail(kind_of(err, true), format("connecting to %s:%d: %s", q.host, q.port, err)) end
  local reused = (sock:getreusedtimes() or 0) > 0
  if https and not reused then
    ok, err = sock:sslhandshake(nil, q.host, verify)
    if not ok then
      sock:close()
      if err == "timeout" then return fail("timeout", "TLS handshake: timeout") end
      return fail("tls", "TLS handshake with " .. q.host .. ": " .. tostring(err))
    end
  end
  local connect_time = now() - t0

  local head = { q.method, " ", q.path, " HTTP/1.1\r\nHost: ", q.host }
  if find(q.host, ":", 1, true) then head[5] = "[" .. q.host .. "]" end
  if q.port ~= (https and 443 or 80) then head[#head + 1] = ":" .. q.port end
  head[#head + 1] = "\r\n"
  if o.user_agent and not q.has["user-agent"] then
    head[#head + 1] = "User-Agent: " .. o.user_agent .. "\r\n"
  end
  if q.body or q.method == "POST" or q.method == "PUT" or q.method == "PATCH" then
    head[#head + 1] = "Content-Length: " .. #(q.body or "") .. "\r\n"
  end
  for i = 1, #q.lines do head[#head + 1] = q.lines[i] end
  head[#head + 1] = "\r\n"
  if q.body then head[#head + 1] = q.body end
  ms = left_ms(deadline)
  if not ms then sock:close(); return fail("timeout", "timed out before sending") end
  sock:settimeouts(ms, ms, ms)
  local sent
  sent, err = sock:send(head)
  if not sent then
    sock:close()
    -- a kept-alive connection the server had closed: try once on a new one
    if reused and err ~= "timeout" and not q.retried then
      q.retried = true
      return perform(self, q)
    end
    return fail(kind_of(err), "sending the request: " .. err)
  end

  local status, headers, keepalive = read_head(sock)
  if not status then
    sock:close()
    local kind, msg = headers, keepalive
    if kind == "reset" and reused and not q.retried then
      q.retried = true   -- the same stale connection, found on the first read
      return perform(self, q)
    end
    return fail(kind, msg)
  end
  local first_byte = now() - t0
  ms = left_ms(deadline)
  if not ms then sock:close(); return fail("timeout", "timed out reading the body", status) end
  sock:settimeouts(ms, ms, ms)

  local stream = q.on_chunk ~= nil and status >= 200 and status < 300
  local parts, received = {}, 0
  local function sink(piece)
    received = received + #piece
    if received > q.max_body then
      return nil, "too_large", format("response body exceeds max_body (%d bytes)", q.max_body)
    end
    if stream then
      local go = q.on_chunk(piece)
      if go == false then return nil, "aborted", "transfer aborted by on_chunk" end
    else
      parts[#parts + 1] = piece
    end
    if deadline ~= huge then
      local left = left_ms(deadline)
      if not left then return nil, "timeout", "timed out reading the body" end
      sock:settimeouts(left, left, left)
    end
    return true
  end
  local okc, body_ok, kind, msg = pcall(read_body, sock, q, status, headers, sink)
  if not okc then sock:close(); error(body_ok, 0) end   -- on_chunk raised
  if not body_ok then
    sock:close()
    return fail(kind, msg, status)
  end
  if kind and keepalive then   -- kind is "reusable" here
    sock:setkeepalive(floor(o.keepalive_timeout * 1000), o.pool_size)
  else
    sock:close()
  end
  local res = { status = status, headers = headers, body = stream and "" or concat(parts),
                timing = { connect = connect_time, first_byte = first_byte, total = now() - t0 } }
  if stream then res.streamed = true end
  return res
end

local function check_phase(ngx)
  local phase = ngx.get_phase and ngx.get_phase()
  if phase and not COSOCKET_PHASES[phase] then
    error(format("breaker.cosocket: cosockets are not available in the %s phase "
                 .. "(use rewrite, access, content or ngx.timer)", phase), 3)
  end
end

function T:request(req)
  local ngx = ngx_api()
  check_phase(ngx)
  return perform(self, read_request(self, req, "request"))
end

function T:request_many(list)
  local ngx = ngx_api()
  check_phase(ngx)
  if type(list) ~= "table" then raise("request_many expects a list of requests") end
  local qs = {}
  for i = 1, #list do qs[i] = read_request(self, list[i], "requests[" .. i .. "]") end
  local threads, out = {}, {}
  for i = 1, #qs do
    threads[i] = ngx.thread.spawn(function()
      local res, err = perform(self, qs[i])
      return res, err
    end)
  end
  local raised
  for i = 1, #threads do
    local ok, res, err = ngx.thread.wait(threads[i])
    if not ok then
      raised = raised or res
      out[i] = { err = errors.new("aborted", "request raised: " .. tostring(res)) }
    elseif res then
      out[i] = { res = res }
    else
      out[i] = { err = err }
    end
  end
  if raised then error(raised, 2) end
  return out
end

-- Connections are nginx's (per worker, kept alive in its pool): nothing to free.
function T.close(_) end

return _M
