-- make valgrind: exercises the libcurl transport (breaker.curl) against the
-- fake upstream under valgrind: responses, transport errors, streaming and
-- its aborts, request_many, too_large, close and GC. Any definite leak or
-- memory error fails. The upstream is stopped whatever happens.
local curl = require "breaker.curl"
local helper = require "helper"

local KEY = "sk-test-good"
local up = helper.upstream.start{ api_key = KEY }

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

local ok, err = pcall(run)
up:stop()
collectgarbage(); collectgarbage()
assert(ok, err)
print("done")
