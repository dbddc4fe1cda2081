-- Specs for breaker.cosocket: the transport runs inside a real nginx (the app
-- spec/support/cosocket_app.lua) against the fake upstream, plain and TLS.
-- Every server started here is stopped by its pid in a teardown.
local helper = require "helper"
local curl = require "breaker.curl"
local cjson = require "cjson"

local concat, format = table.concat, string.format

local repo = helper.repo_dir()
local LUA_PATH, LUA_CPATH = helper.nginx.lua_paths()

local CONF = [[
load_module /usr/share/nginx/modules/ndk_http_module.so;
load_module /usr/share/nginx/modules/ngx_http_lua_module.so;
%s
worker_processes 1;
pid %s/logs/nginx.pid;
error_log %s/logs/error.log info;
events { worker_connections 256; }
http {
  access_log off;
  default_type application/json;
  client_body_temp_path %s/tmp/client_body;
  proxy_temp_path %s/tmp/proxy;
  fastcgi_temp_path %s/tmp/fastcgi;
  uwsgi_temp_path %s/tmp/uwsgi;
  scgi_temp_path %s/tmp/scgi;
  client_body_buffer_size 1m;
  lua_package_path '%s';
  lua_package_cpath '%s';
  lua_ssl_trusted_certificate %s;
  lua_ssl_verify_depth 2;
  lua_socket_log_errors off;
  server {
    listen 127.0.0.1:%d;
    location = /do { content_by_lua_block { require("cosocket_app").run() } }
    location = /stream { content_by_lua_block { require("cosocket_app").stream() } }
    location = /llm { content_by_lua_block { require("cosocket_app").llm() } }
  }
}
]]

-- Percent-encodes a URL for a query string.
local function url_escape(s)
  return (s:gsub("[^%w%-_.~]", function(c) return format("%%%02X", c:byte()) end))
end

