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
