/*
 * lhttp.c - Lua binding of the libcurl transport (http.c): breaker.curl.
 *
 *   local curl = require "breaker.curl"
 *   local t = curl.new{ timeout = 30 }
 *   local res, err = t:request{ method = "POST", url = ..., headers = ..., body = ... }
 *
 * The binding only translates: it validates Lua values (raising on caller
 * mistakes), hands plain C structs to http.c, and turns results into Lua
 * tables or breaker.error values. README-level documentation of the API is
 * in the comments of the exported functions below.
 */
#include "http.h"
#include "compat.h"

#include <curl/curlver.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#ifndef BREAKER_VERSION
#error "BREAKER_VERSION must be defined (the Makefile passes -DBREAKER_VERSION)"
#endif

#define TRANSPORT_MT "breaker.curl"
#define ERROR_NEW_KEY "breaker.curl.error_new"

#define DEFAULT_TIMEOUT 60.0
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_MAX_BODY ((size_t)16 * 1024 * 1024)
#define DEFAULT_USER_AGENT "breaker/" BREAKER_VERSION " libcurl/" LIBCURL_VERSION

LUALIB_API int luaopen_breaker_curl(lua_State *L);

/* ------------------------------------------------------------------------
 * Types
 * ---------------------------------------------------------------------- */

/* Stack slots that an on_chunk callback needs while curl runs. */
typedef struct run_ctx {
	lua_State *L;
	int anchor;     /* slot: table keeping values alive, made on first use */
	int tramp;      /* slot: chunk_trampoline, pushed on first use */
	int errslot;    /* slot: first error raised by an on_chunk */
	int nanchored;  /* keys used in the anchor table */
	int raised;
} run_ctx;

/* One request being run: its spec for http.c and its Lua side. */
typedef struct lreq {
	http_request_spec spec;  /* strings borrowed from the request table */
	run_ctx *ctx;            /* borrowed, on the C stack of run() */
	int fn_key;              /* anchor key of on_chunk, 0 when none */
	size_t hdr_off;          /* its headers in transport.hdrs */
} lreq;

/* The userdata behind a transport object. */
typedef struct transport {
	http_client *client;     /* owned; NULL once closed */
	int busy;                /* inside http_perform: no re-entry, no close */
	long timeout_ms;         /* defaults for each request */
	long connect_timeout_ms;
	size_t max_body;
	/* Scratch reused by every call (no garbage per request); all owned and
	 * freed by close. hreqs[0, pending) may hold requests that a Lua error
	 * (out of memory while building results) left behind: the next call or
	 * close frees them. */
	lreq *reqs;
	http_request **hreqs;
	size_t cap;
	size_t pending;
	http_header *hdrs;       /* the header arrays of one call's requests */
	size_t hdr_cap;
} transport;

/* Bytes handed to the trampoline (a light userdata cannot be const). */
typedef struct chunk_call {
	const char *data;
	size_t len;
} chunk_call;

/* ------------------------------------------------------------------------
 * Raising caller mistakes
 * ---------------------------------------------------------------------- */

/* The chunk name of t:request's Lua wrapper (request_lua). */
#define WRAPPER_SOURCE "=breaker.curl"

/* Raises "breaker.curl: <message>" at the Lua caller's position: the
 * caller of t:request's Lua wrapper when that is what called us. */
static int throw(lua_State *L, const char *fmt, ...)
{
	va_list ap;
	lua_Debug ar;
	int level = 1;
	if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "S", &ar) &&
	    strcmp(ar.source, WRAPPER_SOURCE) == 0)
		level = 2;
	luaL_where(L, level);
	lua_pushliteral(L, "breaker.curl: ");
	va_start(ap, fmt);
	lua_pushvfstring(L, fmt, ap);
	va_end(ap);
	lua_concat(L, 3);
	return lua_error(L);
}

/* Pushes t[key] for the table at absolute index idx, without metamethods:
 * borrowed strings must stay referenced by the table itself. */
static void rawfield(lua_State *L, int idx, const char *key)
{
	lua_pushstring(L, key);
	lua_rawget(L, idx);
}

/* Field names of requests and responses, interned once and kept as
 * upvalues of the C functions behind request and request_many: every
 * request reads about nine of them and every response sets eight, and
 * LuaJIT would otherwise hash each name again on every call. Only valid
 * inside those functions. */
enum {
	K_URL = 1, K_METHOD, K_BODY, K_HEADERS, K_TIMEOUT, K_CONNECT_TIMEOUT, K_MAX_BODY,
	K_ON_CHUNK, K_STATUS, K_STREAMED, K_TIMING, K_CONNECT, K_FIRST_BYTE, K_TOTAL,
	K_COUNT = K_TOTAL
};
static const char *const key_names[K_COUNT] = {
	"url", "method", "body", "headers", "timeout", "connect_timeout", "max_body",
	"on_chunk", "status", "streamed", "timing", "connect", "first_byte", "total",
};

/* Pushes t[key] for the table at idx (raw). */
static void keyfield(lua_State *L, int idx, int key)
{
	lua_pushvalue(L, lua_upvalueindex(key));
	lua_rawget(L, idx < 0 ? idx - 1 : idx);
}

/* Pushes a field name, for a lua_rawset once its value is pushed too. */
static void pushkey(lua_State *L, int key)
{
	lua_pushvalue(L, lua_upvalueindex(key));
}

