#!/bin/sh
# Installs the Debian packages breaker needs to build, test, bench and demo,
# when they are missing. Idempotent; prints nothing when all are present.
set -e
PKGS="gcc make luajit2 libluajit2-5.1-dev lua5.1 liblua5.1-0-dev lua-cjson lua-busted
lua-check luarocks libcurl4-openssl-dev nginx libnginx-mod-http-lua lua-resty-core
lua-socket lua-curl wrk valgrind"
missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
[ -z "$missing" ] && exit 0
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
