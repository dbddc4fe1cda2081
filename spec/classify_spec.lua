local classify = require "breaker.classify"
local errors = require "breaker.error"
local cjson = require "cjson"

local has_curl = pcall(require, "breaker.curl")

local function res(status, headers, body)
  return { status = status, headers = headers or {}, body = body or "" }
end

local function openai_error(message, typ, code)
  return cjson.encode({ error = { message = message, type = typ, param = cjson.null, code = code or cjson.null } })
end

describe("breaker.classify", function()
  local c = classify.default

  describe("statuses", function()
    it("treats 2xx as success with the shared verdict", function()
      for _, s in ipairs{ 200, 201, 204, 299 } do
        local v = c(res(s))
        assert.equal("success", v.outcome)
        assert.is_false(v.retryable)
        assert.equal(classify.SUCCESS, v)
      end
    end)

    it("makes 408 409 429 500 502 503 504 529 retryable failures", function()
      for _, s in ipairs{ 408, 409, 429, 500, 502, 503, 504, 529 } do
        local v = c(res(s))
        assert.equal("failure", v.outcome, "status " .. s)
        assert.is_true(v.retryable, "status " .. s)
        assert.equal(s, v.status)
        assert.equal(s == 429 and "rate_limited" or "http_status", v.kind)
      end
    end)

    it("makes other 5xx failures that are not retried", function()
      for _, s in ipairs{ 501, 505, 599 } do
        local v = c(res(s))
        assert.equal("failure", v.outcome)
        assert.is_false(v.retryable)
        assert.equal("http_status", v.kind)
      end
    end)

    it("ignores other 4xx and does not retry them", function()
      for _, s in ipairs{ 400, 404, 413, 422 } do
        local v = c(res(s, nil, openai_error("bad thing", "invalid_request_error")))
        assert.equal("ignored", v.outcome, "status " .. s)
        assert.is_false(v.retryable)
        assert.equal("http_status", v.kind)
        assert.equal("bad thing", v.message)
        assert.equal("invalid_request_error", v.type)
      end
    end)

    it("ignores 1xx and 3xx", function()
      for _, s in ipairs{ 101, 301, 304 } do
        local v = c(res(s))
        assert.equal("ignored", v.outcome)
        assert.is_false(v.retryable)
      end
    end)

    it("marks 401 and 403 as auth, ignored, not retried, with the provider's message", function()
      for _, s in ipairs{ 401, 403 } do
        local body = openai_error("Incorrect API key provided: sk-test-****good.", "invalid_request_error",
                                  "invalid_api_key")
        local v = c(res(s, { ["www-authenticate"] = "Bearer" }, body))
        assert.equal("ignored", v.outcome)
        assert.is_false(v.retryable)
        assert.equal("auth", v.kind)
        assert.equal("Incorrect API key provided: sk-test-****good.", v.message)
        assert.equal("invalid_api_key", v.code)
      end
    end)

    it("makes 429 insufficient_quota a failure that is not retried, kind quota", function()
      local body = openai_error("You exceeded your current quota, please check your plan and billing details.",
                                "insufficient_quota", "insufficient_quota")
      local v = c(res(429, { ["retry-after"] = "1" }, body))
      assert.equal("failure", v.outcome)
      assert.is_false(v.retryable)
      assert.equal("quota", v.kind)
      assert.equal(429, v.status)
      assert.matches("exceeded your current quota", v.message)
    end)

    it("recognises billing codes and types, and quota markers in non-JSON bodies", function()
      local v = c(res(429, nil, openai_error("limit", "requests", "billing_hard_limit_reached")))
      assert.equal("quota", v.kind)
      v = c(res(429, nil, openai_error("limit", "insufficient_quota")))
      assert.equal("quota", v.kind)
      v = c(res(429, nil, openai_error("limit", "billing_something_new")))
      assert.equal("quota", v.kind)
      v = c(res(429, nil, "<html>insufficient_quota</html>"))
      assert.equal("quota", v.kind)
      assert.is_false(v.retryable)
      -- A plain rate limit that mentions nothing of the kind stays retryable.
      v = c(res(429, nil, openai_error("Rate limit reached for requests", "requests", "rate_limit_exceeded")))
      assert.equal("rate_limited", v.kind)
      assert.is_true(v.retryable)
    end)

    it("reads Anthropic-shaped error bodies", function()
      local body = cjson.encode({ type = "error", error = { type = "overloaded_error", message = "Overloaded" } })
      local v = c(res(529, nil, body))
      assert.equal("failure", v.outcome)
      assert.is_true(v.retryable)
      assert.equal("overloaded_error", v.type)
      assert.equal("Overloaded", v.message)
    end)

    it("keeps the start of a body that is not JSON as the message", function()
      local v = c(res(502, nil, "<html>" .. string.rep("x", 500)))
      assert.equal(200, #v.message)
      assert.matches("^<html>", v.message)
    end)
  end)

  describe("x-should-retry", function()
    it("overrides the status rule either way", function()
      local v = c(res(400, { ["x-should-retry"] = "true" }))
      assert.is_true(v.retryable)
      assert.equal("ignored", v.outcome)
      v = c(res(503, { ["x-should-retry"] = "false" }))
      assert.is_false(v.retryable)
      assert.equal("failure", v.outcome)
      v = c(res(503, { ["x-should-retry"] = "FALSE" }))
      assert.is_false(v.retryable)
    end)

    it("can override a quota verdict and leaves 2xx alone", function()
      local v = c(res(429, { ["x-should-retry"] = "true" }, openai_error("q", "insufficient_quota")))
      assert.is_true(v.retryable)
      v = c(res(200, { ["x-should-retry"] = "true" }))
      assert.equal("success", v.outcome)
      assert.is_false(v.retryable)
    end)

    it("ignores values it does not know, and can be turned off", function()
      assert.is_true(c(res(503, { ["x-should-retry"] = "maybe" })).retryable)
      local off = classify.new{ should_retry_header = false }
      assert.is_true(off(res(503, { ["x-should-retry"] = "false" })).retryable)
    end)
  end)

  describe("retry-after", function()
    it("prefers retry-after-ms over Retry-After", function()
      local v = c(res(429, { ["retry-after-ms"] = "1500", ["retry-after"] = "10" }))
      assert.equal(1.5, v.retry_after)
    end)

    it("reads Retry-After in delta-seconds", function()
      assert.equal(7, c(res(503, { ["retry-after"] = "7" })).retry_after)
      assert.equal(7, classify.retry_after({ ["retry-after"] = "7" }))
    end)

    it("falls back to Retry-After when retry-after-ms is unreadable", function()
      assert.equal(3, classify.retry_after({ ["retry-after-ms"] = "soon", ["retry-after"] = "3" }))
    end)

    it("returns nil for absent or unreadable values", function()
      assert.is_nil(c(res(503)).retry_after)
      assert.is_nil(classify.retry_after({ ["retry-after"] = "soon" }))
      assert.is_nil(classify.retry_after(nil))
    end)

    it("does not report a retry-after on success", function()
      assert.is_nil(c(res(200, { ["retry-after"] = "5" })).retry_after)
    end)

    it("reads Retry-After as an HTTP-date through breaker.curl", function()
      if not has_curl then
        pending("breaker.curl is not built")
        return
      end
      local date = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 30)
      local s = c(res(503, { ["retry-after"] = date })).retry_after
      assert.is_number(s)
      assert.is_true(s > 25 and s <= 31, "got " .. tostring(s))
    end)
  end)

  describe("errors", function()
    it("makes timeouts, refused connections and resets retryable failures", function()
      for _, k in ipairs{ "timeout", "connect", "reset" } do
        local v = c(nil, errors.new(k, "x"))
        assert.equal("failure", v.outcome)
        assert.is_true(v.retryable)
        assert.equal(k, v.kind)
      end
    end)

    it("does not retry dns, tls and protocol errors but counts them", function()
      for _, k in ipairs{ "dns", "tls", "protocol" } do
        local v = c(nil, errors.new(k, "x"))
        assert.equal("failure", v.outcome)
        assert.is_false(v.retryable)
      end
    end)

    it("ignores the caller's own doing and local rejections", function()
      for _, k in ipairs{ "too_large", "invalid", "aborted", "breaker_open", "bulkhead_full", "rate_limited" } do
        local v = c(nil, errors.new(k, "x"))
        assert.equal("ignored", v.outcome, k)
        assert.is_false(v.retryable)
      end
    end)

    it("classifies an error that carries a status by its status", function()
      local v = c(nil, errors.new("rate_limited", "slow down", { status = 429, retry_after = 4 }))
      assert.equal("failure", v.outcome)
      assert.is_true(v.retryable)
      assert.equal(4, v.retry_after)
      assert.equal("rate_limited", v.kind)
    end)

    it("classifies a transport error after a 2xx status line by its kind", function()
      -- e.g. a connection reset or a timeout in the middle of a 200's body
      for _, k in ipairs{ "reset", "timeout" } do
        local v = c(nil, errors.new(k, "cut", { status = 200 }))
        assert.equal("failure", v.outcome, k)
        assert.is_true(v.retryable, k)
        assert.equal(k, v.kind)
        assert.equal(200, v.status)
      end
    end)

    it("maps cosocket error strings", function()
      assert.equal("timeout", c(nil, "timeout").kind)
      assert.is_true(c(nil, "timeout").retryable)
      assert.equal("connect", c(nil, "connection refused").kind)
      assert.equal("reset", c(nil, "closed").kind)
      assert.equal("reset", c(nil, "connection reset by peer").kind)
      assert.equal("dns", c(nil, "api.example.com could not be resolved (3: Host not found)").kind)
    end)

    it("makes unknown errors failures that are not retried", function()
      local v = c(nil, "something broke")
      assert.equal("failure", v.outcome)
      assert.is_false(v.retryable)
      assert.equal("error", v.kind)
      assert.equal("something broke", v.message)
      v = c(nil, { weird = true })
      assert.equal("failure", v.outcome)
      v = c(nil, errors.new("mystery", "?"))
      assert.equal("mystery", v.kind)
      assert.is_false(v.retryable)
    end)

    it("treats a value that is not a response (no numeric status) as a success", function()
      assert.equal("success", c({ headers = {} }, nil).outcome)
      assert.equal("success", c({ status = "ok" }, nil).outcome)
      assert.equal("success", c("a plain value", nil).outcome)
    end)
  end)

  describe("user rules", function()
    it("merges a status table over the defaults", function()
      local u = classify.new{ statuses = {
        [404] = "success",
        [418] = { outcome = "failure", retryable = true, kind = "teapot" },
        [503] = { outcome = "failure", retryable = false },
      } }
      assert.equal("success", u(res(404)).outcome)
      local v = u(res(418))
      assert.same({ "failure", true, "teapot" }, { v.outcome, v.retryable, v.kind })
      assert.is_false(u(res(503)).retryable)
      assert.is_true(u(res(502)).retryable) -- untouched default
      assert.is_true(c(res(503)).retryable) -- the default classifier is unchanged
    end)

    it("classifies a transport error by its kind when its status is made a success", function()
      -- statuses = { [200] = "success" } (or 404, the README's example) makes
      -- a verdict table of its own: a reset after that status line still fails
      for _, st in ipairs{ 200, 404 } do
        local u = classify.new{ statuses = { [st] = "success" } }
        local v = u(nil, errors.new("reset", "cut", { status = st }))
        assert.same({ "failure", true, "reset" }, { v.outcome, v.retryable, v.kind }, st)
      end
    end)

    it("merges kinds and the unknown rule", function()
      local u = classify.new{ kinds = { dns = { outcome = "failure", retryable = true } },
                              unknown = { outcome = "ignored" } }
      assert.is_true(u(nil, errors.new("dns", "x")).retryable)
      assert.equal("ignored", u(nil, "whatever").outcome)
    end)

    it("adds quota codes", function()
      local u = classify.new{ quota_codes = { "out_of_credits" } }
      assert.equal("quota", u(res(429, nil, openai_error("no", "x", "out_of_credits"))).kind)
      assert.equal("rate_limited", c(res(429, nil, openai_error("no", "x", "out_of_credits"))).kind)
    end)

    it("runs a user function first and falls back to the rules on nil", function()
      local seen
      local u = classify.from(function(r, _, ctx, rules)
        seen = ctx
        if r and r.status == 200 and r.body == "error" then
          return { outcome = "failure", retryable = true, kind = "soft_error" }
        end
        assert.is_function(rules)
        return nil
      end)
      local v = u(res(200, nil, "error"), nil, { mode = "request" })
      assert.equal("soft_error", v.kind)
      assert.equal("request", seen.mode)
      assert.equal("success", u(res(200, nil, "fine")).outcome)
      assert.is_true(u(res(503)).retryable)
    end)

    it("raises when a user function returns a bad verdict", function()
      local u = classify.from(function() return { outcome = "meh" } end)
      assert.has_error(function() u(res(200)) end,
        "classify.fn: must return nil or a verdict with outcome \"success\", \"failure\" or \"ignored\", got meh")
    end)

    it("raises naming the key on bad options", function()
      assert.has_error(function() classify.new{ statuses = { [404] = "fine" } } end,
        'classify.statuses[404]: expected "success", "failure" or "ignored", got "fine"')
      assert.has_error(function() classify.new{ statuses = { [404] = { outcome = "failure", retry = true } } } end,
        "classify.statuses[404]: unknown key 'retry'")
      assert.has_error(function() classify.new{ statuses = { nope = "failure" } } end,
        'classify.statuses: expected HTTP status numbers as keys, got "nope"')
      assert.has_error(function() classify.new{ stauses = {} } end, "classify: unknown key 'stauses'")
      assert.has_error(function() classify.new{ fn = 3 } end, "classify.fn: expected a function, got 3")
      assert.has_error(function() classify.from(42, "policy.classify") end,
        "policy.classify.(value): expected a function or a table, got 42")
    end)
  end)
end)