/* Raises unless every key of the table at idx is one of `allowed`. */
static void check_keys(lua_State *L, int idx, const char *const *allowed, const char *what)
{
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		const char *const *k;
		int found = 0;
		if (lua_type(L, -2) != LUA_TSTRING)
			throw(L, "%s: keys must be strings, got a %s", what,
			      luaL_typename(L, -2));
		for (k = allowed; *k != NULL; k++)
			if (strcmp(*k, lua_tostring(L, -2)) == 0)
				found = 1;
		if (!found)
			throw(L, "%s: unknown key '%s'", what, lua_tostring(L, -2));
		lua_pop(L, 1);
	}
}

/* Seconds (a positive number, math.huge for none) as curl milliseconds. */
static long seconds_ms(lua_State *L, int idx, const char *what, const char *key)
{
	double s;
	if (lua_type(L, idx) != LUA_TNUMBER)
		throw(L, "%s.%s must be a number of seconds, got a %s", what, key,
		      luaL_typename(L, idx));
	s = lua_tonumber(L, idx);
	if (!(s > 0))
		throw(L, "%s.%s must be a positive number of seconds", what, key);
	if (s >= 1e9 || ceil(s * 1000.0) >= (double)LONG_MAX)
		return 0; /* no limit (and no overflow of a 32-bit long) */
	return (long)ceil(s * 1000.0);
}

static size_t byte_count(lua_State *L, int idx, const char *what, const char *key)
{
	double v;
	if (lua_type(L, idx) != LUA_TNUMBER)
		throw(L, "%s.%s must be a number of bytes, got a %s", what, key,
		      luaL_typename(L, idx));
	v = lua_tonumber(L, idx);
	if (!(v >= 0))
		throw(L, "%s.%s must be a number >= 0", what, key);
	/* 2^53 (or SIZE_MAX where size_t is narrower): no practical limit */
	if (v >= 9007199254740992.0 || v >= (double)SIZE_MAX)
		return (double)SIZE_MAX < 9007199254740992.0 ? SIZE_MAX
			: (size_t)9007199254740992.0;
	return (size_t)v;
}

/* A string without NUL bytes (for paths and other C strings). */
static const char *c_string(lua_State *L, int idx, const char *what, const char *key)
{
	size_t len;
	const char *s;
	if (lua_type(L, idx) != LUA_TSTRING)
		throw(L, "%s.%s must be a string, got a %s", what, key, luaL_typename(L, idx));
	s = lua_tolstring(L, idx, &len);
	if (strlen(s) != len)
		throw(L, "%s.%s must not contain NUL bytes", what, key);
	return s;
}

/* http:// or https:// followed by a non-empty rest without spaces or
 * control characters. */
static int is_http_url(const char *s, size_t len)
{
	size_t i, start;
	if (len > 7 && strncasecmp(s, "http://", 7) == 0)
		start = 7;
	else if (len > 8 && strncasecmp(s, "https://", 8) == 0)
		start = 8;
	else
		return 0;
	for (i = start; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch <= 0x20 || ch == 0x7f)
			return 0;
	}
	return 1;
}

/* ------------------------------------------------------------------------
 * Scratch memory of a transport
 * ---------------------------------------------------------------------- */

/* Frees the requests a raised error left behind; their handles go back to
 * the pool. */
static void release_pending(transport *t)
{
	size_t i;
	for (i = 0; i < t->pending; i++) {
		http_request_free(t->client, t->hreqs[i]);
		t->hreqs[i] = NULL;
	}
	t->pending = 0;
}

/* Makes room for n requests; raises when out of memory. */
static void reserve_requests(lua_State *L, transport *t, size_t n)
{
	lreq *reqs;
	http_request **hreqs;
	if (n <= t->cap)
		return;
	if (n > ((size_t)1 << 24))
		throw(L, "request_many: too many requests");
	reqs = realloc(t->reqs, n * sizeof(*reqs));
	if (reqs == NULL)
		throw(L, "out of memory");
	t->reqs = reqs;
	hreqs = realloc(t->hreqs, n * sizeof(*hreqs));
	if (hreqs == NULL)
		throw(L, "out of memory");
	t->hreqs = hreqs;
	t->cap = n;
}

/* Makes room for `need` headers in all; raises when out of memory. The
 * array may move: requests keep offsets until every one is read. */
static void reserve_headers(lua_State *L, transport *t, size_t need)
{
	http_header *hdrs;
	size_t cap = t->hdr_cap ? t->hdr_cap : 16;
	if (need <= t->hdr_cap)
		return;
	if (need > ((size_t)1 << 24))
		throw(L, "too many headers");
	while (cap < need)
		cap *= 2;
	hdrs = realloc(t->hdrs, cap * sizeof(*hdrs));
	if (hdrs == NULL)
		throw(L, "out of memory");
	t->hdrs = hdrs;
	t->hdr_cap = cap;
}

/* ------------------------------------------------------------------------
 * Transport objects
 * ---------------------------------------------------------------------- */

/* The transport at idx; raises if it is not one or is closed. */
static transport *check_transport(lua_State *L, int idx)
{
	transport *t = luaL_checkudata(L, idx, TRANSPORT_MT);
	if (t->client == NULL)
		throw(L, "transport is closed");
	return t;
}

