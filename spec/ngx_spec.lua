-- Specs for breaker.ngx and shared breakers inside real nginx (Debian's nginx
-- with lua-nginx-module), started by the suite on 127.0.0.1 and stopped by
-- pid: spec/support/ngx_app.conf + ngx_app.lua, and examples/nginx.conf. The
-- fake upstream (spec/support/) counts what reaches it.
local helper = require "helper"
local curl = require "breaker.curl"
local cjson = require "cjson"

local format, concat = string.format, table.concat

local repo = helper.repo_dir()
local LUA_PATH, LUA_CPATH = helper.nginx.lua_paths()
local IS_ROOT = (function()
  local p = io.popen(helper.clean_env .. "id -u")
  local id = p:read("*l")
  p:close()
  return id == "0"
end)()

local function read(path)
  local f = assert(io.open(path))
  local s = f:read("*a")
  f:close()
  return s
end

local TEMPLATE = read(repo .. "/spec/support/ngx_app.conf")

-- Starts the spec app (ngx_app.conf) with `workers` worker processes.
local function start_app(up, workers)
  return helper.nginx.start{
    name = "ngx-app", workers = workers,
    render = function(port, prefix)
      local vars = { PORT = port, PREFIX = prefix, WORKERS = workers, UPSTREAM = up.url,
                     USER = IS_ROOT and "user root;" or "", LUA_PATH = LUA_PATH, LUA_CPATH = LUA_CPATH }
      return (TEMPLATE:gsub("@([%u_]+)@", function(k)
        return tostring(assert(vars[k], "no value for placeholder " .. k))
      end))
    end,
  }
end

-- Replaces `old` (plain text) by `new` in s, exactly once.
local function replace_once(s, old, new)
  local i, j = s:find(old, 1, true)
  assert(i, "examples/nginx.conf no longer holds: " .. old)
  assert(not s:find(old, j + 1, true), "examples/nginx.conf holds twice: " .. old)
  return s:sub(1, i - 1) .. new .. s:sub(j + 1)
end

local function breaker_stats(app, name)
  return app:json("/stats").breakers[name]
end

local function counters(app)
  return app:json("/count")
end

-- Runs `n` GETs of `path` in parallel from this process (curl multi, one
-- connection each); returns { {status, worker, kind}, ... }.
local function burst(app, path, n, headers)
  local t = curl.new{ timeout = 15 }
  local reqs = {}
  for i = 1, n do reqs[i] = { method = "GET", url = app.url .. path, headers = headers } end
  local out = {}
  for i, r in ipairs(t:request_many(reqs)) do
    assert(r.res, "request " .. i .. " failed: " .. tostring(r.err))
    out[i] = { status = r.res.status, worker = r.res.headers["x-worker"], kind = r.res.headers["x-kind"] }
  end
  t:close()
  return out
end

