-- Installs with `luarocks make` (see README, "Installing").
rockspec_format = "3.0"
package = "breaker"
version = "scm-1"
source = {
   url = "git+file:///work/main",
}
description = {
   summary = "Circuit breakers, retries with Retry-After, and a libcurl transport for Lua and OpenResty",
   detailed = [[
Hystrix-style circuit breakers written in C (count and time windows,
failure-rate, slow-call and consecutive-failure rules, exact half-open probe
limits), pure-Lua policies (retry with backoff and jitter that honours 429
Retry-After, fallbacks, budgets, bulkheads, rate limits) and a libcurl
transport, for apps that call flaky HTTP APIs such as LLM providers.
]],
   license = "MIT",
}
dependencies = {
   "lua >= 5.1",
   "lua-cjson",
}
external_dependencies = {
   -- No `header` here: Debian keeps curl/curl.h under the multiarch include
   -- directory, where luarocks' header search does not look.
   CURL = { library = "curl" },
}
build = {
   type = "builtin",
   modules = {
      ["breaker.core"] = {
         sources = { "src/breaker.c", "src/shm.c", "src/lbreaker.c" },
         defines = { "BREAKER_VERSION=\"0.1.0\"", "_GNU_SOURCE" },
         libraries = { "pthread", "m", "rt", "dl" },
         incdirs = { "src" },
      },
      ["breaker.curl"] = {
         sources = { "src/http.c", "src/lhttp.c" },
         defines = { "BREAKER_VERSION=\"0.1.0\"", "_GNU_SOURCE" },
         libraries = { "curl", "pthread", "m" },
         incdirs = { "src", "$(CURL_INCDIR)" },
         libdirs = { "$(CURL_LIBDIR)" },
      },
      ["breaker"] = "lua/breaker/init.lua",
      ["breaker.version"] = "lua/breaker/version.lua",
      ["breaker.error"] = "lua/breaker/error.lua",
      ["breaker.classify"] = "lua/breaker/classify.lua",
      ["breaker.retry"] = "lua/breaker/retry.lua",
      ["breaker.fallback"] = "lua/breaker/fallback.lua",
      ["breaker.bulkhead"] = "lua/breaker/bulkhead.lua",
      ["breaker.ratelimit"] = "lua/breaker/ratelimit.lua",
      ["breaker.policy"] = "lua/breaker/policy.lua",
      ["breaker.shared"] = "lua/breaker/shared.lua",
      ["breaker.llm"] = "lua/breaker/llm.lua",
      ["breaker.events"] = "lua/breaker/events.lua",
      ["breaker.metrics"] = "lua/breaker/metrics.lua",
      ["breaker.dashboard"] = "lua/breaker/dashboard.lua",
      ["breaker.ngx"] = "lua/breaker/ngx.lua",
      ["breaker.ngx_worker"] = "lua/breaker/ngx_worker.lua",
      ["breaker.cosocket"] = "lua/breaker/cosocket.lua",
   },
}
