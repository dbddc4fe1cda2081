-- End-to-end specs of breaker.policy: the real libcurl transport against the
-- fake upstream (spec/support). Backoff sleeps are recorded instead of slept
-- wherever the server does not enforce time; the fake upstream's counters
-- prove what reached it.
local helper = require "helper"
local breaker = require "breaker"
local policy = require "breaker.policy"
local curl = require "breaker.curl"

local KEY = "sk-test-good"

local id = 0
local function bname()
  id = id + 1
  return "policy-e2e-" .. id
end

describe("breaker.policy end to end", function()
  local up, t, sleeps

  local function recorded(s) sleeps[#sleeps + 1] = s end

  local function P(spec)
    if spec.sleep == nil then spec.sleep = recorded end
    return policy.new(spec)
  end

  local function models(key)
    return { method = "GET", url = up.url .. "/v1/models", timeout = 5,
             headers = { authorization = "Bearer " .. (key or KEY) } }
  end

  local function chat(text)
    return { method = "POST", url = up.url .. "/v1/chat/completions", timeout = 5,
             headers = { authorization = "Bearer " .. KEY, ["content-type"] = "application/json" },
             body = '{"model":"gpt-fake","messages":[{"role":"user","content":"' .. text .. '"}]}' }
  end

  setup(function()
    up = helper.upstream.start{ workers = 1, api_key = KEY }
    t = curl.new{}
  end)

  teardown(function()
    if up then up:stop() end
  end)

  before_each(function()
    up:reset()
    sleeps = {}
  end)

  after_each(function()
    if breaker.clock.frozen() then breaker.clock.unfreeze() end
  end)

  it("rides out a 429 storm with Retry-After in seconds, as an HTTP-date and in ms", function()
    up:scenario{
      { fault = "429", retry_after = 3 },
      { fault = "429", retry_after_date = 2 },
      { fault = "429", retry_after_ms = 250 },
      { fault = "ok" },
    }
    local p = P{ breaker = { name = bname(), consecutive_failures = 10 }, retry = { max_attempts = 4 } }
    local res, err = p:request(t, models())
    assert.is_nil(err)
    assert.equal(200, res.status)
    assert.equal(4, up:stats().requests)
    assert.equal(3, #sleeps)
    assert.equal(3, sleeps[1])
    -- a date 2 s ahead in whole seconds, measured from the precise clock
    assert.is_true(sleeps[2] > 0.9 and sleeps[2] <= 2, "HTTP-date delay " .. tostring(sleeps[2]))
    assert.near(0.25, sleeps[3], 1e-9)
    assert.same({ 4, "success" }, { p.last.attempts, p.last.outcome })
    assert.near(sleeps[1] + sleeps[2] + sleeps[3], p.last.wait, 1e-9)
  end)

  it("returns the 429 with its Retry-After when the storm outlasts the attempts", function()
    up:scenario{ { fault = "429", retry_after = 1, times = 10 } }
    local p = P{ retry = { max_attempts = 3 } }
    local res, err = p:request(t, chat("hello"))
    assert.is_nil(res)
    assert.same({ "rate_limited", 429, 1, 3 }, { err.kind, err.status, err.retry_after, err.attempts })
    assert.equal("rate_limit_exceeded", err.code)
    assert.equal(429, err.response.status)
    assert.equal(3, up:stats().requests)
  end)

  it("opens the breaker in an outage and stops calling the upstream", function()
    up:scenario{ { fault = "503", times = 1000 } }
    local b = breaker.new(bname(), { consecutive_failures = 3, open_duration = 30 })
    local p = P{ breaker = b, retry = { max_attempts = 2 }, fallback = { value = "fallback", on = { "breaker_open" } } }
    local first_err
    local _, e = p:request(t, models())
    first_err = e
    assert.equal(503, first_err.status)
    assert.equal(2, up:stats().requests)
    _, e = p:request(t, models()) -- the third failure opens it
    assert.equal(503, e.status)
    assert.equal("breaker_open", p.last.stop)
    assert.equal("open", b:state())
    for _ = 1, 20 do
      local v = p:request(t, models())
      assert.equal("fallback", v)
      assert.same({ "value", "breaker_open", 0 }, { p.last.fallback, p.last.reason, p.last.attempts })
    end
    assert.equal(3, up:stats().requests)
  end)

  it("recovers through half-open once the upstream is back", function()
    breaker.clock.freeze()
    local b = breaker.new(bname(), { consecutive_failures = 2, open_duration = 10, half_open_calls = 1 })
    local p = P{ breaker = b, sleep = function(s) recorded(s); breaker.clock.advance(s) end }
    up:scenario{ { fault = "500", times = 2 } }
    p:request(t, models())
    p:request(t, models())
    assert.equal("open", b:state())
    local _, e = p:request(t, models())
    assert.equal("breaker_open", e.kind)
    assert.is_true(e.retry_after > 0 and e.retry_after <= 10)
    assert.equal(2, up:stats().requests)
    breaker.clock.advance(10)
    local res = p:request(t, models()) -- the probe
    assert.equal(200, res.status)
    assert.equal("closed", b:state())
    for _ = 1, 3 do assert.equal(200, p:request(t, models()).status) end
    assert.equal(6, up:stats().requests)
  end)

  it("re-opens when the half-open probe fails", function()
    breaker.clock.freeze()
    local b = breaker.new(bname(), { consecutive_failures = 1, open_duration = 10, half_open_calls = 1 })
    local p = P{ breaker = b, retry = { max_attempts = 3 } }
    up:scenario{ { fault = "503", times = 2 } }
    p:request(t, models())
    assert.equal("open", b:state())
    breaker.clock.advance(10)
    local _, e = p:request(t, models())
    assert.equal(503, e.status)
    assert.equal("open", b:state())
    assert.equal(2, up:stats().requests) -- the failed probe was not retried
  end)

  it("does not retry insufficient_quota, and counts it against the breaker", function()
    up:scenario{ { fault = "quota", times = 10 } }
    local b = breaker.new(bname(), { consecutive_failures = 2 })
    local p = P{ breaker = b, retry = { max_attempts = 5 } }
    local res, err = p:request(t, chat("hi"))
    assert.is_nil(res)
    assert.same({ "quota", 429, "insufficient_quota", 1 }, { err.kind, err.status, err.code, err.attempts })
    assert.matches("exceeded your current quota", err.message)
    assert.equal(1, up:stats().requests)
    assert.same({}, sleeps)
    p:request(t, chat("hi"))
    assert.equal("open", b:state())
  end)

  it("surfaces a wrong key as auth without tripping the breaker", function()
    local b = breaker.new(bname(), { consecutive_failures = 2 })
    local p = P{ breaker = b, retry = { max_attempts = 3 } }
    for _ = 1, 6 do
      local res, err = p:request(t, models("sk-test-wrong"))
      assert.is_nil(res)
      assert.same({ "auth", 401, "invalid_api_key" }, { err.kind, err.status, err.code })
      assert.matches("Incorrect API key provided", err.message)
      assert.not_matches("sk%-test%-wrong", tostring(err))
    end
    assert.equal(6, up:stats().requests)
    assert.equal("closed", b:state())
    assert.equal(200, p:request(t, models()).status)
  end)

  it("lets the deadline cut a long Retry-After short instead of sleeping", function()
    up:scenario{ { fault = "429", retry_after = 30, times = 5 } }
    local p = policy.new{ retry = { max_attempts = 5 }, deadline = 5 } -- the real sleep
    local t0 = helper.now()
    local res, err = p:request(t, models())
    local took = helper.now() - t0
    assert.is_nil(res)
    assert.same({ "rate_limited", 30, 1 }, { err.kind, err.retry_after, err.attempts })
    assert.equal("deadline", p.last.stop)
    assert.is_true(took < 2, "took " .. took .. " s")
    assert.equal(1, up:stats().requests)
  end)

  it("cuts a slow attempt's timeout to the deadline", function()
    up:scenario{ { fault = "slow", delay = 3 } }
    local p = policy.new{ retry = { max_attempts = 3 }, deadline = 0.5 }
    local t0 = helper.now()
    local res, err = p:request(t, models())
    local took = helper.now() - t0
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.is_true(took < 1.5, "took " .. took .. " s")
    assert.equal("deadline", p.last.stop)
  end)

  it("caps retries with the budget across calls", function()
    up:scenario{ { fault = "503", times = 1000 } }
    local p = P{ retry = { max_attempts = 5, budget = { ratio = 0, min_per_second = 0.2, ttl = 10 } } }
    for _ = 1, 5 do p:request(t, models()) end
    -- 5 first attempts + the budget's 2 retries, not 5 * 5
    assert.equal(7, up:stats().requests)
    assert.equal("budget", p.last.stop)
  end)

  it("retries a refused connection and reports it", function()
    local p = P{ retry = { max_attempts = 3 } }
    local res, err = p:request(t, { method = "GET", url = "http://127.0.0.1:" .. helper.free_port() .. "/v1/models",
                                    timeout = 2 })
    assert.is_nil(res)
    assert.equal("connect", err.kind)
    assert.equal(3, err.attempts)
    assert.equal(2, #sleeps)
  end)

  it("slows down before the 429 using the x-ratelimit headers", function()
    up:rate_limit(2) -- a bucket of 2 requests, refilled at 2 per minute
    local p = P{ rate_limit = { learn = true } }
    assert.equal(200, p:request(t, models()).status)
    assert.equal(200, p:request(t, models()).status)
    local res, err = p:request(t, models())
    assert.is_nil(res)
    assert.same({ "rate_limited", "client" }, { err.kind, err.source })
    assert.is_true(err.retry_after > 20 and err.retry_after <= 30, "retry_after " .. err.retry_after)
    local st = up:stats()
    assert.equal(2, st.requests)
    assert.equal(0, st.rate_limited)
  end)

  it("serves the last good answer from the cache while the upstream fails", function()
    local p = P{ retry = { max_attempts = 2 }, fallback = { cache = { size = 10 } } }
    local good = p:request(t, chat("remember me"))
    assert.equal(200, good.status)
    up:scenario{ { fault = "500", times = 10 } }
    local res = p:request(t, chat("remember me"))
    assert.equal(good, res)
    assert.same({ "cache", "http_status" }, { p.last.fallback, p.last.reason })
    local r2, e2 = p:request(t, chat("never seen"))
    assert.is_nil(r2)
    assert.equal(500, e2.status)
  end)

  it("protects a plain function with p:call the same way", function()
    up:scenario{ { fault = "503" }, { fault = "ok" } }
    local p = P{ retry = { max_attempts = 2 } }
    local status = p:call(function()
      local res, err = t:request(models())
      if not res then return nil, err end
      if res.status >= 500 then return nil, "timeout" end -- a function's own convention
      return res.status
    end)
    assert.equal(200, status)
    assert.equal(2, p.last.attempts)
  end)
end)

-- The same policies inside OpenResty: sleeping yields (ngx.sleep), so other
-- requests' light threads keep running, and a bulkhead's waiters are woken by
-- an ngx.semaphore. One nginx started here runs the checks in a handler.
describe("breaker.policy under OpenResty", function()
  local cjson = require "cjson"
  local dir, port, pid

  local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

  local HANDLER = [=[
    local policy = require "breaker.policy"
    local cjson = require "cjson"
    local out = {}

    -- 1. Retry backoff sleeps with ngx.sleep: a ticker thread keeps running.
    local p1 = policy.new{ retry = { max_attempts = 3, base = 0.1, factor = 1, jitter = "none" } }
    local ticks, done = 0, false
    local ticker = ngx.thread.spawn(function()
      while not done do ticks = ticks + 1; ngx.sleep(0.01) end
    end)
    local calls = 0
    local r, e = p1:call(function() calls = calls + 1; return nil, "timeout" end)
    done = true
    ngx.thread.wait(ticker)
    out.retry = { calls = calls, err = e, wait = p1.last.wait, ticks = ticks, phase = ngx.get_phase() }

    -- 2. A bulkhead of 1 with max_wait: the second light thread waits for the first.
    local p2 = policy.new{ breaker = { name = "ngx-bulkhead" }, bulkhead = { max_concurrent = 1, max_wait = 2 } }
    local order = {}
    local function worker(name)
      local rep = {}
      local v, err = p2:call_into(rep, function()
        order[#order + 1] = name .. "-in"
        ngx.sleep(0.2)
        order[#order + 1] = name .. "-out"
        return name
      end)
      return { v = v, err = err and err.kind, wait = rep.wait }
    end
    local ta, tb = ngx.thread.spawn(worker, "a"), ngx.thread.spawn(worker, "b")
    local _, ra = ngx.thread.wait(ta)
    local _, rb = ngx.thread.wait(tb)
    out.bulkhead = { a = ra, b = rb, order = order }

    -- 3. A bulkhead whose max_wait is too short rejects the second.
    local p3 = policy.new{ bulkhead = { max_concurrent = 1, max_wait = 0.05 } }
    local function w3(name)
      local v, err = p3:call(function() ngx.sleep(0.2); return name end)
      return { v = v, err = err and err.kind }
    end
    local tc, td = ngx.thread.spawn(w3, "c"), ngx.thread.spawn(w3, "d")
    local _, rc = ngx.thread.wait(tc)
    local _, rd = ngx.thread.wait(td)
    out.short = { c = rc, d = rd }
    ngx.say(cjson.encode(out))
  ]=]

  setup(function()
    port = helper.free_port()
    local pwd = io.popen("pwd")
    local root = pwd:read("*l")
    pwd:close()
    dir = helper.tmp_dir .. "/policy-ngx-" .. port
    if dir:sub(1, 1) ~= "/" then dir = root .. "/" .. dir end
    os.execute("mkdir -p " .. q(dir .. "/conf") .. " " .. q(dir .. "/logs") .. " " .. q(dir .. "/tmp"))
    local conf = table.concat({
      "load_module /usr/share/nginx/modules/ndk_http_module.so;",
      "load_module /usr/share/nginx/modules/ngx_http_lua_module.so;",
      "user root;",
      "worker_processes 1;",
      "pid " .. dir .. "/logs/nginx.pid;",
      "error_log " .. dir .. "/logs/error.log warn;",
      "events { worker_connections 64; }",
      "http {",
      "  access_log off;",
      "  client_body_temp_path " .. dir .. "/tmp/body;",
      "  proxy_temp_path " .. dir .. "/tmp/proxy;",
      "  fastcgi_temp_path " .. dir .. "/tmp/fastcgi;",
      "  uwsgi_temp_path " .. dir .. "/tmp/uwsgi;",
      "  scgi_temp_path " .. dir .. "/tmp/scgi;",
      "  lua_package_path '" .. root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;';",
      "  lua_package_cpath '" .. root .. "/build/?.so;;';",
      "  server {",
      "    listen 127.0.0.1:" .. port .. ";",
      "    location = /check { content_by_lua_block {" .. HANDLER .. "} }",
      "  }",
      "}",
    }, "\n")
    local f = assert(io.open(dir .. "/conf/nginx.conf", "w"))
    f:write(conf)
    f:close()
    local rc = os.execute("nginx -p " .. q(dir .. "/") .. " -c conf/nginx.conf -e logs/error.log -g 'daemon on;'")
    assert(rc == 0 or rc == true, "nginx failed to start, see " .. dir .. "/logs/error.log")
    for _ = 1, 200 do
      local pf = io.open(dir .. "/logs/nginx.pid")
      if pf then pid = tonumber(pf:read("*l")); pf:close() end
      if pid then break end
      helper.sleep(0.025)
    end
    assert(pid, "nginx did not start")
  end)

  teardown(function()
    if pid then
      os.execute("kill " .. pid)
      for _ = 1, 200 do
        if os.execute("kill -0 " .. pid .. " 2>/dev/null") ~= 0 then break end
        helper.sleep(0.025)
      end
    end
    if dir and not os.getenv("BREAKER_KEEP_UPSTREAM") then os.execute("rm -rf " .. q(dir)) end
  end)

  local result
  local function check()
    if result then return result end
    local http = require "socket.http"
    local body, code
    for _ = 1, 100 do
      body, code = http.request("http://127.0.0.1:" .. port .. "/check")
      if body then break end
      helper.sleep(0.025)
    end
    assert.equal(200, code, tostring(body))
    result = cjson.decode(body)
    return result
  end

  it("sleeps between retries with ngx.sleep, letting other light threads run", function()
    local r = check().retry
    assert.equal("content", r.phase)
    assert.equal(3, r.calls)
    assert.equal("timeout", r.err)
    assert.near(0.2, r.wait, 1e-9)
    assert.is_true(r.ticks >= 10, "ticker ran " .. r.ticks .. " times during 0.2 s of backoff")
  end)

  it("makes a bulkhead's second caller wait for the slot", function()
    local b = check().bulkhead
    assert.same({ "a-in", "a-out", "b-in", "b-out" }, b.order)
    assert.equal("a", b.a.v)
    assert.equal("b", b.b.v)
    assert.is_true(b.b.wait >= 0.15 and b.b.wait < 1, "b waited " .. b.b.wait)
  end)

  it("rejects with bulkhead_full once max_wait has passed", function()
    local s = check().short
    assert.equal("c", s.c.v)
    assert.equal("bulkhead_full", s.d.err)
  end)
end)