static const char *const new_keys[] = {
	"insecure_skip_verify", "ca_file", "ca_path", "timeout", "connect_timeout",
	"max_body", "user_agent", "max_connections", NULL
};

/* curl.new([options]) -> transport. Options: insecure_skip_verify (true
 * turns TLS verification off; the only way to), ca_file, ca_path, timeout
 * (seconds, default 60), connect_timeout (default 10), max_body (bytes,
 * default 16 MiB), user_agent (string, or false for none), max_connections
 * (per host, default unlimited). Raises on a bad option. */
static int l_new(lua_State *L)
{
	http_client_config cfg;
	transport *t;
	char err[256];
	const char *what = "new";

	memset(&cfg, 0, sizeof(cfg));
	cfg.verify_tls = 1;
	cfg.user_agent = DEFAULT_USER_AGENT;
	if (lua_isnoneornil(L, 1)) {
		lua_settop(L, 0);
		lua_newtable(L);
	}
	luaL_checktype(L, 1, LUA_TTABLE);
	lua_settop(L, 1);
	check_keys(L, 1, new_keys, what);

	t = lua_newuserdata(L, sizeof(*t));  /* index 2 */
	memset(t, 0, sizeof(*t));
	luaL_getmetatable(L, TRANSPORT_MT);
	lua_setmetatable(L, -2);
	t->timeout_ms = (long)(DEFAULT_TIMEOUT * 1000);
	t->connect_timeout_ms = (long)(DEFAULT_CONNECT_TIMEOUT * 1000);
	t->max_body = DEFAULT_MAX_BODY;

	rawfield(L, 1, "insecure_skip_verify");
	if (!lua_isnil(L, -1)) {
		if (!lua_isboolean(L, -1))
			throw(L, "new.insecure_skip_verify must be a boolean");
		cfg.verify_tls = !lua_toboolean(L, -1);
	}
	rawfield(L, 1, "ca_file");
	if (!lua_isnil(L, -1))
		cfg.ca_file = c_string(L, -1, what, "ca_file");
	rawfield(L, 1, "ca_path");
	if (!lua_isnil(L, -1))
		cfg.ca_path = c_string(L, -1, what, "ca_path");
	rawfield(L, 1, "user_agent");
	if (lua_isboolean(L, -1) && !lua_toboolean(L, -1)) {
		cfg.user_agent = NULL;
	} else if (!lua_isnil(L, -1)) {
		size_t len;
		cfg.user_agent = c_string(L, -1, what, "user_agent");
		len = strlen(cfg.user_agent);
		if (!http_is_field_value(cfg.user_agent, len))
			throw(L, "new.user_agent must not contain CR or LF");
	}
	rawfield(L, 1, "timeout");
	if (!lua_isnil(L, -1))
		t->timeout_ms = seconds_ms(L, -1, what, "timeout");
	rawfield(L, 1, "connect_timeout");
	if (!lua_isnil(L, -1))
		t->connect_timeout_ms = seconds_ms(L, -1, what, "connect_timeout");
	rawfield(L, 1, "max_body");
	if (!lua_isnil(L, -1))
		t->max_body = byte_count(L, -1, what, "max_body");
	rawfield(L, 1, "max_connections");
	if (!lua_isnil(L, -1)) {
		size_t n = byte_count(L, -1, what, "max_connections");
		cfg.max_connections = n > 100000 ? 100000 : (long)n;
	}

	/* the strings in cfg are still on the stack; the client copies them */
	t->client = http_client_new(&cfg, err, sizeof(err));
	if (t->client == NULL)
		throw(L, "new: %s", err);
	lua_settop(L, 2);
	return 1;
}

/* t:default_timeout() -> the seconds a request without its own `timeout`
 * may take, or nil for none. A policy's deadline cuts it, never lengthens
 * it. Works on a closed transport too (it only reads the option). */
static int l_default_timeout(lua_State *L)
{
	transport *t = luaL_checkudata(L, 1, TRANSPORT_MT);
	if (t->timeout_ms > 0)
		lua_pushnumber(L, (double)t->timeout_ms / 1000.0);
	else
		lua_pushnil(L);
	return 1;
}

/* t:close(): frees the connections and handles; also __gc. Idempotent.
 * Raises when called from an on_chunk callback of the same transport. */
static int l_close(lua_State *L)
{
	transport *t = luaL_checkudata(L, 1, TRANSPORT_MT);
	if (t->busy)
		throw(L, "cannot close a transport while its request runs");
	release_pending(t);
	http_client_free(t->client);
	t->client = NULL;
	free(t->reqs);
	free(t->hreqs);
	free(t->hdrs);
	t->reqs = NULL;
	t->hreqs = NULL;
	t->hdrs = NULL;
	t->cap = t->hdr_cap = 0;
	return 0;
}

static int l_tostring(lua_State *L)
{
	transport *t = luaL_checkudata(L, 1, TRANSPORT_MT);
	if (t->client == NULL)
		lua_pushliteral(L, "breaker.curl transport (closed)");
	else
		lua_pushfstring(L, "breaker.curl transport (%p)", (void *)t);
	return 1;
}

/* ------------------------------------------------------------------------
 * Reading a request table
 * ---------------------------------------------------------------------- */

static const char *const request_keys[] = {
	"method", "url", "headers", "body", "timeout", "connect_timeout",
	"max_body", "on_chunk", NULL
};

