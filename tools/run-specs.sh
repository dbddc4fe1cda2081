#!/bin/sh
# Runs every busted suite and ends with one line "N passed, N failed" that
# adds them all up (CI reads that line, not busted's own summaries).
#   tools/run-specs.sh LUAJIT LUA51 BUSTED
# Suites:
#   1. all specs under LuaJIT (FFI fast path),
#   2. the breaker specs under LuaJIT with the classic binding (BREAKER_NO_FFI=1),
#   3. the breaker specs under plain Lua 5.1 (classic binding smoke run).
LUAJIT=${1:-luajit}
LUA51=${2:-lua5.1}
BUSTED=${3:-/usr/bin/busted}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT INT TERM
passed=0
failed=0
status=0

suite() { # name, command...
  name=$1; shift
  echo "== $name"
  "$@" 2>&1 | tee "$out/$name.log"
  line=$(grep -E '[0-9]+ successes? / [0-9]+ failures? / [0-9]+ errors?' "$out/$name.log" | tail -n 1)
  if [ -z "$line" ]; then
    echo "$name: busted printed no summary (crashed?)"
    failed=$((failed + 1)); status=1
    return
  fi
  s=$(echo "$line" | sed -E 's/^[^0-9]*([0-9]+) success.*/\1/')
  f=$(echo "$line" | sed -E 's/.* ([0-9]+) failures?.*/\1/')
  e=$(echo "$line" | sed -E 's/.* ([0-9]+) errors?.*/\1/')
  passed=$((passed + s)); failed=$((failed + f + e))
  [ $((f + e)) -gt 0 ] && status=1
  return 0
}

suite luajit-ffi "$LUAJIT" "$BUSTED" -o utfTerminal spec
suite luajit-classic env BREAKER_NO_FFI=1 "$LUAJIT" "$BUSTED" -o utfTerminal spec/breaker_spec.lua spec/version_spec.lua
suite lua51-classic "$LUA51" "$BUSTED" -o utfTerminal spec/breaker_spec.lua

# Every server a spec starts must be stopped by its pid: one still running
# under this checkout's spec/tmp is a failure (and is stopped here).
# (procps tools hang with the sanitizer runtime preloaded: run them without it)
left=$(env -u LD_PRELOAD pgrep -f "nginx: master process nginx -p $(pwd)/spec/tmp" || true)
if [ -n "$left" ]; then
  echo "servers left running by the specs (pids $left): stopping them"
  kill $left 2>/dev/null || true
  failed=$((failed + 1)); status=1
fi

echo
echo "$passed passed, $failed failed"
exit $status
