-- Specs for breaker.curl (src/http.c + src/lhttp.c) against the fake
-- upstream (spec/support/). Every server started here is stopped by its pid
-- in a teardown. Plain Lua 5.1 compatible.
local curl = require "breaker.curl"
local berror = require "breaker.error"
local cjson = require "cjson"
local helper = require "helper"

local fault = helper.fault
local KEY = "sk-test-good"
local SECRET = "sk-secret-123"

local function auth(extra)
  local h = { authorization = "Bearer " .. KEY }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

-- Asserts that calling fn raises an error mentioning every given text.
local function raises(fn, ...)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  err = tostring(err)
  for i = 1, select("#", ...) do
    local text = select(i, ...)
    assert.is_truthy(err:find(text, 1, true), "error '" .. err .. "' lacks '" .. text .. "'")
  end
  return err
end

local function is_error(err, kind)
  assert.is_truthy(berror.is(err), "not a breaker.error: " .. tostring(err))
  assert.are.equal(kind, err.kind, tostring(err))
  assert.are.equal("string", type(err.message))
end

-- The content deltas of an SSE chat stream, and whether [DONE] arrived.
local function sse_content(text)
  local parts, done = {}, false
  for data in text:gmatch("data: ([^\n]*)\n\n") do
    if data == "[DONE]" then
      done = true
    else
      local ev = cjson.decode(data)
      parts[#parts + 1] = ev.choices[1].delta.content or ""
    end
  end
  return table.concat(parts), done
end

describe("breaker.curl", function()
  local up, t

  lazy_setup(function()
    up = helper.upstream.start{ api_key = KEY }
  end)

  lazy_teardown(function()
    if t then t:close() end
    if up then up:stop() end
  end)

  before_each(function()
    up:reset()
    if t then t:close() end
    t = curl.new()
  end)

  describe("module", function()
    it("has the project's version and names libcurl's", function()
      assert.are.equal(dofile("lua/breaker/version.lua"), curl._VERSION)
      assert.matches("^%d+%.%d+%.%d+", curl.curl_version)
    end)
  end)

  describe("new", function()
    it("accepts no options and every documented option", function()
      assert.is_truthy(curl.new())
      assert.is_truthy(curl.new{})
      local tt = curl.new{ timeout = 5, connect_timeout = 1, max_body = 1024, user_agent = "x/1",
                           ca_file = "/etc/ssl/certs/ca-certificates.crt", ca_path = "/etc/ssl/certs",
                           insecure_skip_verify = false, max_connections = 4 }
      tt:close()
    end)

    it("tells a policy its default timeout, nil for none, also when closed", function()
      local tt = curl.new{ timeout = 0.5 }
      assert.equal(0.5, tt:default_timeout())
      tt:close()
      assert.equal(0.5, tt:default_timeout())
      assert.equal(60, curl.new():default_timeout())
      assert.is_nil(curl.new{ timeout = math.huge }:default_timeout())
      -- breaker.cosocket keeps the same contract (it needs nginx only to send)
      local cosocket = require "breaker.cosocket"
      assert.equal(3, cosocket.new{ timeout = 3 }:default_timeout())
      assert.is_nil(cosocket.new{ timeout = math.huge }:default_timeout())
    end)

    it("raises on unknown or bad options, naming the key", function()
      raises(function() curl.new{ verify = false } end, "unknown key 'verify'")
      raises(function() curl.new{ verify_tls = false } end, "unknown key 'verify_tls'")
      raises(function() curl.new{ timeout = -1 } end, "timeout")
      raises(function() curl.new{ timeout = 0 } end, "timeout")
      raises(function() curl.new{ timeout = "5" } end, "timeout")
      raises(function() curl.new{ connect_timeout = -0.5 } end, "connect_timeout")
      raises(function() curl.new{ max_body = -1 } end, "max_body")
      raises(function() curl.new{ insecure_skip_verify = "yes" } end, "insecure_skip_verify")
      raises(function() curl.new{ user_agent = "a\r\nX-Evil: 1" } end, "user_agent")
      raises(function() curl.new{ ca_file = 42 } end, "ca_file")
      raises(function() curl.new{ [1] = true } end, "keys must be strings")
      raises(function() curl.new("fast") end, "table expected")
    end)
  end)

  describe("request", function()
    it("returns status, lower-cased headers, body and timing", function()
      local res, err = t:request{ url = up.url .. "/v1/models", headers = auth() }
      assert.is_nil(err)
      assert.are.equal(200, res.status)
      assert.are.equal("application/json", res.headers["content-type"])
      assert.is_nil(res.headers["Content-Type"])
      assert.are.equal(tostring(#res.body), res.headers["content-length"])
      assert.are.equal("list", cjson.decode(res.body).object)
      local tm = res.timing
      assert.is_true(tm.connect >= 0 and tm.first_byte >= tm.connect and tm.total >= tm.first_byte)
      assert.is_nil(res.streamed)
    end)

    it("sends method, headers and a binary body exactly", function()
      local body = "a\0b\r\n\255" .. string.rep("z", 1100000)  -- > 1 MiB: curl would send Expect
      local res = assert(t:request{ method = "PUT", url = up.url .. "/echo?x=1",
                                    headers = { ["X-Custom"] = "v 1", ["x-num"] = 42,
                                                ["x-empty"] = "" },
                                    body = body })
      local echo = cjson.decode(res.body)
      assert.are.equal("PUT", echo.method)
      assert.are.equal("x=1", echo.args)
      assert.are.equal(#body, echo.body_length)
      assert.are.equal(body, echo.body)
      assert.are.equal("v 1", echo.headers["x-custom"])
      assert.are.equal("42", echo.headers["x-num"])
      assert.are.equal("", echo.headers["x-empty"])
      assert.matches("^breaker/", echo.headers["user-agent"])
      -- no Expect: 100-continue round trip, no invented form content type
      assert.is_nil(echo.headers["expect"])
      assert.is_nil(echo.headers["content-type"])
      -- nor for bodies around the 1024-byte threshold of older curl
      for _, n in ipairs{ 10, 1024, 1025, 70000 } do
        local e = cjson.decode(assert(t:request{ url = up.url .. "/echo", body = string.rep("y", n) }).body)
        assert.are.equal(n, e.body_length)
        assert.is_nil(e.headers["expect"])
      end
    end)

    it("defaults to GET without a body and POST with one", function()
      local get = cjson.decode(assert(t:request{ url = up.url .. "/echo" }).body)
      assert.are.equal("GET", get.method)
      local post = cjson.decode(assert(t:request{ url = up.url .. "/echo", body = "{}" }).body)
      assert.are.equal("POST", post.method)
      assert.are.equal("{}", post.body)
      for _, m in ipairs{ "DELETE", "PATCH", "OPTIONS" } do
        local e = cjson.decode(assert(t:request{ method = m, url = up.url .. "/echo" }).body)
        assert.are.equal(m, e.method)
      end
      local head = assert(t:request{ method = "HEAD", url = up.url .. "/echo" })
      assert.are.equal(200, head.status)
      assert.are.equal("", head.body)
    end)

    it("carries nothing over from one request to the next on the same handle", function()
      local one = curl.new{ timeout = 5 }  -- one handle, reused by every request below
      local function echo(req)
        req.url = req.url or up.url .. "/echo"
        return cjson.decode(assert(one:request(req)).body)
      end
      local e = echo{ method = "PUT", url = up.url .. "/echo?x=1", body = "abc", headers = { ["x-a"] = "1" } }
      assert.are.same({ "PUT", "x=1", "abc", "1" }, { e.method, e.args, e.body, e.headers["x-a"] })
      local head = assert(one:request{ method = "HEAD", url = up.url .. "/echo" })
      assert.are.equal("", head.body)
      e = echo{ url = up.url .. "/echo?x=2" }
      assert.are.same({ "GET", "x=2", 0 }, { e.method, e.args, e.body_length })
      assert.is_nil(e.headers["x-a"])
      e = echo{ method = "DELETE" }
      assert.are.same({ "DELETE", "", 0 }, { e.method, e.args, e.body_length })
      e = echo{ body = "{}" }
      assert.are.same({ "POST", "{}" }, { e.method, e.body })
      e = echo{}
      assert.are.equal("GET", e.method)
      -- a short timeout and a small max_body apply to their request only
      local _, err = one:request{ url = up.url .. "/echo", timeout = 0.1,
                                  headers = { ["x-fake-fault"] = "fault=slow&delay=0.5" } }
      is_error(err, "timeout")
      assert(one:request{ url = up.url .. "/echo", headers = { ["x-fake-fault"] = "fault=slow&delay=0.3" } })
      _, err = one:request{ url = up.url .. "/echo", max_body = 10 }
      is_error(err, "too_large")
      assert(one:request{ url = up.url .. "/echo" })
      one:close()
    end)


    -- the handle keeps the last URL parsed (CURLOPT_CURLU): a new URL, or one
    -- curl refuses, must never leave the old one in place
    it("goes to each URL it is given on a reused handle, also after one curl refuses", function()
      local one = curl.new{ timeout = 5 }
      local function echo(url)
        local res, err = one:request{ url = url }
        assert(res, err and err.message)
        return cjson.decode(res.body)
      end
      local host = up.url:match("^http://(.*)$")
      for round = 1, 2 do
        local e = echo(up.url .. "/echo?round=" .. round)
        assert.are.same({ "round=" .. round, host }, { e.args, e.headers.host })
        local models = assert(one:request{ url = up.url .. "/v1/models", headers = auth() })
        assert.are.equal("list", cjson.decode(models.body).object)
        local res, err = one:request{ url = "http://[::1/echo" }
        assert.is_nil(res)
        is_error(err, "invalid")
        e = echo(up.url .. "/echo?after=bad")
        assert.are.equal("after=bad", e.args)
        res, err = one:request{ url = "http://127.0.0.1:1/echo" }
        assert.is_nil(res)
        is_error(err, "connect")
        e = echo(up.url .. "/echo?after=refused")
        assert.are.equal("after=refused", e.args)
      end
      assert.are.equal(8, up:stats().requests)
      one:close()
    end)
    it("joins repeated headers with ', ' and keeps set-cookie as a list", function()
      local res = assert(t:request{ url = up.url .. "/headers" })
      assert.are.equal("one, two", res.headers["x-multi"])
      assert.are.same({ "a=1; Path=/", "b=2; Path=/" }, res.headers["set-cookie"])
      assert.are.equal("Value", res.headers["x-mixed-case"])
    end)

    it("uses a user agent that can be changed or removed", function()
      local tt = curl.new{ user_agent = "my-app/2.0" }
      local e = cjson.decode(assert(tt:request{ url = up.url .. "/echo" }).body)
      assert.are.equal("my-app/2.0", e.headers["user-agent"])
      -- a request's own User-Agent wins, and only one is sent
      e = cjson.decode(assert(tt:request{ url = up.url .. "/echo",
                                          headers = { ["User-Agent"] = "per-request/1" } }).body)
      assert.are.equal("per-request/1", e.headers["user-agent"])
      tt:close()
      tt = curl.new{ user_agent = false }
      e = cjson.decode(assert(tt:request{ url = up.url .. "/echo" }).body)
      assert.is_nil(e.headers["user-agent"])
      tt:close()
    end)
  end)

  describe("bad input", function()
    local function bad(req, ...)
      raises(function() t:request(req) end, ...)
    end
    local function url() return up.url .. "/echo" end

    it("raises on a URL that is not http(s)", function()
      bad({ url = "ftp://127.0.0.1/x" }, "url", "http://")
      bad({ url = "file:///etc/passwd" }, "url")
      bad({ url = "127.0.0.1:80/x" }, "url")
      bad({ url = "http://" }, "url")
      bad({ url = "http://a b/" }, "url")
      bad({ url = "http://x/\r\nHost: evil" }, "url")
      bad({ url = "http://x/\0" }, "url")
      bad({ url = 42 }, "url")
      bad({}, "url")
    end)

    it("raises on header injection, naming the header but not its value", function()
      local e = raises(function()
        t:request{ url = url(), headers = { authorization = "Bearer " .. SECRET .. "\r\nX-Evil: 1" } }
      end, "headers['authorization']", "CR, LF or NUL")
      assert.is_nil(e:find(SECRET, 1, true))
      bad({ url = url(), headers = { ["x-a"] = "a\nb" } }, "headers['x-a']")
      bad({ url = url(), headers = { ["x-a"] = "a\0b" } }, "headers['x-a']")
      bad({ url = url(), headers = { ["x-a\r\nx-b"] = "1" } }, "headers", "invalid header name")
      bad({ url = url(), headers = { ["x-a: b"] = "1" } }, "invalid header name")
      bad({ url = url(), headers = { ["x\0a"] = "1" } }, "invalid header name")
      bad({ url = url(), headers = { [""] = "1" } }, "invalid header name")
      bad({ url = url(), headers = { "x-a: 1" } }, "headers", "names must be strings")
      bad({ url = url(), headers = { ["x-a"] = true } }, "headers['x-a']", "string")
      bad({ url = url(), headers = "x-a: 1" }, "headers must be a table")
    end)

    it("raises on the framing headers the transport sets, as breaker.cosocket does", function()
      -- a caller's Content-Length could frame the body otherwise than it is
      -- sent: the rest would be read as the next request on the connection
      for _, h in ipairs{ "Content-Length", "transfer-encoding", "CONNECTION" } do
        bad({ url = url(), body = "helloGET /echo HTTP/1.1\r\nHost: x\r\n\r\n", headers = { [h] = "5" } },
            "headers['" .. h .. "'] is set by the transport")
      end
      assert.equal(0, up:stats().requests)
    end)

    it("raises on a bad body, timeout, method or key", function()
      bad({ url = url(), body = 42 }, "body must be a string")
      bad({ url = url(), body = {} }, "body must be a string")
      bad({ url = url(), method = "HEAD", body = "x" }, "body", "HEAD")
      bad({ url = url(), timeout = -1 }, "timeout")
      bad({ url = url(), timeout = 0 }, "timeout")
      bad({ url = url(), timeout = 0 / 0 }, "timeout")
      bad({ url = url(), connect_timeout = -1 }, "connect_timeout")
      bad({ url = url(), max_body = -5 }, "max_body")
      bad({ url = url(), method = "GET /x HTTP/1.1\r\n" }, "method")
      bad({ url = url(), method = "" }, "method")
      bad({ url = url(), on_chunk = "print" }, "on_chunk must be a function")
      bad({ url = url(), tiemout = 1 }, "unknown key 'tiemout'")
      raises(function() t:request("http://x") end, "table expected")
    end)

    it("raises at the caller's line", function()
      local line = debug.getinfo(1, "l").currentline + 1
      local _, err = pcall(function() local r = t:request{ url = 5 }; return r end)
      assert.matches("curl_spec.lua:" .. line .. ": breaker.curl: request.url", err, 1, true)
      line = debug.getinfo(1, "l").currentline + 1
      _, err = pcall(function() local r = t:request_many{ {} }; return r end)
      assert.matches("curl_spec.lua:" .. line .. ": breaker.curl: requests[1].url", err, 1, true)
    end)

    it("sends nothing when it raises", function()
      pcall(t.request, t, { url = url(), headers = { ["x-a"] = "\n" } })
      pcall(t.request, t, { url = url(), body = 1 })
      assert.are.equal(0, up:stats().requests)
    end)
  end)

  describe("HTTP errors are responses", function()
    it("gives 401 with the provider's error body for a wrong key", function()
      local res = assert(t:request{ url = up.url .. "/v1/models",
                                    headers = { authorization = "Bearer sk-wrong" } })
      assert.are.equal(401, res.status)
      assert.are.same({ error = { message = "Incorrect API key provided",
                                  type = "invalid_request_error", param = cjson.null,
                                  code = "invalid_api_key" } }, cjson.decode(res.body))
    end)

    for _, case in ipairs{
      { "429", 429, "rate_limit_exceeded" }, { "quota", 429, "insufficient_quota" },
      { "401", 401, "invalid_api_key" }, { "500", 500, nil }, { "503", 503, nil },
      { "529", 529, nil },
    } do
      it("returns fault " .. case[1] .. " as status " .. case[2], function()
        local res = assert(t:request{ url = up.url .. "/v1/chat/completions", headers = auth{
          ["x-fake-fault"] = fault{ fault = case[1] } }, body = "{}" })
        assert.are.equal(case[2], res.status)
        local e = cjson.decode(res.body).error
        assert.are.equal("string", type(e.message))
        assert.are.equal(case[3] or cjson.null, e.code)
      end)
    end

    it("carries Retry-After (seconds and HTTP-date), retry-after-ms and x-should-retry", function()
      local res = assert(t:request{ url = up.url .. "/v1/models", headers = auth{
        ["x-fake-fault"] = fault{ fault = "429", retry_after = 7, retry_after_ms = 1500,
                                  should_retry = "false" } } })
      assert.are.equal("7", res.headers["retry-after"])
      assert.are.equal(7, curl.parse_retry_after(res.headers["retry-after"]))
      assert.are.equal(1.5, curl.parse_retry_after_ms(res.headers["retry-after-ms"]))
      assert.are.equal("false", res.headers["x-should-retry"])

      res = assert(t:request{ url = up.url .. "/v1/models", headers = auth{
        ["x-fake-fault"] = fault{ fault = "503", retry_after_date = 120 } } })
      assert.are.equal(503, res.status)
      assert.matches("GMT$", res.headers["retry-after"])
      local secs = curl.parse_retry_after(res.headers["retry-after"])
      assert.is_true(secs > 100 and secs <= 120, tostring(secs))
    end)

    it("returns a malformed body as it came", function()
      local res = assert(t:request{ url = up.url .. "/v1/chat/completions", body = "{}",
                                    headers = auth{ ["x-fake-fault"] = "fault=malformed" } })
      assert.are.equal(200, res.status)
      assert.is_nil((require("cjson.safe").decode(res.body)))
    end)
  end)

  describe("transport errors", function()
    it("reports a refused connection as connect", function()
      local res, err = t:request{ url = "http://127.0.0.1:" .. helper.free_port() .. "/" }
      assert.is_nil(res)
      is_error(err, "connect")
      assert.matches("connect", err.message)
      assert.are.equal(7, err.curl_code)
    end)

    it("tells an HTTPS proxy who it is, and keeps the request's headers from it", function()
      local ok, ffi = pcall(require, "ffi")
      if not ok then pending("needs LuaJIT's ffi to set the proxy environment") return end
      pcall(ffi.cdef, "int setenv(const char *, const char *, int); int unsetenv(const char *);")
      local seen = os.tmpname()
      -- A one-shot proxy in its own process: records the CONNECT request it
      -- gets, refuses it, and exits (or gives up after 5 s).
      local script = os.tmpname()
      local sf = assert(io.open(script, "w"))
      sf:write(([[
        local socket = require "socket"
        local s = assert(socket.bind("127.0.0.1", 0))
        local _, port = s:getsockname()
        print(port); io.stdout:flush()
        s:settimeout(5)
        local c = s:accept()
        local f = assert(io.open(%q, "w"))
        if c then
          c:settimeout(5)
          repeat
            local line = c:receive("*l")
            if line then f:write(line, "\n") end
          until not line or line == ""
          c:send("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
          c:close()
        end
        f:close()
      ]]):format(seen))
      sf:close()
      local proxy = assert(io.popen("luajit " .. script, "r"))
      local port = assert(tonumber(proxy:read("*l")))
      local saved = {}
      for _, k in ipairs{ "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY" } do
        saved[k] = os.getenv(k)
        ffi.C.unsetenv(k)
      end
      ffi.C.setenv("https_proxy", "http://127.0.0.1:" .. port, 1)
      local tt = curl.new{ timeout = 5 }
      local res, err = tt:request{ url = "https://api.example.test/v1/models",
                                   headers = { authorization = "Bearer " .. SECRET } }
      tt:close()
      ffi.C.unsetenv("https_proxy")
      for k, v in pairs(saved) do ffi.C.setenv(k, v, 1) end
      proxy:close()
      os.remove(script)
      local f = assert(io.open(seen))
      local got = f:read("*a")
      f:close()
      os.remove(seen)
      assert.is_nil(res)
      assert.is_table(err)
      assert.matches("^CONNECT api.example.test:443 HTTP/1.1", got)
      assert.matches("\nUser%-Agent: breaker/", got)
      assert.is_nil(got:lower():find("authorization", 1, true))
      assert.is_nil(got:find(SECRET, 1, true))
      assert.is_nil(tostring(err):find(SECRET, 1, true))
    end)

    it("takes its proxy from the environment as it was when the transport was made", function()
      local ok, ffi = pcall(require, "ffi")
      if not ok then pending("needs LuaJIT's ffi to set the proxy environment") return end
      pcall(ffi.cdef, "int setenv(const char *, const char *, int); int unsetenv(const char *);")
      local names = { "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                      "no_proxy", "NO_PROXY" }
      local saved = {}
      for _, k in ipairs(names) do
        saved[k] = os.getenv(k)
        ffi.C.unsetenv(k)
      end
      local before = curl.new{ timeout = 5 }
      -- a proxy that refuses every connection
      ffi.C.setenv("http_proxy", "http://127.0.0.1:" .. helper.free_port(), 1)
      local after = curl.new{ timeout = 5 }
      ffi.C.setenv("no_proxy", "127.0.0.1", 1)
      local exempt = curl.new{ timeout = 5 }
      for _, k in ipairs(names) do ffi.C.unsetenv(k) end
      for k, v in pairs(saved) do ffi.C.setenv(k, v, 1) end
      local url = up.url .. "/echo"
      local res1 = before:request{ url = url }
      local res2, err2 = after:request{ url = url }
      local res3 = exempt:request{ url = url }
      before:close(); after:close(); exempt:close()
      assert.are.equal(200, res1 and res1.status)   -- made with no proxy set
      assert.is_nil(res2)                           -- made with http_proxy set
      is_error(err2, "connect")
      assert.are.equal(200, res3 and res3.status)   -- no_proxy names the host
    end)

    it("reports a name that does not resolve as dns", function()
      local _, err = t:request{ url = "http://nonexistent.invalid/v1/models" }
      is_error(err, "dns")
      assert.matches("nonexistent.invalid", err.message, 1, true)
    end)

    it("reports a connection closed mid-response as reset, fresh or reused", function()
      local _, err = t:request{ url = up.url .. "/x", headers = { ["x-fake-fault"] = "fault=reset" } }
      is_error(err, "reset")
      assert.are.equal(200, err.status)
      assert(t:request{ url = up.url .. "/echo" })  -- the transport recovers
      _, err = t:request{ url = up.url .. "/x", headers = { ["x-fake-fault"] = "fault=reset" } }
      is_error(err, "reset")
      local fresh = curl.new()
      _, err = fresh:request{ url = up.url .. "/x",
                              headers = { ["x-fake-fault"] = "fault=reset&after=request" } }
      fresh:close()
      is_error(err, "reset")
      assert.matches("Empty reply", err.message)
    end)

    it("reports a slow first byte beyond timeout as timeout", function()
      local start = helper.now()
      local _, err = t:request{ url = up.url .. "/x", timeout = 0.3,
                                headers = { ["x-fake-fault"] = "fault=slow&delay=3" } }
      is_error(err, "timeout")
      assert.is_true(helper.now() - start < 2.5, "did not give up before the server answered")
    end)

    it("reports a slow body beyond timeout as timeout", function()
      local _, err = t:request{ url = up.url .. "/echo", timeout = 0.5,
                                headers = { ["x-fake-fault"] = "fault=slow&body_delay=1&chunks=4" } }
      is_error(err, "timeout")
      assert.are.equal(200, err.status)
    end)

    it("uses the transport's default timeout", function()
      local tt = curl.new{ timeout = 0.3 }
      local _, err = tt:request{ url = up.url .. "/x", headers = { ["x-fake-fault"] = "fault=slow&delay=3" } }
      tt:close()
      is_error(err, "timeout")
    end)

    it("aborts a body beyond max_body with too_large (Content-Length and chunked)", function()
      local _, err = t:request{ url = up.url .. "/x", max_body = 1000,
                                headers = { ["x-fake-fault"] = "fault=oversize&size=1001" } }
      is_error(err, "too_large")
      _, err = t:request{ url = up.url .. "/x", max_body = 100000,
                          headers = { ["x-fake-fault"] = "fault=oversize&size=300000&chunked=true" } }
      is_error(err, "too_large")
      local res = assert(t:request{ url = up.url .. "/x", max_body = 1000,
                                    headers = { ["x-fake-fault"] = "fault=oversize&size=1000&chunked=true" } })
      assert.are.equal(1000, #res.body)
    end)

    it("limits bodies to 16 MiB by default", function()
      local _, err = t:request{ url = up.url .. "/x", headers = { ["x-fake-fault"] =
        "fault=oversize&chunked=true" } }  -- 16 MiB + 1 byte
      is_error(err, "too_large")
      assert.matches("16777216", err.message)
      local tt = curl.new{ max_body = 10 }
      _, err = tt:request{ url = up.url .. "/v1/models", headers = { authorization = "x" } }
      tt:close()
      is_error(err, "too_large")  -- error statuses are limited too
    end)

    it("never puts the Authorization header or body in an error", function()
      local h = { authorization = "Bearer " .. SECRET, ["x-api-key"] = SECRET }
      local cases = {
        { url = "http://127.0.0.1:" .. helper.free_port() .. "/" },
        { url = "http://nonexistent.invalid/" },
        { url = up.url .. "/x", faults = "fault=reset" },
        { url = up.url .. "/x", faults = "fault=slow&delay=2", timeout = 0.2 },
        { url = up.url .. "/x", faults = "fault=oversize&size=5000", max_body = 10 },
        { url = up.url .. "/x", faults = "fault=stream_die&events=1" },
      }
      for _, c in ipairs(cases) do
        local hh = { ["x-fake-fault"] = c.faults }
        for k, v in pairs(h) do hh[k] = v end
        local res, err = t:request{ url = c.url, headers = hh, body = "secret body " .. SECRET,
                                    timeout = c.timeout, max_body = c.max_body }
        assert.is_nil(res)
        local s = tostring(err)
        assert.is_nil(s:find(SECRET, 1, true), s)
        assert.is_nil(s:find("Bearer", 1, true), s)
        assert.is_nil(s:find("secret body", 1, true), s)
      end
    end)
  end)

  describe("streaming", function()
    local body = cjson.encode{ model = "gpt-fake", stream = true,
                               messages = { { role = "user", content = "one two three four five" } } }

    it("passes a 2xx body to on_chunk as it arrives", function()
      local chunks = {}
      local res = assert(t:request{ url = up.url .. "/v1/chat/completions", headers = auth(),
                                    body = body, on_chunk = function(c) chunks[#chunks + 1] = c end })
      assert.are.equal(200, res.status)
      assert.are.equal("text/event-stream", res.headers["content-type"])
      assert.are.equal("", res.body)
      assert.is_true(res.streamed)
      assert.is_true(#chunks >= 1)
      local content, done = sse_content(table.concat(chunks))
      assert.are.equal("one two three four five", content)
      assert.is_true(done)
    end)

    it("delivers slow events one by one", function()
      local chunks = {}
      assert(t:request{ url = up.url .. "/v1/chat/completions", body = body,
                        headers = auth{ ["x-fake-fault"] = "fault=slow&body_delay=0.05" },
                        on_chunk = function(c) chunks[#chunks + 1] = c end })
      assert.is_true(#chunks >= 4, "got " .. #chunks .. " chunks") -- 7 events + [DONE], 50 ms apart
    end)

    it("aborts when on_chunk returns false", function()
      local calls = 0
      local res, err = t:request{ url = up.url .. "/v1/chat/completions", body = body,
                                  headers = auth{ ["x-fake-fault"] = "fault=slow&body_delay=0.05" },
                                  on_chunk = function() calls = calls + 1; return false end }
      assert.is_nil(res)
      is_error(err, "aborted")
      assert.are.equal(1, calls)
      assert(t:request{ url = up.url .. "/echo" })  -- still usable
    end)

    it("rethrows what on_chunk raises, and stays usable", function()
      raises(function()
        t:request{ url = up.url .. "/v1/chat/completions", body = body, headers = auth(),
                   on_chunk = function() error("boom in callback") end }
      end, "boom in callback")
      assert.are.equal(200, assert(t:request{ url = up.url .. "/echo" }).status)
    end)

    it("refuses re-entry and close from inside on_chunk", function()
      raises(function()
        t:request{ url = up.url .. "/v1/chat/completions", body = body, headers = auth(),
                   on_chunk = function() t:request{ url = up.url .. "/echo" } end }
      end, "busy")
      raises(function()
        t:request{ url = up.url .. "/v1/chat/completions", body = body, headers = auth(),
                   on_chunk = function() t:close() end }
      end, "cannot close")
      assert(t:request{ url = up.url .. "/echo" })
    end)

    it("buffers a non-2xx body instead of streaming it", function()
      local called = false
      local res = assert(t:request{ url = up.url .. "/v1/chat/completions", body = body,
                                    headers = { authorization = "Bearer wrong" },
                                    on_chunk = function() called = true end })
      assert.are.equal(401, res.status)
      assert.is_false(called)
      assert.are.equal("invalid_api_key", cjson.decode(res.body).error.code)
      assert.is_nil(res.streamed)
    end)

    it("reports a stream that dies as reset after the events it got", function()
      local chunks = {}
      local res, err = t:request{ url = up.url .. "/v1/chat/completions", body = body, headers = auth{
        ["x-fake-fault"] = "fault=stream_die&events=3" }, on_chunk = function(c) chunks[#chunks + 1] = c end }
      assert.is_nil(res)
      is_error(err, "reset")
      assert.are.equal(200, err.status)
      local content, done = sse_content(table.concat(chunks))
      assert.are.equal("this stream ", content)
      assert.is_false(done)
    end)

    it("applies max_body to streamed bytes", function()
      local _, err = t:request{ url = up.url .. "/v1/chat/completions", body = body, headers = auth(),
                                max_body = 100, on_chunk = function() end }
      is_error(err, "too_large")
    end)
  end)

  describe("keep-alive", function()
    it("uses one TCP connection for 1000 sequential requests", function()
      for i = 1, 1000 do
        local res = t:request{ method = "POST", url = up.url .. "/v1/embeddings", headers = auth(),
                               body = '{"model":"text-embedding-fake","input":"hi"}' }
        assert(res and res.status == 200, "request " .. i)
      end
      local s = up:stats()
      assert.are.equal(1000, s.requests)
      assert.are.equal(1000, s.paths["/v1/embeddings"])
      assert.are.equal(1, s.connections)
    end)

    it("keeps separate connections per transport", function()
      local other = curl.new()
      for _ = 1, 5 do
        assert(t:request{ url = up.url .. "/echo" })
        assert(other:request{ url = up.url .. "/echo" })
      end
      other:close()
      assert.are.equal(2, up:stats().connections)
    end)
  end)

  describe("request_many", function()
    it("runs requests in parallel and returns results in input order", function()
      local reqs = {}
      for i = 1, 8 do
        reqs[i] = { url = up.url .. "/echo?i=" .. i, headers = { ["x-fake-fault"] = "fault=slow&delay=0.3" } }
      end
      local start = helper.now()
      local results = t:request_many(reqs)
      local elapsed = helper.now() - start
      assert.are.equal(8, #results)
      for i = 1, 8 do
        assert.is_nil(results[i].err)
        assert.are.equal("i=" .. i, cjson.decode(results[i].res.body).args)
      end
      -- sequentially this takes 2.4 s; a generous bound still proves overlap
      assert.is_true(elapsed < 1.6, "took " .. elapsed .. " s")
      assert.is_true(up:stats().connections >= 2)
    end)

    it("keeps a batch's connections open for the next batch", function()
      local many = curl.new()
      local batch = {}
      for i = 1, 16 do batch[i] = { url = up.url .. "/echo?i=" .. i } end
      for round = 1, 10 do
        for i, r in ipairs(many:request_many(batch)) do
          assert(r.res and r.res.status == 200, "round " .. round .. " request " .. i)
        end
      end
      many:close()
      -- 16 opened by the first batch, reused by the nine others
      assert.are.equal(160, up:stats().requests)
      assert.are.equal(16, up:stats().connections)
    end)

    it("mixes responses and errors per request", function()
      local results = t:request_many{
        { url = up.url .. "/echo" },
        { url = "http://127.0.0.1:" .. helper.free_port() .. "/" },
        { url = up.url .. "/x", headers = { ["x-fake-fault"] = "fault=reset" } },
        { url = up.url .. "/v1/models", headers = { ["x-fake-fault"] = "fault=503" } },
        { url = up.url .. "/x", timeout = 0.2, headers = { ["x-fake-fault"] = "fault=slow&delay=2" } },
      }
      assert.are.equal(200, results[1].res.status)
      is_error(results[2].err, "connect")
      is_error(results[3].err, "reset")
      assert.are.equal(503, results[4].res.status)
      is_error(results[5].err, "timeout")
      assert.is_nil(results[2].res)
    end)

    it("streams each request to its own on_chunk", function()
      local a, b = {}, {}
      local function req(text, sink)
        return { url = up.url .. "/v1/chat/completions", headers = auth(),
                 body = cjson.encode{ model = "m", stream = true,
                                      messages = { { role = "user", content = text } } },
                 on_chunk = function(c) sink[#sink + 1] = c end }
      end
      local results = t:request_many{ req("alpha beta", a), req("gamma delta", b) }
      assert.is_true(results[1].res.streamed and results[2].res.streamed)
      assert.are.equal("alpha beta", (sse_content(table.concat(a))))
      assert.are.equal("gamma delta", (sse_content(table.concat(b))))
    end)

    it("returns an empty list for no requests", function()
      assert.are.same({}, t:request_many{})
    end)

    it("runs no on_chunk after one raised, and rethrows that error", function()
      local after = 0
      local raised = false
      local body = cjson.encode{ model = "m", stream = true,
                                 messages = { { role = "user", content = "a b c d e f g h" } } }
      raises(function()
        t:request_many{
          { url = up.url .. "/v1/chat/completions", headers = auth(), body = body,
            on_chunk = function() raised = true; error("first boom") end },
          { url = up.url .. "/v1/chat/completions", body = body,
            headers = auth{ ["x-fake-fault"] = "fault=slow&body_delay=0.05" },
            on_chunk = function()
              if raised then after = after + 1 end  -- goes on: 8 events, 50 ms apart
            end },
        }
      end, "first boom")
      assert.are.equal(0, after)
      assert(t:request{ url = up.url .. "/echo" })  -- still usable
    end)

    it("validates every request before sending any", function()
      raises(function()
        t:request_many{ { url = up.url .. "/echo" }, { url = up.url .. "/echo" },
                        { url = up.url .. "/echo", body = 5 } }
      end, "requests[3].body")
      raises(function() t:request_many{ { url = up.url .. "/echo" }, "x" } end, "requests[2]")
      assert.are.equal(0, up:stats().requests)
    end)
  end)

  describe("C API (http.h) through FFI", function()
    local ok_ffi, ffi = pcall(require, "ffi")
    local lib
    if ok_ffi then
      local path = package.searchpath and package.searchpath("breaker.curl", package.cpath)
      if path then
        pcall(ffi.cdef, [[
          typedef struct http_header { const char *name; size_t name_len;
                                       const char *value; size_t value_len; } http_header;
          typedef struct http_client_config { int verify_tls; const char *ca_file;
            const char *ca_path; const char *user_agent; long max_connections; } http_client_config;
          typedef int (*http_chunk_fn)(void *ud, const char *data, size_t len);
          typedef struct http_request_spec { const char *method; const char *url;
            const http_header *headers; size_t nheaders; const char *body; size_t body_len;
            long timeout_ms; long connect_timeout_ms; size_t max_body;
            http_chunk_fn on_chunk; void *chunk_ud; } http_request_spec;
          typedef struct http_result { int kind; int curl_code; int chunk_status; long status;
            int streamed; const char *message; const char *body; size_t body_len; size_t received;
            const http_header *headers; size_t nheaders; double connect_time;
            double first_byte_time; double total_time; } http_result;
          typedef struct http_client http_client;
          typedef struct http_request http_request;
          http_client *http_client_new(const http_client_config *cfg, char *err, size_t errlen);
          void http_client_free(http_client *c);
          http_request *http_request_new(http_client *c, const http_request_spec *spec);
          int http_perform(http_client *c, http_request *const *reqs, size_t n);
          const http_result *http_request_result(const http_request *r);
          void http_request_free(http_client *c, http_request *r);
        ]])
        lib = ffi.load(path)
      end
    end

    -- Runs one request through the C API; returns kind, message, and what
    -- the upstream received.
    local function c_request(method, name, value, ua)
      local cfg = ffi.new("http_client_config", { verify_tls = 1, user_agent = ua })
      local errbuf = ffi.new("char[256]")
      local c = lib.http_client_new(cfg, errbuf, 256)
      if c == nil then return nil, ffi.string(errbuf) end
      local h = ffi.new("http_header[1]")
      h[0].name, h[0].name_len, h[0].value, h[0].value_len = name, #name, value, #value
      local spec = ffi.new("http_request_spec", { method = method, url = up.url .. "/echo",
                           headers = h, nheaders = 1, timeout_ms = 5000, max_body = 65536 })
      local r = lib.http_request_new(c, spec)
      local rs = ffi.new("http_request *[1]", r)
      lib.http_perform(c, rs, 1)
      local res = lib.http_request_result(r)
      local kind, msg = res.kind, ffi.string(res.message)
      lib.http_request_free(c, r)
      lib.http_client_free(c)
      return kind, msg
    end

    it("refuses CR, LF or NUL in a header value, a bad name or method, and sends nothing", function()
      if not lib then pending("needs LuaJIT's FFI") return end
      local INVALID = 7  -- HTTP_EINVALID
      local cases = {
        { "GET", "x-a", "v\r\nx-injected: 1" },
        { "GET", "x-a", "v\nx-injected: 1" },
        { "GET", "x-a", "Bearer " .. SECRET .. "\0tail" },
        { "GET", "x-a: b\r\nx-injected", "1" },
        { "GET", "bad name", "1" },
        { "GET", "", "1" },
        { "GET /x HTTP/1.1\r\nx-injected: 1\r\n", "x-a", "1" },
        { "GET", "Content-Length", "5" },
        { "GET", "transfer-encoding", "chunked" },
      }
      for _, c in ipairs(cases) do
        local kind, msg = c_request(c[1], c[2], c[3])
        assert.are.equal(INVALID, kind, msg)
        assert.is_nil(msg:find(SECRET, 1, true), msg)
      end
      assert.are.equal(0, up:stats().requests)
      assert.are.equal(0, (c_request("GET", "x-a", "fine")))  -- HTTP_OK
      local kind, msg = c_request("GET", "x-a", "1", "agent\r\nx-injected: 1")
      assert.is_nil(kind)
      assert.matches("user_agent", msg)
    end)
  end)

  describe("lifetime", function()
    it("close is idempotent and a closed transport raises", function()
      local tt = curl.new()
      assert(tt:request{ url = up.url .. "/echo" })
      tt:close()
      tt:close()
      raises(function() tt:request{ url = up.url .. "/echo" } end, "closed")
      raises(function() tt:request_many{} end, "closed")
      assert.matches("closed", tostring(tt))
    end)

    it("is collected with open connections, and __gc equals close", function()
      local weak = setmetatable({}, { __mode = "k" })
      do
        local tt = curl.new()
        assert(tt:request{ url = up.url .. "/echo" })
        weak[tt] = true
      end
      collectgarbage()
      collectgarbage()
      assert.is_nil(next(weak))
      local mt = getmetatable(t)
      assert.are.equal("breaker.curl transport", mt)  -- protected metatable
    end)

    it("rejects other userdata as self", function()
      raises(function() t.request(io.stdout, { url = up.url }) end, "breaker.curl")
    end)
  end)

  describe("parse_retry_after", function()
    local now = 784111777  -- Sun, 06 Nov 1994 08:49:37 GMT
    local p = curl.parse_retry_after

    it("parses delta-seconds", function()
      assert.are.equal(120, p("120"))
      assert.are.equal(0, p("0"))
      assert.are.equal(5, p(" 5\t"))
      assert.are.equal(2147483647, p("2147483647"))
      assert.are.equal(30, p(30))
    end)

    it("parses HTTP-dates in all three formats relative to now", function()
      assert.are.equal(30, p("Sun, 06 Nov 1994 08:49:37 GMT", now - 30))
      assert.are.equal(30, p("Sunday, 06-Nov-94 08:49:37 GMT", now - 30))
      assert.are.equal(30, p("Sun Nov  6 08:49:37 1994", now - 30))
      assert.are.equal(0, p("Sun, 06 Nov 1994 08:49:37 GMT", now + 3600))  -- past: 0
      local soon = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 60)
      local s = p(soon)
      assert.is_true(s >= 58 and s <= 60, tostring(s))
    end)

    it("returns nil for garbage and hostile values, never raising", function()
      local hostile = {
        "", " ", "abc", "-5", "+5", "1.5", "1e3", "0x10", "5 seconds", "NaN", "inf",
        "99999999999999999999", "2147483648", "18446744073709551617",
        string.rep("9", 1000), string.rep("a", 1000), string.rep("Sun, ", 200),
        "12\0", "\0", "Sun, 06 Nov 1994 08:49:37 GMT\0junk", "Mon", "GMT", "tomorrow",
        "Fri, 31 Dec 9999 23:59:59 GMT", "Sun, 32 Nov 1994 08:49:37 GMT",
        "\255\254\253", "%s%s%s%n", "\r\n120",
      }
      for _, v in ipairs(hostile) do
        local ok, r = pcall(p, v, now)
        assert.is_true(ok, "raised for " .. ("%q"):format(v))
        assert.is_nil(r, ("%q gave %s"):format(v, tostring(r)))
      end
      for _, v in ipairs{ -1, 0 / 0, math.huge, -math.huge, 1e300, {}, true, print } do
        assert.is_nil(p(v))
      end
      assert.is_nil(p(nil))
      assert.is_nil(p())
    end)

    it("returns nil for a date measured from a NaN or huge now", function()
      local date = "Sun, 06 Nov 1994 08:49:37 GMT"
      for _, bad in ipairs{ 0 / 0, math.huge, -math.huge, 1e300, -1e300, 2 ^ 53 } do
        local ok, r = pcall(p, date, bad)
        assert.is_true(ok)
        assert.is_nil(r, tostring(bad))
      end
      assert.are.equal(30, p(30, 0 / 0))  -- a number does not need now
      assert.are.equal(0, p(date, 2 ^ 53 - 1))
    end)
  end)

  describe("parse_retry_after_ms", function()
    local p = curl.parse_retry_after_ms

    it("parses milliseconds into seconds", function()
      assert.are.equal(1.5, p("1500"))
      assert.are.equal(0, p("0"))
      assert.are.equal(0.25, p(" 250 "))
      assert.is_true(math.abs(p("1500.5") - 1.5005) < 1e-12)
      assert.are.equal(2, p(2000))
    end)

    it("returns nil for garbage and hostile values", function()
      for _, v in ipairs{ "", "-1", "abc", "1e3", "1.", ".5", "1.2.3", "0x10", "12ms",
                          "99999999999999999999", "2147483648", string.rep("1", 1000),
                          "15\0", "Sun, 06 Nov 1994 08:49:37 GMT" } do
        local ok, r = pcall(p, v)
        assert.is_true(ok)
        assert.is_nil(r, ("%q gave %s"):format(v, tostring(r)))
      end
      for _, v in ipairs{ -1, 0 / 0, math.huge, {}, false } do assert.is_nil(p(v)) end
      assert.is_nil(p(nil))
    end)
  end)
end)

describe("breaker.curl against a server that breaks HTTP/1.1", function()
  -- spec/support/raw_upstream.lua, in a process of its own
  local raw, t

  lazy_setup(function()
    raw = helper.raw_upstream()
    t = curl.new{ timeout = 5 }
  end)

  lazy_teardown(function()
    if t then t:close() end
    if raw then raw.stop() end
  end)

  it("reports a reply it cannot read as protocol, which the breaker counts", function()
    local classify = require("breaker.classify").default
    for _, path in ipairs{ "/garbage", "/status_2000", "/status_099", "/chunk_0x" } do
      local res, err = t:request{ url = raw.url .. path }
      assert.is_nil(res, path)
      assert.are.equal("protocol", err.kind, path .. ": " .. tostring(err))
      assert.are.equal("failure", classify(nil, err).outcome, path)
    end
    -- a header line over curl's own limit: too_large, not "out of memory"
    local _, err = t:request{ url = raw.url .. "/huge_line" }
    assert.are.equal("too_large", err.kind, tostring(err))
  end)

  it("refuses a reply with two different Content-Lengths", function()
    local res, err = t:request{ url = raw.url .. "/lengths_differ" }
    assert.is_nil(res)
    assert.are.equal("protocol", err.kind)
    assert.matches("conflicting Content-Length", err.message, 1, true)
    assert(t:request{ url = raw.url .. "/ok" })
    -- the same length written long, twice, is no conflict
    assert.are.equal("hi", assert(t:request{ url = raw.url .. "/lengths_long_same" }).body)
  end)

  it("keeps trailers out of the response's headers", function()
    local res = assert(t:request{ url = raw.url .. "/trailers" })
    assert.are.equal("hi", res.body)
    assert.are.equal("head", res.headers["x-a"])
    assert.is_nil(res.headers["x-t"])
    assert.is_nil(res.headers["content-length"])
    -- nor can a trailer that begins like a status line start the head over
    res = assert(t:request{ url = raw.url .. "/trailer_status" })
    assert.are.same({ "hi", "head" }, { res.body, res.headers["x-a"] })
    assert.is_nil(res.headers.location)
  end)

  it("joins 40k repeats of a header", function()
    -- (once, at the end: joining as they came was quadratic, 0.66 s here)
    local res = assert(t:request{ url = raw.url .. "/header_flood" })
    local x = res.headers.x
    assert.are.equal(40000 * 3 - 2, #x) -- "a, a, ..."
    assert.are.equal(("a, "):rep(39999) .. "a", x)
  end)

  it("marks an empty 2xx answer streamed when on_chunk was given", function()
    local got = 0
    local res = assert(t:request{ url = raw.url .. "/empty_200", on_chunk = function() got = got + 1 end })
    assert.are.equal(0, got)
    assert.is_true(res.streamed)
    assert.are.equal("", res.body)
  end)
end)

describe("breaker.curl over TLS", function()
  local up

  lazy_setup(function()
    up = helper.upstream.start{ tls = true, api_key = false }
  end)

  lazy_teardown(function()
    if up then up:stop() end
  end)

  it("verifies certificates by default", function()
    local t = curl.new()
    local res, err = t:request{ url = up.url .. "/echo" }
    t:close()
    assert.is_nil(res)
    is_error(err, "tls")
  end)

  it("trusts a CA given with ca_file", function()
    local t = curl.new{ ca_file = up.ca_file }
    local res = assert(t:request{ url = up.url .. "/echo" })
    t:close()
    assert.are.equal(200, res.status)
  end)

  it("checks the host name against the certificate", function()
    local t = curl.new{ ca_file = up.ca_file }
    -- the certificate names localhost only, not 127.0.0.1
    local _, err = t:request{ url = "https://127.0.0.1:" .. up.port .. "/echo" }
    t:close()
    is_error(err, "tls")
  end)

  it("skips verification only with insecure_skip_verify = true", function()
    local t = curl.new{ insecure_skip_verify = true }
    local res = assert(t:request{ url = up.url .. "/echo" })
    t:close()
    assert.are.equal(200, res.status)
  end)

  it("reports a missing CA file as tls", function()
    local t = curl.new{ ca_file = "/nonexistent/ca.pem" }
    local _, err = t:request{ url = up.url .. "/echo" }
    t:close()
    is_error(err, "tls")
  end)
end)

-- Providers answer HTTPS over HTTP/2 (chosen by ALPN); the fake upstream does
-- too unless told otherwise. (The helper reaches its control endpoints
-- through a transport of its own; they never count as API requests or
-- connections.)
describe("breaker.curl over HTTPS with HTTP/2", function()
  local up, h1

  -- Asserts how many API requests and TCP connections the server saw.
  local function saw(server, requests, connections, why)
    local stats = server:stats()
    assert.are.equal(requests, stats.requests)
    assert.are.equal(connections, stats.connections, why)
  end

  lazy_setup(function()
    up = helper.upstream.start{ tls = true, api_key = false }
    h1 = helper.upstream.start{ tls = true, http2 = false, api_key = false }
  end)

  lazy_teardown(function()
    if up then up:stop() end
    if h1 then h1:stop() end
  end)

  local function transport(server)
    return curl.new{ ca_file = server.ca_file, timeout = 10 }
  end

  it("speaks HTTP/2 to a server that offers it, HTTP/1.1 to one that does not", function()
    for server, version in pairs{ [up] = 2, [h1] = 1.1 } do
      local t = transport(server)
      local res = assert(t:request{ url = server.url .. "/echo" })
      t:close()
      assert.are.equal(200, res.status)
      assert.are.equal(version, cjson.decode(res.body).http_version)
    end
  end)

  it("runs request_many from a cold transport over one shared connection", function()
    up:reset()
    local t = transport(up)
    local list = {}
    for i = 1, 16 do
      list[i] = { method = "POST", url = up.url .. "/v1/embeddings", headers = { ["x-n"] = tostring(i) },
                  body = cjson.encode{ model = "text-embedding-fake", input = "text " .. i } }
    end
    local out = t:request_many(list)
    t:close()
    for i = 1, 16 do
      assert.is_nil(out[i].err)
      assert.are.equal(200, out[i].res.status)
      assert.are.equal(2, cjson.decode(out[i].res.body).usage.prompt_tokens) -- "text N"
    end
    saw(up, 16, 1)
  end)

  it("opens a connection per request for request_many to an HTTPS server without HTTP/2", function()
    h1:reset()
    local t = transport(h1)
    local list = {}
    for i = 1, 6 do
      list[i] = { url = h1.url .. "/v1/models", headers = { ["x-fake-fault"] = "fault=slow&delay=0.2" } }
    end
    local out = t:request_many(list)
    t:close()
    for i = 1, 6 do assert.are.equal(200, out[i].res.status) end
    saw(h1, 6, 6, "in parallel, not queued behind one")
  end)

  it("reports a stream the server resets as reset, and keeps the connection", function()
    up:reset()
    local t = transport(up)
    assert(t:request{ url = up.url .. "/v1/models" })
    for _, f in ipairs{ "fault=reset", "fault=reset&after=request", "fault=stream_die&events=1" } do
      local res, err = t:request{ method = "POST", url = up.url .. "/v1/chat/completions",
                                  headers = { ["x-fake-fault"] = f },
                                  body = cjson.encode{ model = "gpt-fake", stream = true,
                                                       messages = { { role = "user", content = "hi" } } } }
      assert.is_nil(res, f)
      is_error(err, "reset")
      assert.matches("HTTP/2 stream", err.message)
    end
    assert.are.equal(200, assert(t:request{ url = up.url .. "/v1/models" }).status)
    t:close()
    saw(up, 5, 1)
  end)

  it("streams events over HTTP/2, and an aborted stream leaves the connection usable", function()
    up:reset()
    local t = transport(up)
    local body = cjson.encode{ model = "gpt-fake", stream = true,
                               messages = { { role = "user", content = "one two three four five" } } }
    local chunks = {}
    local res = assert(t:request{ method = "POST", url = up.url .. "/v1/chat/completions", body = body,
                                  headers = { ["x-fake-fault"] = "fault=slow&body_delay=0.02" },
                                  on_chunk = function(c) chunks[#chunks + 1] = c end })
    assert.are.equal(200, res.status)
    assert.is_true(res.streamed)
    assert.is_true(#chunks >= 4, "got " .. #chunks .. " chunks")
    local content, done = sse_content(table.concat(chunks))
    assert.are.equal("one two three four five", content)
    assert.is_true(done)

    local calls = 0
    local _, err = t:request{ method = "POST", url = up.url .. "/v1/chat/completions", body = body,
                              headers = { ["x-fake-fault"] = "fault=slow&body_delay=0.05" },
                              on_chunk = function() calls = calls + 1; return false end }
    is_error(err, "aborted")
    assert.are.equal(1, calls)
    assert.are.equal(200, assert(t:request{ url = up.url .. "/v1/models" }).status)
    t:close()
    saw(up, 3, 1)
  end)

  it("keeps the request's headers and body intact over HTTP/2", function()
    local t = transport(up)
    local body = string.rep("x", 70000) .. "\n\n" .. SECRET
    local res = assert(t:request{ method = "PUT", url = up.url .. "/echo?a=1&b=two",
                                  headers = { ["x-one"] = "1", ["X-Mixed"] = "Value" }, body = body })
    t:close()
    local got = cjson.decode(res.body)
    assert.are.equal("PUT", got.method)
    assert.are.equal("a=1&b=two", got.args)
    assert.are.equal("1", got.headers["x-one"])
    assert.are.equal("Value", got.headers["x-mixed"])
    assert.are.equal(#body, got.body_length)
    assert.are.equal(body, got.body)
  end)
end)
