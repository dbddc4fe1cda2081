-- Specs of breaker.llm against the fake upstream (spec/support): chat, streams
-- and embeddings over the real libcurl transport; error shapes; model
-- fallback order; context-length routing; stream failures before and after the
-- first token; cached and static fallbacks; key redaction. Backoff sleeps are
-- recorded instead of slept wherever the server does not enforce time; the
-- fake upstream's counters prove what reached it.
local helper = require "helper"
local breaker = require "breaker"
local llm = require "breaker.llm"
local cjson = require "cjson"

-- A key that no generic redaction pattern recognises: only the client's own
-- scrubbing can keep it out of errors.
local KEY = "k3y-SECRET-4242-ZZ"

-- Every error, report and stats table the specs see, for the redaction check.
local seen = {}
local function keep(v)
  seen[#seen + 1] = v
  return v
end

local function dump(v, out, depth)
  out = out or {}
  depth = depth or 0
  if type(v) == "table" and depth < 6 then
    out[#out + 1] = tostring(v)
    for k, x in pairs(v) do
      out[#out + 1] = tostring(k)
      dump(x, out, depth + 1)
    end
  else
    out[#out + 1] = tostring(v)
  end
  return out
end

-- Breakers are per (base_url, model) and process-wide: each spec starts
-- afresh.
local function close_llm_breakers()
  for name, b in breaker.each() do
    if name:find("^llm ") then b:close() end
  end
end

local function user(text)
  return { { role = "system", content = "You are terse." }, { role = "user", content = text } }
end

describe("breaker.llm", function()
  local up, sleeps

  local function recorded(s) sleeps[#sleeps + 1] = s end

  -- A client with fast, recorded backoff; `opts` overrides.
  local function client(opts)
    opts = opts or {}
    local o = {
      base_url = up.url .. "/v1", api_key = KEY, model = "gpt-fake", timeout = 5,
      policy = { retry = { max_attempts = 3, base = 0.01, cap = 0.02 }, sleep = recorded },
    }
    for k, v in pairs(opts) do o[k] = v end
    return llm.new(o)
  end

  -- A transport that records the model of every request before sending it.
  local function recording_transport(log)
    local t = require("breaker.curl").new{ timeout = 5 }
    return {
      request = function(_, req)
        local doc = cjson.decode(req.body)
        log[#log + 1] = doc.model
        return t:request(req)
      end,
    }
  end

  -- A transport that plays `steps` instead of calling a server, for answers
  -- whose exact bytes matter: step n (the last one repeats) is
  -- function(req, n) -> status, body [, headers] or nil, err. A body that
  -- is a list of pieces goes to the request's on_chunk one by one, as
  -- breaker.curl streams a 2xx body; a string is answered whole. `log`
  -- (optional) gets the model of every request.
  local function scripted(steps, log)
    local n = 0
    return {
      request = function(_, req)
        n = n + 1
        if log then log[#log + 1] = cjson.decode(req.body).model end
        local status, body, headers = (steps[n] or steps[#steps])(req, n)
        if status == nil then return nil, body end
        if type(body) == "table" then
          for _, piece in ipairs(body) do
            if req.on_chunk(piece) == false then
              return nil, require("breaker.error").new("aborted", "transfer aborted by on_chunk")
            end
          end
          return { status = status, headers = headers or {}, body = "", streamed = true }
        end
        return { status = status, headers = headers or { ["content-type"] = "application/json" }, body = body }
      end,
    }
  end

  setup(function()
    up = helper.upstream.start{ workers = 1, api_key = KEY }
  end)

  teardown(function()
    if up then up:stop() end
  end)

  before_each(function()
    up:reset()
    sleeps = {}
  end)

  after_each(close_llm_breakers)

  describe("new", function()
    it("raises naming the environment variable when no key is given", function()
      local ok, err = pcall(llm.new, { base_url = up.url .. "/v1", model = "gpt-fake",
                                       api_key_env = "BREAKER_SPEC_UNSET_KEY_VAR" })
      assert.is_false(ok)
      assert.matches("BREAKER_SPEC_UNSET_KEY_VAR", err, 1, true)
      assert.matches("no API key", err, 1, true)
      ok, err = pcall(llm.new, { base_url = up.url .. "/v1", model = "gpt-fake",
                                 api_key_env = "HOME" })
      assert.is_true(ok, err)
    end)

    it("raises naming the option on mistakes", function()
      local function fails(opts, pattern)
        local ok, err = pcall(llm.new, opts)
        assert.is_false(ok)
        assert.matches(pattern, err, 1, true)
      end
      fails({ base_url = up.url, api_key = KEY, modle = "x" }, "unknown option 'modle'")
      fails({ base_url = "api.openai.com", api_key = KEY }, "base_url")
      fails({ base_url = up.url, api_key = KEY, fallback_models = { 1 } }, "fallback_models[1]")
      fails({ base_url = up.url, api_key = KEY, policy = { retries = 3 } }, "policy: unknown key 'retries'")
      fails({ base_url = up.url, api_key = KEY, prices = { m = { input = 1 } } }, "prices[\"m\"].input")
      fails({ base_url = up.url, api_key = KEY, timeout = 0 }, "timeout")
    end)

    it("passes a shared region through to breaker.new", function()
      local got
      local real = breaker.new
      breaker.new = function(name, config, opts)
        got = opts
        return real(name, config)
      end
      local ok, err = pcall(client, { shared = "the-region", model = "gpt-fake-shared" })
      breaker.new = real
      assert.is_true(ok, err)
      assert.same({ shared = "the-region" }, got)
    end)

    it("shares a model's breaker with other processes through a shared region", function()
      local shared = require "breaker.shared"
      local rname = "llm-spec-" .. up.port
      local region = assert(shared.open(rname))
      local ok, err = pcall(function()
        local c = client{ shared = region, policy = { retry = false } }
        assert.equal(region, c:breaker("gpt-fake").shared)
        up:scenario{ { fault = "503", times = 5 } }
        for _ = 1, 5 do keep(select(2, c:chat{ messages = user("x") })) end
        assert.equal("open", c:breaker("gpt-fake"):state())
        -- Another process, same region, same (base_url, model): rejected at once.
        local code = table.concat({
          "local llm = require 'breaker.llm'",
          "local region = assert(require('breaker.shared').open(" .. string.format("%q", rname) .. "))",
          "local c = llm.new{ base_url = " .. string.format("%q", up.url .. "/v1") .. ", api_key = "
            .. string.format("%q", KEY) .. ", model = 'gpt-fake', shared = region, policy = { retry = false } }",
          "local res, e = c:chat{ messages = { { role = 'user', content = 'x' } } }",
          "io.write(res and 'answered' or e.kind)",
        }, "; ")
        local p = assert(io.popen((arg and arg[-1] or "luajit") .. " -e " .. string.format("%q", code) .. " 2>&1"))
        local out = p:read("*a")
        p:close()
        assert.equal("breaker_open", out)
        assert.equal(5, up:stats().requests)
      end)
      shared.unlink(rname)
      assert(ok, err)
    end)

    it("leaves the caller's policy table as it was: two clients made from it have two retry budgets", function()
      -- one retry per 10 s window in each budget
      local spec = { retry = { max_attempts = 3, base = 0.01, cap = 0.02,
                               budget = { ratio = 0, min_per_second = 0.1 } }, sleep = recorded }
      local a, b = client{ policy = spec }, client{ policy = spec }
      assert.same({ ratio = 0, min_per_second = 0.1 }, spec.retry.budget)
      up:scenario{ { fault = "503", times = 2 }, { fault = "503" } }
      local _, err = a:chat{ messages = user("x") }   -- takes a's one retry, then a's budget is out
      keep(err)
      assert.equal(2, err.attempts)
      local res = b:chat{ messages = user("b's own budget") }   -- 503, then retried
      assert.equal("b's own budget", res.choices[1].message.content)
      assert.equal(2, b.last.attempts)
      -- the default budget is not written into the caller's table either
      local plain = { retry = { max_attempts = 2 } }
      client{ policy = plain }
      assert.is_nil(plain.retry.budget)
    end)

    it("keeps a model's breaker, open state and all, when its clients are gone", function()
      -- a client made per request must not leave its breaker to the collector
      local c = client({ model = "kept-model" })
      c:breaker("kept-model"):force_open()
      c = nil -- luacheck: ignore 311
      collectgarbage()
      collectgarbage()
      local d = client({ model = "kept-model" })
      assert.equal("forced_open", d:breaker("kept-model"):state())
      local res, err = d:chat{ messages = user("x") }
      assert.is_nil(res)
      assert.equal("breaker_open", err.kind)
      assert.equal(0, up:stats().requests)
      d:breaker("kept-model"):reset()
    end)

    it("makes one breaker per (base_url, model)", function()
      local a = client()
      local b = client()
      local c = client({ model = "gpt-fake-mini" })
      assert.equal(a:breaker("gpt-fake"), b:breaker("gpt-fake"))
      assert.not_equal(a:breaker("gpt-fake"), c:breaker("gpt-fake-mini"))
      assert.equal("llm " .. up.url .. "/v1 gpt-fake", a:breaker("gpt-fake").name)
      -- credentials and query strings stay out of the name
      assert.equal("llm https://h.example/v1 m", llm.breaker_name("https://u:pw@h.example/v1?key=x", "m"))
    end)
  end)

  describe("chat", function()
    it("returns the completion as the provider sent it and sends extra fields through", function()
      local c = client()
      local res, err = c:chat{ messages = user("Hello, breaker."), temperature = 0.2,
                               max_tokens = 50, user = "u-1", response_format = { type = "text" },
                               timeout = 3 }
      assert.is_nil(err)
      assert.equal("chat.completion", res.object)
      assert.equal("gpt-fake", res.model)
      assert.equal("Hello, breaker.", res.choices[1].message.content)
      assert.equal("stop", res.choices[1].finish_reason)
      assert.is_number(res.usage.total_tokens)
      local last = up:last_request()
      assert.equal("/v1/chat/completions", last.path)
      assert.equal("Bearer " .. KEY, last.headers.authorization)
      local sent = cjson.decode(last.body)
      assert.equal(0.2, sent.temperature)
      assert.equal(50, sent.max_tokens)
      assert.equal("u-1", sent.user)
      assert.same({ type = "text" }, sent.response_format)
      assert.is_nil(sent.timeout)
      assert.is_nil(sent.stream)
      assert.equal("gpt-fake", c.last.model)
      assert.equal(1, c.last.attempts)
      assert.is_nil(c.last.fallback)
    end)

    it("raises on the caller's mistakes", function()
      local c = client()
      assert.has_error(function() c:chat{} end, "breaker.llm.chat: messages: expected a non-empty list of messages")
      assert.has_error(function() c:chat{ messages = user("x"), timeout = -1 } end,
                       "breaker.llm.chat: timeout: expected seconds > 0")
      assert.has_error(function() c:chat_stream{ messages = user("x") } end)
      assert.has_error(function() c:embeddings{} end)
      -- a stream asked of chat would fail to decode at every model: pointed to chat_stream
      assert.has_error(function() c:chat{ messages = user("x"), stream = true } end,
                       "breaker.llm.chat: stream: use client:chat_stream{ ..., on_delta = fn } for a streamed answer")
      assert.equal(0, up:stats().requests)
      assert(c:chat{ messages = user("x"), stream = false })
    end)

    it("retries a 429 after its Retry-After and does not count it against the breaker", function()
      local c = client()
      up:scenario{ { fault = "429", retry_after = 2, times = 2 } }
      local res, err = c:chat{ messages = user("after the storm") }
      assert.is_nil(err)
      assert.equal("after the storm", res.choices[1].message.content)
      assert.equal(3, c.last.attempts)
      -- Each retry waits the server's 2 s (the rate limiter, which the 429
      -- also paused, then finds no time left to wait: sleeps are recorded,
      -- so the clock did not move and it waits again).
      assert.equal(2, sleeps[1])
      for _, s in ipairs(sleeps) do assert.is_true(s <= 2) end
      local st = c:breaker("gpt-fake"):stats()
      assert.equal(0, st.failures)
      assert.equal(3, up:stats().requests)
    end)

    it("counts tokens per model and prices them", function()
      local c = client{ prices = { ["gpt-fake"] = { prompt = 1000000, completion = 2000000 } } }
      local r1 = assert(c:chat{ messages = user("12345678") })
      local r2 = assert(c:chat{ messages = user("abcd") })
      local s = c:stats()
      local m = s.models["gpt-fake"]
      local pt = r1.usage.prompt_tokens + r2.usage.prompt_tokens
      local ct = r1.usage.completion_tokens + r2.usage.completion_tokens
      assert.equal(2, m.successes)
      assert.equal(pt, m.prompt_tokens)
      assert.equal(ct, m.completion_tokens)
      assert.equal(pt + ct, m.total_tokens)
      assert.equal(pt * 1 + ct * 2, m.cost)
      assert.equal(m.cost, s.cost)
      assert.equal(2, s.calls)
      assert.equal("closed", m.breaker)
    end)
  end)

  describe("errors", function()
    local function fails(c, steps, req)
      up:scenario(steps)
      local res, err = c:chat(req or { messages = user("x") })
      assert.is_nil(res)
      keep(err)
      return err
    end

    it("401: kind auth with the provider's type, code and message, not retried", function()
      local c = client{ api_key = "k3y-wrong-key" }
      local res, err = c:chat{ messages = user("x") }
      assert.is_nil(res)
      keep(err)
      assert.equal("auth", err.kind)
      assert.equal(401, err.status)
      assert.equal("invalid_api_key", err.code)
      assert.equal("invalid_request_error", err.type)
      assert.matches("Incorrect API key provided", err.message, 1, true)
      assert.equal(1, err.attempts)
      assert.equal("gpt-fake", err.model)
      assert.matches("^auth: HTTP 401: Incorrect API key provided", tostring(err))
      assert.equal(1, up:stats().requests)
    end)

    it("429 beyond the attempts: rate_limited with retry_after", function()
      local err = fails(client(), { { fault = "429", retry_after = 1, times = 3 } })
      assert.equal("rate_limited", err.kind)
      assert.equal(429, err.status)
      assert.equal(1, err.retry_after)
      assert.equal("rate_limit_exceeded", err.code)
      assert.equal("requests", err.type)
      assert.equal(3, err.attempts)
    end)

    it("insufficient quota: kind quota, not retried", function()
      local err = fails(client(), { { fault = "quota", times = 3 } })
      assert.equal("quota", err.kind)
      assert.equal("insufficient_quota", err.code)
      assert.equal(1, err.attempts)
      assert.equal(1, up:stats().requests)
    end)

    it("503: http_status with type server_error after the retries", function()
      local err = fails(client(), { { fault = "503", times = 3 } })
      assert.equal("http_status", err.kind)
      assert.equal(503, err.status)
      assert.equal("server_error", err.type)
      assert.equal(3, err.attempts)
      assert.equal(503, err.response.status)
    end)

    it("400 bad request: returned at once, no other model tried", function()
      local c = client{ fallback_models = { "gpt-fake-mini" } }
      local err = fails(c, { { fault = "400" } })
      assert.equal("http_status", err.kind)
      assert.equal(400, err.status)
      assert.equal("invalid_request_error", err.type)
      assert.equal("Bad request.", err.message:match("Bad request%."))
      assert.equal(1, err.attempts)
      assert.equal(1, up:stats().requests)
    end)

    it("a truncated body: kind decode, and the breaker counts it", function()
      local c = client()
      local err = fails(c, { { fault = "malformed" } })
      assert.equal("decode", err.kind)
      assert.equal(1, c:breaker("gpt-fake"):stats().failures)
    end)

    it("timeouts and refused connections keep the transport's kinds", function()
      local c = client{ timeout = 0.3 }
      local err = fails(c, { { fault = "slow", delay = 2, times = 3 } })
      assert.equal("timeout", err.kind)
      assert.equal(3, err.attempts)
      local dead = client{ base_url = "http://127.0.0.1:" .. helper.free_port() .. "/v1" }
      local res, err2 = dead:chat{ messages = user("x") }
      keep(err2)
      assert.is_nil(res)
      assert.equal("connect", err2.kind)
    end)

    it("an open breaker: kind breaker_open without calling the API", function()
      local c = client()
      c:breaker("gpt-fake"):force_open()
      local res, err = c:chat{ messages = user("x") }
      keep(err)
      assert.is_nil(res)
      assert.equal("breaker_open", err.kind)
      assert.equal(0, up:stats().requests)
      assert.equal(1, c:stats().models["gpt-fake"].rejected)
    end)

    it("a transport raising, or a request JSON cannot hold: raised, and the stats still add up", function()
      local log = {}
      local c = client{ fallback_models = { "gpt-fake-mini" },
                        transport = scripted({ function() error("transport bug") end }, log) }
      local ok, raised = pcall(c.chat, c, { messages = user("x") })
      assert.is_false(ok)
      assert.matches("transport bug", raised, 1, true)
      assert.same({ "gpt-fake" }, log)
      local s = c:stats()
      assert.same({ 1, 0, 1 }, { s.calls, s.successes, s.failures })
      assert.is_true(c.last.error.raised)
      -- a field JSON cannot encode is the caller's mistake: not a call at all
      ok, raised = pcall(c.chat, c, { messages = user("x"), bad = function() end })
      assert.is_false(ok)
      assert.matches("breaker.llm.chat: the request cannot be encoded as JSON", raised, 1, true)
      s = c:stats()
      assert.same({ 1, 0, 1 }, { s.calls, s.successes, s.failures })
      assert.equal(1, s.models["gpt-fake"].calls)
    end)
  end)

  describe("model fallback", function()
    it("tries fallback_models in order after failures and open breakers", function()
      local log = {}
      local c = client{ model = "m-a", fallback_models = { "m-b", "m-c", "m-d" },
                        transport = recording_transport(log),
                        policy = { retry = { max_attempts = 2, base = 0.01 }, sleep = recorded } }
      c:breaker("m-b"):force_open()
      up:scenario{ { fault = "503", times = 2 }, { fault = "reset" }, { fault = "no-such-fault" } }
      -- m-a: two 503s; m-b: open, skipped; m-c: reset, then a 400 (unknown
      -- fault) that is not an availability failure: the chain stops there.
      local res, err = c:chat{ messages = user("x") }
      keep(err)
      assert.is_nil(res)
      assert.same({ "m-a", "m-a", "m-c", "m-c" }, log)
      assert.equal(400, err.status)
      assert.equal("m-c", err.model)
      assert.equal(3, err.models)

      -- Now everything fails for availability reasons until m-d answers.
      c:breaker("m-b"):reset()
      log = {}
      c = client{ model = "m-a", fallback_models = { "m-b", "m-c", "m-d" },
                  transport = recording_transport(log),
                  policy = { retry = false } }
      up:scenario{ { fault = "503" }, { fault = "500" }, { fault = "529" } }
      res, err = c:chat{ messages = user("fell through") }
      assert.is_nil(err)
      assert.same({ "m-a", "m-b", "m-c", "m-d" }, log)
      assert.equal("m-d", c.last.model)
      assert.equal("fell through", res.choices[1].message.content)
      assert.equal("m-d", res.model)
      local s = c:stats()
      assert.equal(1, s.models["m-a"].failures)
      assert.equal(1, s.models["m-d"].successes)
    end)

    it("a request's own model replaces `model` at the head of the chain", function()
      local log = {}
      local c = client{ model = "m-a", fallback_models = { "m-b" }, transport = recording_transport(log),
                        policy = { retry = false } }
      up:scenario{ { fault = "503" } }
      assert(c:chat{ messages = user("x"), model = "m-z" })
      assert.same({ "m-z", "m-b" }, log)
      assert.equal("m-b", c.last.model)
      assert.equal("m-z", c.last.requested)
    end)
  end)

  describe("context length", function()
    local long = string.rep("word ", 1200) -- 6000 characters: > 1024 tokens

    it("routes to a larger-context model without counting a failure", function()
      local log = {}
      local c = client{ model = "small-context", fallback_models = { "gpt-fake-mini" },
                        long_context_models = { "gpt-fake" }, transport = recording_transport(log) }
      local res, err = c:chat{ messages = user(long) }
      assert.is_nil(err)
      assert.same({ "small-context", "gpt-fake" }, log)
      assert.equal("gpt-fake", c.last.model)
      assert.equal("context_length", c.last.routed)
      assert.equal("gpt-fake", res.model)
      local b = c:breaker("small-context"):stats()
      assert.equal(0, b.failures)
      assert.equal(1, b.ignored)
      local s = c:stats()
      assert.equal(1, s.context_routed)
      assert.equal(1, s.models["small-context"].context_length)
      assert.equal(0, s.models["small-context"].failures)
    end)

    it("tries each model once per call, also when the larger-context list names one again", function()
      local log = {}
      local c = client{ model = "small-context", fallback_models = { "gpt-fake-mini" },
                        long_context_models = { "small-context", "gpt-fake-mini", "gpt-fake" },
                        transport = recording_transport(log), policy = { retry = false } }
      up:scenario{ { fault = "ok" }, { fault = "503" } }
      local res, err = c:chat{ messages = user(long) }
      assert.is_nil(err)
      assert.same({ "small-context", "gpt-fake-mini", "gpt-fake" }, log)
      assert.equal("gpt-fake", res.model)
      assert.equal(3, c.last.models)
      assert.equal(1, c:stats().models["small-context"].calls)
    end)

    it("without a larger model: kind context_length with the provider's code and param", function()
      local c = client{ model = "small-context" }
      local res, err = c:chat{ messages = user(long) }
      keep(err)
      assert.is_nil(res)
      assert.equal("context_length", err.kind)
      assert.equal("context_length_exceeded", err.code)
      assert.equal("messages", err.param)
      assert.equal(400, err.status)
      assert.matches("maximum context length", err.message, 1, true)
      assert.equal(1, up:stats().requests)
    end)
  end)

  describe("chat_stream", function()
    local function collector()
      local parts = {}
      return parts, function(text, chunk, index)
        assert.is_string(text)
        assert.is_table(chunk)
        assert.equal(0, index)
        parts[#parts + 1] = text
      end
    end

    it("delivers the deltas and returns the assembled completion", function()
      local c = client()
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("one two three four"), on_delta = on_delta }
      assert.is_nil(err)
      assert.same({ "one ", "two ", "three ", "four" }, parts)
      assert.equal("one two three four", res.choices[1].message.content)
      assert.equal("stop", res.choices[1].finish_reason)
      assert.is_true(res.streamed)
      assert.equal("gpt-fake", res.model)
      assert.is_number(c.last.ttft)
      local sent = cjson.decode(up:last_request().body)
      assert.is_true(sent.stream)
      assert.is_nil(sent.on_delta)
    end)

    it("retries a stream that dies before the first token, delivering the text once", function()
      local c = client()
      up:scenario{ { fault = "stream_die", events = 1 } } -- role chunk only
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("alpha beta"), on_delta = on_delta }
      assert.is_nil(err)
      assert.same({ "alpha ", "beta" }, parts)
      assert.equal("alpha beta", res.choices[1].message.content)
      assert.equal(2, c.last.attempts)
      assert.equal(2, up:stats().requests)
    end)

    it("falls back to the next model when the first fails before any token", function()
      local log = {}
      local c = client{ fallback_models = { "gpt-fake-mini" }, transport = recording_transport(log) }
      up:scenario{ { fault = "stream_die", events = 0, times = 3 } }
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("gamma delta"), on_delta = on_delta }
      assert.is_nil(err)
      assert.same({ "gpt-fake", "gpt-fake", "gpt-fake", "gpt-fake-mini" }, log)
      assert.equal("gamma delta", table.concat(parts))
      assert.equal("gpt-fake-mini", res.model)
    end)

    it("after the first token: the error carries what was received, never retried or re-sent", function()
      local c = client{ fallback_models = { "gpt-fake-mini" } }
      up:scenario{ { fault = "stream_die", events = 3 } } -- role, "this ", "stream "
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("ignored"), on_delta = on_delta }
      keep(err)
      assert.is_nil(res)
      assert.same({ "this ", "stream " }, parts)
      assert.equal("this stream ", err.partial)
      assert.equal("reset", err.kind)
      assert.equal(1, err.attempts)
      assert.equal(1, up:stats().requests)
      assert.equal(1, c:breaker("gpt-fake"):stats().failures)
      assert.equal(0, c:stats().models["gpt-fake-mini"].calls)
    end)

    it("a connection lost after the stream's last event does not fail the stream", function()
      local c = client()
      -- all ten events (role, eight words, finish_reason "stop"), then the
      -- connection closes without [DONE] or the body's end
      up:scenario{ { fault = "stream_die", events = 10 } }
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("ignored"), on_delta = on_delta }
      assert.is_nil(err)
      assert.equal("this stream will die before it is done", table.concat(parts))
      assert.equal("this stream will die before it is done", res.choices[1].message.content)
      assert.equal("stop", res.choices[1].finish_reason)
      assert.equal(1, c.last.attempts)
      local st = c:breaker("gpt-fake"):stats()
      assert.equal(0, st.failures)
      assert.equal(1, st.successes)
      -- after [DONE] too; but not while a choice is unfinished
      local function event(index, text, finish)
        return "data: " .. cjson.encode{ choices = {
          { index = index, delta = { content = text }, finish_reason = finish or cjson.null } } } .. "\n\n"
      end
      local errors = require "breaker.error"
      for _, case in ipairs{
        { { event(0, "done"), "data: [DONE]\n\n" }, "timeout" },
        { { event(0, "done"), event(0, "", "stop"), 'data: {"choices":[],"usa' }, "reset" },
      } do
        c = client{ transport = scripted{ function(req)
          for _, piece in ipairs(case[1]) do req.on_chunk(piece) end
          return nil, errors.new(case[2], "the body did not end", { status = 200 })
        end } }
        res, err = c:chat_stream{ messages = user("x"), on_delta = on_delta }
        assert.is_nil(err)
        assert.equal("done", res.choices[1].message.content)
      end
      c = client{ transport = scripted{ function(req)
        req.on_chunk(event(0, "one") .. event(1, "two") .. event(0, "", "stop"))
        return nil, errors.new("reset", "transfer closed with outstanding read data remaining")
      end } }
      res, err = c:chat_stream{ messages = user("x"), n = 2, on_delta = function() end }
      keep(err)
      assert.is_nil(res)
      assert.equal("reset", err.kind)
      assert.equal("onetwo", err.partial)
    end)

    it("takes id, model and created from the first chunk that has them (Azure's first has none)", function()
      local pieces = {
        'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":' ..
          '[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n',
        'data: {"choices":[{"content_filter_results":{},"delta":{"content":"","role":"assistant"},' ..
          '"finish_reason":null,"index":0}],"created":1717000000,"id":"chatcmpl-9","model":"gpt-4o-2024-05-13",' ..
          '"object":"chat.completion.chunk","system_fingerprint":"fp_5f4bad809a"}\n\n',
        'data: {"choices":[{"delta":{"content":"Hi"},"finish_reason":null,"index":0}],"created":1717000000,' ..
          '"id":"chatcmpl-9","model":"gpt-4o-2024-05-13","object":"chat.completion.chunk"}\n\n',
        'data: {"choices":[{"delta":{},"finish_reason":"stop","index":0}],"created":1717000000,' ..
          '"id":"chatcmpl-9","model":"gpt-4o-2024-05-13","object":"chat.completion.chunk"}\n\n',
        'data: [DONE]\n\n',
      }
      local c = client{ transport = scripted{ function() return 200, pieces end } }
      local res = assert(c:chat_stream{ messages = user("x"), on_delta = function() end })
      assert.equal("Hi", res.choices[1].message.content)
      assert.equal("chatcmpl-9", res.id)
      assert.equal("gpt-4o-2024-05-13", res.model)
      assert.equal(1717000000, res.created)
    end)

    it("a provider error before the stream starts is typed like chat's", function()
      local c = client()
      up:scenario{ { fault = "429", retry_after = 1, times = 3 } }
      local _, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("x"), on_delta = on_delta }
      keep(err)
      assert.is_nil(res)
      assert.equal("rate_limited", err.kind)
      assert.equal("rate_limit_exceeded", err.code)
      assert.is_nil(err.partial)
    end)

    it("an error event before the first token is retried, then goes to the next model", function()
      local log = {}
      local c = client{ fallback_models = { "gpt-fake-mini" }, transport = recording_transport(log) }
      up:scenario{ { fault = "stream_error", times = 3 } }  -- role chunk, then a server_error event
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("after the event"), on_delta = on_delta }
      assert.is_nil(err)
      assert.same({ "gpt-fake", "gpt-fake", "gpt-fake", "gpt-fake-mini" }, log)
      assert.same({ "after ", "the ", "event" }, parts)
      assert.equal("after the event", res.choices[1].message.content)
      assert.equal("gpt-fake-mini", c.last.model)
      assert.equal(3, c:breaker("gpt-fake"):stats().failures)
      -- every model failing so: kind server_error, the provider's type, no code (JSON null)
      up:scenario{ { fault = "stream_error", times = 6 } }
      res, err = c:chat_stream{ messages = user("x"), on_delta = on_delta }
      keep(err)
      assert.is_nil(res)
      assert.equal("server_error", err.kind)
      assert.equal("server_error", err.type)
      assert.is_nil(err.code)
      assert.is_nil(err.status)
      assert.is_nil(err.partial)
      assert.equal(3, err.attempts)
      assert.equal(2, err.models)
      assert.matches("The server had an error", err.message, 1, true)
    end)

    it("an error event's type and code decide: rate limit, caller error, context length", function()
      local log = {}
      local c = client{ fallback_models = { "gpt-fake-mini" }, long_context_models = { "gpt-fake-mini" },
                        transport = recording_transport(log) }
      local _, on_delta = collector()
      -- a rate limit: retried, not a breaker failure
      up:scenario{ { fault = "stream_error", error_type = "requests", error_code = "rate_limit_exceeded" } }
      local res, err = c:chat_stream{ messages = user("paced"), on_delta = on_delta }
      assert.is_nil(err)
      assert.equal("paced", res.choices[1].message.content)
      assert.equal(2, c.last.attempts)
      assert.equal(0, c:breaker("gpt-fake"):stats().failures)
      -- the caller's mistake: back at once, no retry, no other model
      for i = #log, 1, -1 do log[i] = nil end
      up:scenario{ { fault = "stream_error", error_type = "invalid_request_error", error_code = "invalid_value",
                     error_message = "Invalid value for 'temperature'." } }
      res, err = c:chat_stream{ messages = user("x"), on_delta = on_delta }
      keep(err)
      assert.is_nil(res)
      assert.equal("invalid_request", err.kind)
      assert.equal("invalid_value", err.code)
      assert.equal("Invalid value for 'temperature'.", err.message)
      assert.same({ "gpt-fake" }, log)
      -- context length: routed to long_context_models
      for i = #log, 1, -1 do log[i] = nil end
      up:scenario{ { fault = "stream_error", error_type = "invalid_request_error",
                     error_code = "context_length_exceeded" } }
      res, err = c:chat_stream{ messages = user("long"), on_delta = on_delta }
      assert.is_nil(err)
      assert.same({ "gpt-fake", "gpt-fake-mini" }, log)
      assert.equal("context_length", c.last.routed)
      assert.equal("long", res.choices[1].message.content)
    end)

    it("an error event after the first token comes back with the partial text", function()
      local c = client{ fallback_models = { "gpt-fake-mini" } }
      up:scenario{ { fault = "stream_error", events = 3 } } -- role, "alpha ", "beta "
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("alpha beta gamma"), on_delta = on_delta }
      keep(err)
      assert.is_nil(res)
      assert.same({ "alpha ", "beta " }, parts)
      assert.equal("server_error", err.kind)
      assert.equal("alpha beta ", err.partial)
      assert.equal(1, up:stats().requests)
    end)

    it("on_delta returning false stops the stream without a breaker failure", function()
      local c = client()
      local n = 0
      local res, err = c:chat_stream{ messages = user("a b c d e"), on_delta = function()
        n = n + 1
        return n < 2
      end }
      keep(err)
      assert.is_nil(res)
      assert.equal("aborted", err.kind)
      assert.equal("a b ", err.partial)
      assert.equal(0, c:breaker("gpt-fake"):stats().failures)
    end)

    it("on_delta raising: raised again from chat_stream as it was, the call counted as failed", function()
      local c = client{ fallback_models = { "gpt-fake-mini" }, fallback = { value = "never" } }
      local boom = setmetatable({}, { __tostring = function() return "boom" end })
      local n = 0
      local ok, raised = pcall(c.chat_stream, c, { messages = user("a b c"), on_delta = function()
        n = n + 1
        if n == 2 then error(boom) end
      end })
      assert.is_false(ok)
      assert.equal(boom, raised)
      assert.equal(2, n)
      assert.equal(1, up:stats().requests)   -- no retry, no other model
      local s = c:stats()
      assert.same({ 1, 0, 1, 0 }, { s.calls, s.successes, s.failures, s.fallbacks })
      assert.same({ 1, 0, 1 }, { s.models["gpt-fake"].calls, s.models["gpt-fake"].successes,
                                 s.models["gpt-fake"].failures })
      assert.equal(0, c:breaker("gpt-fake"):stats().failures)   -- the caller's doing
      keep(c.last)
      assert.is_nil(c.last.model)
      assert.equal("error", c.last.error.kind)
      assert.is_true(c.last.error.raised)
      assert.equal("raised: boom", c.last.error.message)
      assert.equal("gpt-fake", c.last.error.model)
    end)

    it("on_delta raising on a fallback's text: raised again, no fallback counted", function()
      local c = client{ fallback = { value = "Busy, try later." }, policy = { retry = false } }
      up:scenario{ { fault = "503" } }
      local ok, raised = pcall(c.chat_stream, c, { messages = user("x"), on_delta = function(text)
        error("no room for " .. text, 0)
      end })
      assert.is_false(ok)
      assert.equal("no room for Busy, try later.", raised)
      local s = c:stats()
      assert.same({ 1, 0, 1, 0, 0 }, { s.calls, s.successes, s.failures, s.fallbacks, s.fallback_value })
      keep(c.last)
      assert.is_nil(c.last.fallback)
      assert.same({ "error", true }, { c.last.error.kind, c.last.error.raised })
      assert.is_true(c.last.elapsed > 0)
    end)

    local TOOLS = {
      { type = "function", ["function"] = { name = "search", parameters = { type = "object" } } },
      { type = "function", ["function"] = { name = "lookup_weather", parameters = { type = "object" } } },
    }

    it("assembles streamed tool calls: ids, names and arguments joined per index", function()
      local c = client()
      local pieces = 0
      local res, err = c:chat_stream{ messages = user("weather in Paris?"), tools = TOOLS,
                                      tool_choice = "required",
                                      on_delta = function(text, chunk)
                                        assert.equal("", text)
                                        if chunk.choices[1].delta.tool_calls then pieces = pieces + 1 end
                                      end }
      assert.is_nil(err)
      assert.is_true(pieces > 4)         -- the arguments came in several pieces
      local choice = res.choices[1]
      assert.equal("tool_calls", choice.finish_reason)
      assert.equal(cjson.null, choice.message.content)
      local calls = choice.message.tool_calls
      assert.equal(2, #calls)
      for i, name in ipairs{ "search", "lookup_weather" } do
        assert.equal(name, calls[i]["function"].name)
        assert.equal("function", calls[i].type)
        assert.matches("^call_chatcmpl%-fake%d+_" .. (i - 1) .. "$", calls[i].id)
        assert.same({ query = "weather in Paris?" }, cjson.decode(calls[i]["function"].arguments))
      end
      -- the same shape as the provider's non-streamed answer
      local plain = assert(c:chat{ messages = user("weather in Paris?"), tools = TOOLS,
                                   tool_choice = "required" })
      assert.equal(#plain.choices[1].message.tool_calls, #calls)
      assert.equal(plain.choices[1].message.tool_calls[2]["function"].arguments,
                   calls[2]["function"].arguments)
    end)

    it("a tool-call stream whose pieces carry content \"\" still has content null", function()
      local function piece(delta, finish)
        return "data: " .. cjson.encode{ id = "c1", model = "gpt-fake", choices = {
          { index = 0, delta = delta, finish_reason = finish or cjson.null } } } .. "\n\n"
      end
      local c = client{ fallback = { cache = true }, transport = scripted{ function()
        return 200, {
          piece{ role = "assistant", content = "", tool_calls = { { index = 0, id = "call_1", type = "function",
                 ["function"] = { name = "search", arguments = "" } } } },
          piece{ content = "", tool_calls = { { index = 0, ["function"] = { arguments = '{"q":1}' } } } },
          piece({ content = "" }, "tool_calls"),
          "data: [DONE]\n\n" }
      end } }
      local res = assert(c:chat_stream{ messages = user("x"), tools = TOOLS, on_delta = function() end })
      assert.equal(cjson.null, res.choices[1].message.content)
      assert.equal('{"q":1}', res.choices[1].message.tool_calls[1]["function"].arguments)
      -- cached as the answer to that request, as chat's tool calls are
      c:breaker("gpt-fake"):force_open()
      assert.equal(res, c:chat_stream{ messages = user("x"), tools = TOOLS, on_delta = function() end })
      assert.equal("cache", c.last.fallback)
    end)

    it("tells parallel tool calls apart by id when the provider sends no index", function()
      local c = client()
      up:scenario{ { fault = "ok", tool_index = "none" } }
      local res, err = c:chat_stream{ messages = user("both"), tools = TOOLS, tool_choice = "required",
                                      on_delta = function() end }
      assert.is_nil(err)
      local calls = res.choices[1].message.tool_calls
      assert.equal(2, #calls)
      assert.same({ "search", "lookup_weather" }, { calls[1]["function"].name, calls[2]["function"].name })
      assert.are_not.equal(calls[1].id, calls[2].id)
      for i = 1, 2 do assert.same({ query = "both" }, cjson.decode(calls[i]["function"].arguments)) end
    end)

    it("a tool-call index that cannot be one is a decode error, not a huge table", function()
      local c = client()
      up:scenario{ { fault = "ok", tool_index = 3000000 } }
      local t0 = os.clock()
      local res, err = c:chat_stream{ messages = user("x"), tools = TOOLS, tool_choice = "required",
                                      on_delta = function() end }
      keep(err)
      assert.is_nil(res)
      assert.equal("decode", err.kind)
      assert.matches("tool_calls index", err.message, 1, true)
      assert.equal("search", err.partial_tool_calls[1]["function"].name)   -- the first call came whole
      assert.is_true(os.clock() - t0 < 1)
    end)

    it("a choice index that cannot be one is a decode error, not millions of choices", function()
      local function event(index, text, finish)
        return "data: " .. cjson.encode{ id = "c1", model = "gpt-fake", choices = {
          { index = index, delta = { content = text }, finish_reason = finish or cjson.null } } } .. "\n\n"
      end
      -- several choices (n = 2), in any order: one completion each
      local c = client{ transport = scripted{ function()
        return 200, { event(1, "second"), event(0, "first"), event(0, "", "stop"), event(1, "", "length"),
                      "data: [DONE]\n\n" }
      end } }
      local res = assert(c:chat_stream{ messages = user("x"), n = 2, on_delta = function() end })
      assert.equal(2, #res.choices)
      assert.equal("first", res.choices[1].message.content)
      assert.equal("second", res.choices[2].message.content)
      assert.equal("length", res.choices[2].finish_reason)
      for _, index in ipairs{ 3e6, 1e9, 1e300, -1, 0.5, "1" } do
        c = client{ policy = false, transport = scripted{ function()
          return 200, { event(index, "hi", "stop"), "data: [DONE]\n\n" }
        end } }
        local t0 = os.clock()
        local got, err = c:chat_stream{ messages = user("x"), on_delta = function() end }
        keep(err)
        assert.is_nil(got and #got.choices, tostring(index))   -- (not a table to print)
        assert.equal("decode", err.kind)
        assert.matches("bad choice index", err.message, 1, true)
        assert.is_true(os.clock() - t0 < 0.1)
      end
    end)

    it("takes a provider that ignores stream and answers in one document", function()
      local c = client()
      up:scenario{ { fault = "ok", ignore_stream = true }, { fault = "ok", ignore_stream = true } }
      local parts = {}
      local res, err = c:chat_stream{ messages = user("all at once"),
                                      on_delta = function(text) parts[#parts + 1] = text end }
      assert.is_nil(err)
      assert.same({ "all at once" }, parts)
      assert.equal("all at once", res.choices[1].message.content)
      assert.equal("stop", res.choices[1].finish_reason)
      assert.is_table(res.usage)
      res, err = c:chat_stream{ messages = user("tools at once"), tools = TOOLS, tool_choice = "required",
                                on_delta = function() end }
      assert.is_nil(err)
      local calls = res.choices[1].message.tool_calls
      assert.same({ "search", "lookup_weather" }, { calls[1]["function"].name, calls[2]["function"].name })
      assert.same({ query = "tools at once" }, cjson.decode(calls[2]["function"].arguments))
      assert.equal(cjson.null, res.choices[1].message.content)
      assert.equal("tool_calls", res.choices[1].finish_reason)
    end)

    it("takes the events of a transport that does not stream, in one body", function()
      -- breaker.curl without on_chunk: the whole event stream comes as the body
      local t = require("breaker.curl").new{ timeout = 5 }
      local buffering = { request = function(_, req)
        local r = {}
        for k, v in pairs(req) do r[k] = v end
        r.on_chunk = nil
        return t:request(r)
      end }
      local c = client{ transport = buffering }
      local parts, on_delta = collector()
      local res, err = c:chat_stream{ messages = user("all the events"), on_delta = on_delta }
      assert.is_nil(err)
      assert.same({ "all ", "the ", "events" }, parts)
      assert.equal("all the events", res.choices[1].message.content)
      assert.equal("stop", res.choices[1].finish_reason)
      assert.equal("gpt-fake", res.model)
      -- a body that is neither a completion nor events: decode, not an empty success
      for _, body in ipairs{ "", "<html>busy</html>", '{"choices":[]}' } do
        c = client{ policy = false, transport = scripted{ function() return 200, body end } }
        res, err = c:chat_stream{ messages = user("x"), on_delta = on_delta }
        keep(err)
        assert.is_nil(res, body)
        assert.equal("decode", err.kind)
      end
    end)

    it("a stream that dies inside a tool call reports the calls received so far", function()
      local c = client()
      -- events: the first call's opening piece and two 7-byte argument pieces
      up:scenario{ { fault = "stream_die", events = 3 } }
      local res, err = c:chat_stream{ messages = user("cut me short"), tools = TOOLS,
                                      tool_choice = { type = "function", ["function"] = { name = "search" } },
                                      on_delta = function() end }
      keep(err)
      assert.is_nil(res)
      assert.equal("reset", err.kind)
      assert.equal("", err.partial)
      assert.equal(1, #err.partial_tool_calls)
      assert.equal("search", err.partial_tool_calls[1]["function"].name)
      assert.equal(14, #err.partial_tool_calls[1]["function"].arguments)
      assert.equal(1, up:stats().requests)   -- never re-sent after the first piece
    end)

    it("the breaker records the time to first token as the latency", function()
      local c = client{ policy = { breaker = { slow_call_duration = 0.3, minimum_calls = 1 },
                                   sleep = recorded } }
      -- First token after ~0.1 s, the whole stream ~0.5 s: not slow.
      up:scenario{ { fault = "slow", body_delay = 0.1 } }
      local _, on_delta = collector()
      assert(c:chat_stream{ messages = user("w1 w2 w3 w4"), on_delta = on_delta })
      local st = c:breaker("gpt-fake"):stats()
      assert.equal(1, st.successes)
      assert.equal(0, st.slow)
      -- The first byte after 0.4 s: slow.
      up:scenario{ { fault = "slow", delay = 0.4 } }
      assert(c:chat_stream{ messages = user("w1 w2"), on_delta = on_delta })
      assert.equal(1, c:breaker("gpt-fake"):stats().slow)
    end)
  end)

  describe("sse_parser", function()
    local function parse(pieces)
      local events = {}
      local feed = llm.sse_parser(function(d) events[#events + 1] = d end)
      for _, p in ipairs(pieces) do feed(p) end
      feed(nil)
      return events
    end

    it("is robust to chunk boundaries, CRLF, comments and multi-line data", function()
      local text = ": keep-alive\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\n" ..
                   "data:nospace\n\ndata: [DONE]\n\n"
      local want = { '{"a":1}', "line1\nline2", "nospace", "[DONE]" }
      assert.same(want, parse({ text }))
      local bytes = {}
      for i = 1, #text do bytes[i] = text:sub(i, i) end
      assert.same(want, parse(bytes))
      for cut = 1, #text - 1 do
        assert.same(want, parse({ text:sub(1, cut), text:sub(cut + 1) }))
      end
    end)

    it("flushes a last event without its blank line", function()
      assert.same({ "tail" }, parse({ "data: ta", "il" }))
    end)
  end)

  describe("embeddings", function()
    it("returns the provider's vectors and counts their tokens", function()
      local c = client{ embedding_model = "text-embedding-fake" }
      local res, err = c:embeddings{ input = { "first text", "second" }, dimensions = 4 }
      assert.is_nil(err)
      assert.equal("list", res.object)
      assert.equal(2, #res.data)
      assert.equal(4, #res.data[1].embedding)
      assert.equal("text-embedding-fake", res.model)
      local last = up:last_request()
      assert.equal("/v1/embeddings", last.path)
      assert.equal(4, cjson.decode(last.body).dimensions)
      assert.equal(res.usage.prompt_tokens, c:stats().models["text-embedding-fake"].prompt_tokens)
    end)

    it("does not fall back to another model", function()
      local log = {}
      local c = client{ embedding_model = "text-embedding-fake", fallback_models = { "gpt-fake-mini" },
                        transport = recording_transport(log), policy = { retry = false } }
      up:scenario{ { fault = "503" } }
      local res, err = c:embeddings{ input = "x" }
      keep(err)
      assert.is_nil(res)
      assert.same({ "text-embedding-fake" }, log)
    end)

    it("does not go to long_context_models on context_length_exceeded either", function()
      local log = {}
      local too_long = '{"error":{"message":"This model\'s maximum context length is 8192 tokens.",' ..
                       '"type":"invalid_request_error","param":"input","code":"context_length_exceeded"}}'
      local c = client{ embedding_model = "text-embedding-fake", long_context_models = { "gpt-fake" },
                        transport = scripted({ function() return 400, too_long end,
                                               function() return 200, '{"object":"list","data":[]}' end }, log) }
      local res, err = c:embeddings{ input = "a long text" }
      keep(err)
      assert.is_nil(res)
      assert.same({ "text-embedding-fake" }, log)
      assert.equal("context_length", err.kind)
      assert.equal("input", err.param)
      assert.equal(0, c:stats().context_routed)
      assert.is_nil(c.last.routed)
    end)
  end)

  describe("fallback answers", function()
    it("serves the last good answer to an identical request without calling the API", function()
      local c = client{ fallback = { cache = { size = 10 } } }
      local req = { messages = user("cache me"), temperature = 0 }
      local good = assert(c:chat(req))
      c:breaker("gpt-fake"):force_open()
      local before = up:stats().requests
      local res, err = c:chat{ temperature = 0, messages = user("cache me") } -- same request, new table
      assert.is_nil(err)
      assert.equal(good, res)
      assert.equal("cache", c.last.fallback)
      assert.equal("breaker_open", c.last.error.kind)
      assert.equal(before, up:stats().requests)
      -- A different request has no cached answer.
      local res2, err2 = c:chat{ messages = user("never seen"), temperature = 0 }
      keep(err2)
      assert.is_nil(res2)
      assert.equal("breaker_open", err2.kind)
      assert.equal(1, c:stats().fallback_cache)
    end)

    it("tells requests apart by fields named timeout, stream or on_delta below the top", function()
      local c = client{ fallback = { cache = true } }
      local function req(t)
        return { messages = user("schema"), timeout = 3, response_format = { type = "json_schema",
                 json_schema = { name = "s", schema = { type = "object", properties = t } } } }
      end
      local good = assert(c:chat(req{ timeout = { type = "integer" } }))
      c:breaker("gpt-fake"):force_open()
      assert.equal(good, c:chat(req{ timeout = { type = "integer" } }))
      assert.equal("cache", c.last.fallback)
      for _, t in ipairs{ { timeout = { type = "string" } }, { stream = { type = "integer" } },
                          { on_delta = { type = "integer" } } } do
        local res, err = c:chat(req(t))
        keep(err)
        assert.is_nil(res)
        assert.equal("breaker_open", err.kind)
      end
      -- the top-level timeout is the client's: not part of the request
      local r = req{ timeout = { type = "integer" } }
      r.timeout = 9
      assert(c:chat(r))
    end)

    it("a cached answer also serves a stream of the same request", function()
      local c = client{ fallback = { cache = true } }
      assert(c:chat{ messages = user("streamed from cache") })
      up:scenario{ { fault = "503", times = 3 } }
      local got = {}
      local res = c:chat_stream{ messages = user("streamed from cache"),
                                 on_delta = function(t) got[#got + 1] = t end }
      assert.equal("cache", c.last.fallback)
      assert.same({ "streamed from cache" }, got)
      assert.equal("streamed from cache", res.choices[1].message.content)
    end)

    it("answers with the static value when all models fail, never on caller errors", function()
      local c = client{ fallback_models = { "gpt-fake-mini" }, fallback = { value = "Busy, try later." },
                        policy = { retry = false } }
      up:scenario{ { fault = "503" }, { fault = "503" } }
      local res, err = c:chat{ messages = user("x") }
      assert.is_nil(err)
      assert.equal("Busy, try later.", res.choices[1].message.content)
      assert.equal("value", c.last.fallback)
      assert.equal(2, up:stats().requests)
      up:scenario{ { fault = "401" } }
      res, err = c:chat{ messages = user("x") }
      keep(err)
      assert.is_nil(res)
      assert.equal("auth", err.kind)
    end)

    it("a fallback function gets the error and the request", function()
      local got_err, got_req
      local c = client{ fallback = { fn = function(e, r)
        got_err, got_req = e, r
        return { answer = "computed" }
      end }, policy = { retry = false } }
      up:scenario{ { fault = "500" } }
      local req = { messages = user("x") }
      local res = c:chat(req)
      assert.same({ answer = "computed" }, res)
      assert.equal(500, got_err.status)
      assert.equal(req, got_req)
      assert.equal("function", c.last.fallback)
    end)
  end)

  describe("the API key", function()
    it("is scrubbed from errors even when the provider quotes it", function()
      local c = client{ fallback_models = { "gpt-fake-mini" }, policy = { retry = false } }
      up:scenario{ { fault = "503", echo_key = 1 }, { fault = "401", echo_key = 1 } }
      local res, err = c:chat{ messages = user("x") }
      keep(err)
      assert.is_nil(res)
      assert.equal("auth", err.kind)
      assert.matches("Incorrect API key provided: [redacted]", err.message, 1, true)
      assert.matches("[redacted]", err.response.body, 1, true)
      keep(c.last)
      keep(c:stats())
      keep(tostring(c))
    end)

    it("is scrubbed from the error a breaker rejection wraps, and from client.last", function()
      local c
      -- another worker trips the breaker while this call backs off
      c = client{ policy = { retry = { max_attempts = 3, base = 0.01, cap = 0.02 },
                             sleep = function() c:breaker("gpt-fake"):force_open() end } }
      up:scenario{ { fault = "503", echo_key = 1, times = 3 } }
      local res, err = c:chat{ messages = user("x") }
      keep(err)
      keep(c.last)
      assert.is_nil(res)
      assert.equal("breaker_open", err.kind)
      local cause = err.cause
      assert.equal(503, cause.status)
      assert.matches("overloaded, please try again later.: [redacted]", cause.message, 1, true)
      assert.matches("[redacted]", cause.response.body, 1, true)
      assert.is_nil(cause.response.body:find(KEY, 1, true))
      assert.equal(cause, c.last.error.cause)
      assert.equal(1, up:stats().requests)
    end)

    it("is scrubbed from the headers of the response an error holds", function()
      local body = '{"error":{"message":"overloaded","type":"server_error"}}'
      local c = client{ policy = false, transport = scripted{ function()
        return 503, body, { ["x-debug-key"] = KEY, ["x-list"] = { "a", "key=" .. KEY } }
      end } }
      local _, err = c:chat{ messages = user("x") }
      keep(err)
      assert.equal(503, err.status)
      assert.equal("[redacted]", err.response.headers["x-debug-key"])
      assert.same({ "a", "key=[redacted]" }, err.response.headers["x-list"])
    end)

    it("never appears in any error, report or stats these specs produced", function()
      assert.is_true(#seen > 15)
      for i, v in ipairs(seen) do
        local text = table.concat(dump(v), " ")
        if type(v) == "table" and getmetatable(v) == require("breaker.error").mt then
          text = text .. " " .. tostring(v)
        end
        assert.is_nil(text:find(KEY, 1, true), "key found in item " .. i .. ": " .. text:sub(1, 300))
      end
    end)
  end)
end)

-- Providers answer https over HTTP/2; a stream they cut is reset on its own
-- (RST_STREAM) while the connection lives on. The client must treat it as
-- it treats a dropped HTTP/1.1 connection.
describe("breaker.llm over HTTPS with HTTP/2", function()
  local up

  setup(function()
    up = helper.upstream.start{ workers = 1, api_key = KEY, tls = true }
  end)

  teardown(function()
    if up then up:stop() end
  end)

  before_each(function()
    up:reset()
  end)

  after_each(close_llm_breakers)

  local function client()
    return llm.new{ base_url = up.url .. "/v1", api_key = KEY, model = "gpt-fake", timeout = 5,
                    transport = { ca_file = up.ca_file },
                    policy = { retry = { max_attempts = 3, base = 0.01, cap = 0.02 },
                               sleep = function() end } }
  end

  it("retries a stream the provider resets before the first token, over one connection", function()
    local c = client()
    up:scenario{ { fault = "stream_die", events = 1 } }
    local parts = {}
    local res, err = c:chat_stream{ messages = user("alpha beta"),
                                    on_delta = function(text) parts[#parts + 1] = text end }
    assert.is_nil(err)
    assert.equal("alpha beta", table.concat(parts))
    assert.equal("alpha beta", res.choices[1].message.content)
    assert.equal(2, c.last.attempts)
    local stats = up:stats()
    assert.equal(2, stats.requests)
    assert.equal(1, stats.connections)
    c:close()
  end)

  it("answers chat and embeddings, and a reset chat is retried", function()
    local c = client()
    up:scenario{ { fault = "reset" } }
    local res, err = c:chat{ messages = user("one two") }
    assert.is_nil(err)
    assert.equal("one two", res.choices[1].message.content)
    assert.equal(2, c.last.attempts)
    local emb = assert(c:embeddings{ model = "text-embedding-fake", input = { "a", "b" } })
    assert.equal(2, #emb.data)
    c:close()
  end)
end)
