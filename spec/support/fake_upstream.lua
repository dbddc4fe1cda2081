-- fake_upstream: request handlers of the fake LLM provider that breaker's
-- specs, benchmarks and demo run against (nginx + lua-nginx-module).
--
-- It speaks a small OpenAI-compatible API, counts what it receives in a
-- lua_shared_dict (so counts are exact with any number of workers), and
-- misbehaves on request: per call through the `x-fake-fault` request header,
-- or through a scripted scenario set on /_control/scenario. README.md in this
-- directory documents every fault and control endpoint.

local cjson = require "cjson.safe"

local ngx = ngx
local dict = ngx.shared.fake_upstream
local type, tonumber, tostring, pairs, ipairs = type, tonumber, tostring, pairs, ipairs
local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local concat, format, rep = table.concat, string.format, string.rep
local sub, lower = string.sub, string.lower

local _M = {}

local api_key            -- the Bearer key /v1/* requires; nil accepts anything
local SMALL_CONTEXT = 1024  -- tokens the "small-context" model accepts
local MAX_STEPS = 100000    -- scenario steps after expanding `times`
local MODELS = { "gpt-fake", "gpt-fake-mini", "small-context", "text-embedding-fake" }

-- Called from init_by_lua with the key the server was started with ("" = none).
function _M.init(opts)
  api_key = opts.api_key ~= "" and opts.api_key or nil
end

---------------------------------------------------------------------------
-- Responses
---------------------------------------------------------------------------

local function json_encode(v)
  return (assert(cjson.encode(v)))
end

-- Sends `body` with an exact Content-Length; with `f.body_delay` the body goes
-- out in `f.chunks` (default 4) flushed pieces with a pause between them.
local function send_body(status, body, content_type, f)
  ngx.status = status
  ngx.header["Content-Type"] = content_type or "application/json"
  ngx.header["Content-Length"] = #body
  local body_delay = f and tonumber(f.body_delay)
  if not body_delay or body_delay <= 0 or #body < 2 then
    ngx.print(body)
    return ngx.exit(status)
  end
  local pieces = max(1, min(#body, tonumber(f.chunks) or 4))
  local step = ceil(#body / pieces)
  for i = 1, #body, step do
    if i > 1 then ngx.sleep(body_delay) end
    ngx.print(body:sub(i, i + step - 1))
    if not ngx.flush(true) then return ngx.exit(ngx.OK) end
  end
  return ngx.exit(status)
end

local function send_json(status, value, f)
  return send_body(status, json_encode(value), "application/json", f)
end

-- The error body every provider error uses, in OpenAI's shape.
local function send_error(status, message, etype, code, param, f)
  return send_json(status, { error = {
    message = message,
    type = etype,
    param = param or cjson.null,
    code = code or cjson.null,
  } }, f)
end

local STATUS_ERRORS = {
  [400] = { "Bad request.", "invalid_request_error" },
  [401] = { "Incorrect API key provided", "invalid_request_error", "invalid_api_key" },
  [403] = { "You are not allowed to sample from this model.", "invalid_request_error" },
  [404] = { "The model does not exist or you do not have access to it.",
            "invalid_request_error", "model_not_found" },
  [408] = { "Request timed out.", "timeout" },
  [429] = { "Rate limit reached for requests. Please try again later.",
            "requests", "rate_limit_exceeded" },
  [500] = { "The server had an error while processing your request. Sorry about that!",
            "server_error" },
  [502] = { "Bad gateway.", "server_error" },
  [503] = { "The engine is currently overloaded, please try again later.", "server_error" },
  [504] = { "Gateway timeout.", "server_error" },
  [529] = { "Overloaded", "overloaded_error" },
}

local function send_status_error(status, f)
  local e = STATUS_ERRORS[status]
  if e and f.echo_key then
    -- Like providers that quote the key they were given, but unmasked: for
    -- specs that check a client scrubs it from its errors.
    local h = ngx.req.get_headers()["authorization"]
    if type(h) == "table" then h = h[1] end
    local key = type(h) == "string" and h:match("^[Bb]earer%s+(.+)$") or "none"
    return send_error(status, e[1] .. ": " .. key .. ".", e[2], e[3], nil, f)
  end
  if e then return send_error(status, e[1], e[2], e[3], nil, f) end
  return send_error(status, "HTTP " .. status,
                    status >= 500 and "server_error" or "invalid_request_error", nil, nil, f)
end

-- Formats a duration the way OpenAI's x-ratelimit-reset-* headers do:
-- "20ms", "1s", "1.5s", "6m0s", "1h2m3s".
local function duration(d)
  if d < 1 then return format("%dms", max(1, ceil(d * 1000))) end
  local function secs(s)
    local t = format("%.3f", s):gsub("0+$", ""):gsub("%.$", "")
    return t .. "s"
  end
  if d < 60 then return secs(d) end
  local h = floor(d / 3600)
  local m = floor((d - h * 3600) / 60)
  local s = d - h * 3600 - m * 60
  if h > 0 then return format("%dh%dm%s", h, m, secs(s)) end
  return format("%dm%s", m, secs(s))
end

-- Retry-After style headers a fault asked for; they go on any response.
local function set_retry_headers(f)
  if f.retry_after then ngx.header["Retry-After"] = tostring(f.retry_after) end
  local at = tonumber(f.retry_after_date)
  if at then ngx.header["Retry-After"] = ngx.http_time(ngx.time() + floor(at)) end
  if f.retry_after_ms then ngx.header["retry-after-ms"] = tostring(f.retry_after_ms) end
  if f.should_retry then ngx.header["x-should-retry"] = tostring(f.should_retry) end
end

---------------------------------------------------------------------------
-- Bookkeeping: counters, scenario, rate limit
---------------------------------------------------------------------------

local function count_request(path)
  dict:incr("requests", 1, 0)
  dict:incr("path:" .. path, 1, 0)
  -- $connection is a serial number shared by all workers; the pid keeps the
  -- key unique even if it were not.
  if dict:add("conn:" .. ngx.worker.pid() .. ":" .. ngx.var.connection, true) then
    dict:incr("connections", 1, 0)
  end
end

local function read_body()
  ngx.req.read_body()
  return ngx.req.get_body_data() or ""
end

-- The last API request, kept raw (one shared-dict write per request) and
-- taken apart only when /_control/last_request asks for it: the lengths of
-- method, path and args on a first line, then those three, then the raw
-- header block up to its blank line, then the body.
-- The request's header block as it came: HTTP/1 keeps it raw; HTTP/2 has
-- none (ngx.req.raw_header refuses it), so its decoded fields are written
-- out in the same "name: value" lines, all of them (no 100-field limit) but
-- grouped by name in no particular order.
local function header_block()
  if ngx.req.http_version() ~= 2 then return ngx.req.raw_header(true) end
  local lines = {}
  for name, value in pairs(ngx.req.get_headers(0, true)) do
    if type(value) ~= "table" then value = { value } end
    for _, v in ipairs(value) do lines[#lines + 1] = name .. ": " .. v .. "\r\n" end
  end
  lines[#lines + 1] = "\r\n"
  return concat(lines)
end

local function remember_request(method, path, body)
  local args = ngx.var.args or ""
  dict:set("last_request", concat({ #method, " ", #path, " ", #args, "\n", method, path, args,
                                    header_block(), sub(body, 1, 65536) }))
end

-- The remembered request as JSON: method, path, args, headers (names lower
-- case, a repeated header as a list, as ngx.req.get_headers gives them) and
-- body; "null" before the first request.
local function last_request_json()
  local raw = dict:get("last_request")
  if not raw then return "null" end
  local lm, lp, la, pos = raw:match("^(%d+) (%d+) (%d+)\n()")
  lm, lp, la = tonumber(lm), tonumber(lp), tonumber(la)
  local method = sub(raw, pos, pos + lm - 1)
  local path = sub(raw, pos + lm, pos + lm + lp - 1)
  local args = sub(raw, pos + lm + lp, pos + lm + lp + la - 1)
  local rest = sub(raw, pos + lm + lp + la)
  local head_end = rest:find("\r\n\r\n", 1, true)
  local head = head_end and rest:sub(1, head_end + 1) or rest
  local body = head_end and rest:sub(head_end + 4) or ""
  local headers = {}
  for name, value in head:gmatch("([^:\r\n]+):[ \t]*([^\r\n]*)\r\n") do
    name = lower(name)
    value = value:gsub("[ \t]+$", "")
    local seen = headers[name]
    if seen == nil then
      headers[name] = value
    elseif type(seen) == "table" then
      seen[#seen + 1] = value
    else
      headers[name] = { seen, value }
    end
  end
  return json_encode({ method = method, path = path, args = args, headers = headers, body = body })
end

-- Timeline: phases by wall-clock time since `tl_start`. Phase i (stored
-- as JSON under "tl:i") lasts `duration` seconds; a share `ratio` of its
-- requests (default all, spread evenly: request k is faulted when
-- floor(k * ratio) moves) gets its fault, taken round-robin from `mix` when
-- given; or, with `rps`, requests beyond a limit of rps per second (bucket
-- of one second's worth) get 429 with Retry-After. Counts requests per phase
-- under "tl_count:i".
local function timeline_fault()
  local start = dict:get("tl_start")
  if not start then return nil end
  ngx.update_time()
  local t = ngx.now() - start
  if t < 0 then return nil end
  local acc = 0
  for i = 1, dict:get("tl_n") or 0 do
    local phase = cjson.decode(dict:get("tl:" .. i) or "{}") or {}
    acc = acc + (tonumber(phase.duration) or 0)
    if t < acc then
      dict:incr("tl_count:" .. i, 1, 0)
      local rps = tonumber(phase.rps)
      if rps and rps > 0 then
        -- A provider's rate limit: a bucket of `rps` requests refilled at rps
        -- per second; beyond it 429 with Retry-After (whole seconds, >= 1).
        local got = false
        for _ = 1, 5000 do
          if dict:add("tl_lock", true, 0.5) then got = true; break end
          ngx.sleep(0.001)
        end
        if not got then return nil end
        local now, interval = ngx.now(), 1 / rps
        local tat = max(dict:get("tl_tat:" .. i) or now, now)
        local ok = tat + interval - now <= 1 + 1e-9
        if ok then dict:set("tl_tat:" .. i, tat + interval) end
        dict:delete("tl_lock")
        if ok then return nil end
        return { fault = "429", retry_after = max(1, ceil(tat + interval - now - 1)) }
      end
      local ratio = tonumber(phase.ratio) or 1
      local k = dict:incr("tl_seen:" .. i, 1, 0)
      if floor(k * ratio + 1e-9) == floor((k - 1) * ratio + 1e-9) then return nil end
      local mix = phase.mix
      if type(mix) == "table" and #mix > 0 then
        local j = dict:incr("tl_mix:" .. i, 1, 0)
        return mix[(j - 1) % #mix + 1]
      end
      return phase.fault and phase or nil
    end
  end
  return nil
end

-- The fault for this request: the x-fake-fault header, else the next
-- scenario step, else the timeline's current phase, else nil (behave
-- normally).
local function next_fault()
  local h = ngx.var.http_x_fake_fault
  -- repeated, newer nginx joins them with ", ": the first one counts
  if h then return ngx.decode_args((h:match("^[^,]*")), 0) end
  local n = dict:get("steps")
  if n and n > 0 then
    local pos = dict:incr("step_pos", 1, 0)
    if pos <= n then return cjson.decode(dict:get("step:" .. pos) or "{}") end
  end
  return timeline_fault()
end

local function lock()
  for _ = 1, 5000 do
    if dict:add("rl_lock", true, 0.5) then return true end
    ngx.sleep(0.001)
  end
  return false
end

-- Requests-per-minute limit as a generic cell rate algorithm (a token bucket
-- holding `rpm` requests, refilled at rpm/60 per second). Sends OpenAI's
-- x-ratelimit-* headers; returns false after sending the 429 when exceeded.
local function rate_limit()
  local rpm = dict:get("rpm")
  if not rpm or rpm <= 0 then return true end
  local interval = 60 / rpm
  if not lock() then return true end
  ngx.update_time()
  local now = ngx.now()
  local tat = max(dict:get("rl_tat") or now, now)
  local new_tat = tat + interval
  local allow_at = new_tat - 60
  local ok = now >= allow_at - 1e-9
  if ok then dict:set("rl_tat", new_tat) end
  dict:delete("rl_lock")
  ngx.header["x-ratelimit-limit-requests"] = tostring(rpm)
  if ok then
    ngx.header["x-ratelimit-remaining-requests"] =
      tostring(max(0, floor((now + 60 - new_tat) / interval + 1e-9)))
    ngx.header["x-ratelimit-reset-requests"] = duration(new_tat - now)
    return true
  end
  local wait = allow_at - now
  ngx.header["x-ratelimit-remaining-requests"] = "0"
  ngx.header["x-ratelimit-reset-requests"] = duration(tat - now)
  ngx.header["Retry-After"] = tostring(max(1, ceil(wait)))
  dict:incr("rate_limited", 1, 0)
  send_error(429, format("Rate limit reached for requests on requests per min (RPM): " ..
                         "Limit %d, Used %d, Requested 1. Please try again in %s.",
                         rpm, rpm, duration(wait)),
             "requests", "rate_limit_exceeded")
  return false
end

---------------------------------------------------------------------------
-- The API
---------------------------------------------------------------------------

local function authorized()
  if not api_key then return true end
  local h = ngx.req.get_headers()["authorization"]
  if type(h) == "table" then h = h[1] end
  return h == "Bearer " .. api_key
end

local function tokens(text)
  return max(1, ceil(#text / 4))
end

local function message_text(m)
  if type(m) ~= "table" then return "" end
  if type(m.content) == "string" then return m.content end
  if type(m.content) == "table" then  -- content parts
    local t = {}
    for _, part in ipairs(m.content) do
      if type(part) == "table" and type(part.text) == "string" then t[#t + 1] = part.text end
    end
    return concat(t, " ")
  end
  return ""
end

-- A list of stream events and chunk(delta [, finish_reason]) adding one
-- chat.completion.chunk to it.
local function chunker(id, model, created)
  local events = {}
  return events, function(delta, finish)
    events[#events + 1] = json_encode({
      id = id, object = "chat.completion.chunk", created = created, model = model,
      choices = { { index = 0, delta = delta, finish_reason = finish or cjson.null } },
    })
  end
end

local function stream_events(id, model, content, created)
  local events, chunk = chunker(id, model, created)
  chunk({ role = "assistant", content = "" })
  for piece in content:gmatch("%S+%s*") do chunk({ content = piece }) end
  chunk({}, "stop")  -- an empty table encodes as {}
  return events
end

-- Sends Server-Sent Events; with `die_after` closes the connection after that
-- many events, without the final chunk or [DONE]. Fault stream_error: after
-- `events` events (default 1) an error event in OpenAI's shape ends the
-- stream, without [DONE] (the response itself ends cleanly).
local function send_stream(events, f, die_after)
  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream"
  ngx.header["Cache-Control"] = "no-cache"
  local body_delay = tonumber(f.body_delay)
  local error_after = f.fault == "stream_error" and floor(tonumber(f.events) or 1) or nil
  for i, ev in ipairs(events) do
    if die_after and i > die_after then break end
    if error_after and i > error_after then break end
    if i > 1 and body_delay and body_delay > 0 then ngx.sleep(body_delay) end
    ngx.print("data: ", ev, "\n\n")
    if not ngx.flush(true) then return ngx.exit(ngx.OK) end
  end
  if die_after then return ngx.exit(444) end
  if error_after then
    ngx.print("data: ", json_encode({ error = {
      message = f.error_message or "The server had an error while processing your request. Sorry about that!",
      type = f.error_type or "server_error", param = cjson.null, code = f.error_code or cjson.null,
    } }), "\n\n")
    return ngx.exit(200)
  end
  ngx.print("data: [DONE]\n\n")
  return ngx.exit(200)
end

-- The tool calls a request forces: tool_choice naming a function calls
-- that one; tool_choice "required" calls every tool given, in order
-- (parallel tool calls). Arguments: {"query": <the last user message>}.
-- nil when the request leaves the choice to the model.
local function forced_tool_calls(req, content, id)
  local tools, choice = req.tools, req.tool_choice
  if type(tools) ~= "table" or #tools == 0 then return nil end
  local names = {}
  if type(choice) == "table" and type(choice["function"]) == "table" then
    names[1] = choice["function"].name
  elseif choice == "required" then
    for _, t in ipairs(tools) do
      if type(t) == "table" and type(t["function"]) == "table" then names[#names + 1] = t["function"].name end
    end
  end
  if #names == 0 then return nil end
  local calls = {}
  for i, name in ipairs(names) do
    calls[i] = { id = format("call_%s_%d", id, i - 1), type = "function",
                 ["function"] = { name = tostring(name), arguments = json_encode({ query = content }) } }
  end
  return calls
end

-- A streamed tool-call answer as providers send it: the first piece of each
-- call brings its id, type and name, the arguments follow in pieces of 7
-- bytes, calls one after another, then finish_reason "tool_calls".
-- Fault key tool_index: "none" leaves `index` out (as some providers do),
-- a number sends it as the index of every call after the first.
local function stream_tool_events(id, model, calls, created, f)
  local events, chunk = chunker(id, model, created)
  local function index_of(i)
    if f.tool_index == "none" then return nil end
    if i > 1 and tonumber(f.tool_index) then return tonumber(f.tool_index) end
    return i - 1
  end
  for i, c in ipairs(calls) do
    local first = { index = index_of(i), id = c.id, type = c.type,
                    ["function"] = { name = c["function"].name, arguments = "" } }
    if i == 1 then
      chunk({ role = "assistant", content = cjson.null, tool_calls = { first } })
    else
      chunk({ tool_calls = { first } })
    end
    local args = c["function"].arguments
    for pos = 1, #args, 7 do
      chunk({ tool_calls = { { index = index_of(i), ["function"] = { arguments = sub(args, pos, pos + 6) } } } })
    end
  end
  chunk({}, "tool_calls")
  return events
end

local function chat(body, f)
  local req = cjson.decode(body)
  if type(req) ~= "table" then
    return send_error(400, "We could not parse the JSON body of your request. (HINT: This " ..
                      "likely means you aren't using your HTTP library correctly.)",
                      "invalid_request_error")
  end
  if type(req.model) ~= "string" then
    return send_error(400, "you must provide a model parameter", "invalid_request_error", nil, nil)
  end
  if type(req.messages) ~= "table" or #req.messages == 0 then
    return send_error(400, "'messages' is a required property", "invalid_request_error",
                      nil, "messages")
  end
  local texts, content = {}, nil
  for _, m in ipairs(req.messages) do
    texts[#texts + 1] = message_text(m)
    if type(m) == "table" and m.role == "user" then content = texts[#texts] end
  end
  local prompt_tokens = tokens(concat(texts, "\n"))
  if req.model == "small-context" and prompt_tokens > SMALL_CONTEXT then
    return send_error(400, format("This model's maximum context length is %d tokens. However, " ..
                      "your messages resulted in %d tokens. Please reduce the length of the " ..
                      "messages.", SMALL_CONTEXT, prompt_tokens),
                      "invalid_request_error", "context_length_exceeded", "messages")
  end
  content = content or "Hello from the fake upstream."
  local id = "chatcmpl-fake" .. dict:incr("ids", 1, 0)
  local created = ngx.time()
  -- fault key ignore_stream: answer in one JSON document even when asked
  -- to stream, as some OpenAI-compatible servers do
  local stream = req.stream == true and not f.ignore_stream
  local calls = forced_tool_calls(req, content, id)
  if calls then
    if stream then
      return send_stream(stream_tool_events(id, req.model, calls, created, f), f,
                         f.fault == "stream_die" and floor(tonumber(f.events) or 2) or nil)
    end
    local completion_tokens = 0
    for _, c in ipairs(calls) do completion_tokens = completion_tokens + tokens(c["function"].arguments) end
    return send_json(200, {
      id = id, object = "chat.completion", created = created, model = req.model,
      choices = { { index = 0, message = { role = "assistant", content = cjson.null, tool_calls = calls },
                    finish_reason = "tool_calls" } },
      usage = { prompt_tokens = prompt_tokens, completion_tokens = completion_tokens,
                total_tokens = prompt_tokens + completion_tokens },
    }, f)
  end
  if stream then
    return send_stream(stream_events(id, req.model, content, created), f)
  end
  local completion_tokens = tokens(content)
  return send_json(200, {
    id = id, object = "chat.completion", created = created, model = req.model,
    choices = { { index = 0, message = { role = "assistant", content = content },
                  finish_reason = "stop" } },
    usage = { prompt_tokens = prompt_tokens, completion_tokens = completion_tokens,
              total_tokens = prompt_tokens + completion_tokens },
  }, f)
end

-- An embeddings answer depends on the request body alone, so a worker keeps
-- the answers to its last bodies: a benchmark's thousands of identical
-- requests then cost the server no JSON work, and the figures measure the
-- clients rather than cjson's number formatting. Only small bodies and
-- answers are kept (at most 256 of each, 8 KiB and 64 KiB).
local EMBED_CACHE_MAX, EMBED_BODY_MAX, EMBED_ANSWER_MAX = 256, 8192, 65536
local embed_cache, embed_cached = {}, 0

local function embeddings(body, f)
  local cached = embed_cache[body]
  if cached then return send_body(200, cached, "application/json", f) end
  local req = cjson.decode(body)
  if type(req) ~= "table" or type(req.model) ~= "string" then
    return send_error(400, "you must provide a model parameter", "invalid_request_error")
  end
  local inputs = req.input
  if type(inputs) == "string" then inputs = { inputs } end
  if type(inputs) ~= "table" or #inputs == 0 then
    return send_error(400, "'input' is a required property", "invalid_request_error",
                      nil, "input")
  end
  local dims = min(4096, max(1, floor(tonumber(req.dimensions) or 8)))
  local data, used = {}, 0
  for i, text in ipairs(inputs) do
    text = tostring(text)
    used = used + tokens(text)
    local v = {}
    for d = 1, dims do
      -- deterministic pseudo-embedding in [-1, 1]
      v[d] = (ngx.crc32_long(text .. "#" .. d) % 20001) / 10000 - 1
    end
    data[i] = { object = "embedding", index = i - 1, embedding = v }
  end
  local answer = json_encode({ object = "list", data = data, model = req.model,
                               usage = { prompt_tokens = used, total_tokens = used } })
  if #body <= EMBED_BODY_MAX and #answer <= EMBED_ANSWER_MAX then
    if embed_cached >= EMBED_CACHE_MAX then embed_cache, embed_cached = {}, 0 end
    embed_cache[body], embed_cached = answer, embed_cached + 1
  end
  return send_body(200, answer, "application/json", f)
end

local function models(f)
  local data = {}
  for i, id in ipairs(MODELS) do
    data[i] = { id = id, object = "model", created = 1700000000, owned_by = "fake-upstream" }
  end
  return send_json(200, { object = "list", data = data }, f)
end

-- /echo: what the server received, for transport specs.
local function echo(body, f)
  return send_json(200, {
    method = ngx.req.get_method(),
    path = ngx.var.uri,
    args = ngx.var.args or "",
    headers = ngx.req.get_headers(100),
    body = body,
    body_length = #body,
    body_md5 = ngx.md5(body),
    connection = tonumber(ngx.var.connection),
    http_version = ngx.req.http_version(),
  }, f)
end

-- /headers: repeated and mixed-case response headers, for transport specs.
local function headers(_, f)
  ngx.header["Set-Cookie"] = { "a=1; Path=/", "b=2; Path=/" }
  ngx.header["X-Multi"] = { "one", "two" }
  ngx.header["X-Mixed-Case"] = "Value"
  ngx.header["X-Empty"] = ""
  return send_json(200, { ok = true }, f)
end

local ROUTES = {
  ["/v1/chat/completions"] = { "POST", chat, true },
  ["/v1/embeddings"] = { "POST", embeddings, true },
  ["/v1/models"] = { "GET", models, true },
}

local function route(method, path, body, f)
  if path == "/echo" then return echo(body, f) end
  if path == "/headers" then return headers(body, f) end
  local r = ROUTES[path]
  if not r then
    return send_error(404, format("Invalid URL (%s %s)", method, path), "invalid_request_error")
  end
  if r[3] and not authorized() then
    return send_error(401, "Incorrect API key provided", "invalid_request_error",
                      "invalid_api_key")
  end
  if not rate_limit() then return end
  if method ~= r[1] then
    return send_error(405, format("Invalid method for URL (%s %s)", method, path),
                      "invalid_request_error")
  end
  return r[2](body, f)
end

---------------------------------------------------------------------------
-- Faults
---------------------------------------------------------------------------

-- Closes the connection: after status line, headers and part of a promised
-- body (default), or right after reading the request (`after=request`).
local function reset(f)
  if f.after == "request" then return ngx.exit(444) end
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Content-Length"] = 1000
  ngx.print('{"id":"chatcmpl-reset","object":"chat.')
  ngx.flush(true)
  return ngx.exit(444)
end

local function oversize(f)
  local size = floor(tonumber(f.size) or (16 * 1024 * 1024 + 1))
  ngx.status = 200
  ngx.header["Content-Type"] = "text/plain"
  if f.chunked ~= "true" and f.chunked ~= true then ngx.header["Content-Length"] = size end
  local block = rep("x", 65536)
  local left, sent = size, 0
  while left > 0 do
    local n = min(left, #block)
    if not ngx.print(n == #block and block or block:sub(1, n)) then break end
    left, sent = left - n, sent + n
    if sent % (1024 * 1024) == 0 or left == 0 then
      if not ngx.flush(true) then break end
    end
  end
  return ngx.exit(ngx.OK)
end

local function malformed(f)
  return send_body(200, '{"id":"chatcmpl-malformed","object":"chat.completion","choices":' ..
                        '[{"index":0,"message":{"role":"assistant","content":"trunc',
                   "application/json", f)
end

-- Entry point for every non-control request.
function _M.api()
  local method, path = ngx.req.get_method(), ngx.var.uri
  count_request(path)
  local body = read_body()
  remember_request(method, path, body)
  local f = next_fault() or {}
  local fault = f.fault or "ok"
  local delay = tonumber(f.delay)
  if fault == "slow" and not delay and not f.body_delay then delay = 1 end
  if delay and delay > 0 then ngx.sleep(delay) end
  set_retry_headers(f)

  if fault == "ok" or fault == "slow" or fault == "stream_error" then return route(method, path, body, f) end
  if fault == "reset" then return reset(f) end
  if fault == "quota" then
    return send_error(429, "You exceeded your current quota, please check your plan and " ..
                      "billing details.", "insufficient_quota", "insufficient_quota", nil, f)
  end
  if fault == "malformed" then return malformed(f) end
  if fault == "oversize" then return oversize(f) end
  if fault == "stream_die" and path == "/v1/chat/completions" then
    -- a request that forces tool calls gets its tool-call stream, cut short
    local req = cjson.decode(body)
    if type(req) == "table" and forced_tool_calls(req, "", "") then
      return route(method, path, body, f)
    end
  end
  if fault == "stream_die" then
    local events = stream_events("chatcmpl-dying", "gpt-fake",
                                 "this stream will die before it is done", ngx.time())
    return send_stream(events, f, floor(tonumber(f.events) or 2))
  end
  local status = tonumber(fault)
  if status and status >= 100 and status <= 599 then
    return send_status_error(floor(status), f)
  end
  return send_error(400, "fake upstream: unknown fault " .. tostring(fault),
                    "invalid_request_error", "unknown_fault")
end

---------------------------------------------------------------------------
-- Control endpoints (never counted as API requests)
---------------------------------------------------------------------------

local function stats()
  local paths = {}
  for _, k in ipairs(dict:get_keys(0)) do
    local p = k:match("^path:(.*)$")
    if p then paths[p] = dict:get(k) end
  end
  local phases, phase_now = {}, cjson.null
  local start = dict:get("tl_start")
  if start then
    ngx.update_time()
    local t, acc = ngx.now() - start, 0
    for i = 1, dict:get("tl_n") or 0 do
      local phase = cjson.decode(dict:get("tl:" .. i) or "{}") or {}
      local name = tostring(phase.name or i)
      phases[name] = (phases[name] or 0) + (dict:get("tl_count:" .. i) or 0)
      acc = acc + (tonumber(phase.duration) or 0)
      if phase_now == cjson.null and t >= 0 and t < acc then phase_now = name end
    end
  end
  return {
    requests = dict:get("requests") or 0,
    connections = dict:get("connections") or 0,
    rate_limited = dict:get("rate_limited") or 0,
    scenario_left = max(0, (dict:get("steps") or 0) - (dict:get("step_pos") or 0)),
    paths = paths,
    phases = phases,
    phase = phase_now,
  }
end

-- Replaces the timeline: { start = epoch seconds (default now), phases = {
-- { name, duration, ratio, mix, fault keys... }, ... } }.
local function set_timeline(spec)
  if type(spec) ~= "table" or type(spec.phases) ~= "table" then
    return nil, "timeline must be a JSON object with a phases array"
  end
  for i, phase in ipairs(spec.phases) do
    if type(phase) ~= "table" or not tonumber(phase.duration) or tonumber(phase.duration) < 0 then
      return nil, "phase " .. i .. ": needs a duration >= 0"
    end
    if phase.ratio ~= nil and not (tonumber(phase.ratio) and phase.ratio >= 0 and phase.ratio <= 1) then
      return nil, "phase " .. i .. ": ratio must be in [0, 1]"
    end
    if phase.mix ~= nil and type(phase.mix) ~= "table" then
      return nil, "phase " .. i .. ": mix must be an array of faults"
    end
  end
  for _, k in ipairs(dict:get_keys(0)) do
    if k:find("^tl") then dict:delete(k) end
  end
  for i, phase in ipairs(spec.phases) do
    local ok, err = dict:set("tl:" .. i, json_encode(phase))
    if not ok then return nil, "shared dict: " .. tostring(err) end
  end
  dict:set("tl_n", #spec.phases)
  ngx.update_time()
  dict:set("tl_start", tonumber(spec.start) or ngx.now())
  return #spec.phases
end

local function set_scenario(steps)
  if type(steps) ~= "table" then return nil, "scenario must be a JSON array of steps" end
  local list = {}
  for i, step in ipairs(steps) do
    if type(step) ~= "table" then return nil, "step " .. i .. " is not an object" end
    local times = tonumber(step.times or 1)
    if not times or times < 0 or #list + times > MAX_STEPS then
      return nil, "step " .. i .. ": bad times"
    end
    local s = {}
    for k, v in pairs(step) do if k ~= "times" then s[k] = v end end
    local encoded = json_encode(s)
    for _ = 1, times do list[#list + 1] = encoded end
  end
  dict:set("steps", 0)
  dict:set("step_pos", 0)
  for i, encoded in ipairs(list) do
    local ok, err = dict:set("step:" .. i, encoded)
    if not ok then return nil, "shared dict: " .. tostring(err) end
  end
  dict:set("steps", #list)
  return #list
end

-- Entry point for /_control/*.
function _M.control()
  local op = ngx.var.uri:match("^/_control/([%w_]+)$")
  if op == "ping" then
    return send_json(200, { ok = true, pid = ngx.worker.pid() })
  elseif op == "stats" then
    return send_json(200, stats())
  elseif op == "last_request" then
    return send_body(200, last_request_json(), "application/json")
  elseif ngx.req.get_method() ~= "POST" then
    return send_error(405, "control: use POST for " .. tostring(op), "invalid_request_error")
  elseif op == "reset" then
    dict:flush_all()
    dict:flush_expired()
    return send_json(200, { ok = true })
  elseif op == "scenario" then
    local n, err = set_scenario(cjson.decode(read_body()))
    if not n then return send_error(400, "control: " .. err, "invalid_request_error") end
    return send_json(200, { ok = true, steps = n })
  elseif op == "timeline" then
    local n, err = set_timeline(cjson.decode(read_body()))
    if not n then return send_error(400, "control: " .. err, "invalid_request_error") end
    return send_json(200, { ok = true, phases = n })
  elseif op == "rate_limit" then
    local rpm = tonumber(ngx.req.get_uri_args().rpm) or 0
    dict:set("rpm", max(0, floor(rpm)))
    dict:delete("rl_tat")
    return send_json(200, { ok = true, rpm = rpm })
  end
  return send_error(404, "control: unknown endpoint " .. ngx.var.uri, "invalid_request_error")
end

return _M
