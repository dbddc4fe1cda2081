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
local COSOCKET_PHASES = require("breaker.retry").YIELDABLE

-- Raises a caller's mistake; the entry points (new, request, request_many)
-- catch it and raise it again at their caller's line (see blame).
local function raise(fmt, ...)
  error("breaker.cosocket: " .. format(fmt, ...), 0)
end

-- fn(...), with a raise from inside it moved to the line that called the
-- public function (two levels up from here).
local function blame(fn, ...)
  local ok, v = pcall(fn, ...)
  if not ok then error(v, 3) end
  return v
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

local function new(opts)
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

function _M.new(opts)
  return blame(new, opts)
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
      if l == "content-length" or l == "transfer-encoding" or l == "connection" then
        raise("%s.headers['%s'] is set by the transport", what, name)
      end
      has[l] = value
      if l ~= "host" then lines[#lines + 1] = name .. ": " .. value .. "\r\n" end
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
  return min(ms, 2 ^ 31 - 1)   -- the most settimeouts takes
end

-- A buffered reader over the socket, every read bounded by the request's
-- deadline (the socket's timeout is set from what is left before each one;
-- nginx's own timer restarts whenever bytes arrive, so a server that
-- trickles bytes cannot stretch it). Methods return nil, kind, message on
-- failure.
local function reader(sock, deadline)
  local buf, pos = "", 1   -- unread bytes are buf:sub(pos)
  local r = { got = 0, first = nil }

  local function fill()
    local ms = left_ms(deadline)
    if not ms then return nil, "timeout", "timed out reading the response" end
    sock:settimeouts(ms, ms, ms)
    local data, err = sock:receiveany(READ_MAX)
    if not data then return nil, err end
    r.first = r.first or now()
    r.got = r.got + #data
    if pos > #buf then buf, pos = data, 1 else buf, pos = sub(buf, pos) .. data, 1 end
    return true
  end

  -- The next line without its CRLF (a bare LF ends one too), at most
  -- `limit` bytes long, its CR included; nil, "long" past that, nil,
  -- "closed" when the server closed the connection first.
  function r.line(limit)
    while true do
      local e = find(buf, "\n", pos, true)
      if e then
        if e - pos > limit then break end
        local line = sub(buf, pos, e - 1)
        pos = e + 1
        if sub(line, -1) == "\r" then line = sub(line, 1, -2) end
        return line
      end
      if #buf - pos + 1 > limit then break end
      local ok, err, msg = fill()
      if not ok then
        if msg then return nil, err, msg end
        return nil, err == "closed" and "closed" or kind_of(err), "reading the response: " .. err
      end
    end
    return nil, "long"   -- the caller says what was too long
  end

  -- Up to n bytes, at least one; or nil, kind, message (kind "closed" when
  -- the server closed the connection cleanly).
  function r.some(n)
    if pos > #buf then
      local ok, err, msg = fill()
      if not ok then
        if msg then return nil, err, msg end
        return nil, err == "closed" and "closed" or kind_of(err), "reading the body: " .. err
      end
    end
    local piece = sub(buf, pos, pos + n - 1)
    pos = pos + #piece
    return piece
  end

  -- Whether bytes past the response are already here (then the connection
  -- must not be reused).
  function r.leftover() return pos <= #buf end
  return r
end

-- Reads the status line and headers of the final response. Returns
-- status, headers, keepalive, or nil, kind, message. At most 10 interim
-- (1xx) responses; status line, headers and interim responses share one
-- budget of HEADER_BYTES_MAX bytes.
local function read_head(rd)
  local budget = HEADER_BYTES_MAX
  local function line_error(kind, msg)
    if kind == "long" then
      return nil, "too_large", format("response headers exceed %d bytes", HEADER_BYTES_MAX)
    end
    return nil, kind, msg
  end
  for _ = 1, 11 do
    local line, kind, msg = rd.line(budget)
    if not line then return line_error(kind, msg) end
    budget = budget - #line - 2
    local v, code = match(line, "^HTTP/(%d%.%d) (%d%d%d)$")
    if not v then v, code = match(line, "^HTTP/(%d%.%d) (%d%d%d) ") end
    local status = tonumber(code)
    if not status then return nil, "protocol", "not an HTTP status line" end
    -- (below 100 is no status at all: not an interim answer to wait past)
    if status < 100 then return nil, "protocol", "a status line with status " .. code end
    local fields, order, last = {}, {}, nil   -- name -> list of values
    -- the pieces of a value continued on folded lines, joined once it ends
    -- (joining as they come was quadratic in the number of lines)
    local fold
    while true do
      line, kind, msg = rd.line(budget)
      if not line then
        if kind == "closed" then kind = "reset" end
        return line_error(kind, msg)
      end
      budget = budget - #line - 2
      local folded = find(line, "^[ \t]")
      if fold and not folded then
        local list = fields[last]
        list[#list] = concat(fold, " ")
        fold = nil
      end
      if line == "" then break end
      if folded then   -- obsolete line folding
        if not last then return nil, "protocol", "a folded line before any header" end
        if not fold then
          local list = fields[last]
          fold = { list[#list] }
        end
        fold[#fold + 1] = gsub(line, "^[ \t]+", "")
      else
        local name, value = match(line, "^([^:%s]+):[ \t]*(.-)[ \t]*$")
        if not name then return nil, "protocol", "a response header line without a name and colon" end
        name = lower(name)
        local list = fields[name]
        if not list then list = {}; fields[name] = list; order[#order + 1] = name end
        list[#list + 1] = value
        last = name
      end
    end
    if status == 101 then   -- no upgrade is ever asked for, or supported
      return nil, "protocol", "an unasked-for 101 Switching Protocols"
    end
    if status >= 200 then
      local headers = {}
      for i = 1, #order do
        local name = order[i]
        local list = fields[name]
        if name == "set-cookie" then headers[name] = list
        elseif #list == 1 then headers[name] = list[1]
        else headers[name] = concat(list, ", ") end
      end
      local keepalive = v == "1.1"
      local conn = headers.connection and lower(headers.connection) or ""
      if find(conn, "close", 1, true) then keepalive = false
      elseif find(conn, "keep-alive", 1, true) then keepalive = true end
      return status, headers, keepalive
    end
  end
  return nil, "protocol", "more than 10 interim (1xx) responses"
end

-- Passes the next n bytes of the body to sink. Returns true, or nil, kind,
-- message (from the socket or from sink).
local function copy(rd, n, sink)
  while n > 0 do
    local piece, kind, msg = rd.some(min(n, READ_MAX))
    if not piece then return nil, kind == "closed" and "reset" or kind, msg end
    n = n - #piece
    local ok, k, m = sink(piece)
    if not ok then return nil, k, m end
  end
  return true
end

-- Reads the body into sink(piece). Returns true, reusable, or nil, kind,
-- message; sink returns nil, kind, message to stop.
local function read_body(rd, q, status, headers, sink)
  if q.method == "HEAD" or status == 204 or status == 304 or (status >= 100 and status < 200) then
    return true, true
  end
  local te = headers["transfer-encoding"]
  local cl = headers["content-length"]
  if te then
    -- chunked must be the last coding (RFC 9112 6.3); with a Content-Length
    -- as well the reply is suspect: framed by chunks, never reused
    local codings = lower(te)
    if not (match(codings, "^%s*chunked%s*$") or match(codings, ",%s*chunked%s*$")) then
      return nil, "protocol", "Transfer-Encoding without chunked last: " .. te
    end
    local budget = HEADER_BYTES_MAX   -- for the trailers
    local function line_error(kind, msg, what)
      if kind == "long" then return nil, "protocol", what .. " too long" end
      return nil, kind == "closed" and "reset" or kind, msg
    end
    while true do
      local line, kind, msg = rd.line(4096)   -- each chunk size line on its own
      if not line then return line_error(kind, msg, "a chunk size line") end
      local hex = match(line, "^(%x+)[ \t]*;") or match(line, "^(%x+)[ \t]*$")
      hex = hex and gsub(hex, "^0+(%x)", "%1")
      if not hex or #hex > 15 then return nil, "protocol", "a bad chunk size line" end
      local size = tonumber(hex, 16)
      if size == 0 then
        repeat   -- trailers, up to the blank line
          line, kind, msg = rd.line(budget)
          if not line then return line_error(kind, msg, "trailers") end
          budget = budget - #line - 2
        until line == ""
        return true, cl == nil
      end
      local ok, k, m = copy(rd, size, sink)
      if not ok then return nil, k, m end
      line, kind, msg = rd.line(2)
      if not line then return line_error(kind, msg, "the end of a chunk") end
      if line ~= "" then return nil, "protocol", "a chunk not followed by CRLF" end
    end
  end
  if cl then
    -- repeated (joined with ", ") they must all agree (RFC 9110 8.6)
    local len
    for v in string.gmatch(cl, "[^,]+") do
      local n = tonumber(match(v, "^%s*(%d+)%s*$"))
      if not n or (len and n ~= len) then return nil, "protocol", "a bad Content-Length" end
      len = n
    end
    if not len then return nil, "protocol", "a bad Content-Length" end
    if len > q.max_body then
      return nil, "too_large",
             format("response body exceeds max_body (%d bytes): Content-Length too large", q.max_body)
    end
    local ok, k, m = copy(rd, len, sink)
    if not ok then return nil, k, m end
    return true, true
  end
  while true do   -- no framing: the body ends when the server closes
    local piece, kind, msg = rd.some(READ_MAX)
    if not piece then
      if kind == "closed" then return true, false end
      return nil, kind, msg
    end
    local ok, k, m = sink(piece)
    if not ok then return nil, k, m end
  end
end

-- Runs one checked request. Returns res, or nil, err; raises what on_chunk
-- raises. A request that finds its kept-alive connection closed before any
-- byte of an answer is sent once more on a new connection, within the same
-- deadline (curl does the same).
local function perform(self, ngx, q, t0, deadline)
  local o = self.opts
  t0 = t0 or now()
  deadline = deadline or (q.timeout == huge and huge or t0 + q.timeout)
  local sock = ngx.socket.tcp()
  local https = q.scheme == "https"
  local verify = not o.insecure_skip_verify
  local addr = o.resolve and o.resolve[q.host] or q.host
  local pool = format("breaker:%s:%s:%d:%s%s", q.host, addr, q.port, q.scheme,
                      verify and "" or ":noverify")

  local ms = left_ms(deadline)
  if not ms then return fail("timeout", "timed out before connecting") end
  sock:settimeouts(math.max(1, min(ms, floor(q.connect_timeout * 1000))), ms, ms)
  local ok, err = sock:connect(find(addr, ":", 1, true) and "[" .. addr .. "]" or addr, q.port,
                               { pool = pool, pool_size = o.pool_size })
  if not ok then return fail(kind_of(err, true), format("connecting to %s:%d: %s", q.host, q.port, err)) end
  local reused = (sock:getreusedtimes() or 0) > 0
  if https and not reused then
    -- the handshake is timed by the connect timeout: what is left of it
    ms = left_ms(deadline)
    if not ms then sock:close(); return fail("timeout", "timed out before the TLS handshake") end
    sock:settimeouts(math.max(1, min(ms, floor(q.connect_timeout * 1000))), ms, ms)
    -- lua-resty-core (Debian's 0.1.24 among others) asserts when the
    -- handshake completes at once and the certificate check then fails
    -- (lua-resty-core issue #499): that raise is this handshake's failure.
    -- (Passing `false` for the session would skip the assert, and with it
    -- the certificate's verdict.)
    local pok
    pok, ok, err = pcall(sock.sslhandshake, sock, nil, q.host, verify)
    if not pok then
      if not find(tostring(ok), "assertion failed", 1, true) then sock:close(); error(ok, 0) end
      ok, err = nil, "certificate verification failed (" .. tostring(ok) .. ")"
    end
    if not ok then
      sock:close()
      if err == "timeout" then return fail("timeout", "TLS handshake: timeout") end
      return fail("tls", "TLS handshake with " .. q.host .. ": " .. tostring(err))
    end
  end
  local connect_time = now() - t0

  local host = q.has.host or (find(q.host, ":", 1, true) and "[" .. q.host .. "]" or q.host)
  if not q.has.host and q.port ~= (https and 443 or 80) then host = host .. ":" .. q.port end
  local head = { q.method, " ", q.path, " HTTP/1.1\r\nHost: ", host, "\r\n" }
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
    if reused and err ~= "timeout" and not q.retried then
      q.retried = true
      return perform(self, ngx, q, t0, deadline)
    end
    return fail(kind_of(err), "sending the request: " .. err)
  end

  local rd = reader(sock, deadline)
  local status, headers, keepalive = read_head(rd)
  if not status then
    sock:close()
    local kind, msg = headers, keepalive
    if (kind == "closed" or kind == "reset") and reused and rd.got == 0 and not q.retried then
      q.retried = true   -- the kept-alive connection was stale: nothing came back
      return perform(self, ngx, q, t0, deadline)
    end
    if kind == "closed" then kind = "reset" end
    return fail(kind, msg)
  end
  local first_byte = (rd.first or now()) - t0

  local stream = q.on_chunk ~= nil and status >= 200 and status < 300
  local parts, received, raised, did_raise = {}, 0, nil, false
  local function sink(piece)
    received = received + #piece
    if received > q.max_body then
      return nil, "too_large", format("response body exceeds max_body (%d bytes)", q.max_body)
    end
    if stream then
      local okc, go = pcall(q.on_chunk, piece)
      if not okc then raised, did_raise = go, true; return nil, "raised" end
      if go == false then return nil, "aborted", "transfer aborted by on_chunk" end
    else
      parts[#parts + 1] = piece
    end
    return true
  end
  local body_ok, reusable, msg = read_body(rd, q, status, headers, sink)
  if did_raise then sock:close(); error(raised, 0) end
  if not body_ok then
    sock:close()
    return fail(reusable, msg, status)
  end
  if reusable and keepalive and not rd.leftover() then
    if not sock:setkeepalive(floor(o.keepalive_timeout * 1000), o.pool_size) then sock:close() end
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
  return perform(self, ngx, blame(read_request, self, req, "request"))
end

function T:request_many(list)
  local ngx = ngx_api()
  check_phase(ngx)
  local qs = blame(function()
    if type(list) ~= "table" then raise("request_many expects a list of requests") end
    local out = {}
    for i = 1, #list do out[i] = read_request(self, list[i], "requests[" .. i .. "]") end
    return out
  end)
  local threads, out = {}, {}
  for i = 1, #qs do threads[i] = ngx.thread.spawn(perform, self, ngx, qs[i]) end
  local raised
  for i = 1, #threads do   -- wait for all, even after one raised (an on_chunk)
    local ok, res, err = ngx.thread.wait(threads[i])
    if not ok then raised = raised or res
    elseif res then out[i] = { res = res }
    else out[i] = { err = err } end
  end
  if raised then error(raised, 2) end
  return out
end

-- t:default_timeout() -> the seconds a request without its own `timeout`
-- may take (nil for none): a policy's deadline cuts it, never lengthens it.
function T.default_timeout(self)
  local to = self.opts.timeout
  if to == huge then return nil end
  return to
end

-- Connections are nginx's (per worker, kept alive in its pool): nothing to free.
function T.close(_) end

return _M
