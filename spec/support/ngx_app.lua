-- The app that spec/ngx_spec.lua runs in real nginx (spec/support/ngx_app.conf):
-- shared breakers made in init_by_lua, one location per breaker that calls
-- the fake upstream through a policy and the thread-pool transport, a stats
-- location, and a control location that calls curl in the worker itself
-- (blocking the event loop) to show what the thread pool avoids.
--
--   GET /call/<breaker>    POST /v1/chat/completions upstream; the request's
--                          x-fake-fault header goes along. 200 + the upstream
--                          body, or 503 + {kind, message, status, retry_after}
--   GET /blocking          the same call with breaker.curl in the worker
--   GET /stats             bngx.stats() + init_at + region info
--   GET /count             counters of the shared dict `test`
--   GET /transport/<case>  one check of breaker.ngx's transport (see `cases`)
--
-- Every answer carries X-Worker (ngx.worker.id()) and X-Worker-Pid.

local _M = {}

local cjson = require "cjson"

-- Breakers of the specs, by name. None of them shares a config with another.
local BREAKERS = {
  -- never trips: counts only
  count = { window_size = 100, minimum_calls = 100, failure_rate_threshold = false,
            consecutive_failures = false },
  -- trips on 2 failures; after 1 s, 3 probes
  halfopen = { consecutive_failures = 2, open_duration = 1, half_open_calls = 3,
               failure_rate_threshold = false, probe_timeout = 30 },
  -- trips on 3 failures, stays open a minute
  trip = { consecutive_failures = 3, open_duration = 60, failure_rate_threshold = false },
  -- for the reload spec
  reload = { consecutive_failures = 2, open_duration = 120, failure_rate_threshold = false },
  -- one probe whose permit expires after 2 s
  probe = { consecutive_failures = 2, open_duration = 0.5, half_open_calls = 1,
            probe_timeout = 2, failure_rate_threshold = false },
  -- the slow-upstream spec (never trips)
  slow = { failure_rate_threshold = false, consecutive_failures = false },
}

local policies = {}
local conf = {}

-- init_by_lua: the region (found again on reload), the breakers, the policies.
function _M.init(opts)
  local breaker = require "breaker"
  local shared = require "breaker.shared"
  local bngx = require "breaker.ngx"
  conf.upstream = opts.upstream
  conf.key = opts.key or "sk-test-good"
  conf.init_at = ngx.now()
  conf.region = shared.new(opts.region, { capacity = 16, max_window = 128 })
  for name, cfg in pairs(BREAKERS) do
    -- the reload spec changes a config (see ngx_spec.lua)
    if opts.mismatch and name == "count" then cfg = { window_size = 99 } end
    local b = breaker.new(name, cfg, { shared = conf.region })
    policies[name] = bngx.policy{ breaker = b }
  end
  conf.transport = bngx.transport{ pool = "breaker", timeout = 10, connect_timeout = 2 }
end

local function mark()
  ngx.header["X-Worker"] = tostring(ngx.worker.id())
  ngx.header["X-Worker-Pid"] = tostring(ngx.worker.pid())
end

local function chat_request()
  return {
    method = "POST",
    url = conf.upstream .. "/v1/chat/completions",
    headers = {
      ["authorization"] = "Bearer " .. conf.key,
      ["content-type"] = "application/json",
      ["x-fake-fault"] = ngx.var.http_x_fake_fault,
    },
    body = '{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}]}',
  }
end

local function reply(name, res, err)
  local dict = ngx.shared.test
  if res then
    dict:incr("ok:" .. name, 1, 0)
    ngx.status = res.status
    ngx.header["Content-Type"] = "application/json"
    ngx.print(res.body)
    return
  end
  dict:incr("err:" .. name, 1, 0)
  ngx.status = 503
  ngx.header["Content-Type"] = "application/json"
  ngx.header["X-Kind"] = err.kind
  ngx.print(cjson.encode({ kind = err.kind, message = err.message, status = err.status,
                           retry_after = err.retry_after }))
end

local handlers = {}

function handlers.call(name)
  local p = policies[name]
  if not p then return ngx.exit(404) end
  -- Who asked last (the spec that kills a worker mid-probe reads it).
  ngx.shared.test:set("holder:" .. name, ngx.worker.pid())
  ngx.shared.test:incr("served:" .. ngx.worker.id(), 1, 0)
  return reply(name, p:request(conf.transport, chat_request()))
end

-- Control: the same call, with breaker.curl run by the worker itself.
function handlers.blocking()
  local t = conf.blocking
  if not t then
    t = require("breaker.curl").new{ timeout = 10 }
    conf.blocking = t
  end
  return reply("blocking", t:request(chat_request()))
end

-- A minimal transport on cosockets (HTTP/1.1, Connection: close): the
-- plug-in interface of breaker.ngx, t:request(req) -> res | nil, err.
local cosocket = {}

