-- breaker.llm: a client for OpenAI-compatible APIs (chat, streamed chat,
-- embeddings) with one breaker per (base_url, model), retries that honour
-- Retry-After, model fallback, context-length routing, cached and static
-- fallback answers, and token/cost accounting.
--
--   local llm = require "breaker.llm"
--   local client = llm.new{
--     base_url = "https://api.openai.com/v1",    -- any OpenAI-compatible endpoint
--     model = "gpt-4o-mini",                     -- key from $OPENAI_API_KEY
--     fallback_models = { "gpt-4o" },
--     fallback = { cache = { size = 500, ttl = 3600 }, value = "Busy, try again soon." },
--   }
--   local res, err = client:chat{ messages = { { role = "user", content = "hi" } } }
--   if res then print(res.choices[1].message.content) else print(err) end
--   print(client.last.model, client.last.attempts, client.last.fallback)
--
-- Flow of one call: the models are tried in order (the request's model, or
-- `model`, then `fallback_models`); each goes through its own policy
-- (breaker.policy: deadline, retry with backoff and Retry-After, the model's
-- breaker, a rate limiter that learns from 429s and x-ratelimit headers).
-- The next model is tried when a model's breaker is open or its call failed
-- for availability reasons (429, 5xx, timeouts, connection errors, a broken
-- body, model_not_found); caller errors (400, 401, 403, ...) come back at once.
-- A `context_length_exceeded` answer moves on to `long_context_models` (or
-- else the rest of the chain) and is not a failure for any breaker.
-- Embeddings never change model, whatever the error. When every model
-- failed, the fallback answers: the last good answer to an identical request
-- (cache), else `fallback.fn(err, req)`, else the static `fallback.value`.
-- The fallback never calls the API.
--
-- Default policy (per model; `policy` replaces it section by section):
--   retry      3 attempts, backoff 0.5 s .. 8 s with full jitter, the server's
--              Retry-After waited up to 20 s, a retry budget of 20 % of calls
--              (+1/s) shared by all models of the client
--   rate_limit no own limit; learns from x-ratelimit-* headers, and a 429's
--              Retry-After pauses every call of that model (waits up to 20 s)
--   breaker    time window of 30 s, opens at >= 50 % failures (10 calls at
--              least) or 5 failures in a row; open 5 s (+-20 % jitter, no
--              escalation: probes are cheap next to an LLM call, and the app
--              gets its model back within seconds of the provider); 2 probes
--              when half-open
--   deadline   120 s per model for the whole call, waits included
--   classify   as breaker.classify, except that a 429 rate limit (not a
--              quota error) is retried but not counted by the breaker: it is
--              backpressure, not an outage (an exhausted quota still counts)
--
-- Responses are the provider's JSON, decoded (cjson: JSON null is cjson.null),
-- and may be shared with the fallback cache: treat them as read-only. Errors
-- are breaker.error values: kind (rate_limited, quota, auth, http_status,
-- context_length, timeout, connect, reset, decode, breaker_open, and for an
-- error event in a stream server_error or invalid_request, ...), the
-- provider's message, `type`, `code` and `param`, status, retry_after,
-- attempts, model, and `partial` (text received) for broken streams. The API
-- key never appears in an error, in stats or in `client.last`.

local _M = { _VERSION = require "breaker.version" }
local mt = { __index = _M }

local cjson = require "cjson.safe"
local errors = require "breaker.error"
local policy_mod = require "breaker.policy"
local retry_mod = require "breaker.retry"
local classify_mod = require "breaker.classify"
local fallback_mod = require "breaker.fallback"
local breaker_mod = require "breaker"

local type, pairs, ipairs, tostring, tonumber, error, pcall, next, setmetatable, getmetatable, rawget =
      type, pairs, ipairs, tostring, tonumber, error, pcall, next, setmetatable, getmetatable, rawget
local getenv = os.getenv
local concat, sort = table.concat, table.sort
local find, sub, byte, match, format, gsub = string.find, string.sub, string.byte,
                                             string.match, string.format, string.gsub
local decode, encode = cjson.decode, cjson.encode
local new_error, is_error = errors.new, errors.is
local clock = breaker_mod.clock

---------------------------------------------------------------------------
-- Defaults
---------------------------------------------------------------------------

local DEFAULT_BREAKER = {
  window_type = "time", window_size = 30, window_buckets = 10, minimum_calls = 10,
  failure_rate_threshold = 50, consecutive_failures = 5, half_open_calls = 2,
  open_duration = 5, open_duration_factor = 1, open_duration_max = 30,
  open_duration_jitter = 0.2,
}
local DEFAULT_RETRY = { max_attempts = 3, base = 0.5, cap = 8, max_delay = 20 }
local DEFAULT_BUDGET = { ratio = 0.2, min_per_second = 1, ttl = 10 }
local DEFAULT_RATE_LIMIT = { learn = true, max_wait = 20 }
local DEFAULT_DEADLINE = 120

-- A 429 rate limit is retried and paces the client, but is not a breaker
-- failure (an insufficient_quota 429 still is: classify turns it into "quota").
local DEFAULT_CLASSIFY = {
  statuses = { [429] = { outcome = "ignored", retryable = true, kind = "rate_limited" } },
}

-- Policy sections a `policy` table may hold.
local POLICY_KEYS = { retry = true, breaker = true, rate_limit = true, deadline = true,
                      bulkhead = true, classify = true, sleep = true }

local KEYS = {
  base_url = "string", api_key = true, api_key_env = "string", model = "string",
  embedding_model = "string", fallback_models = "table", long_context_models = "table",
  policy = true, fallback = true, transport = true, timeout = "number",
  connect_timeout = "number", max_body = "number", headers = "table", prices = "table",
  shared = true, name = "string",
}

-- Request fields the client reads and does not send.
local RESERVED = { on_delta = true, timeout = true }

-- Error kinds after which the next model (and in the end the fallback) is
-- tried: the model or the provider is unavailable, not the request wrong.
local AVAILABILITY = {
  breaker_open = true, rate_limited = true, quota = true, timeout = true, connect = true,
  reset = true, dns = true, tls = true, protocol = true, decode = true,
  bulkhead_full = true, deadline = true, error = true, server_error = true,
}

