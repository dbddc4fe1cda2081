-- Benchmark of shared breakers and of breaker inside nginx (make bench).
-- Prints figures; asserts nothing.
--
-- 1. allow + record pair of a breaker in a shared region vs a local breaker,
--    same process, same run (target: shared <= 1.5x local).
-- 2. nginx (2 workers) calling the fake upstream through a policy and the
--    thread-pool transport vs a plain proxy_pass (keepalive upstream block
--    with max_fails / fail_timeout), under wrk on loopback, BENCH_SECONDS
--    (default 5) each: requests per second, and with the upstream answering
--    503 to everything, how many requests still reached it.
--
-- Run from the repository: LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;'
-- LUA_CPATH='build/?.so;;' luajit bench/ngx.lua

local breaker = require "breaker"
local shared = require "breaker.shared"
local helper = require "helper"

local format, concat = string.format, table.concat
local now = breaker.clock.now_precise

local N = tonumber(os.getenv("BENCH_N")) or 5000000
local RUNS = tonumber(os.getenv("BENCH_RUNS")) or 7
local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 5

---------------------------------------------------------------------------
-- 1. shared vs local allow + record
---------------------------------------------------------------------------

local function median(t)
  table.sort(t)
  return t[math.ceil(#t / 2)]
end

-- A loop of n allow+record pairs on breaker b. Each breaker gets its own
-- copy of the loop (compiled from source), so each has its own trace: with
-- one shared prototype, the second breaker would run in side traces of the
-- first one's trace, and in some runs exit to the interpreter every round
-- (about 3x slower, from the code's placement, not the breaker's cost).
local LOOP_SRC = [[
  local b = ...
  return function(n)
    for _ = 1, n do
      b:record(b:allow(), "success", 0.001)
    end
  end
]]
local function pair_loop(b)
  return assert(load(LOOP_SRC, "=pair_loop"))(b)
end

local function time_ns(run)
  local t0 = now()
  run(N)
  return (now() - t0) * 1e9 / N
end

print("== shared region vs local breaker: allow + record (success)")
do
  local cfg = { window_size = 100, minimum_calls = 100 }
  local region = shared.new("bench-ngx", { capacity = 4 })
  local lb = breaker.new("bench-local", cfg)
  local sb = breaker.new("bench-shared", cfg, { shared = region })
  local lrun, srun = pair_loop(lb), pair_loop(sb)
  lrun(N / 10); srun(N / 10)
  -- Rounds alternate local and shared, so both see the same machine; the
  -- ratio is the median of the per-round ratios.
  local ls, ss, ratios = {}, {}, {}
  for i = 1, 2 * RUNS do
    ls[i] = time_ns(lrun)
    ss[i] = time_ns(srun)
    ratios[i] = ss[i] / ls[i]
  end
  print(format("  local  %7.1f ns/pair   (median of %d rounds)", median(ls), 2 * RUNS))
  print(format("  shared %7.1f ns/pair   ratio %.2fx (median of per-round ratios; target <= 1.5x)   binding: %s",
    median(ss), median(ratios), breaker.binding))
  lb:close()
  sb:close()
end

---------------------------------------------------------------------------
-- 2. nginx: policy + thread pool vs proxy_pass
---------------------------------------------------------------------------

local repo = helper.repo_dir()
local LUA_PATH = concat({ repo .. "/lua/?.lua", repo .. "/lua/?/init.lua", "/usr/share/lua/5.1/?.lua", "" }, ";")
  .. ";"
local LUA_CPATH = repo .. "/build/?.so;;"

local function is_root()
  local p = io.popen(helper.clean_env .. "id -u")
  local id = p:read("*l")
  p:close()
  return id == "0"
end

-- Two upstream blocks as nginx users write them: `llm` has one server (for
-- which nginx ignores max_fails: a lone server is never marked down);
-- `llm_backup` adds a backup answering 503 itself, so max_fails can take
-- the failing server out (zone: the failure count is shared by the workers).
local CONF = [[
load_module /usr/share/nginx/modules/ndk_http_module.so;
load_module /usr/share/nginx/modules/ngx_http_lua_module.so;
@USER@
worker_processes 2;
pid @PREFIX@/logs/nginx.pid;
error_log @PREFIX@/logs/error.log error;
thread_pool breaker threads=16;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/tmp/client_body;
    proxy_temp_path @PREFIX@/tmp/proxy;
    fastcgi_temp_path @PREFIX@/tmp/fastcgi;
    uwsgi_temp_path @PREFIX@/tmp/uwsgi;
    scgi_temp_path @PREFIX@/tmp/scgi;
    keepalive_requests 1000000;
    lua_package_path '@LUA_PATH@';
    lua_package_cpath '@LUA_CPATH@';

    upstream llm {
        server 127.0.0.1:@UP_PORT@ max_fails=5 fail_timeout=30s;
        keepalive 32;
    }
    upstream llm_backup {
        zone llm_backup 64k;
        server 127.0.0.1:@UP_PORT@ max_fails=5 fail_timeout=30s;
        server 127.0.0.1:@BACKUP_PORT@ backup;
        keepalive 32;
    }

    init_by_lua_block {
        local breaker = require "breaker"
        local bngx = require "breaker.ngx"
        local region = require("breaker.shared").new("bench", { capacity = 8 })
        local never = { failure_rate_threshold = false, consecutive_failures = false }
        local trips = { consecutive_failures = 5, failure_rate_threshold = false, open_duration = 30 }
        package.loaded.bench = {
            url = "http://127.0.0.1:@UP_PORT@/v1/models",
            t = bngx.transport{ pool = "breaker", timeout = 10 },
            co = require("breaker.cosocket").new{ timeout = 10 },
            ok = bngx.policy{ breaker = breaker.new("ok", never, { shared = region }) },
            fail = bngx.policy{ breaker = breaker.new("fail", trips, { shared = region }) },
        }
    }

    server {
        listen 127.0.0.1:@PORT@ reuseport;
        location = /breaker {
            content_by_lua_block {
                local b = require "bench"
                local res, err = b.ok:request(b.t, { url = b.url,
                    headers = { authorization = "Bearer sk-test-good" } })
                if not res then ngx.status = 503; return ngx.print(err.kind) end
                ngx.status = res.status
                ngx.print(res.body)
            }
        }
        location = /breaker_cosocket {
            content_by_lua_block {
                local b = require "bench"
                local res, err = b.ok:request(b.co, { url = b.url,
                    headers = { authorization = "Bearer sk-test-good" } })
                if not res then ngx.status = 503; return ngx.print(err.kind) end
                ngx.status = res.status
                ngx.print(res.body)
            }
        }
        location = /breaker_fail {
            content_by_lua_block {
                local b = require "bench"
                local res, err = b.fail:request(b.t, { url = b.url,
                    headers = { authorization = "Bearer sk-test-good", ["x-fake-fault"] = "fault=503" } })
                if not res then ngx.status = 503; return ngx.print(err.kind) end
                ngx.status = res.status
                ngx.print(res.body)
            }
        }
        location = /pool_only {
            content_by_lua_block {
                local ok, n = ngx.run_worker_thread("breaker", "breaker.ngx_worker", "count")
                ngx.print(ok and n or "failed")
            }
        }
        location = /proxy {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer sk-test-good";
            proxy_pass http://llm/v1/models;
        }
        location = /proxy_fail {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer sk-test-good";
            proxy_set_header x-fake-fault "fault=503";
            proxy_next_upstream error timeout http_503;
            proxy_pass http://llm/v1/models;
        }
        location = /proxy_backup_fail {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer sk-test-good";
            proxy_set_header x-fake-fault "fault=503";
            proxy_next_upstream error timeout http_503;
            proxy_pass http://llm_backup/v1/models;
        }
    }
    server {
        listen 127.0.0.1:@BACKUP_PORT@;
        location / { return 503 '{"error":{"message":"busy, try later"}}'; }
    }
}
]]

-- wrk on url for SECONDS: requests/s, requests, non-2xx responses.
local function wrk(url)
  local p = assert(io.popen(format("%stimeout %d wrk -t2 -c32 -d%ds --timeout 5s %s 2>&1",
                                   helper.clean_env, SECONDS + 30, SECONDS, url)))
  local out = p:read("*a")
  p:close()
  local rps = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  local total = tonumber(out:match("(%d+) requests in"))
  local non2xx = tonumber(out:match("Non%-2xx or 3xx responses: (%d+)")) or 0
  if not rps then error("wrk printed no figures:\n" .. out) end
  return rps, total, non2xx
end

print()
print(format("== nginx (2 workers) + fake upstream (2 workers), wrk -t2 -c32 -d%ds on loopback, %s",
             SECONDS, "all on this machine's cores"))
local up = helper.upstream.start{ workers = 2 }
local app
local ok, err = pcall(function()
  local backup_port = helper.free_port()
  app = helper.nginx.start{
    name = "bench-ngx", workers = 2,
    render = function(port, prefix)
      local vars = { PORT = port, PREFIX = prefix, UP_PORT = up.port, BACKUP_PORT = backup_port,
                     USER = is_root() and "user root;" or "", LUA_PATH = LUA_PATH, LUA_CPATH = LUA_CPATH }
      return (CONF:gsub("@([%u_]+)@", function(k) return tostring(assert(vars[k], k)) end))
    end,
  }

  -- warm-up: connections, pool threads, JIT
  wrk(app.url .. "/breaker")
  wrk(app.url .. "/breaker_cosocket")
  wrk(app.url .. "/proxy")

  print("-- healthy upstream: requests per second")
  up:reset()
  local b_rps, b_n, b_bad = wrk(app.url .. "/breaker")
  local b_up = up:stats().requests
  up:reset()
  local p_rps, p_n, p_bad = wrk(app.url .. "/proxy")
  local p_up = up:stats().requests
  print(format("  policy + thread-pool transport  %8.0f req/s  (%d requests, %d non-2xx, %d reached upstream)",
               b_rps, b_n, b_bad, b_up))
  print(format("  proxy_pass                      %8.0f req/s  (%d requests, %d non-2xx, %d reached upstream)",
               p_rps, p_n, p_bad, p_up))
  print(format("  ratio breaker / proxy_pass      %8.2f", b_rps / p_rps))
  up:reset()
  local c_rps, c_n, c_bad = wrk(app.url .. "/breaker_cosocket")
  print(format("  policy + cosocket transport     %8.0f req/s  (%d requests, %d non-2xx, %d reached upstream)",
               c_rps, c_n, c_bad, up:stats().requests))
  print(format("  ratio cosocket / proxy_pass     %8.2f", c_rps / p_rps))
  local o_rps = wrk(app.url .. "/pool_only")
  print(format("  (thread-pool round trip alone, no HTTP: %.0f req/s)", o_rps))

  print("-- upstream answering 503 to everything: requests that still reached it")
  local function failing(label, path)
    up:reset()
    local rps, n, bad = wrk(app.url .. path)
    helper.sleep(0.3) -- let in-flight requests land
    local reached = up:stats().requests
    print(format("  %-44s %7d of %7d requests (%5.2f%%), %8.0f req/s, %d non-2xx",
                 label, reached, n, 100 * reached / math.max(n, 1), rps, bad))
  end
  failing("policy + breaker (shared, 5 failures -> open)", "/breaker_fail")
  failing("proxy_pass, one server, max_fails=5", "/proxy_fail")
  failing("proxy_pass, max_fails=5 + backup + zone", "/proxy_backup_fail")
end)
if app then app:stop() end
up:stop()
if not ok then error(err, 0) end
