-- examples/policy.lua: a policy for an OpenAI-compatible chat endpoint.
--
--   local policy = require "breaker.policy"
--   local curl = require "breaker.curl"
--   local p = policy.load("examples/policy.lua")
--   local res, err = p:request(curl.new(), {
--     method = "POST", url = "https://api.openai.com/v1/chat/completions",
--     headers = { authorization = "Bearer " .. os.getenv("OPENAI_API_KEY"),
--                 ["content-type"] = "application/json" },
--     body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
--     timeout = 60,
--   })
--   -- p.last tells how it went: attempts, wait, outcome, fallback, reason.
--
-- The script runs in its own environment: it may require modules, and the
-- globals it sets stay here. It must return the policy table.

local cjson = require "cjson.safe"

return {
  -- One breaker per upstream: it opens when half the calls of the last minute
  -- failed (at least 10 calls), or after 5 failures in a row, and stays open
  -- 30 s (or as long as a 429's Retry-After asks).
  breaker = {
    name = "openai-chat",
    window_type = "time",
    window_size = 60,
    minimum_calls = 10,
    failure_rate_threshold = 50,
    consecutive_failures = 5,
    slow_call_duration = 45,
    slow_call_rate_threshold = 80,
    open_duration = 30,
    half_open_calls = 2,
  },

  -- Up to 4 attempts; 1 s, 2 s, 4 s ... (full jitter, capped at 20 s) unless
  -- the server says how long to wait; never wait more than 60 s for it; at
  -- most 20 % extra load from retries (plus 1 retry/s) across all calls.
  retry = {
    max_attempts = 4,
    base = 1,
    factor = 2,
    cap = 20,
    max_delay = 60,
    budget = { ratio = 0.2, min_per_second = 1, ttl = 10 },
  },

  -- The whole call, waits included, gives up after 90 s.
  deadline = 90,

  -- At most 32 requests in flight from this process; the 33rd waits up to 2 s.
  bulkhead = { max_concurrent = 32, max_wait = 2 },

  -- Stay under the account's 500 requests per minute, and slow down as soon
  -- as the x-ratelimit-* headers say the server's budget is running out.
  rate_limit = { rate = 500, per = "minute", burst = 20, max_wait = 5, learn = true },

  -- Mostly the defaults; a 409 (conflict) is not worth retrying here.
  classify = {
    statuses = { [409] = { outcome = "ignored", retryable = false } },
  },

  -- When the upstream is down, busy or out of quota: the last good answer to
  -- the same request (up to an hour old), else a polite canned answer in the
  -- provider's own shape. Auth errors and bad requests are not papered over.
  fallback = {
    cache = { size = 256, ttl = 3600 },
    on = function(err)
      local k = err.kind
      if k == "http_status" then return (err.status or 0) >= 500 end
      return k == "breaker_open" or k == "rate_limited" or k == "quota" or k == "timeout"
          or k == "connect" or k == "reset" or k == "bulkhead_full"
    end,
    fn = function(err)
      return {
        status = 200,
        headers = { ["content-type"] = "application/json", ["x-fallback"] = tostring(err.kind) },
        body = cjson.encode({
          object = "chat.completion",
          choices = { { index = 0, finish_reason = "stop", message = {
            role = "assistant",
            content = "The assistant is busy right now. Please try again in a minute.",
          } } },
        }),
      }
    end,
  },
}
