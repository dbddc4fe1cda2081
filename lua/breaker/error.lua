-- breaker.error: the one error type every layer returns for runtime failures.
--
-- An error is a plain table with a stable `kind` that code can match on
-- (`breaker_open`, `timeout`, `connect`, `dns`, `tls`, `reset`, `too_large`,
-- `rate_limited`, `http_status`, `bulkhead_full`, `deadline`, `decode`,
-- `auth`, ...), a readable `message`, and where known `status`,
-- `retry_after`, `attempts` and other fields. tostring(err) prints all of it.
-- Errors never carry secrets: callers build messages without credentials and
-- `redact` scrubs anything that looks like one.

local type, tostring, setmetatable, getmetatable, pairs =
      type, tostring, setmetatable, getmetatable, pairs
local concat, sort, format = table.concat, table.sort, string.format

local _M = {}

local mt = {}
_M.mt = mt

-- Fields printed after the message, in this order; other fields follow sorted.
local ORDER = { "status", "retry_after", "attempts", "breaker", "state", "code", "type" }
local SKIP = { kind = true, message = true, cause = true, response = true, partial = true }
for _, k in pairs(ORDER) do SKIP[k] = true end

local function show(v)
  if type(v) == "number" then
    if v == math.floor(v) and v > -1e15 and v < 1e15 then return format("%d", v) end
    return format("%.3f", v)
  end
  return tostring(v)
end

mt.__tostring = function(e)
  local parts = { tostring(e.kind or "error") .. ": " .. tostring(e.message or "") }
  for _, k in pairs(ORDER) do
    if e[k] ~= nil then parts[#parts + 1] = k .. "=" .. show(e[k]) end
  end
  local extra = {}
  for k, v in pairs(e) do
    if type(k) == "string" and not SKIP[k] and type(v) ~= "table" and type(v) ~= "function" then
      extra[#extra + 1] = k
    end
  end
  sort(extra)
  for i = 1, #extra do parts[#parts + 1] = extra[i] .. "=" .. show(e[extra[i]]) end
  return concat(parts, " ")
end

-- Removes credentials from a string: Bearer tokens, Authorization and API-key
-- header lines, and OpenAI-style `sk-...` keys.
function _M.redact(s)
  if type(s) ~= "string" then return s end
  s = s:gsub("([Bb]earer%s+)[%w%-%._~%+/=]+", "%1[redacted]")
  s = s:gsub("([Aa]uthorization%s*[:=]%s*)[^\r\n,;]+", "%1[redacted]")
  -- api_key: v, api-key=v, and in JSON "api_key": "v" (the value's quotes kept)
  s = s:gsub("([%w%-]*[Aa][Pp][Ii][%-_]?[Kk][Ee][Yy][\"']?%s*[:=]%s*[\"']?)[^\r\n,;&%s\"'}]+", "%1[redacted]")
  s = s:gsub("sk%-[%w%-_]+", "sk-[redacted]")
  return s
end

-- Makes an error of `kind` with `message`; `fields` (optional) is copied in.
-- The message is redacted, so a caller cannot leak a key through it by mistake.
function _M.new(kind, message, fields)
  local e = {}
  if fields then for k, v in pairs(fields) do e[k] = v end end
  e.kind = kind
  e.message = _M.redact(message or kind)
  return setmetatable(e, mt)
end

-- True when `e` is an error made here, and (if given) of that kind.
function _M.is(e, kind)
  return type(e) == "table" and getmetatable(e) == mt and (kind == nil or e.kind == kind)
end

return _M
