-- Specs for the fake upstream itself (spec/support/): the API shapes, the
-- control interface, scenarios, the rate limit and exact counts with several
-- workers. Later specs rely on all of this. Plain Lua 5.1 compatible.
local curl = require "breaker.curl"
local cjson = require "cjson"
local helper = require "helper"

local KEY = "sk-test-good"

describe("fake upstream", function()
  local up, t

  local function call(path, opts)
    opts = opts or {}
    local headers = { authorization = "Bearer " .. (opts.key or KEY),
                      ["content-type"] = "application/json" }
    if opts.fault then headers["x-fake-fault"] = opts.fault end
    local res, err = t:request{ method = opts.method, url = up.url .. path, headers = headers,
                                body = opts.json and cjson.encode(opts.json) or opts.body,
                                timeout = 10 }
    assert(res, tostring(err))
    return res, (require("cjson.safe").decode(res.body))
  end

  local function chat(content, extra)
    local req = { model = "gpt-fake", messages = { { role = "system", content = "be brief" },
                                                    { role = "user", content = content } } }
    for k, v in pairs(extra or {}) do req[k] = v end
    return req
  end

  lazy_setup(function()
    up = helper.upstream.start{ api_key = KEY }
    t = curl.new()
  end)

  lazy_teardown(function()
    if t then t:close() end
    if up then up:stop() end
  end)

  before_each(function() up:reset() end)

  describe("lifecycle", function()
    it("runs on 127.0.0.1 under its own prefix and stops by pid", function()
      local other = helper.upstream.start{ api_key = false }
      assert.matches("^http://127%.0%.0%.1:%d+$", other.url)
      assert.is_true(other.pid > 1)
      assert.is_truthy(io.open(other.prefix .. "/logs/nginx.pid"))
      assert.is_true(other:alive())
      other:stop()
      assert.is_false(other:alive())
      other:stop()  -- idempotent
      local _, err = t:request{ url = other.url .. "/echo" }
      assert.are.equal("connect", err.kind)
    end)

    it("free_port gives a port that refuses connections", function()
      local _, err = t:request{ url = "http://127.0.0.1:" .. helper.free_port() .. "/" }
      assert.are.equal("connect", err.kind)
    end)
  end)

  describe("API", function()
    it("answers chat completions in OpenAI's shape, echoing the last user message", function()
      local res, body = call("/v1/chat/completions", { json = chat("hello there") })
      assert.are.equal(200, res.status)
      assert.matches("^chatcmpl%-", body.id)
      assert.are.equal("chat.completion", body.object)
      assert.are.equal("gpt-fake", body.model)
      assert.are.equal("number", type(body.created))
      assert.are.same({ index = 0, finish_reason = "stop",
                        message = { role = "assistant", content = "hello there" } }, body.choices[1])
      local u = body.usage
      assert.is_true(u.prompt_tokens > 0 and u.completion_tokens > 0)
      assert.are.equal(u.prompt_tokens + u.completion_tokens, u.total_tokens)
    end)

    it("streams chat completions as Server-Sent Events ending in [DONE]", function()
      local res = call("/v1/chat/completions", { json = chat("a b c", { stream = true }) })
      assert.are.equal("text/event-stream", res.headers["content-type"])
      local events = {}
      for data in res.body:gmatch("data: ([^\n]*)\n\n") do events[#events + 1] = data end
      assert.are.equal("[DONE]", events[#events])
      local text = {}
      for i = 1, #events - 1 do
        local ev = cjson.decode(events[i])
        assert.are.equal("chat.completion.chunk", ev.object)
        text[#text + 1] = ev.choices[1].delta.content or ""
      end
      assert.are.equal("a b c", table.concat(text))
      assert.are.equal("stop", cjson.decode(events[#events - 1]).choices[1].finish_reason)
      assert.are.equal(cjson.null, cjson.decode(events[1]).choices[1].finish_reason)
    end)

    it("answers embeddings, deterministic per input", function()
      local _, body = call("/v1/embeddings", { json = { model = "text-embedding-fake",
                                                        input = { "x", "y", "x" }, dimensions = 4 } })
      assert.are.equal("list", body.object)
      assert.are.equal(3, #body.data)
      assert.are.equal(4, #body.data[1].embedding)
      assert.are.equal(1, body.data[2].index)
      assert.are.same(body.data[1].embedding, body.data[3].embedding)
      assert.are_not.same(body.data[1].embedding, body.data[2].embedding)
      assert.is_true(body.usage.prompt_tokens > 0)
    end)

    it("lists models", function()
      local _, body = call("/v1/models")
      assert.are.equal("list", body.object)
      local ids = {}
      for _, m in ipairs(body.data) do ids[m.id] = m.object end
      assert.are.equal("model", ids["gpt-fake"])
      assert.are.equal("model", ids["small-context"])
    end)

    it("rejects a wrong or missing key with 401 invalid_api_key", function()
      for _, key in ipairs{ "sk-wrong", "" } do
        local res, body = call("/v1/models", { key = key })
        assert.are.equal(401, res.status)
        assert.are.same({ error = { message = "Incorrect API key provided",
                                    type = "invalid_request_error", param = cjson.null,
                                    code = "invalid_api_key" } }, body)
      end
    end)

    it("answers context_length_exceeded for a long prompt to small-context", function()
      local req = chat(string.rep("word ", 2000))
      req.model = "small-context"
      local res, body = call("/v1/chat/completions", { json = req })
      assert.are.equal(400, res.status)
      assert.are.equal("context_length_exceeded", body.error.code)
      assert.are.equal("messages", body.error.param)
      assert.matches("maximum context length", body.error.message)
      req.messages[2].content = "short"
      assert.are.equal(200, (call("/v1/chat/completions", { json = req })).status)
    end)

    it("answers errors in OpenAI's shape for bad requests", function()
      local res, body = call("/v1/chat/completions", { body = "{not json" })
      assert.are.equal(400, res.status)
      assert.are.equal("invalid_request_error", body.error.type)
      res, body = call("/v1/nope")
      assert.are.equal(404, res.status)
      assert.are.equal("string", type(body.error.message))
    end)
  end)

  describe("faults", function()
    it("takes faults from the x-fake-fault header, query-string encoded", function()
      local res, body = call("/v1/models", { fault = helper.fault{ fault = "429", retry_after = 3 } })
      assert.are.equal(429, res.status)
      assert.are.equal("3", res.headers["retry-after"])
      assert.are.equal("rate_limit_exceeded", body.error.code)
      res, body = call("/v1/models", { fault = "fault=quota" })
      assert.are.equal(429, res.status)
      assert.are.equal("insufficient_quota", body.error.code)
      assert.are.equal("insufficient_quota", body.error.type)
    end)

    it("plays a scenario one step per request, with times, then behaves", function()
      assert.are.equal(4, up:scenario{ { fault = "503", times = 2 }, { fault = "429", retry_after_ms = 250 },
                                       { fault = "ok" } })
      local statuses = {}
      for i = 1, 5 do statuses[i] = (call("/v1/models")).status end
      assert.are.same({ 503, 503, 429, 200, 200 }, statuses)
      local s = up:stats()
      assert.are.equal(5, s.requests)
      assert.are.equal(0, s.scenario_left)
    end)

    it("lets a header fault override the scenario without consuming it", function()
      up:scenario{ { fault = "500" } }
      assert.are.equal(418, (call("/v1/models", { fault = "fault=418" })).status)
      assert.are.equal(500, (call("/v1/models")).status)
    end)

    it("sends Retry-After as an HTTP-date, retry-after-ms and x-should-retry", function()
      up:scenario{ { fault = "529", retry_after_date = 60, retry_after_ms = 1234, should_retry = "true" } }
      local res = call("/v1/models")
      assert.are.equal(529, res.status)
      local secs = curl.parse_retry_after(res.headers["retry-after"])
      assert.is_true(secs >= 55 and secs <= 60, tostring(secs))
      assert.are.equal("1234", res.headers["retry-after-ms"])
      assert.are.equal("true", res.headers["x-should-retry"])
    end)

    it("sends an oversized body of the requested size", function()
      local res = call("/v1/models", { fault = "fault=oversize&size=123457" })
      assert.are.equal(123457, #res.body)
    end)

    it("answers after delay, and not before", function()
      local start = helper.now()
      local res = call("/v1/models", { fault = "fault=slow&delay=0.3" })
      assert.are.equal(200, res.status)
      assert.is_true(helper.now() - start >= 0.25)
    end)
  end)

  describe("bookkeeping", function()
    it("counts API requests per path, not control calls, and reset clears", function()
      call("/v1/models")
      call("/v1/models")
      call("/v1/embeddings", { json = { model = "e", input = "x" } })
      up:stats()
      up:stats()
      local s = up:stats()
      assert.are.equal(3, s.requests)
      assert.are.same({ ["/v1/models"] = 2, ["/v1/embeddings"] = 1 }, s.paths)
      up:reset()
      s = up:stats()
      assert.are.equal(0, s.requests)
      assert.are.equal(0, s.connections)
    end)

    it("remembers the last API request", function()
      call("/v1/chat/completions", { json = chat("remember me") })
      local last = up:last_request()
      assert.are.equal("POST", last.method)
      assert.are.equal("/v1/chat/completions", last.path)
      assert.are.equal("remember me", cjson.decode(last.body).messages[2].content)
      assert.are.equal("Bearer " .. KEY, last.headers.authorization)
      assert.are.equal("application/json", last.headers["content-type"])
    end)

    it("remembers a body with blank lines and a path with odd bytes exactly", function()
      local body = "line one\r\n\r\nHost: not-a-header\r\n\r\n\0tail"
      call("/v1/odd%0Apath", { body = body })
      local last = up:last_request()
      assert.are.equal("/v1/odd\npath", last.path)
      assert.are.equal(body, last.body)
      assert.is_nil(last.headers["not-a-header"])
      assert.are.equal("Bearer " .. KEY, last.headers.authorization)
    end)
  end)

  describe("rate limit", function()
    it("enforces requests per minute with x-ratelimit headers and Retry-After", function()
      up:rate_limit(3)
      local remaining = {}
      for i = 1, 3 do
        local res = call("/v1/models")
        assert.are.equal(200, res.status)
        assert.are.equal("3", res.headers["x-ratelimit-limit-requests"])
        remaining[i] = res.headers["x-ratelimit-remaining-requests"]
        local reset = res.headers["x-ratelimit-reset-requests"]  -- "20ms", "1.5s", "6m0s"
        assert.is_truthy(reset:match("^%d+ms$") or reset:match("^[%d.]+s$") or
                         reset:match("^%d+m[%d.]+s$"), reset)
      end
      assert.are.same({ "2", "1", "0" }, remaining)
      local res, body = call("/v1/models")
      assert.are.equal(429, res.status)
      assert.are.equal("rate_limit_exceeded", body.error.code)
      local wait = tonumber(res.headers["retry-after"])
      assert.is_true(wait >= 1 and wait <= 20, tostring(wait))
      assert.are.equal(1, up:stats().rate_limited)
      up:rate_limit(nil)
      assert.are.equal(200, (call("/v1/models")).status)
    end)

    it("refills at rpm/60 per second", function()
      up:rate_limit(600)  -- one request per 0.1 s once the burst is spent
      local limited = false
      for _ = 1, 700 do
        if (call("/v1/models")).status == 429 then limited = true; break end
      end
      assert.is_true(limited)
      helper.sleep(0.25)
      assert.are.equal(200, (call("/v1/models")).status)
    end)
  end)

  describe("with several workers", function()
    local multi

    lazy_setup(function() multi = helper.upstream.start{ workers = 2, api_key = false } end)
    lazy_teardown(function() if multi then multi:stop() end end)

    it("counts exactly across workers and shares the scenario", function()
      local tt = curl.new()
      multi:scenario{ { fault = "503", times = 10 } }
      local reqs = {}
      for i = 1, 40 do reqs[i] = { url = multi.url .. "/echo?i=" .. i } end
      local statuses = {}
      for _, r in ipairs(tt:request_many(reqs)) do
        local st = assert(r.res, tostring(r.err)).status
        statuses[st] = (statuses[st] or 0) + 1
      end
      tt:close()
      assert.are.same({ [503] = 10, [200] = 30 }, statuses)
      local s = multi:stats()
      assert.are.equal(40, s.requests)
      assert.are.equal(40, s.paths["/echo"])
      assert.is_true(s.connections >= 2)
    end)
  end)
end)