/* Keeps the value on top of the stack alive in the anchor table (made on
 * first use) and pops it; returns its key. */
static int anchor(lua_State *L, run_ctx *ctx)
{
	if (ctx->nanchored == 0) {
		lua_newtable(L);
		lua_replace(L, ctx->anchor);
	}
	lua_rawseti(L, ctx->anchor, ++ctx->nanchored);
	return ctx->nanchored;
}

/* Reads headers (table at top of stack) into t->hdrs from *used on,
 * checking each name and value as it goes. */
static void read_headers(lua_State *L, transport *t, run_ctx *ctx, size_t *used, lreq *q,
                         const char *what)
{
	int tbl = lua_gettop(L);
	size_t n = 0;

	if (lua_type(L, tbl) != LUA_TTABLE)
		throw(L, "%s.headers must be a table, got a %s", what, luaL_typename(L, tbl));
	lua_pushnil(L);
	while (lua_next(L, tbl) != 0) {
		http_header *h;
		const char *name;
		size_t nlen;
		int vtype = lua_type(L, -1);
		if (lua_type(L, -2) != LUA_TSTRING)
			throw(L, "%s.headers: names must be strings, got a %s", what,
			      luaL_typename(L, -2));
		name = lua_tolstring(L, -2, &nlen);
		if (!http_is_token(name, nlen) || nlen > 255)
			throw(L, "%s.headers: invalid header name (empty, too long, or with "
			      "characters such as CR, LF, NUL, ':' or space)", what);
		if (http_is_framing_header(name, nlen))
			throw(L, "%s.headers['%s'] is set by the transport", what, name);
		if (vtype != LUA_TSTRING && vtype != LUA_TNUMBER)
			throw(L, "%s.headers['%s'] must be a string, got a %s", what, name,
			      luaL_typename(L, -1));
		reserve_headers(L, t, *used + n + 1);
		h = &t->hdrs[*used + n];
		h->name = name;
		h->name_len = nlen;
		if (vtype == LUA_TNUMBER) {
			/* convert a copy (never the key under lua_next) and keep it */
			lua_pushvalue(L, -1);
			h->value = lua_tolstring(L, -1, &h->value_len);
			anchor(L, ctx);
		} else {
			h->value = lua_tolstring(L, -1, &h->value_len);
			if (!http_is_field_value(h->value, h->value_len))
				throw(L, "%s.headers['%s'] contains CR, LF or NUL", what, name);
		}
		n++;
		lua_pop(L, 1);
	}
	q->hdr_off = *used;  /* spec.headers is set once t->hdrs stops moving */
	q->spec.nheaders = n;
	*used += n;
}

static int chunk_cb(void *ud, const char *data, size_t len);
static int chunk_trampoline(lua_State *L);

/* Reads the request table at idx into q, raising on any mistake. The
 * strings stay owned by the table (url, method, header names) or by the
 * anchor table (body, converted numbers, on_chunk). */
static void read_request(lua_State *L, transport *t, int idx, run_ctx *ctx, size_t *hdr_used,
                         int keep_body, lreq *q, const char *what)
{
	size_t len;
	const char *s;
	int top = lua_gettop(L), found = 1, total = 0;

	memset(q, 0, sizeof(*q));
	q->ctx = ctx;
	q->spec.timeout_ms = t->timeout_ms;
	q->spec.connect_timeout_ms = t->connect_timeout_ms;
	q->spec.max_body = t->max_body;

	keyfield(L, idx, K_URL);
	if (lua_type(L, -1) != LUA_TSTRING)
		throw(L, "%s.url must be a string, got a %s", what, luaL_typename(L, -1));
	s = lua_tolstring(L, -1, &len);
	if (!is_http_url(s, len))
		throw(L, "%s.url must be an http:// or https:// URL without spaces or "
		      "control characters", what);
	q->spec.url = s;

	keyfield(L, idx, K_METHOD);
	if (!lua_isnil(L, -1)) {
		if (lua_type(L, -1) != LUA_TSTRING)
			throw(L, "%s.method must be a string, got a %s", what, luaL_typename(L, -1));
		s = lua_tolstring(L, -1, &len);
		if (!http_is_token(s, len) || len > 32)
			throw(L, "%s.method must be an HTTP method token", what);
		q->spec.method = s;
		found++;
	}

	keyfield(L, idx, K_BODY);
	if (!lua_isnil(L, -1)) {
		if (lua_type(L, -1) != LUA_TSTRING)
			throw(L, "%s.body must be a string, got a %s", what, luaL_typename(L, -1));
		if (q->spec.method != NULL && strcmp(q->spec.method, "HEAD") == 0)
			throw(L, "%s.body is not allowed with method HEAD", what);
		q->spec.body = lua_tolstring(L, -1, &q->spec.body_len);
		found++;
	}

	keyfield(L, idx, K_HEADERS);
	if (!lua_isnil(L, -1)) {
		read_headers(L, t, ctx, hdr_used, q, what);
		found++;
	}

	keyfield(L, idx, K_TIMEOUT);
	if (!lua_isnil(L, -1)) {
		q->spec.timeout_ms = seconds_ms(L, -1, what, "timeout");
		found++;
	}
	keyfield(L, idx, K_CONNECT_TIMEOUT);
	if (!lua_isnil(L, -1)) {
		q->spec.connect_timeout_ms = seconds_ms(L, -1, what, "connect_timeout");
		found++;
	}
	keyfield(L, idx, K_MAX_BODY);
	if (!lua_isnil(L, -1)) {
		q->spec.max_body = byte_count(L, -1, what, "max_body");
		found++;
	}

	keyfield(L, idx, K_ON_CHUNK);
	if (!lua_isnil(L, -1)) {
		if (lua_type(L, -1) != LUA_TFUNCTION)
			throw(L, "%s.on_chunk must be a function, got a %s", what,
			      luaL_typename(L, -1));
		lua_pushvalue(L, -1);
		q->fn_key = anchor(L, ctx);
		q->spec.on_chunk = chunk_cb;
		q->spec.chunk_ud = q;
		if (lua_isnil(L, ctx->tramp)) {
			lua_pushcfunction(L, chunk_trampoline);
			lua_replace(L, ctx->tramp);
		}
		found++;
		keep_body = 1;
	}
	/* Lua code (an on_chunk) may drop the body while curl still sends it */
	if (keep_body && q->spec.body != NULL) {
		keyfield(L, idx, K_BODY);
		anchor(L, ctx);
	}
	/* every key was one of ours, unless the table holds more keys */
	lua_settop(L, top);
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		total++;
		lua_pop(L, 1);
	}
	if (total != found)
		check_keys(L, idx, request_keys, what);
	/* url, method and header names stay referenced by the request table,
	 * which is on the caller's stack; no Lua code runs before curl copies
	 * them in http_request_new. */
}