describe("breaker.cosocket in nginx", function()
  local up, tls, app, client, raw

  lazy_setup(function()
    up = helper.upstream.start{ api_key = false }
    tls = helper.upstream.start{ api_key = false, tls = true }
    local is_root = io.popen(helper.clean_env .. "id -u"):read("*l") == "0"
    app = helper.nginx.start{
      name = "cosocket-app",
      render = function(port, prefix)
        return format(CONF, is_root and "user root;" or "", prefix, prefix, prefix, prefix, prefix, prefix,
                      prefix, LUA_PATH, LUA_CPATH, tls.ca_file:sub(1, 1) == "/" and tls.ca_file
                      or repo .. "/" .. tls.ca_file, port)
      end,
    }
    client = curl.new{ timeout = 20 }
    -- the misbehaving server, in its own process, stopped by its pid
    raw = helper.raw_upstream()
  end)

  lazy_teardown(function()
    if raw then raw.stop() end
    if client then client:close() end
    if app then app:stop() end
    if up then up:stop() end
    if tls then tls:stop() end
  end)

  before_each(function()
    up:reset()
  end)

  -- Has the app run spec (see cosocket_app.lua); returns its JSON answer.
  local function run(spec)
    local res = assert(client:request{ method = "POST", url = app.url .. "/do", body = cjson.encode(spec) })
    assert.are.equal(200, res.status, res.body)
    return cjson.decode(res.body)
  end

  it("answers a request with breaker.curl's response shape", function()
    local out = run{ req = { method = "POST", url = up.url .. "/echo?a=1", body = "hello",
                             headers = { ["x-one"] = "1", ["Content-Type"] = "text/plain" } } }
    assert.is_nil(out.err)
    local res = out.res
    assert.are.equal(200, res.status)
    assert.are.equal("application/json", res.headers["content-type"])
    local e = cjson.decode(res.body)
    assert.are.same({ "POST", "a=1", "hello", "1", "text/plain" },
                    { e.method, e.args, e.body, e.headers["x-one"], e.headers["content-type"] })
    assert.matches("^breaker/[%d.]+ cosocket$", e.headers["user-agent"])
    assert.are.equal("127.0.0.1:" .. up.port, e.headers["host"])
    for _, k in ipairs{ "connect", "first_byte", "total" } do
      assert.is_number(res.timing[k])
    end
    assert.is_true(res.timing.connect <= res.timing.first_byte and res.timing.first_byte <= res.timing.total)
    -- a long timeout is more than a socket timeout can hold: capped, not raised
    assert.are.equal(200, run{ req = { url = up.url .. "/echo", timeout = 1e7 } }.res.status)
  end)

  it("joins repeated headers and keeps set-cookie as a list", function()
    local res = run{ req = { url = up.url .. "/headers" } }.res
    assert.are.equal("one, two", res.headers["x-multi"])
    assert.are.same({ "a=1; Path=/", "b=2; Path=/" }, res.headers["set-cookie"])
    assert.are.equal("Value", res.headers["x-mixed-case"])
  end)

  it("reads bodies of any framing and size, and HEAD answers without one", function()
    for _, chunked in ipairs{ "false", "true" } do
      local res = run{ req = { url = up.url .. "/x", headers = {
        ["x-fake-fault"] = "fault=oversize&size=200000&chunked=" .. chunked } } }.res
      assert.are.equal(200000, #res.body)
      assert.is_nil(res.body:find("[^x]"))
    end
    local head = run{ req = { method = "HEAD", url = up.url .. "/echo" } }.res
    assert.are.equal(200, head.status)
    assert.are.equal("", head.body)
    -- the connection that answered HEAD serves the next request
    assert.are.equal("GET", cjson.decode(run{ req = { url = up.url .. "/echo" } }.res.body).method)
    assert.are.equal(1, up:stats().connections)
  end)

  it("keeps the connection alive across requests", function()
    for _ = 1, 10 do
      assert.are.equal(200, run{ req = { url = up.url .. "/echo" } }.res.status)
    end
    local s = up:stats()
    assert.are.equal(10, s.requests)
    assert.are.equal(1, s.connections)
  end)

  it("streams a 2xx body through nginx to its client as it arrives", function()
    local chunks = {}
    local res = assert(client:request{
      url = app.url .. "/stream?url=" .. url_escape(up.url .. "/v1/chat/completions"),
      headers = { ["x-fake-fault"] = "fault=slow&body_delay=0.05" },
      on_chunk = function(c) chunks[#chunks + 1] = c end })
    assert.are.equal(200, res.status)
    assert.is_true(#chunks >= 4, "got " .. #chunks .. " chunks")   -- 8 events, 50 ms apart
    local text = concat(chunks)
    local content = {}
    for data in text:gmatch("data: ([^\n]*)\n\n") do
      if data ~= "[DONE]" then content[#content + 1] = cjson.decode(data).choices[1].delta.content or "" end
    end
    assert.are.equal("one two three four five", concat(content))
    assert.matches("data: %[DONE%]", text)
  end)

  it("carries breaker.llm's chat_stream to nginx's client, retrying a stream that died", function()
    up:scenario{ { fault = "stream_die", events = 1 } }   -- the first attempt dies early
    local chunks = {}
    local res = assert(client:request{
      url = app.url .. "/llm?base=" .. url_escape(up.url .. "/v1"),
      on_chunk = function(c) chunks[#chunks + 1] = c end })
    assert.are.equal(200, res.status)
    local text = concat(chunks)
    local deltas = {}
    for d in text:gmatch("delta: ([^\n]*)\n") do deltas[#deltas + 1] = d end
    assert.are.equal("one two three four five", concat(deltas, ""):gsub("%s+$", ""), text)
    assert.matches("attempts: 2", text)
    assert.are.equal(2, up:stats().requests)
  end)

  it("hands a streamed body to on_chunk, aborts on false, and passes on what it raises", function()
    local chat = cjson.encode{ model = "m", stream = true, messages = { { role = "user", content = "a b c" } } }
    local out = run{ req = { url = up.url .. "/v1/chat/completions", body = chat }, on_chunk = "collect" }
    assert.is_true(out.res.streamed)
    assert.are.equal("", out.res.body)
    assert.is_true(out.chunks >= 1)
    out = run{ req = { url = up.url .. "/v1/chat/completions", body = chat,
                       headers = { ["x-fake-fault"] = "fault=slow&body_delay=0.05" } }, on_chunk = "abort" }
    assert.are.equal("aborted", out.err.kind)
    assert.are.equal(1, out.chunks)
    out = run{ req = { url = up.url .. "/v1/chat/completions", body = chat }, on_chunk = "raise" }
    assert.matches("raised in on_chunk", out.raised)
    -- a non-2xx body is not streamed
    out = run{ req = { url = up.url .. "/v1/models", headers = { ["x-fake-fault"] = "fault=503" } },
               on_chunk = "collect" }
    assert.are.equal(503, out.res.status)
    assert.are.equal(0, out.chunks)
    assert.matches("error", out.res.body)
  end)

  it("reports each failure to get a response with its kind", function()
    local function kind(req, opts)
      local out = run{ req = req, opts = opts }
      assert.is_nil(out.res, cjson.encode(out))
      return out.err.kind, out.err.message
    end
    assert.are.equal("connect", (kind{ url = "http://127.0.0.1:" .. helper.free_port() .. "/" }))
    assert.are.equal("dns", (kind{ url = "http://nonexistent.invalid/" }))
    assert.are.equal("reset", (kind{ url = up.url .. "/x", headers = { ["x-fake-fault"] = "fault=reset" } }))
    assert.are.equal("timeout", (kind{ url = up.url .. "/x", timeout = 0.2,
                                       headers = { ["x-fake-fault"] = "fault=slow&delay=1" } }))
    assert.are.equal("too_large", (kind{ url = up.url .. "/x", max_body = 100,
                                         headers = { ["x-fake-fault"] = "fault=oversize&size=5000" } }))
    assert.are.equal("too_large", (kind({ url = up.url .. "/x",
                                          headers = { ["x-fake-fault"] = "fault=oversize&size=5000&chunked=true" } },
                                        { max_body = 100 })))
    -- and the transport still works afterwards
    assert.are.equal(200, run{ req = { url = up.url .. "/echo" } }.res.status)
  end)

  it("verifies https against nginx's trusted certificates, unless told not to", function()
    local name = "https://localhost:" .. tls.port .. "/echo"
    local out = run{ req = { url = name }, opts = { resolve = { localhost = "127.0.0.1" } } }
    assert.are.equal(200, out.res.status, cjson.encode(out))
    -- the certificate names localhost only
    out = run{ req = { url = "https://127.0.0.1:" .. tls.port .. "/echo" } }
    assert.are.equal("tls", out.err and out.err.kind, cjson.encode(out))
    out = run{ req = { url = "https://127.0.0.1:" .. tls.port .. "/echo" },
               opts = { insecure_skip_verify = true } }
    assert.are.equal(200, out.res.status)
  end)

  it("runs request_many in parallel and answers in order", function()
    local many = {}
    for i = 1, 6 do
      many[i] = { url = up.url .. "/echo?i=" .. i, headers = { ["x-fake-fault"] = "fault=slow&delay=0.3" } }
    end
    many[7] = { url = "http://127.0.0.1:" .. helper.free_port() .. "/" }
    local out = run{ many = many }.many
    for i = 1, 6 do assert.are.equal("i=" .. i, cjson.decode(out[i].res.body).args) end
    assert.are.equal("connect", out[7].err.kind)
    assert.are.equal(6, up:stats().connections)   -- in parallel, not one after another
  end)

  -- What the raw server saw: { connections = n, requests = { [path] = n } }.
  local function raw_stats()
    return cjson.decode(assert(client:request{ url = raw.url .. "/stats" }).body)
  end

  describe("against a server that breaks HTTP/1.1", function()
    local function get(path, opts, timeout)
      return run{ req = { url = raw.url .. path, timeout = timeout }, opts = opts }
    end

    it("answers protocol, never raising, for replies it cannot read", function()
      for _, path in ipairs{ "/bad_chunk", "/chunk_0x", "/no_colon", "/status_2000", "/status_099", "/many_interim",
                             "/garbage", "/lengths_differ",
                             "/te_xchunked", "/upgrade_101" } do
        local out = get(path)
        assert.is_nil(out.raised, path)
        assert.are.equal("protocol", out.err and out.err.kind, path .. ": " .. cjson.encode(out))
      end
    end)

    it("reads chunk extensions, trailers, many chunks and a repeated equal Content-Length", function()
      assert.are.equal("hello world", get("/chunk_ext").res.body)
      assert.are.equal("hello", get("/chunk_16_digits").res.body)
      assert.are.equal(100000, #get("/many_chunks").res.body)
      assert.are.equal("hello", get("/two_lengths").res.body)
      local tr = get("/trailers").res  -- trailers stay out of the headers, as with breaker.curl
      assert.are.same({ "hi", "head" }, { tr.body, tr.headers["x-a"] })
      assert.is_nil(tr.headers["x-t"])
    end)

    it("joins a value folded over 20k lines, and 40k repeats of a header", function()
      assert.are.equal("a" .. (" b"):rep(20000), get("/folded_flood").res.headers.x)
      assert.are.equal(("a, "):rep(39999) .. "a", get("/header_flood").res.headers.x)
    end)

    it("never reuses a connection after a suspect answer", function()
      assert.are.equal("fine", get("/ok").res.body)   -- a kept-alive connection
      local before = raw_stats().connections
      for _, path in ipairs{ "/length_and_chunked", "/ok", "/length_short", "/ok" } do
        local body = get(path).res.body
        assert.are.equal(path == "/ok" and "fine" or "hello", body, path)
      end
      -- each suspect answer closes its connection: the /ok after it opens one
      assert.are.equal(before + 2, raw_stats().connections)
    end)

    it("keeps its deadline against a server that trickles its head, and bounds a header line", function()
      assert.are.equal("timeout", get("/trickle_head", nil, 0.5).err.kind)
      assert.are.equal("too_large", get("/huge_line").err.kind)
    end)

    it("sends once more when a kept-alive connection was closed, never after part of an answer", function()
      local before = raw_stats()
      local function count(stats, path) return stats.requests[path] or 0 end
      for _, path in ipairs{ "/ok", "/ok_then_close", "/ok" } do
        assert.are.equal("fine", get(path).res.body, path)
      end
      local after = raw_stats()
      -- the last /ok found its pooled connection closed and went again on a new one
      assert.are.equal(count(before, "/ok") + 2, count(after, "/ok"))
      assert.are.equal(before.connections + 2, after.connections)
      -- reset (RST) instead of closed: the same. /ok_then_rst resets a
      -- connection's second request; both calls below find a kept-alive
      -- connection (the one the resend above opened, then the one the first
      -- call's resend opened), get the reset, and go again on a new one.
      before = raw_stats()
      assert.are.equal("fine", get("/ok_then_rst").res.body)
      assert.are.equal("fine", get("/ok_then_rst").res.body)
      after = raw_stats()
      assert.are.equal(count(before, "/ok_then_rst") + 4, count(after, "/ok_then_rst"))
      -- the status line arrived, then the connection closed: not sent again
      assert.are.equal("reset", get("/status_then_close").err.kind)
      assert.are.equal(count(before, "/status_then_close") + 1, count(raw_stats(), "/status_then_close"))
    end)
  end)

  it("raises on bad input, naming it, and sends nothing", function()
    local cases = {
      { { url = "ftp://x/" }, "http:// or https://" },
      { { url = up.url, tiemout = 1 }, "unknown key 'tiemout'" },
      { { url = up.url, headers = { ["x-a"] = "v\r\nx-injected: 1" } }, "contains CR, LF or NUL" },
      { { url = up.url, headers = { ["bad name"] = "1" } }, "invalid header name" },
      { { url = up.url, method = "GET /x HTTP/1.1\r\n" }, "method" },
      { { url = up.url, body = 5 }, "body must be a string" },
      { { url = up.url, timeout = -1 }, "timeout" },
      { { url = up.url, headers = { ["content-length"] = "1" } }, "set by the transport" },
    }
    for _, c in ipairs(cases) do
      local out = run{ req = c[1] }
      assert.is_string(out.raised, cjson.encode(c[1]))
      assert.is_truthy(out.raised:find(c[2], 1, true), out.raised .. " lacks " .. c[2])
      -- at the caller's line, not inside the transport
      assert.matches("cosocket_app%.lua:%d+: breaker%.cosocket: ", out.raised)
    end
    assert.matches("unknown option 'bogus'", run{ req = { url = up.url }, opts = { bogus = 1 } }.raised)
    assert.are.equal(0, up:stats().requests)
  end)
end)
