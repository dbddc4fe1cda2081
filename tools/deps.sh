#!/bin/sh
# Installs the Debian packages breaker needs to build, test, bench and demo,
# when they are missing, and the npm package of the dashboard's browser test
# (spec/browser) when its node_modules is missing. Idempotent; prints nothing
# when all are present.
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
# chromium and nodejs: the dashboard's browser test (spec/browser). npm is
# asked for only when no npm command exists (NodeSource's nodejs bundles it
# and conflicts with Debian's npm package).
PKGS="gcc make luajit2 libluajit2-5.1-dev lua5.1 liblua5.1-0-dev lua-cjson lua-busted
lua-check luarocks libcurl4-openssl-dev nginx libnginx-mod-http-lua lua-resty-core
lua-socket lua-curl wrk valgrind chromium nodejs"

# playwright-core (no browser download: it drives Debian's chromium), pinned
# by spec/browser/package-lock.json.
browser_modules() {
  [ -d "$here/spec/browser/node_modules/playwright-core" ] && return 0
  echo "deps: npm ci in spec/browser"
  (cd "$here/spec/browser" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
}

missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
command -v npm >/dev/null 2>&1 || missing="$missing npm"
if [ -z "$missing" ]; then browser_modules; exit 0; fi
echo "deps: installing$missing"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# luajit2 (OpenResty's fork) replaces Debian's plain luajit, whose -dev
# package conflicts with the nginx Lua module.
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
# Debian starts the system nginx on port 80 when it is installed; the specs
# run their own instances and need nothing from it.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop nginx >/dev/null 2>&1 || true; fi
browser_modules