/* ------------------------------------------------------------------------
 * Streaming callback
 * ---------------------------------------------------------------------- */

/* Called protected: (on_chunk, chunk_call) -> on_chunk(chunk). Making the
 * string here keeps an allocation error inside the pcall. */
static int chunk_trampoline(lua_State *L)
{
	const chunk_call *cc = lua_touserdata(L, 2);
	lua_pushlstring(L, cc->data, cc->len);
	lua_remove(L, 2);
	lua_call(L, 1, 1);
	return 1;
}

/* http_chunk_fn: runs the request's on_chunk. Returns 1 when it returned
 * false (abort), 2 when it raised (kept in errslot, rethrown later). */
static int chunk_cb(void *ud, const char *data, size_t len)
{
	lreq *q = ud;
	run_ctx *ctx = q->ctx;
	lua_State *L = ctx->L;
	chunk_call cc;
	int stop;

	/* Once an on_chunk raised, the call ends with that error: no more Lua
	 * runs, and every other streamed request of the batch aborts at its
	 * next chunk (buffered ones still run to their end or timeout). */
	if (ctx->raised)
		return 2;
	cc.data = data;
	cc.len = len;
	lua_pushvalue(L, ctx->tramp);
	lua_rawgeti(L, ctx->anchor, q->fn_key);
	lua_pushlightuserdata(L, &cc);
	if (lua_pcall(L, 2, 1, 0) != 0) {
		if (!ctx->raised) {
			ctx->raised = 1;
			lua_replace(L, ctx->errslot);
		} else {
			lua_pop(L, 1);
		}
		return 2;
	}
	stop = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
	lua_pop(L, 1);
	return stop ? 1 : 0;
}

/* ------------------------------------------------------------------------
 * Results
 * ---------------------------------------------------------------------- */

/* Whether the response's header names are all different and none is
 * set-cookie (kept as a list): then each is a plain store. Up to 64 headers
 * are compared pairwise (most differ in length); more take the general path. */
static int headers_simple(const http_result *res)
{
	size_t i, j;
	if (res->nheaders > 64)
		return 0;
	for (i = 0; i < res->nheaders; i++) {
		const http_header *h = &res->headers[i];
		if (h->name_len == 10 && memcmp(h->name, "set-cookie", 10) == 0)
			return 0;
		for (j = 0; j < i; j++)
			if (res->headers[j].name_len == h->name_len &&
			    memcmp(res->headers[j].name, h->name, h->name_len) == 0)
				return 0;
	}
	return 1;
}