function cosocket.request(_, req)
  local errors = require "breaker.error"
  local host, port, path = req.url:match("^http://([^:/]+):(%d+)(.*)$")
  local sock = ngx.socket.tcp()
  sock:settimeout((req.timeout or 10) * 1000)
  local ok, err = sock:connect(host, tonumber(port))
  if not ok then return nil, errors.new(err == "timeout" and "timeout" or "connect", err) end
  local lines = { (req.method or "GET") .. " " .. (path ~= "" and path or "/") .. " HTTP/1.1",
                  "Host: " .. host, "Connection: close", "Content-Length: " .. #(req.body or "") }
  for k, v in pairs(req.headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  ok, err = sock:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (req.body or ""))
  if not ok then return nil, errors.new(err == "timeout" and "timeout" or "reset", err) end
  local data, rerr, partial = sock:receive("*a")
  sock:close()
  data = data or partial
  if rerr then return nil, errors.new(rerr == "timeout" and "timeout" or "reset", rerr) end
  local head, body = data:match("^(.-)\r\n\r\n(.*)$")
  local status = head and tonumber(head:match("^HTTP/1%.%d (%d%d%d)"))
  if not status then return nil, errors.new("protocol", "no HTTP status line") end
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  return { status = status, headers = headers, body = body, timing = {} }
end

-- /transport/<case>: breaker.ngx's transport and plug-in interface, as JSON.
local cases = {}

function cases.buffer()
  local bngx = require "breaker.ngx"
  local t = bngx.transport{ on_chunk = "buffer", timeout = 10 }
  local req = chat_request()
  req.body = '{"model":"gpt-fake","stream":true,"messages":[{"role":"user","content":"a b c"}]}'
  local chunks = {}
  req.on_chunk = function(c) chunks[#chunks + 1] = c end
  local res, err = t:request(req)
  return { status = res and res.status, streamed = res and res.streamed, body = res and res.body,
           chunks = #chunks, data = table.concat(chunks), err = err and tostring(err) }
end

function cases.many()
  local t = require("breaker.ngx").transport{ timeout = 10 }
  local out = t:request_many{ chat_request(), { url = "http://127.0.0.1:" .. ngx.var.arg_port .. "/" } }
  return { first = out[1].res and out[1].res.status, second = out[2].err and out[2].err.kind,
           second_is_error = require("breaker.error").is(out[2].err) }
end

-- breaker.llm over the thread-pool transport: chat, and a stream (buffered).
function cases.llm()
  local llm = require "breaker.llm"
  local client = llm.new{ base_url = conf.upstream .. "/v1", model = "gpt-fake", api_key = conf.key,
                          name = "llm-spec",
                          transport = require("breaker.ngx").transport{ on_chunk = "buffer" } }
  local res, err = client:chat{ messages = { { role = "user", content = "one two" } } }
  local deltas = {}
  local sres, serr = client:chat_stream{ messages = { { role = "user", content = "three four" } },
                                         on_delta = function(text) deltas[#deltas + 1] = text end }
  return { chat = res and res.choices[1].message.content, chat_err = err and tostring(err),
           stream = sres and sres.choices[1].message.content, stream_err = serr and tostring(serr),
           deltas = table.concat(deltas, "|") }
end

function cases.on_chunk_refused()
  local t = require("breaker.ngx").transport()
  local req = chat_request()
  req.on_chunk = function() end
  local ok, err = pcall(t.request, t, req)
  return { ok = ok, err = tostring(err) }
end

function cases.no_pool()
  local t = require("breaker.ngx").transport{ pool = "nope" }
  local ok, err = pcall(t.request, t, chat_request())
  return { ok = ok, err = tostring(err) }
end

function cases.refused()
  local t = require("breaker.ngx").transport{ connect_timeout = 2 }
  local res, err = t:request{ url = "http://127.0.0.1:" .. ngx.var.arg_port .. "/" }
  return { res = res ~= nil, kind = err and err.kind, text = tostring(err),
           is_error = require("breaker.error").is(err) }
end

function cases.cosocket()
  local p = require("breaker.ngx").policy{ breaker = require("breaker").get("slow") }
  local res, err = p:request(cosocket, chat_request())
  return { status = res and res.status, body = res and res.body, err = err and tostring(err),
           attempts = p.last.attempts }
end

function cases.timer()
  local dict = ngx.shared.test
  dict:delete("timer")
  local req = chat_request() -- ngx.var is not available in a timer
  local ok, terr = ngx.timer.at(0, function(premature)
    if premature then return end
    local res, err = conf.transport:request(req)
    dict:set("timer", res and res.status or tostring(err))
  end)
  if not ok then return { err = terr } end
  for _ = 1, 500 do
    local v = dict:get("timer")
    if v then return { status = v } end
    ngx.sleep(0.01)
  end
  return { err = "the timer gave no result in 5 s" }
end

function cases.sleep()
  local bngx = require "breaker.ngx"
  local t0 = ngx.now()
  bngx.sleep(0.2)
  ngx.update_time()
  return { slept = ngx.now() - t0 }
end

-- A call that never comes back: a light thread killed while its policy
-- call sleeps, twice, over a bulkhead of two; then a call must get a slot.
local hedge_policy
function cases.killed_calls()
  hedge_policy = hedge_policy or require("breaker.ngx").policy{ bulkhead = { max_concurrent = 2 } }
  local p = hedge_policy
  local held = {}
  for i = 1, 2 do
    local th = ngx.thread.spawn(function() return p:call(function() ngx.sleep(5); return "slow" end) end)
    ngx.sleep(0.01)
    ngx.thread.kill(th)
    held[i] = p.bulkhead:in_flight()
  end
  local ok, err = p:call(function() return "ok" end)
  return { held = held, ok = ok, err = err and tostring(err), after = p.bulkhead:in_flight() }
end

function handlers.transport(case)
  local c = cases[case]
  if not c then return ngx.exit(404) end
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode(c()))
end

function handlers.stats()
  local out = require("breaker.ngx").stats()
  out.init_at = conf.init_at
  out.region = conf.region:info()
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode(out))
end

function handlers.count()
  local dict = ngx.shared.test
  local out = {}
  for _, k in ipairs(dict:get_keys(0)) do out[k] = dict:get(k) end
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode(out))
end

-- content_by_lua: routes by the first path segment.
function _M.handle()
  mark()
  local what, arg = ngx.var.uri:match("^/([%w_]+)/?([%w_]*)$")
  local h = what and handlers[what]
  if not h then return ngx.exit(404) end
  return h(arg)
end

return _M