-- Starts `curl` on `url` in the background; :wait() -> http code, seconds.
local function background_curl(url, headers)
  local args = {}
  for k, v in pairs(headers or {}) do args[#args + 1] = format("-H '%s: %s'", k, v) end
  local p = assert(io.popen(format("%stimeout 20 curl -s -o /dev/null -m 15 -w '%%{http_code} %%{time_total}' %s '%s'",
                                   helper.clean_env, concat(args, " "), url)))
  return {
    wait = function()
      local out = p:read("*a")
      p:close()
      local code, secs = out:match("(%d+) ([%d.]+)")
      return tonumber(code), tonumber(secs)
    end,
  }
end

local SLOW_1S = helper.fault{ fault = "slow", delay = 1 }

describe("breaker.ngx in nginx", function()
  local up
  local apps = {}

  local function app_with(workers)
    local a = start_app(up, workers)
    apps[#apps + 1] = a
    return a
  end

  setup(function()
    up = helper.upstream.start{ workers = 2 }
  end)

  teardown(function()
    for _, a in ipairs(apps) do a:stop() end
    if up then up:stop() end
  end)

  before_each(function()
    up:reset()
  end)

  after_each(function()
    for i = #apps, 1, -1 do apps[i]:stop(); apps[i] = nil end
  end)

  it("keeps counts exact across workers after thousands of concurrent requests", function()
    local app = app_with(2)
    local p = assert(io.popen(format("%stimeout 30 wrk -t2 -c32 -d3s --timeout 5s %s/call/count 2>&1",
                                     helper.clean_env, app.url)))
    local out = p:read("*a")
    p:close()
    local done = tonumber(out:match("(%d+) requests in"))
    assert(done, "wrk printed no count: " .. out)
    assert.is_nil(out:match("Non%-2xx"), out)
    -- Requests still in flight when wrk stopped finish on their own.
    local c
    assert.truthy(helper.wait_for(10, function()
      local a = counters(app)
      helper.sleep(0.2)
      c = counters(app)
      return a["ok:count"] == c["ok:count"]
    end))
    local ok_count = c["ok:count"]
    local st = breaker_stats(app, "count")
    assert.is_true(ok_count >= done)
    assert.is_true(ok_count >= 2000, "only " .. ok_count .. " requests in 3 s")
    assert.is_nil(c["err:count"])
    -- both workers served, and the one breaker counted every call
    assert.is_true((c["served:0"] or 0) > 0 and (c["served:1"] or 0) > 0)
    assert.equal(ok_count, (c["served:0"] or 0) + (c["served:1"] or 0))
    assert.equal(ok_count, st.total_calls)
    assert.equal(ok_count, up:stats().requests)
    assert.equal(0, st.total_failures)
    assert.equal("closed", st.state)
  end)

  it("lets exactly half_open_calls probes through while half-open, across workers", function()
    local app = app_with(2)
    up:scenario{ { fault = 503, times = 2 } }
    for _ = 1, 2 do
      local code, h = app:request("GET", "/call/halfopen")
      assert.equal(503, code)
      assert.equal("http_status", h["x-kind"])
    end
    assert.equal("open", breaker_stats(app, "halfopen").state)
    helper.sleep(1.1) -- open_duration = 1
    up:reset()
    -- The probes are slow (1 s): every other request arrives while they run.
    local res = burst(app, "/call/halfopen", 64, { ["x-fake-fault"] = SLOW_1S })
    local ok, rejected, by_worker, rejected_by = 0, 0, {}, {}
    for _, r in ipairs(res) do
      by_worker[r.worker] = true
      if r.status == 200 then
        ok = ok + 1
      else
        assert.equal(503, r.status)
        assert.equal("breaker_open", r.kind)
        rejected = rejected + 1
        rejected_by[r.worker] = true
      end
    end
    assert.is_true(by_worker["0"] and by_worker["1"], "the burst did not reach both workers")
    assert.is_true(rejected_by["0"] and rejected_by["1"], "both workers must have refused a probe")
    assert.equal(3, ok)
    assert.equal(61, rejected)
    assert.equal(3, up:stats().requests)
    -- three successful probes closed it
    assert.equal("closed", breaker_stats(app, "halfopen").state)
  end)

  it("rejects in one worker once failures seen by the other opened the breaker", function()
    local app = app_with(2)
    up:scenario{ { fault = 503, times = 3 } }
    -- one kept-alive connection: every failure goes through the same worker
    local t = curl.new{ timeout = 10, max_connections = 1 }
    local first
    for _ = 1, 3 do
      local res = assert(t:request{ method = "GET", url = app.url .. "/call/trip" })
      assert.equal(503, res.status)
      assert.equal("http_status", res.headers["x-kind"])
      first = first or res.headers["x-worker"]
      assert.equal(first, res.headers["x-worker"])
    end
    t:close()
    assert.equal(3, up:stats().requests)
    assert.equal("open", breaker_stats(app, "trip").state)
    -- new connections until the other worker answers
    local other
    for _ = 1, 200 do
      local code, h = app:request("GET", "/call/trip")
      assert.equal(503, code)
      assert.equal("breaker_open", h["x-kind"])
      if h["x-worker"] ~= first then other = h["x-worker"]; break end
    end
    assert.truthy(other, "no answer from the other worker in 200 connections")
    assert.equal(3, up:stats().requests)
  end)

  describe("with one worker", function()
    -- Sends a slow request to `slow_path` in the background, waits until it
    -- reached the upstream, then times a fast request to /call/slow.
    local function race(app, slow_path)
      local t_start = helper.now()
      local slow = background_curl(app.url .. slow_path, { ["x-fake-fault"] = SLOW_1S })
      assert.truthy(helper.wait_for(5, function() return up:stats().requests >= 1 end, 0.01))
      local t0 = helper.now()
      local code = app:request("GET", "/call/slow")
      local t1 = helper.now()
      local slow_code, slow_secs = slow.wait()
      return { fast_code = code, fast = t1 - t0, fast_done = t1 - t_start,
               slow_code = slow_code, slow = slow_secs }
    end

    it("answers another request while one waits 1 s on a slow upstream (thread pool)", function()
      local app = app_with(1)
      assert.equal(1, #app:workers())
      local r = race(app, "/call/slow")
      assert.equal(200, r.slow_code)
      assert.is_true(r.slow >= 0.95, "the slow request took " .. r.slow .. " s")
      assert.equal(200, r.fast_code)
      assert.is_true(r.fast < 0.5, "the fast request took " .. r.fast .. " s")
      assert.is_true(r.fast_done < r.slow, "the fast request ended after the slow one")
    end)

    it("(control) stalls that request when curl runs in the worker itself", function()
      local app = app_with(1)
      local r = race(app, "/blocking")
      assert.equal(200, r.slow_code)
      assert.equal(200, r.fast_code)
      assert.is_true(r.fast >= 0.5, "the blocked request took only " .. r.fast .. " s")
    end)
  end)

  it("keeps an open breaker open across a reload (HUP), in the new workers", function()
    local app = app_with(2)
    up:scenario{ { fault = 503, times = 2 } }
    for _ = 1, 2 do assert.equal(503, (app:request("GET", "/call/reload"))) end
    local before = app:json("/stats")
    local b0 = before.breakers.reload
    assert.equal("open", b0.state)
    local new_workers = app:reload()
    local after = app:json("/stats")
    local seen = {}
    for _, pid in ipairs(new_workers) do seen[pid] = true end
    assert.is_true(seen[after.worker.pid], "the stats came from an old worker")
    assert.are_not.equal(before.init_at, after.init_at) -- init_by_lua ran again
    local b1 = after.breakers.reload
    assert.equal("open", b1.state)
    assert.equal(b0.generation, b1.generation)
    assert.equal(b0.total_failures, b1.total_failures)
    assert.is_true(b1.retry_after > 100)
    -- the region was found again, not made anew beside the old one
    assert.equal(before.region.used, after.region.used)
    local code, h = app:request("GET", "/call/reload")
    assert.equal(503, code)
    assert.equal("breaker_open", h["x-kind"])
    assert.equal(2, up:stats().requests)
  end)

  it("refuses a reload that changes a shared breaker's config; the old workers keep serving", function()
    local app = app_with(2)
    local before = app:workers()
    local path = app.prefix .. "/conf/nginx.conf"
    local text = read(path)
    local f = assert(io.open(path, "w"))
    f:write(replace_once(text, 'region = "ngx-spec"', 'region = "ngx-spec", mismatch = true'))
    f:close()
    assert.truthy(os.execute("kill -HUP " .. app.pid))
    assert.truthy(helper.wait_for(10, function()
      return app:log():find("breaker 'count' exists in the region with another config ('window_size' differs)",
                            1, true)
    end))
    assert.same(before, app:workers())
    assert.equal(200, (app:request("GET", "/call/count")))
  end)

  it("frees the probe permit of a killed worker after probe_timeout", function()
    local app = app_with(2)
    up:scenario{ { fault = 503, times = 2 } }
    for _ = 1, 2 do assert.equal(503, (app:request("GET", "/call/probe"))) end
    assert.equal("open", breaker_stats(app, "probe").state)
    helper.sleep(0.6) -- open_duration = 0.5
    -- the probe: an upstream that answers after 5 s
    local t_probe = helper.now()
    local probe = background_curl(app.url .. "/call/probe",
                                  { ["x-fake-fault"] = helper.fault{ fault = "slow", delay = 5 } })
    assert.truthy(helper.wait_for(5, function() return up:stats().requests >= 3 end, 0.01))
    local st = breaker_stats(app, "probe")
    assert.equal("half_open", st.state)
    assert.equal(1, st.half_open_granted)
    local holder = counters(app)["holder:probe"]
    local workers = app:workers()
    assert.is_true(holder == workers[1] or holder == workers[2])
    assert.truthy(os.execute("kill -KILL " .. holder))
    assert.truthy(helper.wait_for(5, function() return not helper.running(holder) end))
    local probe_code = probe.wait()
    assert.are_not.equal(200, probe_code) -- its connection died with the worker
    -- the permit is still held until probe_timeout (2 s) has passed
    if helper.now() - t_probe < 1.5 then
      local code, h = app:request("GET", "/call/probe")
      assert.equal(503, code)
      assert.equal("breaker_open", h["x-kind"])
    end
    -- then a new probe is admitted
    local t_ok
    assert.truthy(helper.wait_for(6, function()
      local code = app:request("GET", "/call/probe")
      if code == 200 then t_ok = helper.now() end
      return code == 200
    end, 0.1))
    assert.is_true(t_ok - t_probe >= 1.9, "a new probe came after " .. (t_ok - t_probe) .. " s")
    st = breaker_stats(app, "probe")
    assert.equal("closed", st.state)
    -- the master replaced the killed worker
    assert.truthy(helper.wait_for(5, function() return #app:workers() == 2 end))
  end)

  describe("transport", function()
    it("works from a timer, and sleeps with ngx.sleep", function()
      local app = app_with(1)
      assert.same({ status = 200 }, app:json("/transport/timer"))
      local s = app:json("/transport/sleep").slept
      assert.is_true(s >= 0.19 and s < 1, "slept " .. s)
    end)

    it("gives back the bulkhead slots of calls in killed light threads", function()
      local app = app_with(1)
      local r = app:json("/transport/killed_calls")
      assert.same({ 1, 2 }, r.held)  -- each killed call still held its slot
      assert.equal("ok", r.ok, r.err)
      assert.equal(0, r.after)
    end)

    it("refuses on_chunk by default, naming the way out", function()
      local app = app_with(1)
      local r = app:json("/transport/on_chunk_refused")
      assert.is_false(r.ok)
      assert.matches("on_chunk cannot run in a pool thread", r.err)
      assert.matches('on_chunk = "buffer"', r.err, 1, true)
      assert.equal(0, up:stats().requests)
    end)

    it("with on_chunk = \"buffer\" hands the whole 2xx body to on_chunk at the end", function()
      local app = app_with(1)
      local r = app:json("/transport/buffer")
      assert.equal(200, r.status)
      assert.is_true(r.streamed)
      assert.equal("", r.body)
      assert.equal(1, r.chunks)
      assert.matches('"content":"a "', r.data, 1, true)
      assert.matches("data: [DONE]", r.data, 1, true)
    end)

    it("names the thread_pool directive when the pool is missing", function()
      local app = app_with(1)
      local r = app:json("/transport/no_pool")
      assert.is_false(r.ok)
      assert.matches("thread pool 'nope' not found: add `thread_pool nope threads=16;`", r.err, 1, true)
    end)

    it("returns a network failure as a breaker.error with its kind", function()
      local app = app_with(1)
      local r = app:json("/transport/refused?port=" .. helper.free_port())
      assert.is_false(r.res)
      assert.equal("connect", r.kind)
      assert.is_true(r.is_error)
      assert.matches("^connect: ", r.text)
    end)

    it("carries breaker.llm: chat, and chat_stream with on_chunk = \"buffer\"", function()
      local app = app_with(1)
      assert.same({ chat = "one two", stream = "three four", deltas = "three |four" },
                  app:json("/transport/llm"))
    end)

    it("runs request_many in one pool thread", function()
      local app = app_with(1)
      local r = app:json("/transport/many?port=" .. helper.free_port())
      assert.same({ first = 200, second = "connect", second_is_error = true }, r)
    end)

    it("takes a user's own transport (cosockets) through a policy", function()
      local app = app_with(1)
      local r = app:json("/transport/cosocket")
      assert.equal(200, r.status, r.err)
      assert.equal("hi", cjson.decode(r.body).choices[1].message.content)
      assert.equal(1, r.attempts)
      assert.equal(1, up:stats().requests)
      assert.equal(1, breaker_stats(app, "slow").total_calls)
    end)
  end)

  describe("examples/nginx.conf", function()
    local function start_example()
      local text = read(repo .. "/examples/nginx.conf")
      local a = helper.nginx.start{
        name = "ngx-example", workers = 2,
        env = { LLM_BASE_URL = up.url, OPENAI_API_KEY = "sk-test-good" },
        render = function(port)
          local s = replace_once(text, "listen 127.0.0.1:8080 ", "listen 127.0.0.1:" .. port .. " ")
          s = s:gsub('\n    lua_package_path "[^"\n]*";', function()
            return '\n    lua_package_path "' .. LUA_PATH .. '";'
          end, 1)
          s = s:gsub('\n    lua_package_cpath "[^"\n]*";', function()
            return '\n    lua_package_cpath "' .. LUA_CPATH .. '";'
          end, 1)
          assert(s:find(LUA_PATH, 1, true) and s:find(LUA_CPATH, 1, true), "lua paths not replaced")
          if IS_ROOT then s = "user root;\n" .. s end
          return s
        end,
      }
      apps[#apps + 1] = a
      return a
    end

    local CHAT = cjson.encode({ model = "gpt-fake", messages = { { role = "user", content = "ping" } } })

    it("calls the upstream through the policy and shows the shared breaker", function()
      local app = start_example()
      local code, h, body = app:request("POST", "/v1/chat/completions", { ["content-type"] = "application/json" }, CHAT)
      assert.equal(200, code, body)
      assert.equal("ping", cjson.decode(body).choices[1].message.content)
      assert.truthy(h["x-worker"])
      local st = app:json("/breakers")
      assert.equal("closed", st.breakers.llm.state)
      assert.is_true(st.breakers.llm.shared)
      assert.equal(1, st.breakers.llm.total_calls)
      assert.equal(1, up:stats().requests)
    end)

    it("opens on upstream failures and then answers 503 with Retry-After without calling it", function()
      local app = start_example()
      up:scenario{ { fault = 503, times = 50 } }
      local open_at
      for i = 1, 10 do
        local code, h, body = app:request("POST", "/v1/chat/completions", nil, CHAT)
        assert.equal(503, code)
        local e = cjson.decode(body).error
        if e.type == "breaker_open" then
          assert.truthy(tonumber(h["retry-after"]))
          open_at = i
          break
        end
      end
      assert.truthy(open_at, "the breaker never opened")
      local st = app:json("/breakers").breakers.llm
      assert.equal("open", st.state)
      assert.equal(5, st.total_failures) -- consecutive_failures = 5
      local reached = up:stats().requests
      assert.equal(5, reached)
      for _ = 1, 5 do
        assert.equal(503, (app:request("POST", "/v1/chat/completions", nil, CHAT)))
      end
      assert.equal(reached, up:stats().requests)
    end)

    it("serves Prometheus metrics, JSON and the dashboard at /breaker/", function()
      local app = start_example()
      for _ = 1, 4 do
        assert.equal(200, (app:request("POST", "/v1/chat/completions", nil, CHAT)))
      end
      local code, h, text = app:request("GET", "/breaker/metrics")
      assert.equal(200, code)
      assert.matches("^text/plain", h["content-type"])
      assert.matches('\nbreaker_state{breaker="llm",state="closed"} 1\n', "\n" .. text, 1, true)
      -- the latency histogram is summed over both workers in the shared dict
      local count = text:match('breaker_call_duration_seconds_count{breaker="llm"} (%d+)')
      assert.equal("4", count, text)
      local j = cjson.decode(select(3, app:request("GET", "/breaker/metrics.json")))
      assert.truthy(j.breakers)
      local c2, h2, page = app:request("GET", "/breaker/")
      assert.equal(200, c2)
      assert.matches("^text/html", h2["content-type"])
      assert.truthy(page:find("metrics.json", 1, true))
    end)
  end)
end)