static void push_headers(lua_State *L, const http_result *res)
{
	size_t i;
	lua_createtable(L, 0, (int)res->nheaders);
	if (headers_simple(res)) {
		for (i = 0; i < res->nheaders; i++) {
			const http_header *h = &res->headers[i];
			lua_pushlstring(L, h->name, h->name_len);
			lua_pushlstring(L, h->value, h->value_len);
			lua_rawset(L, -3);
		}
		return;
	}
	/* Repeated names collect their values in a list of parts (a table
	 * `parts` of name -> list below the headers), joined once at the end:
	 * joining as they come copied the growing value for every repeat, which
	 * was quadratic (0.66 s for 43k repeats within the 256 KiB of head). */
	lua_newtable(L);                         /* headers, parts */
	for (i = 0; i < res->nheaders; i++) {
		const http_header *h = &res->headers[i];
		int cookie = h->name_len == 10 && memcmp(h->name, "set-cookie", 10) == 0;
		lua_pushlstring(L, h->name, h->name_len);
		lua_pushvalue(L, -1);
		lua_rawget(L, -4);               /* headers, parts, name, old */
		if (cookie) {
			if (lua_isnil(L, -1)) {
				lua_pop(L, 1);
				lua_newtable(L);
				lua_pushvalue(L, -2);
				lua_pushvalue(L, -2);
				lua_rawset(L, -6);       /* headers[name] = list */
			}
			lua_pushlstring(L, h->value, h->value_len);
			lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
			lua_pop(L, 2);
			continue;
		}
		if (lua_isnil(L, -1)) {
			lua_pop(L, 1);
			lua_pushlstring(L, h->value, h->value_len);
			lua_rawset(L, -4);       /* headers[name] = value */
			continue;
		}
		lua_pop(L, 1);                   /* headers, parts, name */
		lua_pushvalue(L, -1);
		lua_rawget(L, -3);               /* headers, parts, name, list */
		if (lua_isnil(L, -1)) {
			lua_pop(L, 1);
			lua_createtable(L, 4, 0);
			lua_pushvalue(L, -2);
			lua_rawget(L, -5);       /* the first value */
			lua_rawseti(L, -2, 1);
			lua_pushvalue(L, -2);
			lua_pushvalue(L, -2);
			lua_rawset(L, -5);       /* parts[name] = list */
		}
		lua_pushlstring(L, h->value, h->value_len);
		lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
		lua_pop(L, 2);                   /* headers, parts */
	}
	{
		int hdrs = lua_gettop(L) - 1, parts = hdrs + 1;
		lua_pushnil(L);
		while (lua_next(L, parts) != 0) {        /* ..., name, list */
			int list = lua_gettop(L);
			size_t k, n = lua_rawlen(L, list);
			luaL_Buffer b;
			lua_pushvalue(L, list - 1);      /* the name, under the buffer */
			luaL_buffinit(L, &b);
			for (k = 1; k <= n; k++) {
				if (k > 1)
					luaL_addlstring(&b, ", ", 2);
				lua_rawgeti(L, list, (int)k);
				luaL_addvalue(&b);
			}
			luaL_pushresult(&b);             /* ..., name, list, name, joined */
			lua_rawset(L, hdrs);             /* headers[name] = joined */
			lua_pop(L, 1);                   /* ..., name */
		}
	}
	lua_pop(L, 1);                           /* headers */
}

static void set_number(lua_State *L, int key, double v)
{
	pushkey(L, key);
	lua_pushnumber(L, v);
	lua_rawset(L, -3);
}

/* { status, headers, body, timing = { connect, first_byte, total } },
 * plus streamed = true when the body went to on_chunk (body is then ""). */
static void push_response(lua_State *L, const http_result *res)
{
	lua_createtable(L, 0, res->streamed ? 5 : 4);
	pushkey(L, K_STATUS);
	lua_pushinteger(L, (lua_Integer)res->status);
	lua_rawset(L, -3);
	pushkey(L, K_HEADERS);
	push_headers(L, res);
	lua_rawset(L, -3);
	pushkey(L, K_BODY);
	lua_pushlstring(L, res->body, res->body_len);
	lua_rawset(L, -3);
	if (res->streamed) {
		pushkey(L, K_STREAMED);
		lua_pushboolean(L, 1);
		lua_rawset(L, -3);
	}
	pushkey(L, K_TIMING);
	lua_createtable(L, 0, 3);
	set_number(L, K_CONNECT, res->connect_time);
	set_number(L, K_FIRST_BYTE, res->first_byte_time);
	set_number(L, K_TOTAL, res->total_time);
	lua_rawset(L, -3);
}

/* A breaker.error: kind, message (curl's words), curl_code, and the HTTP
 * status when a response had started. Never the request's headers or body. */
static void push_error(lua_State *L, const http_result *res)
{
	lua_getfield(L, LUA_REGISTRYINDEX, ERROR_NEW_KEY);
	lua_pushstring(L, http_kind_name(res->kind));
	lua_pushstring(L, res->message);
	lua_createtable(L, 0, 2);
	lua_pushinteger(L, res->curl_code);
	lua_setfield(L, -2, "curl_code");
	if (res->status > 0) {
		lua_pushinteger(L, (lua_Integer)res->status);
		lua_setfield(L, -2, "status");
	}
	lua_call(L, 3, 1);
}

/* ------------------------------------------------------------------------
 * Running
 * ---------------------------------------------------------------------- */

/* Runs the request tables at idx (one, or a list when many) and pushes the
 * results: for one, the response's parts (status, headers, body, connect,
 * first_byte, total, streamed) or nil, err; for many, the list of { res }
 * or { err } tables. Returns the number of Lua results. */
