-- The version has one source (lua/breaker/version.lua); the rockspec's
-- defines, the C modules and the Lua facade must all agree with it.
describe("version", function()
  local version = require "breaker.version"

  local function rockspec()
    local env = {}
    local chunk = assert(loadfile("breaker-scm-1.rockspec"))
    setfenv(chunk, env)
    chunk()
    return env
  end

  it("is a semantic version", function()
    assert.matches("^%d+%.%d+%.%d+$", version)
  end)

  it("agrees between version.lua, breaker._VERSION and the C core", function()
    assert.equal(version, require("breaker")._VERSION)
    assert.equal(version, require("breaker.core")._VERSION)
  end)

  it("agrees with every C module's define in the rockspec", function()
    local spec = rockspec()
    local n = 0
    for name, mod in pairs(spec.build.modules) do
      if type(mod) == "table" then
        local found
        for _, d in ipairs(mod.defines or {}) do
          found = found or d:match('^BREAKER_VERSION="(.-)"$')
        end
        assert.equal(version, found, name .. " defines BREAKER_VERSION")
        n = n + 1
      end
    end
    assert.is_true(n >= 1)
  end)

  it("agrees with the transport's _VERSION", function()
    local ok, curl = pcall(require, "breaker.curl")
    assert.is_true(ok, "breaker.curl loads")
    assert.equal(version, curl._VERSION)
  end)

  it("lists every Lua module of lua/breaker in the rockspec", function()
    local spec = rockspec()
    local p = io.popen("ls lua/breaker")
    for f in p:lines() do
      local mod = f:match("^(.-)%.lua$")
      if mod then
        local key = mod == "init" and "breaker" or ("breaker." .. mod)
        assert.equal("lua/breaker/" .. f, spec.build.modules[key], key .. " in the rockspec")
      end
    end
    p:close()
  end)
end)
