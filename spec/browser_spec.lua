-- spec/browser_spec.lua: runs the dashboard's browser test (headless
-- Chromium through playwright-core, spec/browser/dashboard.test.js) so that
-- `make test` counts it. `make deps` installs chromium and playwright-core.
local helper = require "helper"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

describe("dashboard in headless Chromium", function()
  local repo = helper.repo_dir()
  local shots = { repo .. "/spec/tmp/browser/dashboard-open.png", repo .. "/spec/tmp/browser/dashboard-closed.png" }

  it("has what it needs: chromium and playwright-core (make deps)", function()
    assert.truthy(io.open("/usr/bin/chromium"), "/usr/bin/chromium is missing: run make deps")
    assert.truthy(read(repo .. "/spec/browser/node_modules/playwright-core/package.json"),
                  "spec/browser/node_modules/playwright-core is missing: run make deps")
  end)

  it("turns the failing breaker's tile open, then closed after recovery, and saves screenshots", function()
    for _, s in ipairs(shots) do os.remove(s) end
    local started = os.time()
    -- `timeout` bounds the run even if the script's own watchdog failed; a
    -- sanitizer preloaded into the specs' interpreter (make asan) must not
    -- reach node, chromium or nginx.
    local p = assert(io.popen("cd " .. shell_quote(repo) .. " && env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS"
                              .. " timeout -k 5 180 node spec/browser/dashboard.test.js 2>&1; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local status = tonumber(out:match("exit=(%d+)%s*$"))
    assert.equal(0, status, out)
    local n = tonumber(out:match("dashboard browser test: (%d+) checks passed"))
    assert.is_number(n, out)
    assert.is_true(n >= 20, out)
    assert.falsy(out:find("^not ok", 1) or out:find("\nnot ok", 1, true), out)
    for _, what in ipairs({ "the failing breaker's tile turns open", "an open tile is red",
                            "after recovery the tile is closed and green again",
                            "the page updated itself without reloading",
                            "the page fetched nothing but its own server" }) do
      assert.truthy(out:find(what, 1, true), "missing check '" .. what .. "' in:\n" .. out)
    end
    for _, s in ipairs(shots) do
      local png = read(s)
      assert.truthy(png, s .. " was not written")
      assert.equal("\137PNG\r\n\26\n", png:sub(1, 8))
      assert.is_true(#png > 10000, s .. " is too small to show the page")
    end
    -- Nothing the test started is left behind: its servers are gone, their directories removed.
    local dirs, pids = out:match("# dirs: (%S+ %S+)"), out:match("# pids: (%d+ %d+)")
    assert.truthy(dirs and pids, out)
    for d in dirs:gmatch("%S+") do
      assert.truthy(d:match("^spec/tmp/browser%-"), d)
      assert.is_nil(io.open(repo .. "/" .. d .. "/logs/error.log"), "left behind: " .. d)
    end
    for pid in pids:gmatch("%d+") do assert.is_false(helper.running(tonumber(pid)), "still running: " .. pid) end
    assert.is_true(os.time() - started < 180)
  end)
end)
