-- make valgrind: exercises the libcurl transport (breaker.curl) against the
-- fake upstream under valgrind: responses, transport errors, streaming and
-- its aborts, request_many, too_large, pooled requests reused across
-- methods and sizes, HTTP/2 over https, close and GC. Any definite leak or
-- memory error fails. The upstreams are stopped whatever happens.
local curl = require "breaker.curl"
local helper = require "helper"
local cjson = require "cjson"

local KEY = "sk-test-good"
local up = helper.upstream.start{ api_key = KEY }
local tls = helper.upstream.start{ api_key = false, tls = true }

-- Pooled requests keep their curl handle, buffers (up to 16 KiB each), URL
-- copy and header block: reuse them across methods, growing and shrinking
-- headers, bodies and URLs, errors, and batches larger than the pool.
local function pooled(url)
  local t = curl.new{ timeout = 5 }
  local function echo(req)
    req.url = req.url or url .. "/echo"
    local res = assert(t:request(req))
    return req.method == "HEAD" and res or cjson.decode(res.body)
  end
  local big_headers = {}
  for i = 1, 40 do big_headers["x-h" .. i] = ("v"):rep(500) end   -- 20 KB of headers
  local steps = {
    { method = "PUT", body = ("b"):rep(70000), headers = big_headers },
    {}, { method = "HEAD" }, { body = "p" }, { method = "DELETE" },
    { method = "OPTIONS", headers = { ["x-a"] = "1" } }, {},
  }
  for round = 1, 3 do
    for i, req in ipairs(steps) do
      local want = req.method or (req.body and "POST" or "GET")
      local e = echo{ method = req.method, url = req.url, body = req.body, headers = req.headers }
      if want ~= "HEAD" then
        assert(e.method == want, ("round %d step %d: %s, not %s"):format(round, i, e.method, want))
        assert(e.body_length == (req.body and #req.body or 0))
      end
    end
    -- a URL over 16 KiB (nginx refuses it: 414), so its copy is not kept
    assert(assert(t:request{ url = url .. "/echo?" .. ("q"):rep(20000) }).status == 414)
    local r = assert(t:request{ url = url .. "/x", headers = { ["x-fake-fault"] = "fault=oversize&size=100000" } })
    assert(#r.body == 100000)                                       -- then trimmed back
    local many = {}
    for i = 1, 100 do                                               -- more than the 64 kept
      many[i] = { url = url .. "/echo", method = i % 3 == 0 and "PUT" or nil,
                  body = i % 3 == 0 and ("m"):rep(i) or nil }
    end
    for i, o in ipairs(t:request_many(many)) do
      assert(cjson.decode(o.res.body).body_length == (i % 3 == 0 and i or 0))
    end
  end
  t:close()
end

local function run()
  local url = up.url
  local auth = { authorization = "Bearer " .. KEY }
  local chat = '{"model":"gpt-fake","stream":true,"messages":[{"role":"user","content":"a b c d"}]}'
  local t = curl.new{ timeout = 5 }

  for i = 1, 20 do
    assert(t:request{ url = url .. "/echo", method = "PUT", body = ("x"):rep(i * 100),
                      headers = { ["x-n"] = i, ["x-empty"] = "" } })
    assert(t:request{ url = url .. "/headers" })
    assert(t:request{ url = url .. "/echo", method = "HEAD" })
  end
  -- transport errors: refused, dns, reset, timeout, too_large (both ways)
  assert(not t:request{ url = "http://127.0.0.1:" .. helper.free_port() .. "/" })
  assert(not t:request{ url = "http://nonexistent.invalid/" })
  assert(not t:request{ url = url .. "/x", headers = { ["x-fake-fault"] = "fault=reset" } })
  assert(not t:request{ url = url .. "/x", timeout = 0.2,
                        headers = { ["x-fake-fault"] = "fault=slow&delay=1" } })
  assert(not t:request{ url = url .. "/x", max_body = 10,
                        headers = { ["x-fake-fault"] = "fault=oversize&size=5000" } })
  assert(not t:request{ url = url .. "/x", max_body = 10,
                        headers = { ["x-fake-fault"] = "fault=oversize&size=5000&chunked=true" } })
  -- streaming: normal, abort by false, raise, dying stream, re-entry refused
  assert(t:request{ url = url .. "/v1/chat/completions", headers = auth, body = chat,
                    on_chunk = function() end })
  assert(not t:request{ url = url .. "/v1/chat/completions", headers = auth, body = chat,
                        on_chunk = function() return false end })
  assert(not pcall(t.request, t, { url = url .. "/v1/chat/completions", headers = auth,
                                   body = chat, on_chunk = function() error("boom") end }))
  assert(not pcall(t.request, t, { url = url .. "/v1/chat/completions", headers = auth,
                                   body = chat, on_chunk = function() collectgarbage(); error({}) end }))
  assert(not pcall(t.request, t, { url = url .. "/v1/chat/completions", headers = auth,
                                   body = chat, on_chunk = function() t:request{ url = url } end }))
  assert(not t:request{ url = url .. "/v1/chat/completions", body = chat, headers = {
    authorization = auth.authorization, ["x-fake-fault"] = "fault=stream_die&events=2" },
    on_chunk = function() end })
  -- request_many: mixed results, streams, a raise, empty, bad input
  local many = {}
  for i = 1, 8 do
    many[i] = i % 3 == 0 and { url = "http://127.0.0.1:" .. helper.free_port() .. "/" }
      or { url = url .. "/v1/chat/completions", headers = auth, body = chat,
           on_chunk = i % 2 == 0 and function() end or nil }
  end
  assert(#t:request_many(many) == 8)
  assert(#t:request_many{} == 0)
  assert(#curl.new():request_many{} == 0)
  many[1].on_chunk = function() error("boom") end
  assert(not pcall(t.request_many, t, many))
  assert(not pcall(t.request_many, t, { { url = url }, { url = url, body = 5 } }))
  assert(not pcall(t.request, t, { url = url, headers = { ["x"] = "a\r\nb" } }))
  -- parsing helpers
  curl.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 0)
  curl.parse_retry_after("120")
  curl.parse_retry_after_ms("1500.5")
  -- close, double close, GC with idle connections and pooled handles
  t:close(); t:close()
  for _ = 1, 10 do
    local tt = curl.new{ max_connections = 2 }
    assert(tt:request{ url = url .. "/echo" })
  end
  pcall(curl.new, { timeout = -1 })
  collectgarbage(); collectgarbage()
end

local ok, err = pcall(function()
  run()
  pooled(up.url)
  -- HTTP/2 over https: one shared connection, a reset stream, an abort
  local t = curl.new{ timeout = 5, ca_file = tls.ca_file }
  local batch = {}
  for i = 1, 20 do batch[i] = { url = tls.url .. "/echo?i=" .. i } end
  for _, o in ipairs(t:request_many(batch)) do assert(o.res.status == 200) end
  assert(not t:request{ url = tls.url .. "/x", headers = { ["x-fake-fault"] = "fault=reset" } })
  assert(not t:request{ url = tls.url .. "/x", headers = { ["x-fake-fault"] = "fault=oversize&size=100000" },
                        on_chunk = function() return false end })
  assert(t:request{ url = tls.url .. "/echo" })
  t:close()
end)
up:stop()
tls:stop()
collectgarbage(); collectgarbage()
assert(ok, err)
print("done")
