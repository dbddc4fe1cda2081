-- Specs for breakers in shared memory (src/shm.c) across real processes:
-- forked LuaJIT children for anonymous regions, separately started LuaJIT
-- processes for named ones. No nginx here (see spec/ngx_spec.lua).
local breaker = require "breaker"
local shared = require "breaker.shared"
local ffi = require "ffi"

pcall(ffi.cdef, [[
  int fork(void);
  void _exit(int status);
  int waitpid(int pid, int *status, int options);
  int getpid(void);
  void brk_lock_word(uint32_t *word);
  void brk_unlock_word(uint32_t *word);
]])
-- (struct breaker_block is declared by breaker's own FFI binding)
pcall(ffi.cdef, "int brk_debug_half_record(struct breaker_block *b);")
local C = ffi.C
local core_lib = ffi.load(package.searchpath("breaker.core", package.cpath))

local seq = 0
local function uniq(prefix)
  seq = seq + 1
  return ("%s-%d-%d"):format(prefix, C.getpid(), seq)
end

-- Runs fn in n forked children; returns their exit codes. A child that
-- raises exits with 1. Children never return into busted.
local function fork_each(n, fn)
  local pids = {}
  for i = 1, n do
    local pid = C.fork()
    assert(pid >= 0, "fork failed")
    if pid == 0 then
      local ok = pcall(fn, i)
      C._exit(ok and 0 or 1)
    end
    pids[i] = pid
  end
  local codes = {}
  local st = ffi.new("int[1]")
  for i, pid in ipairs(pids) do
    C.waitpid(pid, st, 0)
    codes[i] = math.floor(st[0] / 256) % 256
  end
  return codes
end

-- Runs `n` separate LuaJIT processes on `script` (a Lua chunk string with
-- the region name as ...); returns their stdout lines.
local function spawn_each(n, script, region_name)
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p " .. dir)
  local f = assert(io.open(dir .. "/child.lua", "w"))
  f:write(script)
  f:close()
  local cmd = {}
  for i = 1, n do
    cmd[#cmd + 1] = ("luajit %s/child.lua %s %d > %s/out.%d 2>&1 &"):format(dir, region_name, i, dir, i)
  end
  cmd[#cmd + 1] = "wait"
  os.execute(table.concat(cmd, " "))
  local out = {}
  for i = 1, n do
    local o = assert(io.open(dir .. "/out." .. i))
    out[i] = o:read("*a")
    o:close()
  end
  os.execute("rm -rf " .. dir)
  return out
end

describe("breaker.shared", function()
  after_each(function() breaker.clock.unfreeze() end)

  describe("regions", function()
    it("rejects bad options and names, naming them", function()
      assert.has_error(function() shared.new("") end)
      assert.has_error(function() shared.new(uniq("r"), { capacity = 0 }) end)
      local ok, err = pcall(shared.new, uniq("r"), { colour = 1 })
      assert.is_false(ok)
      assert.matches("unknown option 'colour'", err)
      local r, e = shared.open("a/b")
      assert.is_nil(r)
      assert.matches("without '/'", e)
    end)

    it("is full at its capacity, with a clear error", function()
      local r = shared.new(uniq("cap"), { capacity = 3 })
      for i = 1, 3 do breaker.new(uniq("full" .. i), {}, { shared = r }) end
      local ok, err = pcall(breaker.new, uniq("full4"), {}, { shared = r })
      assert.is_false(ok)
      assert.matches("region is full %(3 breakers%)", err)
      assert.equal(3, r:info().used)
    end)

    it("refuses a name longer than a slot holds instead of truncating it", function()
      local r = shared.new(uniq("names"))
      local ok, err = pcall(breaker.new, string.rep("n", 64), {}, { shared = r })
      assert.is_false(ok)
      assert.matches("64 bytes does not fit", err)
      assert.truthy(breaker.new(string.rep("m", 63), {}, { shared = r }))
    end)

    it("refuses names and keys with a NUL byte instead of cutting them short", function()
      local core = require "breaker.core"
      local r = shared.new(uniq("nul"))
      local api = uniq("api")
      local a = breaker.new(api, {}, { shared = r })
      local long = api .. "\0" .. string.rep("x", 100)   -- over 63 bytes, 'api...' in C
      local function refused(pattern, fn, ...)
        local ok, err = pcall(fn, ...)
        assert.is_false(ok)
        assert.matches(pattern, err)
      end
      refused("name contains a NUL byte %(byte " .. (#api + 1) .. " of " .. #long .. "%)",
              breaker.new, long, {}, { shared = r })
      refused("name contains a NUL byte", breaker.new, "x\0y", {})   -- private ones too
      -- the C binding checks on its own (its callers need not be breaker.new)
      refused("shared breaker: the name contains a NUL byte", r._r.breaker, r._r, long, {})
      refused("shared region: the key contains a NUL byte", core.region_anon, "k\0x")
      refused("shared region: the name contains a NUL byte", core.region_named, "n\0x")
      refused("shared region: the name contains a NUL byte", core.region_unlink, "n\0x")
      refused("region name contains a NUL byte", shared.new, "k\0x")
      refused("region name contains a NUL byte", shared.open, "n\0x")
      refused("region name contains a NUL byte", shared.unlink, "n\0x")
      assert.same({ api }, r:names())
      a:force_open()
      assert.equal("forced_open", a:state())
    end)

    it("refuses a window larger than a slot holds", function()
      local r = shared.new(uniq("win"), { max_window = 50 })
      local ok, err = pcall(breaker.new, uniq("w"), { window_size = 51 }, { shared = r })
      assert.is_false(ok)
      assert.matches("max_window 50", err)
    end)

    it("detects a config mismatch and names the key", function()
      local r = shared.new(uniq("cfg"))
      local n = uniq("mismatch")
      local b = breaker.new(n, { failure_rate_threshold = 50 }, { shared = r })
      b:close()
      local ok, err = pcall(breaker.new, n, { failure_rate_threshold = 60 }, { shared = r })
      assert.is_false(ok)
      assert.matches("'failure_rate_threshold' differs", err)
      -- the same config joins
      assert.truthy(breaker.new(n, { failure_rate_threshold = 50 }, { shared = r }))
    end)

    it("gives the same region for the same key again (reload)", function()
      local key = uniq("reload")
      local r1 = shared.new(key, { capacity = 8 })
      local n = uniq("kept")
      local b = breaker.new(n, { window_size = 2, minimum_calls = 2 }, { shared = r1 })
      b:record(b:allow(), "failure", 0.1)
      b:record(b:allow(), "failure", 0.1)
      b:close()
      local r2 = shared.new(key, { capacity = 8 })
      local b2 = breaker.new(n, { window_size = 2, minimum_calls = 2 }, { shared = r2 })
      assert.equal("open", b2:state())
    end)
  end)

  describe("across forked processes (anonymous region)", function()
    it("keeps counts exact under concurrent writers", function()
      local r = shared.new(uniq("exact"), { capacity = 4 })
      local n = uniq("count")
      local cfg = { window_size = 500, minimum_calls = 500, failure_rate_threshold = false,
                    consecutive_failures = false }
      local b = breaker.new(n, cfg, { shared = r })
      local per = 20000
      local codes = fork_each(4, function()
        local mine = breaker.get(n)
        for i = 1, per do
          mine:record(mine:allow(), i % 3 == 0 and "failure" or "success", 0.001)
        end
      end)
      assert.same({ 0, 0, 0, 0 }, codes)
      local st = b:stats()
      assert.equal(4 * per, st.total_calls)
      assert.equal(4 * math.floor(per / 3), st.total_failures)
      assert.equal(500, st.calls)
    end)

    it("admits exactly half_open_calls probes across all processes", function()
      local r = shared.new(uniq("probes"))
      local n = uniq("ho")
      local b = breaker.new(n, { window_size = 2, minimum_calls = 2, open_duration = 0.2,
                                 half_open_calls = 3 }, { shared = r })
      b:record(b:allow(), "failure", 0.1)
      b:record(b:allow(), "failure", 0.1)
      assert.equal("open", b:state())
      -- each child counts the permits it got into its exit code
      local codes = fork_each(6, function()
        local mine = breaker.get(n)
        local got = 0
        local deadline = breaker.clock.now_precise() + 1.0
        while breaker.clock.now_precise() < deadline do
          if mine:allow() then got = got + 1 end
        end
        C._exit(got)
      end)
      local total = 0
      for _, c in ipairs(codes) do total = total + c end
      assert.equal(3, total)
      assert.equal("half_open", b:state())
      assert.equal(3, b:stats().half_open_granted)
    end)

    it("a trip seen in one process rejects in another", function()
      local r = shared.new(uniq("trip"))
      local n = uniq("t")
      local b = breaker.new(n, { window_size = 5, minimum_calls = 5, open_duration = 60 }, { shared = r })
      assert.same({ 0 }, fork_each(1, function()
        local mine = breaker.get(n)
        for _ = 1, 5 do mine:record(mine:allow(), "failure", 0.01) end
      end))
      local seen = {}
      b:on_state_change(function(_, from, to) seen[#seen + 1] = from .. ">" .. to end)
      local p, err = b:allow()
      assert.is_nil(p)
      assert.equal("breaker_open", err.kind)
      assert.same({ "closed>open" }, seen)   -- the other process's transition, seen here
    end)

    it("does not stay wedged when a probe holder dies", function()
      local r = shared.new(uniq("dead"))
      local n = uniq("d")
      local b = breaker.new(n, { window_size = 2, minimum_calls = 2, open_duration = 0.05,
                                 half_open_calls = 1, probe_timeout = 0.3 }, { shared = r })
      b:record(b:allow(), "failure", 0.1)
      b:record(b:allow(), "failure", 0.1)
      breaker.clock.sleep(0.06)
      -- a child takes the only probe and dies without reporting
      assert.same({ 7 }, fork_each(1, function()
        local mine = breaker.get(n)
        assert(mine:allow())
        C._exit(7)
      end))
      assert.is_nil(b:allow())          -- the probe is still held
      breaker.clock.sleep(0.31)
      local p = b:allow()                -- expired: a fresh probe
      assert.truthy(p)
      b:record(p, "success", 0.01)
      assert.equal("closed", b:state())
    end)

    it("sees another process's transition inside a compiled allow() loop", function()
      local r = shared.new(uniq("jit"))
      local n = uniq("hoist")
      local b = breaker.new(n, { window_size = 10 }, { shared = r })
      local pid = C.fork()
      if pid == 0 then
        breaker.clock.sleep(0.05)
        pcall(function() breaker.get(n):force_open() end)
        C._exit(0)
      end
      local rejected_after
      for i = 1, 5e8 do                 -- a tight loop the JIT compiles
        if not b:allow() then rejected_after = i; break end
      end
      C.waitpid(pid, ffi.new("int[1]"), 0)
      assert.truthy(rejected_after, "allow() never saw the other process force the breaker open")
      assert.equal("forced_open", b:state())
    end)

    it("repairs a breaker whose lock holder died in the middle of a record", function()
      local r = shared.new(uniq("repair"))
      local b = breaker.new(uniq("half"), { window_size = 10, minimum_calls = 10,
                                            failure_rate_threshold = 50 }, { shared = r })
      for _ = 1, 10 do b:record(b:allow(), "success", 0.001) end
      assert.equal(0, b:stats().failures)
      local pid = C.fork()
      if pid == 0 then
        -- a failure written into the window, the running counts not yet
        -- updated, the lock held: then the process is gone
        core_lib.brk_debug_half_record(b._p)
        C._exit(0)
      end
      C.waitpid(pid, ffi.new("int[1]"), 0)
      local st = b:stats()                 -- takes the lock over and repairs
      assert.equal(1, st.lock_takeovers)
      assert.equal(10, st.calls)
      assert.equal(1, st.failures)         -- the slot the dead process wrote counts
      assert.equal(9, st.successes)
      assert.equal("closed", b:state())
      b:record(b:allow(), "success", 0.001) -- and it goes on as before
      st = b:stats()
      assert.same({ 10, 1, 1 }, { st.calls, st.failures, st.lock_takeovers })
    end)

    it("after a takeover, a time window's totals are rebuilt equal to its buckets", function()
      local r = shared.new(uniq("repair-t"))
      local b = breaker.new(uniq("half-t"), { window_type = "time", window_size = 10, minimum_calls = 1000 },
                            { shared = r })
      for i = 1, 30 do b:record(b:allow(), i % 3 == 0 and "failure" or "success", 0.001) end
      b:record(b:allow(), "ignored", 0.001)
      local before = b:stats()
      -- a dead process holds the lock: the lock word is the block's fifth
      -- uint32 (struct brk in src/breaker.c)
      local pid = C.fork()
      if pid == 0 then C._exit(0) end
      C.waitpid(pid, ffi.new("int[1]"), 0)
      ffi.cast("uint32_t *", b._p)[4] = pid
      local after = b:stats()
      assert.equal(1, after.lock_takeovers)
      for _, k in ipairs{ "calls", "successes", "failures", "slow", "ignored", "rejected", "late" } do
        assert.equal(before[k], after[k], k)
      end
      assert.same({ 30, 10, 1 }, { after.calls, after.failures, after.ignored })
    end)

    it("takes the lock over from a holder that exited but is not reaped yet", function()
      local word = ffi.new("uint32_t[1]")
      local pid = C.fork()
      if pid == 0 then C._exit(0) end
      breaker.clock.sleep(0.05)          -- the child is a zombie now
      word[0] = pid
      core_lib.brk_lock_word(word)
      assert.equal(C.getpid(), tonumber(word[0]))
      core_lib.brk_unlock_word(word)
      C.waitpid(pid, ffi.new("int[1]"), 0)
    end)

    it("takes the lock over from a dead holder", function()
      local word = ffi.new("uint32_t[1]")
      local codes = fork_each(1, function() C._exit(0) end)
      assert.same({ 0 }, codes)
      -- pretend a now-dead process held the lock: find a pid that is gone
      local dead = ffi.new("int[1]")
      local pid = C.fork()
      if pid == 0 then C._exit(0) end
      C.waitpid(pid, dead, 0)
      word[0] = pid
      core_lib.brk_lock_word(word)       -- returns: the holder is dead
      assert.equal(C.getpid(), tonumber(word[0]))
      core_lib.brk_unlock_word(word)
      assert.equal(0, tonumber(word[0]))
    end)
  end)

  describe("across separate processes (named region)", function()
    it("reports a region its maker never initialised, and names the way out", function()
      local name = uniq("stale")
      local f = assert(io.open("/dev/shm/breaker." .. name, "wb"))
      f:write(string.rep("\0", 65536))   -- the size is there, the header never was
      f:close()
      local r, err = shared.open(name)
      assert.is_nil(r)
      assert.matches("never initialised", err)
      assert.matches("unlink", err)
      assert.truthy(shared.unlink(name))
      local r2, created = assert(shared.open(name, { capacity = 2 }))
      assert.is_true(created)
      assert.equal(2, r2:info().capacity)
      assert.truthy(shared.unlink(name))
    end)

    it("refuses a region of another block layout (another version), and says so", function()
      local name = uniq("layout")
      finally(function() shared.unlink(name) end)
      -- a ready header of layout 2 (32-bit window counts), little-endian:
      -- magic "BRKR", layout, lock, ready
      local f = assert(io.open("/dev/shm/breaker." .. name, "wb"))
      f:write("RKRB", "\2\0\0\0", "\0\0\0\0", "\1\0\0\0", string.rep("\0", 65536 - 16))
      f:close()
      local r, err = shared.open(name)
      assert.is_nil(r)
      assert.matches("made by another version of breaker", err, 1, true)
      assert.matches("not layout 3", err, 1, true)
      assert.matches("unlink", err, 1, true)
    end)

    it("after unlink, opening the name again joins the region other processes now share", function()
      local name = uniq("unlinked")
      finally(function() shared.unlink(name) end)
      local old = assert(shared.open(name, { capacity = 4 }))
      breaker.new(uniq("in-old"), {}, { shared = old })
      assert.truthy(shared.unlink(name))
      -- another process makes the name anew and puts a breaker in it
      local out = spawn_each(1, [[
        package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
        package.cpath = "]] .. package.cpath:gsub("\\", "\\\\"):gsub('"', '\\"') .. [[;" .. package.cpath
        local breaker = require "breaker"
        local r, created = assert(require("breaker.shared").open(..., { capacity = 4 }))
        breaker.new("theirs", {}, { shared = r }):force_open()
        print("created=" .. tostring(created))
      ]], name)
      assert.matches("created=true", out[1])
      local r, created = assert(shared.open(name))
      assert.is_false(created)
      assert.same({ "theirs" }, r:names())
      assert.equal("forced_open", breaker.new("theirs", {}, { shared = r }):state())
      assert.equal(1, #old:names())        -- the old mapping is left as it was
      -- opened again while the name is unchanged: the same region
      assert.same({ "theirs" }, select(1, shared.open(name)):names())
      -- unlinked and not made again elsewhere: this process makes it anew
      assert.truthy(shared.unlink(name))
      local r3, created3 = assert(shared.open(name, { capacity = 2 }))
      assert.is_true(created3)
      assert.same({}, r3:names())
      assert.equal(2, r3:info().capacity)
      assert.truthy(shared.unlink(name))
    end)

    it("refuses a region made in another PID namespace, and says why", function()
      -- Locks name their holders by pid: across PID namespaces (containers
      -- sharing /dev/shm) a pid means another process, so the dead-holder
      -- takeover could seize a live holder's lock.
      local ok = os.execute("unshare --pid --fork true >/dev/null 2>&1")
      if ok ~= true and ok ~= 0 then
        pending("unshare --pid needs root (or user namespaces) here")
        return
      end
      local name = uniq("pidns")
      assert(shared.open(name, { capacity = 2 }))
      local dir = os.tmpname()
      local f = assert(io.open(dir, "w"))
      f:write([[
        package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
        package.cpath = "]] .. package.cpath:gsub("\\", "\\\\"):gsub('"', '\\"') .. [[;" .. package.cpath
        local r, err = require("breaker.shared").open(...)
        print(r == nil, err)
      ]])
      f:close()
      local p = assert(io.popen(("unshare --pid --fork luajit %s %s 2>&1"):format(dir, name)))
      local out = p:read("*a")
      p:close()
      os.remove(dir)
      assert.matches("^true", out)
      assert.matches("another PID namespace", out, 1, true)
      assert.matches("own region name", out, 1, true)
      -- the same namespace still joins
      local out2 = spawn_each(1, [[
        package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
        package.cpath = "]] .. package.cpath:gsub("\\", "\\\\"):gsub('"', '\\"') .. [[;" .. package.cpath
        local name = ...
        local r, created = require("breaker.shared").open(name)
        print(r ~= nil, created)
      ]], name)
      assert.matches("^true\tfalse", out2[1])
      assert.truthy(shared.unlink(name))
    end)

    it("shares one breaker between processes that open the same name", function()
      local name = uniq("named")
      local region, created = assert(shared.open(name, { capacity = 8 }))
      assert.is_true(created)
      local n = "shared-counter"
      local b = breaker.new(n, { window_size = 100, minimum_calls = 100, consecutive_failures = false },
                            { shared = region })
      local script = [[
        package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
        package.cpath = "]] .. package.cpath:gsub("\\", "\\\\"):gsub('"', '\\"') .. [[;" .. package.cpath
        local breaker = require "breaker"
        local shared = require "breaker.shared"
        local region, created = assert(shared.open(..., { capacity = 8 }))
        local b = breaker.new("shared-counter", { window_size = 100, minimum_calls = 100,
                                                  consecutive_failures = false }, { shared = region })
        for _ = 1, 5000 do b:record(b:allow(), "success", 0.002) end
        print("created=" .. tostring(created))
      ]]
      local out = spawn_each(3, script, name)
      for i = 1, 3 do assert.matches("created=false", out[i]) end
      assert.equal(15000, b:stats().total_calls)
      assert.equal(100, b:stats().calls)
      assert.truthy(shared.unlink(name))
    end)
  end)
end)