-- How the policy takes an error event in a stream (the provider failed
-- after its 200), by the kind its type and code give: as the status it
-- stands for would be taken. Such errors are keys of `event_rule` (weak).
local EVENT_RULES = {
  server_error = { outcome = "failure", retryable = true },
  rate_limited = { outcome = "ignored", retryable = true },
  quota = { outcome = "failure", retryable = false },
  context_length = { outcome = "ignored", retryable = false },
  invalid_request = { outcome = "ignored", retryable = false },
  auth = { outcome = "ignored", retryable = false },
}
local event_rule = setmetatable({}, { __mode = "k" })

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

local function raise(where, msg)
  error("breaker.llm." .. where .. ": " .. msg, 3)
end

-- The API key as plain text anywhere in `s` becomes "[redacted]".
local function scrub(s, key)
  if type(s) ~= "string" then return s end
  if key and key ~= "" then
    local i = find(s, key, 1, true)
    while i do
      s = sub(s, 1, i - 1) .. "[redacted]" .. sub(s, i + #key)
      i = find(s, key, i + 10, true)
    end
  end
  return errors.redact(s)
end

-- base_url without credentials, query or fragment: safe for names and stats.
local function public_url(url)
  url = gsub(url, "^(%a[%w+.-]*://)[^/@]*@", "%1")
  url = gsub(url, "[?#].*$", "")
  return url
end

-- Deterministic text of a JSON-like value (sorted keys), for cache keys.
-- At the top (`top`: the request) the client's own fields are left out.
local function canon(v, out, top)
  local t = type(v)
  if t == "table" then
    local keys, n = {}, 0
    for k in pairs(v) do n = n + 1; keys[n] = k end
    sort(keys, function(a, b)
      local ta, tb = type(a), type(b)
      if ta ~= tb then return ta < tb end
      if ta == "number" or ta == "string" then return a < b end
      return tostring(a) < tostring(b)
    end)
    out[#out + 1] = "{"
    for i = 1, n do
      local k = keys[i]
      if not (top and (RESERVED[k] or k == "stream")) then
        out[#out + 1] = type(k) == "string" and format("%q", k) or tostring(k)
        out[#out + 1] = "="
        canon(v[k], out)
        out[#out + 1] = ","
      end
    end
    out[#out + 1] = "}"
  elseif t == "string" then
    out[#out + 1] = format("%q", v)
  else
    out[#out + 1] = tostring(v)
  end
  return out
end

local function cache_key(op, model, req)
  local out = canon(req, { op, "\n", model, "\n" }, true)
  return concat(out)
end

---------------------------------------------------------------------------
-- Construction
---------------------------------------------------------------------------

-- The classifier every model policy uses: `base` rules, plus two that must
-- always hold: a stream that already delivered text is never retried (that
-- would duplicate it), and a 2xx JSON body that cannot be complete (truncated)
-- is a "decode" failure.
-- True when the last non-blank byte of `s` closes a JSON object or array.
local function looks_complete(s)
  local i = #s
  local b = byte(s, i)
  while b == 32 or b == 10 or b == 13 or b == 9 do
    i = i - 1
    b = byte(s, i)
  end
  return b == 125 or b == 93
end

local function make_classifier(base)
  return function(res, err, ctx)
    if err ~= nil then
      if type(err) == "table" and err.partial ~= nil then
        -- on_delta's own stop is the caller's doing, not the provider's.
        local aborted = err.kind == "aborted"
        return { outcome = aborted and "ignored" or "failure", retryable = false,
                 kind = err.kind, message = err.message }
      end
      local r = event_rule[err]
      if r then
        return { outcome = r.outcome, retryable = r.retryable, kind = err.kind, message = err.message,
                 code = err.code, type = err.type }
      end
      return base(res, err, ctx)
    end
    if type(res) == "table" and not res.streamed then
      local status = res.status
      if type(status) == "number" and status >= 200 and status < 300 then
        local body = res.body
        if type(body) == "string" and not looks_complete(body) then
          return { outcome = "failure", retryable = false, kind = "decode",
                   status = status, message = "the response body is not complete JSON" }
        end
      end
    end
    return base(res, err, ctx)
  end
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- The policy spec sections of the client, from the `policy` option.
local function policy_sections(opt)
  if opt == nil then opt = {} end
  local s = {
    retry = copy(DEFAULT_RETRY), breaker = DEFAULT_BREAKER, rate_limit = DEFAULT_RATE_LIMIT,
    deadline = DEFAULT_DEADLINE, classify = DEFAULT_CLASSIFY,
  }
  for k, v in pairs(opt) do
    if not POLICY_KEYS[k] then
      raise("new", format("policy: unknown key '%s' (fallbacks are llm.new's `fallback` option)",
                          tostring(k)))
    end
    if v == false then s[k] = nil else s[k] = v end
  end
  if s.breaker ~= nil and (type(s.breaker) ~= "table" or type(s.breaker.allow) == "function") then
    raise("new", "policy.breaker: expected a breaker config table (one breaker per model is made)")
  end
  if s.breaker and s.breaker.name ~= nil then
    raise("new", "policy.breaker.name: the client names each model's breaker itself")
  end
  if s.retry == true then
    s.retry = copy(DEFAULT_RETRY)
  elseif type(s.retry) == "table" then
    s.retry = copy(s.retry)   -- llm.new sets its budget: not in the caller's table
  end
  return s
end

local function check_models(where, list)
  for i, m in ipairs(list) do
    if type(m) ~= "string" or m == "" then
      raise("new", format("%s[%d]: expected a model name, got %s", where, i, tostring(m)))
    end
  end
end

local PRICE_KEYS = { prompt = true, completion = true }

-- llm.new(opts) -> client. Raises, naming the key, on a bad option, and when
-- no API key is given and the variable `api_key_env` (default
-- OPENAI_API_KEY) is unset; `api_key = false` sends no key. See the top of
-- this file for the options and the default policy.
function _M.new(opts)
  if type(opts) ~= "table" then raise("new", "expected an options table") end
  for k, v in pairs(opts) do
    local want = KEYS[k]
    if not want then raise("new", format("unknown option '%s'", tostring(k))) end
    if want ~= true and type(v) ~= want then
      raise("new", format("%s: expected a %s, got %s", k, want, type(v)))
    end
  end
  local base = opts.base_url
  if type(base) ~= "string" or not find(base, "^https?://[^%s/]+") then
    raise("new", "base_url: expected an http:// or https:// URL such as https://api.openai.com/v1")
  end
  base = gsub(base, "/+$", "")

  local key = opts.api_key
  local env = opts.api_key_env or "OPENAI_API_KEY"
  if key == nil then
    key = getenv(env)
    if key == nil or key == "" then
      raise("new", format("no API key: set api_key, or the environment variable %s " ..
                          "(api_key_env names another; api_key = false sends none)", env))
    end
  elseif key ~= false and (type(key) ~= "string" or key == "") then
    raise("new", "api_key: expected a non-empty string or false")
  end

  local timeout = opts.timeout or 60
  if not (timeout > 0) then raise("new", "timeout: expected seconds > 0") end
  local fallback_models = opts.fallback_models or {}
  check_models("fallback_models", fallback_models)
  if opts.long_context_models then check_models("long_context_models", opts.long_context_models) end
  if opts.prices then
    for m, p in pairs(opts.prices) do
      if type(m) ~= "string" or type(p) ~= "table" then
        raise("new", "prices: expected { [model] = { prompt = USD per 1M tokens, completion = ... } }")
      end
      for k, v in pairs(p) do
        if not PRICE_KEYS[k] or type(v) ~= "number" or not (v >= 0) then
          raise("new", format("prices[%q].%s: expected prompt/completion USD per 1M tokens >= 0",
                              m, tostring(k)))
        end
      end
    end
  end

  local self = setmetatable({
    base_url = base,
    name = opts.name or public_url(base),
    model = opts.model,
    embedding_model = opts.embedding_model,
    fallback_models = fallback_models,
    long_context_models = opts.long_context_models,
    timeout = timeout,
    connect_timeout = opts.connect_timeout,
    max_body = opts.max_body,
    prices = opts.prices or {},
    shared = opts.shared,
    chat_url = base .. "/chat/completions",
    embeddings_url = base .. "/embeddings",
    last = {},
    _models = {},
    _chains = {},
    _totals = { calls = 0, successes = 0, failures = 0, fallbacks = 0, context_routed = 0,
                fallback_cache = 0, fallback_fn = 0, fallback_value = 0 },
  }, mt)

  -- Request headers, with the key, are kept out of anything printable.
  local h = { ["content-type"] = "application/json", accept = "application/json" }
  if opts.headers then
    for k, v in pairs(opts.headers) do
      if type(k) ~= "string" or type(v) ~= "string" then
        raise("new", "headers: expected string names and values")
      end
      h[k:lower()] = v
    end
  end
  if key then h.authorization = "Bearer " .. key end
  local sh = copy(h)
  sh.accept = "text/event-stream"
  self._secret = setmetatable({ key = key or nil, headers = h, stream_headers = sh },
                              { __tostring = function() return "[redacted]" end,
                                __metatable = false })

  -- Transport: an object with :request, or options for breaker.curl.new.
  local t = opts.transport
  if t == nil or (type(t) == "table" and getmetatable(t) == nil and t.request == nil) then
    local copts = t and copy(t) or {}
    if copts.timeout == nil then copts.timeout = timeout end
    if copts.connect_timeout == nil then copts.connect_timeout = opts.connect_timeout end
    if copts.max_body == nil then copts.max_body = opts.max_body end
    self.transport = require("breaker.curl").new(copts)
    self._own_transport = true
  elseif (type(t) == "table" or type(t) == "userdata") and t.request then
    self.transport = t
  else
    raise("new", "transport: expected an object with :request or a breaker.curl options table")
  end

  -- Policy: false = none (one attempt, typed errors); an object = used for
  -- every model as is; a table = sections over the default.
  local p = opts.policy
  if p ~= nil and p ~= false and type(p) ~= "table" then
    raise("new", "policy: expected a policy spec table, a policy object or false")
  end
  if type(p) == "table" and type(p.request) == "function" then
    self._policy_object = p
  else
    self._sections = p ~= false and policy_sections(p) or false
    local r = self._sections and self._sections.retry
    if r then
      if r.budget == nil then
        r.budget = retry_mod.budget(DEFAULT_BUDGET, "breaker.llm.new: policy.retry.budget")
      elseif type(r.budget) == "table" and not retry_mod.is_budget(r.budget) then
        r.budget = retry_mod.budget(r.budget, "breaker.llm.new: policy.retry.budget")
      end
    end
  end

  self._fallback = opts.fallback ~= nil and fallback_mod.new(opts.fallback, "breaker.llm.new: fallback")
                   or nil
  self._cache = self._fallback and self._fallback.cache or nil

  -- Every model the config names gets its breaker now (so it shows in stats).
  local ok, err = pcall(function()
    if self.model then self:_model(self.model) end
    for _, m in ipairs(fallback_models) do self:_model(m) end
    for _, m in ipairs(opts.long_context_models or {}) do self:_model(m) end
    if self.embedding_model then self:_model(self.embedding_model) end
  end)
  if not ok then error(scrub(tostring(err), key), 2) end
  -- Count this client's tokens and cost in breaker.metrics, if the app uses
  -- it (metrics holds clients weakly).
  local metrics = package.loaded["breaker.metrics"]
  if type(metrics) == "table" and metrics.register_llm then metrics.register_llm(self) end
  return self
end

-- The breaker name of (base_url, model): no credentials, no query string.
function _M.breaker_name(base_url, model)
  return "llm " .. public_url(gsub(base_url, "/+$", "")) .. " " .. model
end

local make_model

-- The per-model breakers this module made or found, by name, for the life of
-- the process (one per provider and model): breaker.get holds breakers only
-- while something uses them, and a client made per request would otherwise
-- leave its breaker to the collector, open state and all.
local kept_breakers = {} -- luacheck: ignore 241 (held, never read)

-- Per-model state, made on first use: its breaker, policy and counters.
function _M._model(self, model)
  return self._models[model] or make_model(self, model)
end

-- (Apart from _model: a function that makes closures is not compiled by
-- LuaJIT, and the lookup above is on every call's path.)
make_model = function(self, model)
  local m
  local state = { override = false }
  local now = clock.now_precise
  -- The policy's clock. A stream sets `override` to its first token's time
  -- just before its transport call returns; the policy reads the clock right
  -- then, so the breaker records the time to first token as the latency.
  local function pclock()
    local o = state.override
    if o then state.override = false; return o end
    return now()
  end
  local p, b
  if self._policy_object then
    p = self._policy_object
    b = p.breaker
  else
    local s = self._sections
    local spec = { clock = pclock, name = model }
    if s then
      for k, v in pairs(s) do spec[k] = v end
      spec.classify = make_classifier(classify_mod.from(s.classify or nil, "breaker.llm policy.classify"))
      if s.breaker then
        local name = _M.breaker_name(self.base_url, model)
        b = breaker_mod.get(name) -- (kept_breakers keeps it registered)
        if not b then
          local ok, res = pcall(breaker_mod.new, name, s.breaker, self.shared and { shared = self.shared } or nil)
          if not ok then error(tostring(res):gsub("^[^:]*:%d+: ", ""), 0) end
          b = res
        end
        kept_breakers[name] = b
        spec.breaker = b
      end
    else
      spec.classify = make_classifier(classify_mod.default)
    end
    p = policy_mod.new(spec)
  end
  m = {
    name = model, policy = p, breaker = b, clock = state, report = {},
    stats = { calls = 0, successes = 0, failures = 0, rejected = 0, context_length = 0,
              prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0 },
  }
  self._models[model] = m
  return m
end

-- client:breaker(model) -> the breaker of that model (nil without one).
function _M.breaker(self, model)
  return self:_model(model or self.model).breaker
end

---------------------------------------------------------------------------
-- Errors
---------------------------------------------------------------------------

-- A copy of the headers `h` with the key scrubbed from their values, or
-- nil when none holds it.
local function scrub_headers(h, key)
  local out
  for name, v in pairs(h) do
    local nv = v
    if type(v) == "string" then
      if find(v, key, 1, true) then nv = scrub(v, key) end
    elseif type(v) == "table" then   -- a repeated header
      for i, x in ipairs(v) do
        if type(x) == "string" and find(x, key, 1, true) then
          if nv == v then nv = copy(v) end
          nv[i] = scrub(x, key)
        end
      end
    end
    if nv ~= v then
      out = out or copy(h)
      out[name] = nv
    end
  end
  return out
end

-- Scrubs the key out of `err` in place: every string field, the body and
-- header values of its response (replaced by a scrubbed copy), and so on
-- down the errors it wraps (`cause`: the failure before a breaker
-- rejection, ...), at most `depth` levels.
local function scrub_error(err, key, depth)
  local res = rawget(err, "response")
  if key and type(res) == "table" then
    local r
    if type(res.body) == "string" and find(res.body, key, 1, true) then
      r = copy(res)
      r.body = scrub(res.body, key)
    end
    local h = type(res.headers) == "table" and scrub_headers(res.headers, key)
    if h then
      r = r or copy(res)
      r.headers = h
    end
    if r then err.response = r end
  end
  for k, v in pairs(err) do
    if type(v) == "string" then
      err[k] = scrub(v, key)
    elseif k == "cause" and type(v) == "table" and depth > 1 then
      scrub_error(v, key, depth - 1)
    end
  end
end

-- The error the caller sees: provider fields lifted, the key scrubbed from
-- every string, from the last response's body and headers, and from the
-- errors it wraps.
local function finish_error(self, err, model)
  local key = self._secret.key
  if not is_error(err) then
    err = new_error("error", tostring(err))
  end
  local res = rawget(err, "response")
  if type(res) == "table" and type(res.body) == "string" then
    local doc = decode(res.body)
    local e = type(doc) == "table" and doc.error
    if type(e) == "table" and type(e.param) == "string" then err.param = e.param end
  end
  scrub_error(err, key, 4)
  if err.code == "context_length_exceeded" then err.kind = "context_length" end
  if model and err.model == nil then err.model = model end
  return err
end

local function availability_failure(err)
  if type(err) ~= "table" then return true end
  local kind = err.kind
  if AVAILABILITY[kind] then return true end
  if err.code == "model_not_found" then return true end
  local s = err.status
  if kind == "http_status" and type(s) == "number" and (s >= 500 or s == 408 or s == 409) then
    return true
  end
  return false
end

---------------------------------------------------------------------------
-- Accounting
---------------------------------------------------------------------------

local function account(self, m, doc)
  local st = m.stats
  st.successes = st.successes + 1
  local u = type(doc) == "table" and doc.usage
  if type(u) ~= "table" then return end
  local pt = tonumber(u.prompt_tokens) or 0
  local ct = tonumber(u.completion_tokens) or 0
  st.prompt_tokens = st.prompt_tokens + pt
  st.completion_tokens = st.completion_tokens + ct
  st.total_tokens = st.total_tokens + (tonumber(u.total_tokens) or (pt + ct))
  local price = self.prices[m.name]
  if price then
    st.cost = st.cost + (pt * (price.prompt or 0) + ct * (price.completion or 0)) / 1e6
  end
end

---------------------------------------------------------------------------
-- Server-Sent Events
---------------------------------------------------------------------------

-- A feed(chunk) function that splits Server-Sent Events across arbitrary
-- chunk boundaries and calls on_event(data) per event (data lines joined by
-- "\n"); feed returns false when on_event did. feed(nil) flushes an event
-- left without its blank line at the end of the stream.
function _M.sse_parser(on_event)
  local buf, data = "", nil
  return function(chunk)
    if chunk == nil then
      if buf ~= "" then
        local line = gsub(buf, "\r$", "")
        buf = ""
        local v = match(line, "^data: ?(.*)$")
        if v then data = data and (data .. "\n" .. v) or v end
      end
      if data then
        local d = data
        data = nil
        return on_event(d)
      end
      return true
    end
    buf = buf .. chunk
    local pos = 1
    while true do
      local nl = find(buf, "\n", pos, true)
      if not nl then break end
      local line = sub(buf, pos, nl - 1)
      pos = nl + 1
      if byte(line, -1) == 13 then line = sub(line, 1, -2) end
      if line == "" then
        if data then
          local d = data
          data = nil
          if on_event(d) == false then buf = sub(buf, pos); return false end
        end
      elseif byte(line, 1) ~= 58 then -- ":" starts a comment
        local field, value = match(line, "^([^:]*):? ?(.*)$")
        if field == "data" then data = data and (data .. "\n" .. value) or value end
      end
    end
    buf = sub(buf, pos)
    return true
  end
end

-- How far past the highest choice index seen a stream event's may be (a
-- request asks for at most 128 choices at OpenAI).
local MAX_CHOICE_SKIP = 128

-- State of one streamed call, kept across its attempts and models. `top` is
-- the highest choice index seen.
local function stream_state(on_delta)
  return { on_delta = on_delta, delivered = false, first_at = false, texts = {},
           tools = {}, finish = {}, done = false, perr = false, meta = {}, usage = false,
           chunks = 0, aborted = false, top = -1 }
end

local function stream_partial(st)
  local parts = {}
  for i = 0, #st.texts do if st.texts[i] then parts[#parts + 1] = st.texts[i] end end
  return concat(parts)
end

-- Adds a delta's tool_calls to the calls of choice idx. Providers stream a
-- call as pieces sharing its `index`: the first brings id, type and the
-- function's name, the rest bring pieces of `arguments` (a JSON text) to be
-- joined in order. Several calls (parallel tool calls) have their own
-- indexes; a provider that sends none starts a new call with each new id.
-- Returns true when the delta held a call, false when none, or nil and a
-- message for an index that cannot be one (not an integer, negative, or
-- far past the calls seen).
local function add_tool_calls(st, idx, list)
  if type(list) ~= "table" then return false end
  local calls = st.tools[idx]
  if not calls then calls = {}; st.tools[idx] = calls end
  local any = false
  for _, tc in ipairs(list) do
    if type(tc) == "table" then
      local k = tc.index
      if k == nil then
        local last = calls[#calls]
        local id = tc.id
        if last == nil or (type(id) == "string" and id ~= "" and last.id ~= cjson.null and last.id ~= id) then
          k = #calls
        else
          k = #calls - 1
        end
      elseif type(k) ~= "number" or k < 0 or k % 1 ~= 0 or k > #calls + 8 then
        return nil, "bad tool_calls index in a stream event: " .. tostring(k)
      end
      local call = calls[k + 1]
      if not call then
        for j = #calls + 1, k + 1 do   -- an index skipped leaves an empty call
          calls[j] = { id = cjson.null, type = "function", ["function"] = { name = "", arguments = "" } }
        end
        call = calls[k + 1]
      end
      if type(tc.id) == "string" and tc.id ~= "" then call.id = tc.id end
      if type(tc.type) == "string" then call.type = tc.type end
      local fn = tc["function"]
      if type(fn) == "table" then
        local f = call["function"]
        -- the name comes whole in the first piece; a provider that repeats
        -- it in later pieces must not double it
        if type(fn.name) == "string" and fn.name ~= "" and f.name == "" then f.name = fn.name end
        if type(fn.arguments) == "string" then f.arguments = f.arguments .. fn.arguments end
      end
      any = true
    end
  end
  return any
end

-- Handles one SSE event; false stops the stream.
local stream_chunk

local function stream_event(st, data)
  if data == "[DONE]" then st.done = true; return true end
  local doc, derr = decode(data)
  if type(doc) ~= "table" then
    st.perr = new_error("decode", "bad JSON in a stream event: " .. tostring(derr))
    return false
  end
  return stream_chunk(st, doc)
end

-- A string field of a provider's JSON (a number becomes one), or nil (for
-- JSON null too).
local function str(v)
  if type(v) == "string" then return v end
  if type(v) == "number" then return tostring(v) end
  return nil
end

local function has(s, word)
  return s ~= nil and find(s, word, 1, true) ~= nil
end

-- The kind of an error event from its type and code (see EVENT_RULES).
local function event_kind(typ, code)
  if code == "context_length_exceeded" then return "context_length" end
  if has(code, "quota") or has(typ, "quota") or has(code, "billing") or has(typ, "billing") then
    return "quota"
  end
  if code == "rate_limit_exceeded" or typ == "rate_limit_error" or typ == "requests" or typ == "tokens" then
    return "rate_limited"
  end
  if code == "invalid_api_key" or typ == "authentication_error" or typ == "permission_error" then
    return "auth"
  end
  if typ == "invalid_request_error" then return "invalid_request" end
  return "server_error"
end

-- Handles one decoded chat.completion.chunk; false stops the stream.
function stream_chunk(st, doc)
  local e = doc.error
  if e ~= nil and e ~= cjson.null then
    local msg, typ, code, param
    if type(e) == "table" then
      msg, typ, code, param = str(e.message), str(e.type), str(e.code), str(e.param)
    else
      msg = str(e)
    end
    local kind = event_kind(typ, code)
    local err = new_error(kind, msg or "error event in the stream", { type = typ, code = code, param = param })
    event_rule[err] = EVENT_RULES[kind]
    st.perr = err
    return false
  end
  st.chunks = st.chunks + 1
  -- each from the first chunk that has it: Azure's first chunk (prompt
  -- filter results) has id "", model "" and created 0
  local meta = st.meta
  if meta.id == nil and type(doc.id) == "string" and doc.id ~= "" then meta.id = doc.id end
  if meta.model == nil and type(doc.model) == "string" and doc.model ~= "" then meta.model = doc.model end
  if meta.created == nil and type(doc.created) == "number" and doc.created > 0 then meta.created = doc.created end
  if type(doc.usage) == "table" then st.usage = doc.usage end
  local choices = doc.choices
  if type(choices) ~= "table" then return true end
  for _, c in ipairs(choices) do
    if type(c) ~= "table" then
      st.perr = new_error("decode", "a choice in a stream event is not an object")
      return false
    end
    local idx = c.index
    if idx == nil or idx == cjson.null then
      idx = 0
    elseif type(idx) ~= "number" or not (idx >= 0) or idx % 1 ~= 0 or idx > st.top + MAX_CHOICE_SKIP then
      -- the choices are a list up to the highest index: one far off would
      -- make millions of them
      st.perr = new_error("decode", "bad choice index in a stream event: " .. tostring(idx))
      return false
    end
    if idx > st.top then st.top = idx end
    local delta = c.delta
    if type(c.finish_reason) == "string" then st.finish[idx] = c.finish_reason end
    if type(delta) == "table" then
      local text = delta.content
      if type(text) ~= "string" then text = nil end
      local tools, terr = add_tool_calls(st, idx, delta.tool_calls)
      if tools == nil then
        st.perr = new_error("decode", terr)
        return false
      end
      if (text and text ~= "") or tools then
        if not st.delivered then
          st.delivered = true
          st.first_at = clock.now_precise()
        end
        -- (a tool-call piece with content "" is no text: content stays null)
        if text and text ~= "" then st.texts[idx] = (st.texts[idx] or "") .. text end
        if st.on_delta(text or "", doc, idx) == false then
          st.aborted = true
          return false
        end
      end
    end
  end
  return true
end

-- True when the stream of an attempt ended as a stream ends: [DONE], or a
-- finish_reason for every choice that began.
local function stream_finished(st)
  if st.done then return true end
  local finish = st.finish
  if next(finish) == nil then return false end
  for i in pairs(st.texts) do
    if finish[i] == nil then return false end
  end
  for i, calls in pairs(st.tools) do
    if #calls > 0 and finish[i] == nil then return false end
  end
  return true
end

-- The transport one streamed call goes through: it parses the events of each
-- attempt, turns a stream that ends early into an error (with `partial` once
-- text was delivered), and hands the policy the time to first token.
local function stream_transport(self, m, st)
  local inner = self.transport
  local w = {}
  local feed
  -- The bytes of an attempt until its first event: a server that ignores
  -- "stream" answers with one JSON document, which the transport streams to
  -- on_chunk all the same, and which holds no event.
  local raw
  local function on_chunk(chunk)
    if raw and st.chunks == 0 then raw[#raw + 1] = chunk else raw = nil end
    return feed(chunk)
  end
  function w.request(_, r)
    if st.delivered then
      -- Only a foreign policy object retries a delivered stream: refuse.
      return nil, st.last_err
    end
    st.done, st.perr, st.aborted, st.usage = false, false, false, false
    st.texts, st.tools, st.finish, st.meta, st.chunks, st.top = {}, {}, {}, {}, 0, -1
    feed = _M.sse_parser(function(data) return stream_event(st, data) end)
    raw = {}
    r.on_chunk = on_chunk
    local res, terr = inner:request(r)
    local late = false  -- a transport error after the stream had ended
    if res == nil and terr ~= nil and not st.perr and not st.aborted and stream_finished(st) then
      -- The provider was done (a proxy that then closes the connection
      -- before the end of the body, a timeout waiting for that end): the
      -- answer is whole, the error is not the provider's failure.
      local status = type(terr) == "table" and tonumber(terr.status) or 200
      res, terr, late = { status = status, headers = {}, body = "", streamed = true }, nil, true
    end
    local whole  -- the body of an answer that came as one JSON document
    local buffered = false  -- true when the transport does not stream
    if res and res.streamed then
      -- (after a late error, what is left in the parser is a piece of an event)
      if terr == nil and not st.aborted and not st.perr and not late then feed(nil) end
      if terr == nil and raw and st.chunks == 0 and not st.perr and not st.aborted then
        whole = concat(raw)
      end
    elseif res and res.status and res.status >= 200 and res.status < 300 then
      whole = res.body or ""   -- a transport that does not stream
      buffered = true
    end
    raw = nil
    if whole then
      -- A provider that ignored "stream": one JSON completion.
      local doc = decode(whole)
      local c1 = type(doc) == "table" and type(doc.choices) == "table" and doc.choices[1]
      local msg = type(c1) == "table" and type(c1.message) == "table" and c1.message or nil
      local calls = msg and type(msg.tool_calls) == "table" and msg.tool_calls or nil
      if msg and (type(msg.content) == "string" or calls) then
        local delta = { content = type(msg.content) == "string" and msg.content or nil }
        if calls then
          delta.tool_calls = {}
          for i, tc in ipairs(calls) do
            if type(tc) == "table" then
              delta.tool_calls[#delta.tool_calls + 1] = { index = i - 1, id = tc.id, type = tc.type,
                                                          ["function"] = tc["function"] }
            end
          end
        end
        stream_chunk(st, { id = doc.id, model = doc.model, created = doc.created,
          choices = { { index = 0, delta = delta, finish_reason = c1.finish_reason } },
          usage = doc.usage })
        st.done = true
        res.streamed = true
      elseif buffered then
        -- The events of the whole stream in one body: parsed as they would
        -- have been as they came (on_delta gets every piece now).
        if feed(whole) ~= false then feed(nil) end
        if st.chunks == 0 and not st.done and not st.perr and not st.aborted then
          st.perr = new_error("decode", "the response is neither a JSON completion nor Server-Sent Events",
                              { status = res.status })
        end
        res.streamed = true
      end
    end
    local err = terr
    if st.perr then
      err = st.perr
    elseif st.aborted then
      err = new_error("aborted", "on_delta stopped the stream")
    elseif not err and res and res.streamed and not stream_finished(st) then
      err = new_error("reset", "the stream ended before its last event")
    end
    if err and st.delivered then
      if not is_error(err) then err = new_error("reset", tostring(err)) end
      err.partial = stream_partial(st)
      -- tool calls of the first choice received so far (their arguments
      -- may be cut short)
      local calls = st.tools[0]
      if calls and #calls > 0 then err.partial_tool_calls = calls end
    end
    st.last_err = err
    if st.first_at then m.clock.override = st.first_at end
    if err then return nil, err end
    return res
  end
  return w
end

-- The completion a stream amounts to, in the shape chat() returns.
local function stream_response(st, model)
  local choices = {}
  local n = -1
  for i in pairs(st.texts) do if i > n then n = i end end
  for i in pairs(st.finish) do if i > n then n = i end end
  for i in pairs(st.tools) do if i > n then n = i end end
  for i = 0, n do
    local message = { role = "assistant", content = st.texts[i] or "" }
    local calls = st.tools[i]
    if calls and #calls > 0 then
      message.tool_calls = calls
      -- as the provider's non-streamed answer has it: no text is null
      if st.texts[i] == nil then message.content = cjson.null end
    end
    choices[#choices + 1] = { index = i, finish_reason = st.finish[i] or cjson.null, message = message }
  end
  return { id = st.meta.id, object = "chat.completion", created = st.meta.created,
           model = st.meta.model or model, choices = choices,
           usage = st.usage or nil, streamed = true }
end

---------------------------------------------------------------------------
-- Calls
---------------------------------------------------------------------------

-- The models to try, in order, for a call that asks for `first`.
local function chain(self, first, op)
  local key = op == "embeddings" and "\0" .. first or first
  local c = self._chains[key]
  if c then return c end
  c = { first }
  if op ~= "embeddings" then
    for _, m in ipairs(self.fallback_models) do
      if m ~= first then c[#c + 1] = m end
    end
  end
  self._chains[key] = c
  return c
end

-- The client's counter of each way a fallback answers.
local FALLBACK_COUNTER = { cache = "fallback_cache", ["function"] = "fallback_fn", value = "fallback_value" }

-- The answer of the client's fallback for a call that failed with `err`, and
-- how it answered ("cache", "function", "value"), or nil. (run counts it
-- once the answer has reached the caller.)
local function use_fallback(self, op, req, err, ckey)
  local fb = self._fallback
  if not fb or not availability_failure(err) or not fb:applies(err, err.kind) then return nil end
  if ckey then
    local v = self._cache:get(ckey, clock.now_precise())
    if v ~= nil then return v, "cache" end
  end
  if fb.fn then
    local ok, v = pcall(fb.fn, err, req)
    if ok and v ~= nil then return v, "function" end
    if not ok then self.last.fallback_error = scrub(tostring(v), self._secret.key) end
  end
  if fb.has_value and op ~= "embeddings" then
    local v = fb.value
    if type(v) == "string" then
      v = { object = "chat.completion", model = req.model, choices = {
              { index = 0, finish_reason = "stop", message = { role = "assistant", content = v } } } }
    end
    return v, "value"
  end
  return nil
end

local function reset_report(rep, requested)
  rep.requested, rep.model, rep.attempts, rep.fallback, rep.routed = requested, nil, 0, nil, nil
  rep.models, rep.elapsed, rep.ttft, rep.error, rep.fallback_error = 0, 0, nil, nil, nil
  rep.wait = 0
end

-- One try of `model` for run(): encodes the request for it, sends it
-- through the model's policy and decodes the answer. Returns the answer, or
-- nil and the error (counted in the model's stats), or nil, the value raised
-- and true when on_delta or the transport raised. `r_*` are req's own
-- model, stream, timeout and on_delta, put back after encoding.
local function try_model(self, op, req, model, hreq, st, rep, r_model, r_stream, r_timeout, r_on_delta)
  local m = self:_model(model)
  req.model, req.timeout, req.on_delta = model, nil, nil
  if op == "stream" then req.stream = true end
  local body, eerr = encode(req)
  req.model, req.stream, req.timeout, req.on_delta = r_model, r_stream, r_timeout, r_on_delta
  if not body then
    -- the caller's mistake (the first model's try: only the model changes),
    -- not a call, as for the checks before run
    self._totals.calls = self._totals.calls - 1
    raise(op == "stream" and "chat_stream" or op, "the request cannot be encoded as JSON: " .. tostring(eerr))
  end
  rep.models = rep.models + 1
  local ms = m.stats
  ms.calls = ms.calls + 1
  hreq.body = body
  local mrep = m.report
  local transport = st and stream_transport(self, m, st) or self.transport
  local p = m.policy
  local ok, res, err = pcall(p.request, p, transport, hreq, mrep)
  if not ok then
    -- on_delta or the transport raised (the policy let it through): this
    -- model's failure; run raises it again
    ms.failures = ms.failures + 1
    return nil, res, true
  end
  rep.attempts = rep.attempts + (mrep.attempts or 0)
  rep.wait = rep.wait + (mrep.wait or 0)
  if res then
    local doc
    if st then
      doc = stream_response(st, model)
    else
      local derr
      doc, derr = decode(res.body)
      if type(doc) ~= "table" then
        err = new_error("decode", "the response is not JSON: " .. tostring(derr),
                        { status = res.status, attempts = mrep.attempts })
        doc = nil
      end
    end
    if doc then
      account(self, m, doc)
      return doc
    end
  end
  if type(err) == "table" and err.kind == "breaker_open" then
    ms.rejected = ms.rejected + 1
  elseif type(err) == "table" and err.code == "context_length_exceeded" then
    ms.context_length = ms.context_length + 1
  else
    ms.failures = ms.failures + 1
  end
  return nil, err
end

-- After a failed try: the list of models to go on with, or nil to stop.
local function go_on(self, op, st, rep, err, list)
  if st and st.delivered then return nil end -- text went out: never start over
  if op == "embeddings" then return nil end  -- vectors of other models do not mix
  if type(err) == "table" and err.code == "context_length_exceeded" then
    self._totals.context_routed = self._totals.context_routed + 1
    rep.routed = "context_length"
    local long = self.long_context_models
    if long and list ~= long then return long, true end
    return list
  end
  if not availability_failure(err) then return nil end
  return list
end

-- on_delta (or the transport) raised `v` in a try of `model`: the call
-- counts as failed, client.last says so, and `v` goes on to the caller as it
-- was raised (no other model, no fallback). `counted`: the failure is counted already.
local function reraise(self, rep, v, model, t_start, counted)
  if not counted then self._totals.failures = self._totals.failures + 1 end
  rep.model = nil
  rep.error = new_error("error", "raised: " .. scrub(tostring(v), self._secret.key),
                        { raised = true, model = model, models = rep.models })
  rep.elapsed = clock.now_precise() - t_start
  error(v, 0)
end

-- Runs `op` ("chat", "stream" or "embeddings") over the chain of models.
-- The first model is tried before the loop over the others: a call its
-- first model answers runs no loop, which keeps it compiled by LuaJIT.
local function run(self, op, req, on_delta)
  local t_start = clock.now_precise()
  local first = req.model
  if first == nil then first = op == "embeddings" and (self.embedding_model or self.model) or self.model end
  if type(first) ~= "string" or first == "" then
    raise(op == "stream" and "chat_stream" or op,
          "no model: pass `model` in the request or in llm.new")
  end
  local rep = self.last
  reset_report(rep, first)
  local totals = self._totals
  totals.calls = totals.calls + 1

  -- The body is req itself with model (and stream) set and the client's own
  -- fields removed for the length of encode(), then restored: no copy, and
  -- nothing can run in between.
  local r_model, r_stream, r_timeout, r_on_delta = req.model, req.stream, req.timeout, req.on_delta
  local ckey = self._cache and cache_key(op == "embeddings" and "embeddings" or "chat", first, req) or nil
  local url = op == "embeddings" and self.embeddings_url or self.chat_url
  local secret = self._secret
  local hreq = {
    method = "POST", url = url,
    headers = op == "stream" and secret.stream_headers or secret.headers,
    body = nil, timeout = req.timeout or self.timeout,
  }
  local st = op == "stream" and stream_state(on_delta) or nil

  local list = chain(self, first, op)
  local model = list[1]
  local doc, err, raised = try_model(self, op, req, model, hreq, st, rep, r_model, r_stream, r_timeout, r_on_delta)
  if raised then reraise(self, rep, err, model, t_start) end
  local last_model = model
  if not doc then
    local restart
    list, restart = go_on(self, op, st, rep, err, list)
    local pos, tried = restart and 1 or 2, nil
    while list do
      model = list[pos]
      if model == nil then break end
      pos = pos + 1
      -- each model once per call (before `tried` exists, only the first was)
      local seen
      if tried then seen = tried[model] else seen = model == last_model end
      if not seen then
        tried = tried or { [last_model] = true }
        tried[model] = true
        doc, err, raised = try_model(self, op, req, model, hreq, st, rep, r_model, r_stream, r_timeout, r_on_delta)
        if raised then reraise(self, rep, err, model, t_start) end
        last_model = model
        if doc then break end
        list, restart = go_on(self, op, st, rep, err, list)
        if restart then pos = 1 end
      end
    end
  end
  if doc then
    totals.successes = totals.successes + 1
    if ckey and (not st or st.delivered) then   -- a stream that brought text or tool calls
      self._cache:set(ckey, doc, clock.now_precise())
    end
    rep.model = last_model
    if st and st.first_at then rep.ttft = st.first_at - t_start end
    rep.elapsed = clock.now_precise() - t_start
    return doc
  end

  totals.failures = totals.failures + 1
  err = finish_error(self, err or new_error("error", "no model could be tried"), last_model)
  err.models = rep.models
  rep.model = nil
  if not (st and st.delivered) then
    local v, how = use_fallback(self, op, req, err, ckey)
    if v ~= nil then
      if st then
        local text = type(v) == "table" and type(v.choices) == "table" and type(v.choices[1]) == "table"
                     and type(v.choices[1].message) == "table" and v.choices[1].message.content
        if type(text) == "string" and text ~= "" then
          local ok, e = pcall(on_delta, text, v, 0)
          if not ok then -- as any raising on_delta: a failed call (counted above), re-raised
            return reraise(self, rep, e, last_model, t_start, true)
          end
        end
      end
      totals.fallbacks = totals.fallbacks + 1
      totals[FALLBACK_COUNTER[how]] = totals[FALLBACK_COUNTER[how]] + 1
      rep.fallback, rep.error = how, err
      rep.elapsed = clock.now_precise() - t_start
      return v
    end
  end
  rep.error = err
  rep.elapsed = clock.now_precise() - t_start
  return nil, err
end

local function check_request(where, req, field)
  if type(req) ~= "table" then error("breaker.llm." .. where .. ": expected a request table", 3) end
  local v = req[field]
  if field == "messages" and (type(v) ~= "table" or v[1] == nil) then
    error("breaker.llm." .. where .. ": messages: expected a non-empty list of messages", 3)
  end
  if field == "input" and type(v) ~= "string" and type(v) ~= "table" then
    error("breaker.llm." .. where .. ": input: expected a string or a list of strings", 3)
  end
  if req.model ~= nil and (type(req.model) ~= "string" or req.model == "") then
    error("breaker.llm." .. where .. ": model: expected a model name", 3)
  end
  local to = req.timeout
  if to ~= nil and (type(to) ~= "number" or not (to > 0)) then
    error("breaker.llm." .. where .. ": timeout: expected seconds > 0", 3)
  end
end

-- client:chat{ messages, model, temperature, max_tokens, ... } -> the
-- provider's chat.completion (decoded JSON), a fallback answer, or nil, err.
-- Every field except `timeout` (seconds per attempt) is sent as given (model
-- set per try); `stream = true` raises (chat_stream streams). client.last
-- says which model answered, how many attempts and models it took, and
-- whether a fallback answered.
function _M.chat(self, req)
  check_request("chat", req, "messages")
  if req.stream ~= nil and req.stream ~= false then
    error("breaker.llm.chat: stream: use client:chat_stream{ ..., on_delta = fn } for a streamed answer", 2)
  end
  return run(self, "chat", req)
end

-- client:chat_stream{ ..., on_delta = fn(text, chunk, index) } -> the
-- completion assembled from the stream (choices[i].message.content, usage if
-- the provider sent it, streamed = true), or nil, err. on_delta gets each
-- piece of text as it arrives (returning false stops the stream: kind
-- "aborted"). Before the first piece a failure is retried or falls back to
-- the next model; after it the error is returned with err.partial (the text
-- delivered), never retried, so no text is delivered twice. An on_delta
-- that raises stops the stream and its error is raised again as it was
-- (the call counted as failed, client.last.error with raised = true). The
-- breaker records the time to first token as the call's latency.
function _M.chat_stream(self, req)
  check_request("chat_stream", req, "messages")
  local on_delta = req.on_delta
  if type(on_delta) ~= "function" then
    error("breaker.llm.chat_stream: on_delta: expected a function(text, chunk, index)", 2)
  end
  return run(self, "stream", req, on_delta)
end

-- client:embeddings{ input, model, ... } -> the provider's embedding list
-- (decoded JSON), a cached answer, or nil, err. Uses `embedding_model`
-- (else `model`) when the request names none; no model fallback, not even
-- to long_context_models (vectors of different models do not mix).
function _M.embeddings(self, req)
  check_request("embeddings", req, "input")
  return run(self, "embeddings", req)
end

-- client:stats() -> { calls, successes, failures, fallbacks, fallback_cache,
-- fallback_fn, fallback_value, context_routed, prompt_tokens,
-- completion_tokens, total_tokens, cost, models = { [model] = { calls,
-- successes, failures, rejected, context_length, prompt_tokens,
-- completion_tokens, total_tokens, cost, breaker = state } } }: a fresh copy.
-- cost is in the unit of `prices` (per 1M tokens), 0 without prices.
function _M.stats(self)
  local out = copy(self._totals)
  out.prompt_tokens, out.completion_tokens, out.total_tokens, out.cost = 0, 0, 0, 0
  out.models = {}
  for name, m in pairs(self._models) do
    local s = copy(m.stats)
    s.breaker = m.breaker and m.breaker:state() or nil
    out.models[name] = s
    out.prompt_tokens = out.prompt_tokens + s.prompt_tokens
    out.completion_tokens = out.completion_tokens + s.completion_tokens
    out.total_tokens = out.total_tokens + s.total_tokens
    out.cost = out.cost + s.cost
  end
  return out
end

-- Drops the cached fallback answers.
function _M.clear_cache(self)
  if self._cache then
    self._cache = fallback_mod.lru(self._cache.size, self._cache.ttl)
    self._fallback.cache = self._cache
  end
end

-- client:close(): closes the transport if the client made it. Idempotent.
function _M.close(self)
  if self._own_transport and self.transport then self.transport:close() end
  self._own_transport = false
end

mt.__tostring = function(self)
  return "breaker.llm client " .. self.name .. " (" .. tostring(self.model) .. ")"
end

return _M
