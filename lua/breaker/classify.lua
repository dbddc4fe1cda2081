-- breaker.classify: the one place where a transport response or error becomes
-- an outcome.
--
-- A classifier is a function `verdict = c(res, err, ctx)`: `res` is a
-- transport response ({status, headers, body}) or nil, `err` the transport's
-- (or a plain function's) error or nil, `ctx` a table with `mode` ("request"
-- or "call") and, for requests, `request` and `attempt`. The verdict is
--
--   { outcome = "success" | "failure" | "ignored",   -- what the breaker records
--     retryable = bool,                              -- may the retry layer try again
--     retry_after = seconds | nil,                   -- the server's requested delay
--     kind = "rate_limited" | "quota" | "auth" | "http_status" | transport kind ...,
--     status = HTTP status | nil,
--     message, code, type = the provider's error message / code / type, if any }
--
-- Verdicts for plain successes are shared read-only tables: never modify one.
--
-- Defaults (LLM-provider flavoured):
--   2xx                        success
--   408 409 429 500 502 503 504 529   failure, retryable (429 -> kind "rate_limited",
--                                     the others "http_status")
--   429 (or 402/403) whose error code/type says insufficient_quota or billing
--                              failure, NOT retryable, kind "quota": the app's
--                              money ran out, retrying cannot help, but the
--                              breaker should still open to stop the bleeding
--   401 403                    ignored by the breaker, not retryable, kind "auth",
--                              message = the provider's message
--   other 4xx                  ignored, not retryable, kind "http_status"
--   other 5xx                  failure, not retryable, kind "http_status"
--   1xx 3xx                    ignored, not retryable (p:request returns them)
--   transport timeout/connect/reset   failure, retryable
--   transport dns/tls/protocol        failure, not retryable
--   transport too_large/invalid/aborted  ignored (the caller's doing), not retryable
--   breaker_open/bulkhead_full/rate_limited without a status (local rejections)
--                              ignored, not retryable
--   any other error (a string, an unknown kind, a raised Lua error)
--                              failure, not retryable (option `unknown`)
-- `x-should-retry: true|false` from the server overrides `retryable` for any
-- non-2xx answer. The server's delay comes from `retry-after-ms` first, then
-- `Retry-After` (delta-seconds or HTTP-date), parsed by breaker.curl.

local _M = { _VERSION = require "breaker.version" }

local type, pairs, tostring, pcall, require, error =
      type, pairs, tostring, pcall, require, error
local tonumber, floor = tonumber, math.floor
local find, lower, sub, match, format = string.find, string.lower, string.sub, string.match, string.format

-- ---------------------------------------------------------------------------
-- Optional dependencies, probed lazily so that pure-Lua parts work without
-- the C modules.

local curl_mod -- false once probed and missing
local function curl()
  if curl_mod == nil then
    local ok, m = pcall(require, "breaker.curl")
    curl_mod = ok and type(m) == "table" and m or false
  end
  return curl_mod
end

local json_mod
local function json()
  if json_mod == nil then
    local ok, m = pcall(require, "cjson.safe")
    json_mod = ok and m or false
  end
  return json_mod
end

-- Seconds from a `retry-after-ms` value, or nil.
local function parse_ms(v)
  local c = curl()
  if c and c.parse_retry_after_ms then return c.parse_retry_after_ms(v) end
  local n = tonumber(match(v, "^%s*([%d%.]+)"))
  return n and n / 1000 or nil
end

-- Seconds from a `Retry-After` value, or nil. Without breaker.curl only the
-- delta-seconds form is understood (the HTTP-date parser lives in C).
local function parse_ra(v)
  local c = curl()
  if c and c.parse_retry_after then return c.parse_retry_after(v) end
  local n = match(v, "^%s*(%d+)%s*$") or match(v, "^%s*(%d+)%s*,")
  return n and tonumber(n) or nil
end

local function header(h, name)
  if type(h) ~= "table" then return nil end
  local v = h[name]
  if type(v) == "table" then v = v[1] end
  return type(v) == "string" and v or (v ~= nil and tostring(v) or nil)
end

-- The server's requested delay in seconds from response headers, or nil:
-- `retry-after-ms` first, then `Retry-After`. Negative values become 0.
function _M.retry_after(headers)
  local v = header(headers, "retry-after-ms")
  local s = v and parse_ms(v)
  if not s then
    v = header(headers, "retry-after")
    s = v and parse_ra(v)
  end
  if s and s < 0 then s = 0 end
  return s
end

-- ---------------------------------------------------------------------------
-- Error bodies

local MAX_JSON = 65536

-- message, code, type from an OpenAI / Anthropic style error body, if any.
-- Bodies that are not JSON yield their first 200 bytes as the message.
function _M.error_info(body)
  if type(body) ~= "string" or body == "" then return nil end
  local j = json()
  if j and #body <= MAX_JSON and find(body, "^%s*{") then
    local doc = j.decode(body)
    if type(doc) == "table" then
      local e = doc.error
      local msg, code, typ
      if type(e) == "table" then
        msg, code, typ = e.message, e.code, e.type
      elseif type(e) == "string" then
        msg = e
      end
      if msg == nil then msg = doc.message end
      if typ == nil and type(doc.type) == "string" and doc.type ~= "error" then typ = doc.type end
      local function str(v)
        if type(v) == "string" then return v end
        if type(v) == "number" then return tostring(v) end
        return nil
      end
      return str(msg), str(code), str(typ)
    end
  end
  -- Not JSON (or too big to decode): still look for the quota marker.
  local code = find(body, "insufficient_quota", 1, true) and "insufficient_quota" or nil
  return sub(body, 1, 200), code, nil
end

-- ---------------------------------------------------------------------------
-- Default rules

local OUTCOMES = { success = true, failure = true, ignored = true }

local function rule(outcome, retryable, kind)
  return { outcome = outcome, retryable = retryable, kind = kind }
end

-- Status rules; statuses not listed fall back to their class below.
local DEFAULT_STATUSES = {
  [401] = rule("ignored", false, "auth"),
  [402] = rule("failure", false, "quota"),
  [403] = rule("ignored", false, "auth"),
  [408] = rule("failure", true, "http_status"),
  [409] = rule("failure", true, "http_status"),
  [429] = rule("failure", true, "rate_limited"),
  [500] = rule("failure", true, "http_status"),
  [502] = rule("failure", true, "http_status"),
  [503] = rule("failure", true, "http_status"),
  [504] = rule("failure", true, "http_status"),
  [529] = rule("failure", true, "http_status"),
}
local CLASS_RULES = {
  [1] = rule("ignored", false, "http_status"),
  [2] = rule("success", false, nil),
  [3] = rule("ignored", false, "http_status"),
  [4] = rule("ignored", false, "http_status"),
  [5] = rule("failure", false, "http_status"),
}
local OTHER_STATUS = rule("failure", false, "http_status")

-- Error-kind rules (transport kinds, local rejections, errors of other layers).
local DEFAULT_KINDS = {
  timeout = rule("failure", true),
  connect = rule("failure", true),
  reset = rule("failure", true),
  dns = rule("failure", false),
  tls = rule("failure", false),
  protocol = rule("failure", false),
  decode = rule("failure", false),
  too_large = rule("ignored", false),
  invalid = rule("ignored", false),
  aborted = rule("ignored", false),
  breaker_open = rule("ignored", false),
  bulkhead_full = rule("ignored", false),
  deadline = rule("ignored", false),
  -- A rate_limited error without a status is the client-side limiter's.
  rate_limited = rule("ignored", false),
  auth = rule("ignored", false),
  quota = rule("failure", false),
}
local UNKNOWN = rule("failure", false, "error")

-- Error strings of ngx cosockets / LuaSocket mapped to kinds.
local STRING_KINDS = {
  ["timeout"] = "timeout",
  ["connection refused"] = "connect",
  ["closed"] = "reset",
  ["connection reset by peer"] = "reset",
  ["broken pipe"] = "reset",
}

-- Error codes / types that mean the account is out of money: not retryable.
local DEFAULT_QUOTA_CODES = {
  insufficient_quota = true,
  billing_hard_limit_reached = true,
  billing_not_active = true,
  billing_error = true,
  credit_balance_too_low = true,
}

-- Shared success verdict (read-only).
local SUCCESS = { outcome = "success", retryable = false }
_M.SUCCESS = SUCCESS

-- ---------------------------------------------------------------------------
-- Option checking: caller mistakes raise, naming the key.

local function fail(where, key, expected, got)
  error(format("%s.%s: expected %s, got %s", where, key, expected,
               type(got) == "string" and format("%q", got) or tostring(got)), 0)
end

local function check_rule(where, key, v)
  if type(v) == "string" then
    if not OUTCOMES[v] then fail(where, key, "\"success\", \"failure\" or \"ignored\"", v) end
    return { outcome = v, retryable = false }
  end
  if type(v) ~= "table" then fail(where, key, "an outcome string or a rule table", v) end
  for k in pairs(v) do
    if k ~= "outcome" and k ~= "retryable" and k ~= "kind" then
      error(format("%s.%s: unknown key '%s'", where, key, tostring(k)), 0)
    end
  end
  if not OUTCOMES[v.outcome] then
    fail(where, key .. ".outcome", "\"success\", \"failure\" or \"ignored\"", v.outcome)
  end
  if v.retryable ~= nil and type(v.retryable) ~= "boolean" then
    fail(where, key .. ".retryable", "a boolean", v.retryable)
  end
  if v.kind ~= nil and type(v.kind) ~= "string" then fail(where, key .. ".kind", "a string", v.kind) end
  return { outcome = v.outcome, retryable = v.retryable == true, kind = v.kind }
end

local function merge(defaults, overrides, where, name, keycheck)
  local t = {}
  for k, v in pairs(defaults) do t[k] = v end
  if overrides == nil then return t end
  if type(overrides) ~= "table" then fail(where, name, "a table", overrides) end
  for k, v in pairs(overrides) do
    keycheck(k)
    t[k] = check_rule(where, name .. "[" .. tostring(k) .. "]", v)
  end
  return t
end

local KEYS = { statuses = true, kinds = true, unknown = true, quota_codes = true,
               should_retry_header = true, fn = true }

-- ---------------------------------------------------------------------------
-- The classifier

local function verdict_of(r, status, kind)
  return { outcome = r.outcome, retryable = r.retryable, kind = r.kind or kind,
           status = status }
end

-- Builds a classifier function from `opts` (all optional):
--   statuses = { [status] = "failure" | { outcome =, retryable =, kind = } }
--              merged over the defaults;
--   kinds    = { [err.kind] = rule } merged over the defaults;
--   unknown  = rule for errors with no known kind (default failure, not retryable);
--   quota_codes = { code = true } extra codes/types that mean "out of money";
--   should_retry_header = false to ignore `x-should-retry`;
--   fn = function(res, err, ctx, default) -> verdict or nil: runs first; nil
--        falls back to the rules (`default` is the rule-based classifier).
-- `where` (optional) names the option in error messages.
function _M.new(opts, where)
  where = where or "classify"
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(where, "(options)", "a table", opts) end
  for k in pairs(opts) do
    if not KEYS[k] then error(format("%s: unknown key '%s'", where, tostring(k)), 0) end
  end
  local statuses = merge(DEFAULT_STATUSES, opts.statuses, where, "statuses", function(k)
    if type(k) ~= "number" or k ~= floor(k) or k < 100 or k > 999 then
      fail(where, "statuses", "HTTP status numbers as keys", k)
    end
  end)
  local kinds = merge(DEFAULT_KINDS, opts.kinds, where, "kinds", function(k)
    if type(k) ~= "string" then fail(where, "kinds", "error kinds (strings) as keys", k) end
  end)
  local unknown = opts.unknown ~= nil and check_rule(where, "unknown", opts.unknown) or UNKNOWN
  if unknown.kind == nil then unknown.kind = "error" end
  local quota = {}
  for k in pairs(DEFAULT_QUOTA_CODES) do quota[k] = true end
  if opts.quota_codes ~= nil then
    if type(opts.quota_codes) ~= "table" then fail(where, "quota_codes", "a table", opts.quota_codes) end
    for k, v in pairs(opts.quota_codes) do
      if type(k) == "number" and type(v) == "string" then quota[v] = true
      elseif type(k) == "string" then quota[k] = v and true or nil
      else fail(where, "quota_codes", "a list or set of strings", k) end
    end
  end
  local honour_header = opts.should_retry_header ~= false
  if opts.should_retry_header ~= nil and type(opts.should_retry_header) ~= "boolean" then
    fail(where, "should_retry_header", "a boolean", opts.should_retry_header)
  end
  local user = opts.fn
  if user ~= nil and type(user) ~= "function" then fail(where, "fn", "a function", user) end

  local function is_quota(code, typ)
    if code and (quota[code] or find(lower(code), "billing", 1, true)) then return true end
    if typ and (quota[typ] or find(lower(typ), "billing", 1, true)) then return true end
    return false
  end

  local function by_response(res)
    local status = tonumber(res.status)
    if not status then
      return verdict_of(unknown, nil, "protocol")
    end
    local r = statuses[status]
    if r == nil then
      r = CLASS_RULES[floor(status / 100)] or OTHER_STATUS
    end
    if r.outcome == "success" then
      return r == CLASS_RULES[2] and SUCCESS or verdict_of(r, status)
    end
    local v = verdict_of(r, status, "http_status")
    local h = res.headers
    if status >= 400 then
      local msg, code, typ = _M.error_info(res.body)
      v.message, v.code, v.type = msg, code, typ
      if (status == 429 or status == 402 or status == 403) and is_quota(code, typ) then
        v.outcome, v.retryable, v.kind = "failure", false, "quota"
      end
    end
    if v.outcome ~= "success" then
      v.retry_after = _M.retry_after(h)
      if honour_header then
        local sr = header(h, "x-should-retry")
        if sr then
          sr = lower(sr)
          if sr == "true" then v.retryable = true elseif sr == "false" then v.retryable = false end
        end
      end
    end
    return v
  end

  local function by_error(err)
    local te = type(err)
    if te == "table" then
      if err.status and type(err.status) == "number" then
        local v = by_response(err.response or { status = err.status, headers = err.headers })
        -- (not `v ~= SUCCESS`: an override of a status makes its own table)
        if v.outcome ~= "success" then
          if v.retry_after == nil then v.retry_after = err.retry_after end
          v.message = v.message or err.message
          if err.kind and v.kind == "http_status" then v.kind = err.kind end
          return v
        end
        -- A 2xx whose body then failed (reset, timeout mid-body): the
        -- error's kind decides, as it would without a status.
        local kr = err.kind and kinds[err.kind]
        if kr then
          v = verdict_of(kr, err.status, err.kind)
          v.retry_after = err.retry_after
          v.message = err.message
          return v
        end
        return verdict_of(unknown, err.status, err.kind)
      end
      local r = err.kind and kinds[err.kind]
      if r then
        local v = verdict_of(r, nil, err.kind)
        v.retry_after = err.retry_after
        v.message = err.message
        return v
      end
      local v = verdict_of(unknown, nil)
      if type(err.kind) == "string" then v.kind = err.kind end
      v.message = type(err.message) == "string" and err.message or nil
      return v
    end
    if te == "string" then
      local k = STRING_KINDS[err]
      if not k then
        local l = lower(err)
        if find(l, "timed out", 1, true) or find(l, "timeout", 1, true) then k = "timeout"
        elseif find(l, "could not be resolved", 1, true) or find(l, "resolve", 1, true) then k = "dns"
        elseif find(l, "refused", 1, true) then k = "connect"
        elseif find(l, "reset", 1, true) or find(l, "broken pipe", 1, true) then k = "reset" end
      end
      local r = k and kinds[k]
      if r then
        local v = verdict_of(r, nil, k)
        v.message = err
        return v
      end
      local v = verdict_of(unknown, nil)
      v.message = err
      return v
    end
    return verdict_of(unknown, nil)
  end

  local function rules(res, err)
    if err ~= nil then return by_error(err) end
    if type(res) == "table" and type(res.status) == "number" then return by_response(res) end
    return SUCCESS
  end

  if not user then
    return function(res, err) return rules(res, err) end
  end
  return function(res, err, ctx)
    local v = user(res, err, ctx, rules)
    if v == nil then return rules(res, err) end
    if type(v) ~= "table" or not OUTCOMES[v.outcome] then
      error(format("%s.fn: must return nil or a verdict with outcome \"success\", " ..
                   "\"failure\" or \"ignored\", got %s", where,
                   type(v) == "table" and tostring(v.outcome) or tostring(v)), 2)
    end
    return v
  end
end

-- The default classifier (all rules as documented above).
_M.default = _M.new()

-- Normalises a `classify` option: nil -> the default, a function -> used as
-- the `fn` over the defaults, a table -> options of _M.new. Raises on anything else.
function _M.from(opt, where)
  if opt == nil then return _M.default end
  if type(opt) == "function" then return _M.new({ fn = opt }, where) end
  if type(opt) == "table" then return _M.new(opt, where) end
  fail(where or "classify", "(value)", "a function or a table", opt)
end

-- Expose the defaults (copies) for documentation and specs.
function _M.default_rules()
  local s, k = {}, {}
  for code, r in pairs(DEFAULT_STATUSES) do
    s[code] = { outcome = r.outcome, retryable = r.retryable, kind = r.kind }
  end
  for name, r in pairs(DEFAULT_KINDS) do k[name] = { outcome = r.outcome, retryable = r.retryable } end
  return s, k
end

return _M