static int run(lua_State *L, transport *t, int idx, int many)
{
	run_ctx ctx;
	size_t n = 1, i, hdr_used = 0;
	int rc;

	if (t->busy)
		throw(L, "transport is busy (a request from inside on_chunk?)");
	release_pending(t);
	/* reading a request table nests up to ~20 values (and a raise 3 more) */
	luaL_checkstack(L, 40, "breaker.curl");
	if (many)
		n = lua_rawlen(L, idx);
	memset(&ctx, 0, sizeof(ctx));
	ctx.L = L;
	lua_pushnil(L);
	ctx.anchor = lua_gettop(L);
	lua_pushnil(L);
	ctx.errslot = lua_gettop(L);
	lua_pushnil(L);
	ctx.tramp = lua_gettop(L);
	reserve_requests(L, t, n);

	/* 1. validate everything; raising here leaves no C state behind */
	for (i = 0; i < n; i++) {
		if (!many) {
			read_request(L, t, idx, &ctx, &hdr_used, 0, &t->reqs[i], "request");
			continue;
		}
		lua_rawgeti(L, idx, (int)i + 1);
		if (lua_type(L, -1) != LUA_TTABLE)
			throw(L, "request_many: requests[%d] must be a table, got a %s",
			      (int)i + 1, luaL_typename(L, -1));
		lua_pushfstring(L, "requests[%d]", (int)i + 1);
		read_request(L, t, lua_gettop(L) - 1, &ctx, &hdr_used, 1, &t->reqs[i],
		             lua_tostring(L, -1));
		lua_pop(L, 2);
	}
	for (i = 0; i < n; i++)
		t->reqs[i].spec.headers = t->hdrs + t->reqs[i].hdr_off;

	/* 2. C requests, owned by t (pending) until released */
	if (n > 0)  /* hreqs is NULL before the first request */
		memset(t->hreqs, 0, n * sizeof(*t->hreqs));
	t->pending = n;
	for (i = 0; i < n; i++) {
		/* read_request checked method and headers */
		t->hreqs[i] = http_request_new_checked(t->client, &t->reqs[i].spec);
		if (t->hreqs[i] == NULL)
			throw(L, "out of memory");
	}

	/* 3. the transfer; on_chunk runs protected, nothing raises through curl */
	luaL_checkstack(L, 16, "breaker.curl");
	t->busy = 1;
	http_perform(t->client, t->hreqs, n);
	t->busy = 0;
	if (ctx.raised) {
		release_pending(t);
		lua_pushvalue(L, ctx.errslot);
		return lua_error(L);
	}

	/* 4. results */
	if (!many) {
		const http_result *res = http_request_result(t->hreqs[0]);
		if (res->kind == HTTP_OK) {
			/* the parts of the response, for the Lua wrapper to put in
			 * its table constructors */
			lua_pushinteger(L, (lua_Integer)res->status);
			push_headers(L, res);
			lua_pushlstring(L, res->body, res->body_len);
			lua_pushnumber(L, res->connect_time);
			lua_pushnumber(L, res->first_byte_time);
			lua_pushnumber(L, res->total_time);
			if (res->streamed)
				lua_pushboolean(L, 1);
			else
				lua_pushnil(L);
			rc = 7;
		} else {
			lua_pushnil(L);
			push_error(L, res);
			rc = 2;
		}
	} else {
		lua_createtable(L, (int)n, 0);
		for (i = 0; i < n; i++) {
			const http_result *res = http_request_result(t->hreqs[i]);
			lua_createtable(L, 0, 1);
			if (res->kind == HTTP_OK) {
				push_response(L, res);
				lua_setfield(L, -2, "res");
			} else {
				push_error(L, res);
				lua_setfield(L, -2, "err");
			}
			lua_rawseti(L, -2, (int)i + 1);
		}
		rc = 1;
	}
	release_pending(t);
	return rc;
}

/* t:request{ method, url, headers, body, timeout, connect_timeout, max_body,
 * on_chunk } -> response | nil, err. A response is any complete HTTP answer
 * (4xx/5xx included): { status, headers (names lower-case, repeats joined
 * with ", ", set-cookie a list), body, timing = { connect, first_byte, total
 * } }. With on_chunk, a 2xx body goes to on_chunk(chunk) as it arrives
 * (returning false aborts with kind "aborted") and res.body is "" with
 * res.streamed = true; other statuses are buffered into res.body. Raises on
 * bad input and rethrows what on_chunk raises.
 *
 * t:request is the Lua function compiled from request_lua below; this is
 * what it calls, and it returns the response in parts. */
static int l_request_raw(lua_State *L)
{
	transport *t = lua_touserdata(L, 1);
	int ok = 0;
	/* luaL_testudata, which Lua 5.1 lacks */
	if (t != NULL && lua_getmetatable(L, 1)) {
		luaL_getmetatable(L, TRANSPORT_MT);
		ok = lua_rawequal(L, -1, -2);
		lua_pop(L, 2);
	}
	if (!ok)
		throw(L, "bad argument #1 to 'request' (breaker.curl transport expected, got %s)",
		      luaL_typename(L, 1));
	if (t->client == NULL)
		throw(L, "transport is closed");
	if (lua_type(L, 2) != LUA_TTABLE)
		throw(L, "bad argument #2 to 'request' (table expected, got %s)", luaL_typename(L, 2));
	lua_settop(L, 2);
	return run(L, t, 2, 0);
}

/* t:request in Lua around l_request_raw: LuaJIT builds the response and
 * timing tables from templates, cheaper than field by field through the
 * C API. */
static const char request_lua[] =
	"local raw = ...\n"
	"return function(self, req)\n"
	"  local status, headers, body, connect, first_byte, total, streamed = raw(self, req)\n"
	"  if not status then return nil, headers end\n"
	"  return { status = status, headers = headers, body = body, streamed = streamed,\n"
	"           timing = { connect = connect, first_byte = first_byte, total = total } }\n"
	"end\n";

/* t:request_many{ req1, req2, ... } -> { { res = ... } | { err = ... }, ... }
 * in input order; the requests run in parallel over the transport's
 * connections. */
static int l_request_many(lua_State *L)
{
	transport *t = check_transport(L, 1);
	luaL_checktype(L, 2, LUA_TTABLE);
	lua_settop(L, 2);
	return run(L, t, 2, 1);
}

