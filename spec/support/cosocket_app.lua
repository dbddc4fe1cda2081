-- cosocket_app: handlers of the nginx app that spec/cosocket_spec.lua runs to
-- drive breaker.cosocket from inside nginx.
--
-- POST /do with a JSON body { opts = transport options, req = request, or
-- many = { request, ... }, on_chunk = "collect" | "abort" | "raise" } runs
-- the request(s) and answers JSON: { res = ..., err = ..., chunks = n,
-- raised = message }.
-- GET /stream?url=... relays the upstream's streamed body to the client as
-- it arrives (ngx.print + ngx.flush per piece).
-- GET /llm?base=... streams a chat answer through breaker.llm's chat_stream
-- (retry and breaker included) over this transport, one delta at a time.
local cosocket = require "breaker.cosocket"
local cjson = require "cjson.safe"

local _M = {}

local function plain_err(err)
  if not err then return nil end
  return { kind = err.kind, message = err.message, status = err.status }
end

local function reply(v)
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode(v))
end

function _M.run()
  ngx.req.read_body()
  local spec = cjson.decode(ngx.req.get_body_data() or "") or {}
  local okn, t = pcall(cosocket.new, spec.opts)
  if not okn then return reply{ raised = tostring(t) } end
  local chunks = 0
  local mode = spec.on_chunk
  local function on_chunk()
    chunks = chunks + 1
    if mode == "abort" then return false end
    if mode == "raise" then error("raised in on_chunk") end
  end
  local function prepare(req)
    if mode then req.on_chunk = on_chunk end
    return req
  end
  local ok, a, b = pcall(function()
    if spec.many then
      for i, r in ipairs(spec.many) do spec.many[i] = prepare(r) end
      local out = t:request_many(spec.many)
      return out
    end
    local res, err = t:request(prepare(spec.req))   -- not a tail call: keeps the error's line
    return res, err
  end)
  if not ok then return reply{ raised = tostring(a), chunks = chunks } end
  if spec.many then
    local out = {}
    for i, r in ipairs(a) do out[i] = { res = r.res, err = plain_err(r.err) } end
    return reply{ many = out }
  end
  return reply{ res = a, err = plain_err(b), chunks = chunks }
end

function _M.stream()
  local t = cosocket.new{ timeout = 10 }
  local pieces = 0
  local res, err = t:request{
    method = "POST", url = ngx.unescape_uri(ngx.var.arg_url or ""),
    headers = { ["content-type"] = "application/json", ["x-fake-fault"] = ngx.var.http_x_fake_fault },
    body = cjson.encode{ model = "gpt-fake", stream = true,
                         messages = { { role = "user", content = "one two three four five" } } },
    on_chunk = function(piece)
      pieces = pieces + 1
      ngx.print(piece)
      ngx.flush(true)
    end,
  }
  if not res then
    ngx.log(ngx.ERR, "stream failed: ", tostring(err))
    return ngx.exit(502)
  end
  ngx.log(ngx.INFO, "relayed ", pieces, " pieces")
end

function _M.llm()
  local llm = require "breaker.llm"
  local client = llm.new{ base_url = ngx.unescape_uri(ngx.var.arg_base or ""), api_key = false,
                          model = "gpt-fake", transport = cosocket.new{ timeout = 10 },
                          policy = { retry = { max_attempts = 3, base = 0.01, cap = 0.02 } } }
  local res, err = client:chat_stream{
    messages = { { role = "user", content = "one two three four five" } },
    on_delta = function(text)
      ngx.print("delta: ", text, "\n")
      ngx.flush(true)
    end,
  }
  if not res then
    ngx.print("error: ", tostring(err), "\n")
  else
    ngx.print("attempts: ", client.last.attempts, "\n")
  end
end

return _M
