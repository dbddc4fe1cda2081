#!/bin/bash
# upstream.sh - start or stop the fake upstream (nginx + fake_upstream.lua).
#
#   upstream.sh start DIR [PORT]   start on 127.0.0.1:PORT (default: a free
#                                  port) with DIR as nginx's prefix; prints
#                                  "PORT PID" once the server accepts connections
#   upstream.sh stop DIR           stop the server started in DIR, by its pid
#
# Environment: WORKERS (default 1), API_KEY (default sk-test-good; empty means
# no key check), TLS (1: serve https with a fresh self-signed certificate for
# the name localhost only, written to DIR/conf/cert.pem), HTTP2 (with TLS:
# 1, the default, also offers HTTP/2 by ALPN, as providers do; 0 serves
# HTTP/1.1 only), NGINX (default nginx). Everything the server writes (config,
# pid, logs, temp files) stays under DIR. See README.md.
set -eu
# A sanitizer preloaded into the specs' interpreter must not leak into nginx
# or into ps and friends (ps deadlocks under a preloaded libasan).
unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS

here=$(cd "$(dirname "$0")" && pwd)
NGINX=${NGINX:-nginx}

die() { echo "upstream.sh: $*" >&2; exit 1; }

# Prints a port on 127.0.0.1 that nothing listens on right now.
free_port() {
	local lua
	for lua in luajit lua5.1; do
		if command -v "$lua" >/dev/null 2>&1; then
			"$lua" -e 'local s = assert(require("socket").bind("127.0.0.1", 0))
				local _, port = s:getsockname(); s:close(); print(port)' && return 0
		fi
	done
	die "need luajit or lua5.1 with lua-socket to find a free port"
}

# True when something accepts connections on 127.0.0.1:$1.
listening() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
	local dir=$1 port=${2:-} workers=${WORKERS:-1} key=${API_KEY-sk-test-good} user=""
	case $workers in ''|*[!0-9]*) die "WORKERS must be a number" ;; esac
	case $key in *[!A-Za-z0-9_.-]*) die "API_KEY may only hold [A-Za-z0-9_.-]" ;; esac
	[ -n "$port" ] || port=$(free_port)
	case $port in ''|*[!0-9]*) die "bad port '$port'" ;; esac
	mkdir -p "$dir/conf" "$dir/logs" "$dir/tmp"
	dir=$(cd "$dir" && pwd)
	[ "$(id -u)" = 0 ] && user="user root;"
	local ssl="" ssl_cert=""
	if [ "${TLS:-0}" = 1 ]; then
		openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
			-addext "subjectAltName=DNS:localhost" \
			-keyout "$dir/conf/key.pem" -out "$dir/conf/cert.pem" 2>/dev/null \
			|| die "openssl could not make a certificate"
		ssl=" ssl"
		case ${HTTP2:-1} in
		1)  # needs nginx's http_v2 module (Debian's nginx has it)
			"$NGINX" -V 2>&1 | grep -q -- --with-http_v2_module \
				|| die "HTTP2=1 needs nginx built with http_v2 (HTTP2=0 serves HTTP/1.1)"
			ssl=" ssl http2" ;;
		0) ;;
		*) die "HTTP2 must be 0 or 1" ;;
		esac
		ssl_cert="ssl_certificate $dir/conf/cert.pem; ssl_certificate_key $dir/conf/key.pem;"
	fi
	sed -e "s|@PORT@|$port|g" -e "s|@WORKERS@|$workers|g" -e "s|@PREFIX@|$dir|g" \
	    -e "s|@SUPPORT@|$here|g" -e "s|@API_KEY@|$key|g" -e "s|@USER@|$user|g" \
	    -e "s|@SSL@|$ssl|g" -e "s|@SSL_CERT@|$ssl_cert|g" \
	    "$here/nginx.conf" >"$dir/conf/nginx.conf"
	rm -f "$dir/logs/nginx.pid"
	"$NGINX" -p "$dir/" -c conf/nginx.conf -e logs/error.log -g 'daemon on;' \
		|| die "nginx failed to start (see $dir/logs/error.log)"
	local i pid=""
	for i in $(seq 1 200); do
		[ -s "$dir/logs/nginx.pid" ] && pid=$(cat "$dir/logs/nginx.pid")
		if [ -n "$pid" ] && listening "$port"; then
			echo "$port $pid"
			return 0
		fi
		sleep 0.025
	done
	[ -n "$pid" ] && kill "$pid" 2>/dev/null
	tail -n 5 "$dir/logs/error.log" >&2 || true
	die "nginx did not answer on port $port within 5 s"
}

# True while process $1 exists and is not a zombie waiting to be reaped.
running() {
	local stat
	if [ -r "/proc/$1/stat" ]; then
		stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
		stat=${stat##*) }  # the state letter follows "pid (comm) "
		case $stat in Z*|X*|'') return 1 ;; esac
		return 0
	fi
	kill -0 "$1" 2>/dev/null
}

stop() {
	local dir=$1 pid i
	[ -s "$dir/logs/nginx.pid" ] || return 0
	pid=$(cat "$dir/logs/nginx.pid")
	case $pid in ''|*[!0-9]*) die "bad pid file $dir/logs/nginx.pid" ;; esac
	if ! running "$pid"; then rm -f "$dir/logs/nginx.pid"; return 0; fi
	local workers
	workers=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
	kill -TERM "$pid" 2>/dev/null || true
	for i in $(seq 1 200); do
		running "$pid" || break
		sleep 0.025
	done
	if running "$pid"; then
		echo "upstream.sh: nginx $pid ignored TERM, killing it" >&2
		kill -KILL "$pid" $workers 2>/dev/null || true
	fi
	rm -f "$dir/logs/nginx.pid"
}

case ${1:-} in
start) [ $# -ge 2 ] || die "usage: $0 start DIR [PORT]"; start "$2" "${3:-}" ;;
stop)  [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
*)     die "usage: $0 start DIR [PORT] | stop DIR" ;;
esac