/* ------------------------------------------------------------------------
 * Retry-After
 * ---------------------------------------------------------------------- */

/* curl.parse_retry_after(value [, now]) -> seconds >= 0 | nil. value is a
 * Retry-After header: delta-seconds or an HTTP-date (a past date gives 0);
 * now (epoch seconds, default the clock) is what a date is measured from;
 * a now beyond +-2^53 or NaN gives nil for a string value. Anything else,
 * including nil, gives nil; never raises. */
static int l_parse_retry_after(lua_State *L)
{
	double v;
	size_t len;
	const char *s;
	double now;
	int now_ok = 1;
	struct timespec ts;

	/* The precise clock: time() reads the coarse one, up to a tick behind,
	 * which near a second's turn made a date 2 s away look 3 s away. */
	if (clock_gettime(CLOCK_REALTIME, &ts) == 0)
		now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
	else
		now = (double)time(NULL);
	if (lua_type(L, 2) == LUA_TNUMBER) {
		/* NaN and infinities give nil, like garbage */
		double n = lua_tonumber(L, 2);
		now_ok = n > -9007199254740992.0 && n < 9007199254740992.0;
		now = now_ok ? n : 0;
	}
	if (lua_type(L, 1) == LUA_TNUMBER) {
		v = lua_tonumber(L, 1);
		if (v >= 0 && v <= HTTP_RETRY_AFTER_MAX)
			lua_pushnumber(L, v);
		else
			lua_pushnil(L);
		return 1;
	}
	if (lua_type(L, 1) != LUA_TSTRING) {
		lua_pushnil(L);
		return 1;
	}
	s = lua_tolstring(L, 1, &len);
	if (now_ok && http_parse_retry_after(s, len, now, &v))
		lua_pushnumber(L, v);
	else
		lua_pushnil(L);
	return 1;
}

/* curl.parse_retry_after_ms(value) -> seconds >= 0 | nil, from a
 * retry-after-ms header (milliseconds, fraction allowed). Never raises. */
static int l_parse_retry_after_ms(lua_State *L)
{
	double v;
	size_t len;
	const char *s;

	if (lua_type(L, 1) == LUA_TNUMBER) {
		v = lua_tonumber(L, 1);
		if (v >= 0 && v <= HTTP_RETRY_AFTER_MAX)
			lua_pushnumber(L, v / 1000.0);
		else
			lua_pushnil(L);
		return 1;
	}
	if (lua_type(L, 1) != LUA_TSTRING) {
		lua_pushnil(L);
		return 1;
	}
	s = lua_tolstring(L, 1, &len);
	if (http_parse_retry_after_ms(s, len, &v))
		lua_pushnumber(L, v);
	else
		lua_pushnil(L);
	return 1;
}

/* ------------------------------------------------------------------------
 * Module
 * ---------------------------------------------------------------------- */

static const luaL_Reg transport_methods[] = {
	{ "request_many", l_request_many },
	{ "default_timeout", l_default_timeout },
	{ "close", l_close },
	{ NULL, NULL }
};

static const luaL_Reg transport_meta[] = {
	{ "__gc", l_close },
	{ "__tostring", l_tostring },
	{ NULL, NULL }
};

static const luaL_Reg module_funcs[] = {
	{ "new", l_new },
	{ "parse_retry_after", l_parse_retry_after },
	{ "parse_retry_after_ms", l_parse_retry_after_ms },
	{ NULL, NULL }
};

/* require "breaker.curl": the module table { new, parse_retry_after,
 * parse_retry_after_ms, _VERSION, curl_version }. Needs breaker.error. */
LUALIB_API int luaopen_breaker_curl(lua_State *L)
{
	lua_getglobal(L, "require");
	lua_pushliteral(L, "breaker.error");
	lua_call(L, 1, 1);
	lua_getfield(L, -1, "new");
	if (lua_type(L, -1) != LUA_TFUNCTION)
		return luaL_error(L, "breaker.curl: breaker.error has no function new");
	lua_setfield(L, LUA_REGISTRYINDEX, ERROR_NEW_KEY);
	lua_pop(L, 1);

	if (luaL_newmetatable(L, TRANSPORT_MT)) {
		luaL_setfuncs(L, transport_meta, 0);
		{
			int k;
			lua_newtable(L);
			for (k = 0; k < K_COUNT; k++)
				lua_pushstring(L, key_names[k]);
			luaL_setfuncs(L, transport_methods, K_COUNT);
			if (luaL_loadbuffer(L, request_lua, sizeof(request_lua) - 1, WRAPPER_SOURCE) != 0)
				return lua_error(L);
			for (k = 0; k < K_COUNT; k++)
				lua_pushstring(L, key_names[k]);
			lua_pushcclosure(L, l_request_raw, K_COUNT);
			lua_call(L, 1, 1);
			lua_setfield(L, -2, "request");
		}
		lua_setfield(L, -2, "__index");
		lua_pushliteral(L, "breaker.curl transport");
		lua_setfield(L, -2, "__metatable");
	}
	lua_pop(L, 1);

	luaL_newlib(L, module_funcs);
	lua_pushliteral(L, BREAKER_VERSION);
	lua_setfield(L, -2, "_VERSION");
	lua_pushliteral(L, LIBCURL_VERSION);
	lua_setfield(L, -2, "curl_version");
	return 1;
}
