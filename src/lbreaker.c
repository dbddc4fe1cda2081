/*
 * lbreaker.c - the classic Lua binding of breaker.c: `require "breaker.core"`.
 *
 * It serves plain Lua 5.1 and every call that is not on the hot path under
 * LuaJIT (creation, stats, operator calls); LuaJIT's FFI calls brk_allow and
 * brk_record directly (lua/breaker/init.lua).
 */
#include <dlfcn.h>
#include <math.h>
#include <string.h>

#include "breaker.h"
#include "compat.h"
#include "shm.h"

#ifndef BREAKER_VERSION
#error "BREAKER_VERSION must be defined (the Makefile feeds it from lua/breaker/version.lua)"
#endif

#define BREAKER_MT "breaker.core"
#define REGION_MT "breaker.region"

/* The userdata: a pointer to the breaker block. NULL once closed. */
typedef struct lbrk {
	brk_t *b;  /* owned (freed by close/__gc) unless it lives in a region */
	int owned; /* 0: the block is a region slot; the region's userdata is
		    * anchored in this userdata's environment table */
} lbrk;

/* A region handle. Regions are never unmapped (see shm.h), so there is
 * nothing to free. */
typedef struct lregion {
	brk_region *r; /* not owned: kept by shm.c until the process exits */
} lregion;

/* ======================================================================
 * Argument checks
 * ====================================================================== */

static lbrk *check_box(lua_State *L, int idx)
{
	return (lbrk *)luaL_checkudata(L, idx, BREAKER_MT);
}

/* The breaker at idx; raises if it is not one or was closed. */
static brk_t *check_breaker(lua_State *L, int idx)
{
	lbrk *box = check_box(L, idx);
	if (box->b == NULL)
		luaL_error(L, "breaker: attempt to use a closed breaker");
	return box->b;
}

/* String argument idx that the C side keeps as a C string (a region key or
 * name, a breaker name in a region). One with an embedded NUL byte is
 * refused: C would cut it short there, and "api\0..." would name "api". */
static const char *check_cstring(lua_State *L, int idx, const char *what)
{
	size_t len;
	const char *s = luaL_checklstring(L, idx, &len);
	size_t clen = strlen(s);
	if (clen != len)
		luaL_error(L, "%s contains a NUL byte (byte %d of %d)", what, (int)clen + 1, (int)len);
	return s;
}

static const char *const outcome_names[] = { "success", "failure", "ignored", NULL };

static int check_outcome(lua_State *L, int idx)
{
	return luaL_checkoption(L, idx, NULL, outcome_names);
}

/* ======================================================================
 * Config table -> brk_config
 * ====================================================================== */

static const char *const config_keys[] = {
	"window_type", "window_size", "window_buckets", "minimum_calls",
	"failure_rate_threshold", "slow_call_rate_threshold", "slow_call_duration",
	"consecutive_failures", "half_open_calls", "open_duration",
	"open_duration_factor", "open_duration_max", "open_duration_jitter",
	"probe_timeout", NULL
};

static void config_error(lua_State *L, const char *key, const char *expected, int vidx)
{
	luaL_error(L, "breaker config: bad value for '%s' (expected %s, got %s)",
		   key, expected, luaL_typename(L, vidx));
}

/* Reads number field `key` of the table at idx into *out when present. */
static void opt_number(lua_State *L, int idx, const char *key, double *out)
{
	lua_getfield(L, idx, key);
	if (!lua_isnil(L, -1)) {
		if (lua_type(L, -1) != LUA_TNUMBER)
			config_error(L, key, "a number", -1);
		*out = lua_tonumber(L, -1);
		if (isnan(*out))
			config_error(L, key, "a number, not NaN", -1);
	}
	lua_pop(L, 1);
}

/* Like opt_number, but `false` turns the rule off (stored as -1). */
static void opt_rate(lua_State *L, int idx, const char *key, double *out)
{
	lua_getfield(L, idx, key);
	if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1))
		*out = -1;
	else if (!lua_isnil(L, -1)) {
		if (lua_type(L, -1) != LUA_TNUMBER)
			config_error(L, key, "a percentage or false", -1);
		*out = lua_tonumber(L, -1);
		if (!(*out > 0 && *out <= 100))
			luaL_error(L, "breaker config: bad value for '%s' (expected a percentage in (0, 100] or false, got %f)",
				   key, *out);
	}
	lua_pop(L, 1);
}

static void opt_count(lua_State *L, int idx, const char *key, uint32_t *out, int allow_false)
{
	lua_getfield(L, idx, key);
	if (allow_false && lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1))
		*out = 0;
	else if (!lua_isnil(L, -1)) {
		double d;
		if (lua_type(L, -1) != LUA_TNUMBER)
			config_error(L, key, "an integer", -1);
		d = lua_tonumber(L, -1);
		if (!(d >= 0 && d <= 4294967295.0) || floor(d) != d)
			luaL_error(L, "breaker config: bad value for '%s' (expected a non-negative integer, got %f)",
				   key, d);
		*out = (uint32_t)d;
	}
	lua_pop(L, 1);
}

static void read_config(lua_State *L, int idx, brk_config *cfg)
{
	const char *msg;
	brk_config_default(cfg);
	if (lua_isnoneornil(L, idx))
		return;
	luaL_checktype(L, idx, LUA_TTABLE);

	/* Unknown keys are mistakes: name them. */
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		int i, known = 0;
		if (lua_type(L, -2) == LUA_TSTRING) {
			const char *k = lua_tostring(L, -2);
			for (i = 0; config_keys[i]; i++)
				if (strcmp(k, config_keys[i]) == 0)
					known = 1;
			if (!known)
				luaL_error(L, "breaker config: unknown key '%s'", k);
		} else {
			luaL_error(L, "breaker config: keys must be strings (got a %s)",
				   luaL_typename(L, -2));
		}
		lua_pop(L, 1);
	}

	lua_getfield(L, idx, "window_type");
	if (!lua_isnil(L, -1)) {
		const char *w = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
		if (w && strcmp(w, "count") == 0)
			cfg->window_type = BRK_WINDOW_COUNT;
		else if (w && strcmp(w, "time") == 0)
			cfg->window_type = BRK_WINDOW_TIME;
		else
			config_error(L, "window_type", "\"count\" or \"time\"", -1);
		/* A time window counts seconds: 60 s in 10 buckets unless told. */
		if (cfg->window_type == BRK_WINDOW_TIME)
			cfg->window_size = 60;
	}
	lua_pop(L, 1);
	opt_count(L, idx, "window_size", &cfg->window_size, 0);
	opt_count(L, idx, "window_buckets", &cfg->window_buckets, 0);
	opt_count(L, idx, "minimum_calls", &cfg->minimum_calls, 0);
	if (cfg->window_type == BRK_WINDOW_COUNT && cfg->minimum_calls > cfg->window_size) {
		/* The default minimum follows a small window down, not an explicit one. */
		lua_getfield(L, idx, "minimum_calls");
		if (lua_isnil(L, -1))
			cfg->minimum_calls = cfg->window_size;
		lua_pop(L, 1);
	}
	opt_rate(L, idx, "failure_rate_threshold", &cfg->failure_rate_threshold);
	opt_rate(L, idx, "slow_call_rate_threshold", &cfg->slow_call_rate_threshold);
	opt_number(L, idx, "slow_call_duration", &cfg->slow_call_duration);
	opt_count(L, idx, "consecutive_failures", &cfg->consecutive_failures, 1);
	opt_count(L, idx, "half_open_calls", &cfg->half_open_calls, 0);
	opt_number(L, idx, "open_duration", &cfg->open_duration);
	opt_number(L, idx, "open_duration_factor", &cfg->open_duration_factor);
	opt_number(L, idx, "open_duration_max", &cfg->open_duration_max);
	{
		/* The cap follows a long open_duration up unless given. */
		lua_getfield(L, idx, "open_duration_max");
		if (lua_isnil(L, -1) && cfg->open_duration_max < cfg->open_duration)
			cfg->open_duration_max = cfg->open_duration;
		lua_pop(L, 1);
	}
	opt_number(L, idx, "open_duration_jitter", &cfg->open_duration_jitter);
	opt_number(L, idx, "probe_timeout", &cfg->probe_timeout);

	msg = brk_config_check(cfg);
	if (msg)
		luaL_error(L, "breaker config: bad value for %s", msg);
}

static void push_config(lua_State *L, const brk_config *c)
{
	lua_createtable(L, 0, 14);
	lua_pushstring(L, c->window_type == BRK_WINDOW_TIME ? "time" : "count");
	lua_setfield(L, -2, "window_type");
#define SETN(name, v) (lua_pushnumber(L, (lua_Number)(v)), lua_setfield(L, -2, name))
#define SETRATE(name, v) ((v) < 0 ? lua_pushboolean(L, 0) : lua_pushnumber(L, (v)), lua_setfield(L, -2, name))
	SETN("window_size", c->window_size);
	SETN("window_buckets", c->window_buckets);
	SETN("minimum_calls", c->minimum_calls);
	SETRATE("failure_rate_threshold", c->failure_rate_threshold);
	SETRATE("slow_call_rate_threshold", c->slow_call_rate_threshold);
	SETN("slow_call_duration", c->slow_call_duration);
	if (c->consecutive_failures == 0)
		lua_pushboolean(L, 0);
	else
		lua_pushnumber(L, c->consecutive_failures);
	lua_setfield(L, -2, "consecutive_failures");
	SETN("half_open_calls", c->half_open_calls);
	SETN("open_duration", c->open_duration);
	SETN("open_duration_factor", c->open_duration_factor);
	SETN("open_duration_max", c->open_duration_max);
	SETN("open_duration_jitter", c->open_duration_jitter);
	SETN("probe_timeout", c->probe_timeout);
}

/* ======================================================================
 * Module functions
 * ====================================================================== */

/* core.new([config]) -> breaker userdata. Raises on a bad config, naming the
 * key and what it expected. */
static int l_new(lua_State *L)
{
	brk_config cfg;
	const char *err = NULL;
	lbrk *box;

	read_config(L, 1, &cfg);
	box = (lbrk *)lua_newuserdata(L, sizeof(*box));
	box->b = NULL;
	box->owned = 1;
	luaL_getmetatable(L, BREAKER_MT);
	lua_setmetatable(L, -2);
	box->b = brk_new(&cfg, &err);
	if (box->b == NULL)
		return luaL_error(L, "breaker: %s", err ? err : "cannot create");
	return 1;
}

/* core.validate(config) -> normalised config table (every key filled). */
static int l_validate(lua_State *L)
{
	brk_config cfg;
	read_config(L, 1, &cfg);
	push_config(L, &cfg);
	return 1;
}

/* core.defaults() -> the default config as a table. */
static int l_defaults(lua_State *L)
{
	brk_config cfg;
	brk_config_default(&cfg);
	push_config(L, &cfg);
	return 1;
}

static int l_now(lua_State *L)
{
	lua_pushnumber(L, brk_now());
	return 1;
}

static int l_now_precise(lua_State *L)
{
	lua_pushnumber(L, brk_now_precise());
	return 1;
}

/* core.clock_set(frozen, seconds): freeze the clock (tests) or release it. */
static int l_clock_set(lua_State *L)
{
	int frozen = lua_toboolean(L, 1);
	double t = luaL_optnumber(L, 2, 0);
	if (frozen && !(t >= 0 && t <= 1e9))
		return luaL_argerror(L, 2, "expected seconds in [0, 1e9]");
	brk_clock_set(frozen, t);
	return 0;
}

static int l_clock_frozen(lua_State *L)
{
	lua_pushboolean(L, brk_clock_frozen());
	return 1;
}

/* core.sleep(seconds): blocks the calling thread. */
static int l_sleep(lua_State *L)
{
	double s = luaL_checknumber(L, 1);
	if (!(s >= 0))
		return luaL_argerror(L, 1, "expected seconds >= 0");
	brk_sleep(s);
	return 0;
}

/* ======================================================================
 * Breaker methods
 * ====================================================================== */

/* b:allow() -> permit | nil, retry_after */
static int m_allow(lua_State *L)
{
	double p = brk_allow(check_breaker(L, 1));
	if (p > 0) {
		lua_pushnumber(L, p);
		return 1;
	}
	lua_pushnil(L);
	lua_pushnumber(L, -p - 1);
	return 2;
}

/* b:record(permit, outcome, latency [, retry_after]) */
static int m_record(lua_State *L)
{
	brk_t *b = check_breaker(L, 1);
	double permit = luaL_checknumber(L, 2);
	int outcome = check_outcome(L, 3);
	double latency = luaL_optnumber(L, 4, 0);
	double ra = luaL_optnumber(L, 5, 0);
	if (!(latency >= 0))
		return luaL_argerror(L, 4, "expected a latency in seconds >= 0");
	if (!(ra >= 0))
		return luaL_argerror(L, 5, "expected retry_after in seconds >= 0");
	brk_record(b, permit, outcome, latency, ra);
	return 0;
}

static int m_state(lua_State *L)
{
	lua_pushstring(L, brk_state_name(brk_state(check_breaker(L, 1))));
	return 1;
}

static int m_generation(lua_State *L)
{
	lua_pushnumber(L, brk_generation(check_breaker(L, 1)));
	return 1;
}

static int m_force_open(lua_State *L)
{
	brk_force_open(check_breaker(L, 1));
	return 0;
}

static int m_disable(lua_State *L)
{
	brk_disable(check_breaker(L, 1));
	return 0;
}

static int m_reset(lua_State *L)
{
	brk_reset(check_breaker(L, 1));
	return 0;
}

static int m_config(lua_State *L)
{
	push_config(L, brk_get_config(check_breaker(L, 1)));
	return 1;
}

/* b:stats() -> table (see README for the fields). */
static int m_stats(lua_State *L)
{
	brk_stats st;
	brk_get_stats(check_breaker(L, 1), &st);
	lua_createtable(L, 0, 32);
	lua_pushstring(L, brk_state_name(st.state));
	lua_setfield(L, -2, "state");
	SETN("generation", st.generation);
	SETN("time_in_state", st.time_in_state);
	if (st.state == BRK_OPEN || st.state == BRK_FORCED_OPEN)
		SETN("retry_after", st.retry_after);
	SETN("transitions", st.transitions);
	SETN("opened", st.opened);
	SETN("lock_takeovers", st.lock_takeovers);
	SETN("calls", st.calls);
	SETN("successes", st.successes);
	SETN("failures", st.failures);
	SETN("slow", st.slow);
	SETN("ignored", st.ignored);
	SETN("rejected", st.rejected);
	SETN("late", st.late);
	if (st.failure_rate >= 0) {
		SETN("failure_rate", st.failure_rate);
		SETN("slow_rate", st.slow_rate);
	}
	SETN("consecutive_failures", st.consecutive_failures);
	SETN("half_open_granted", st.half_open_granted);
	SETN("half_open_succeeded", st.half_open_succeeded);
	SETN("reopen_level", st.reopen_level);
	SETN("open_duration", st.open_duration);
	SETN("total_calls", st.total_calls);
	SETN("total_failures", st.total_failures);
	SETN("total_rejected", st.total_rejected);
	if (st.latency_samples > 0) {
		lua_createtable(L, 0, 4);
		SETN("p50", st.p50);
		SETN("p90", st.p90);
		SETN("p99", st.p99);
		SETN("samples", st.latency_samples);
		lua_setfield(L, -2, "latency");
	}
	SETN("memory", st.memory);
	return 1;
}

/* b:transitions(since_generation) -> list of {generation, from, to, reason, at},
 * oldest first. */
static int m_transitions(lua_State *L)
{
	brk_t *b = check_breaker(L, 1);
	double d = luaL_optnumber(L, 2, 0);
	uint32_t since;
	if (!(d >= 0 && d <= 4294967295.0))
		return luaL_argerror(L, 2, "expected a generation in [0, 2^32)");
	since = (uint32_t)d;
	brk_transition t[BRK_LOG_SIZE];
	int i, n = brk_transitions(b, since, t, BRK_LOG_SIZE);
	lua_createtable(L, n, 0);
	for (i = 0; i < n; i++) {
		lua_createtable(L, 0, 5);
		SETN("generation", t[i].gen);
		lua_pushstring(L, brk_state_name(t[i].from));
		lua_setfield(L, -2, "from");
		lua_pushstring(L, brk_state_name(t[i].to));
		lua_setfield(L, -2, "to");
		lua_pushstring(L, brk_reason_name(t[i].reason));
		lua_setfield(L, -2, "reason");
		SETN("at", t[i].at);
		lua_rawseti(L, -2, i + 1);
	}
	return 1;
}

/* b:pointer() -> lightuserdata of the breaker block, for LuaJIT's FFI (the
 * facade casts it to brk_t* and keeps this userdata alive beside it). */
static int m_pointer(lua_State *L)
{
	lua_pushlightuserdata(L, check_breaker(L, 1));
	return 1;
}

/* b:close() and __gc: frees the breaker; idempotent. */
static int m_close(lua_State *L)
{
	lbrk *box = check_box(L, 1);
	if (box->b) {
		if (box->owned)
			brk_free(box->b);
		box->b = NULL; /* a region slot stays for the other processes */
	}
	return 0;
}

static int m_shared(lua_State *L)
{
	lua_pushboolean(L, brk_is_shared(check_breaker(L, 1)));
	return 1;
}

static int m_tostring(lua_State *L)
{
	lbrk *box = check_box(L, 1);
	if (box->b)
		lua_pushfstring(L, "breaker.core (%s): %p",
				brk_state_name(brk_state(box->b)), (void *)box->b);
	else
		lua_pushliteral(L, "breaker.core (closed)");
	return 1;
}


/* ======================================================================
 * Shared regions
 * ====================================================================== */

static brk_region *check_region(lua_State *L, int idx)
{
	return ((lregion *)luaL_checkudata(L, idx, REGION_MT))->r;
}

static void read_region_opts(lua_State *L, int idx, brk_region_opts *o)
{
	brk_region_opts_default(o);
	if (lua_isnoneornil(L, idx))
		return;
	luaL_checktype(L, idx, LUA_TTABLE);
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
		if (strcmp(k, "capacity") && strcmp(k, "max_window") && strcmp(k, "max_buckets") &&
		    strcmp(k, "name"))
			luaL_error(L, "shared region: unknown option '%s'", k);
		lua_pop(L, 1);
	}
	opt_count(L, idx, "capacity", &o->capacity, 0);
	opt_count(L, idx, "max_window", &o->max_window, 0);
	opt_count(L, idx, "max_buckets", &o->max_buckets, 0);
}

static void push_region(lua_State *L, brk_region *r)
{
	lregion *box = (lregion *)lua_newuserdata(L, sizeof(*box));
	box->r = r;
	luaL_getmetatable(L, REGION_MT);
	lua_setmetatable(L, -2);
}

/* core.region_anon(key, opts) -> region: the anonymous region of `key`,
 * made now or found again (a reload runs init_by_lua anew). Make it before
 * fork for the children to share it. */
static int l_region_anon(lua_State *L)
{
	const char *key = check_cstring(L, 1, "shared region: the key");
	brk_region_opts o;
	const char *err = NULL;
	brk_region *r;
	read_region_opts(L, 2, &o);
	r = brk_region_anon(key, &o, &err);
	if (!r)
		return luaL_error(L, "shared region: %s", err);
	push_region(L, r);
	return 1;
}

/* core.region_named(name, opts) -> region, created: joins or makes the
 * named region. */
static int l_region_named(lua_State *L)
{
	const char *name = check_cstring(L, 1, "shared region: the name");
	brk_region_opts o;
	const char *err = NULL;
	int created = 0;
	brk_region *r;
	read_region_opts(L, 2, &o);
	r = brk_region_named(name, &o, &created, &err);
	if (!r) {
		lua_pushnil(L);
		lua_pushfstring(L, "shared region '%s': %s", name, err);
		return 2;
	}
	push_region(L, r);
	lua_pushboolean(L, created);
	return 2;
}

/* core.region_unlink(name) -> true | nil, err */
static int l_region_unlink(lua_State *L)
{
	const char *name = check_cstring(L, 1, "shared region: the name");
	if (brk_region_unlink(name) != 0) {
		lua_pushnil(L);
		lua_pushfstring(L, "cannot unlink shared region '%s'", name);
		return 2;
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* region:breaker(name, config) -> breaker userdata, created. Raises on a
 * bad config, a name too long for a slot, a config that differs from the
 * one the breaker was made with, or a full region. */
static int r_breaker(lua_State *L)
{
	brk_region *r = check_region(L, 1);
	const char *name = check_cstring(L, 2, "shared breaker: the name");
	brk_config cfg;
	char errbuf[256];
	int created = 0;
	lbrk *box;
	brk_t *b;

	read_config(L, 3, &cfg);
	b = brk_region_breaker(r, name, &cfg, &created, errbuf, sizeof(errbuf));
	if (!b)
		return luaL_error(L, "shared breaker: %s", errbuf);
	box = (lbrk *)lua_newuserdata(L, sizeof(*box));
	box->b = b;
	box->owned = 0;
	luaL_getmetatable(L, BREAKER_MT);
	lua_setmetatable(L, -2);
	/* Anchor the region: the environment table keeps its userdata alive. */
	lua_createtable(L, 1, 0);
	lua_pushvalue(L, 1);
	lua_rawseti(L, -2, 1);
	lua_setfenv(L, -2);
	lua_pushboolean(L, created);
	return 2;
}

/* region:names() -> list of the breaker names in the region. */
static int r_names(lua_State *L)
{
	brk_region *r = check_region(L, 1);
	uint32_t i, cap = brk_region_capacity(r);
	int n = 0;
	lua_newtable(L);
	for (i = 0; i < cap; i++) {
		const char *name = brk_region_slot_name(r, i, NULL);
		if (name) {
			lua_pushstring(L, name);
			lua_rawseti(L, -2, ++n);
		}
	}
	return 1;
}

/* region:info() -> { name, named, capacity, used, bytes, slot_bytes } */
static int r_info(lua_State *L)
{
	brk_region *r = check_region(L, 1);
	lua_createtable(L, 0, 6);
	lua_pushstring(L, brk_region_name(r));
	lua_setfield(L, -2, "name");
	lua_pushboolean(L, brk_region_is_named(r));
	lua_setfield(L, -2, "named");
	SETN("capacity", brk_region_capacity(r));
	SETN("used", brk_region_used(r));
	SETN("bytes", brk_region_bytes(r));
	SETN("slot_bytes", brk_region_slot_bytes(r));
	return 1;
}

static int r_tostring(lua_State *L)
{
	brk_region *r = check_region(L, 1);
	lua_pushfstring(L, "breaker.region '%s' (%d/%d)", brk_region_name(r),
			(int)brk_region_used(r), (int)brk_region_capacity(r));
	return 1;
}

static const luaL_Reg region_methods[] = {
	{ "breaker", r_breaker },
	{ "names", r_names },
	{ "info", r_info },
	{ NULL, NULL }
};

static const luaL_Reg methods[] = {
	{ "allow", m_allow },
	{ "record", m_record },
	{ "state", m_state },
	{ "generation", m_generation },
	{ "force_open", m_force_open },
	{ "disable", m_disable },
	{ "reset", m_reset },
	{ "config", m_config },
	{ "stats", m_stats },
	{ "transitions", m_transitions },
	{ "pointer", m_pointer },
	{ "shared", m_shared },
	{ "close", m_close },
	{ NULL, NULL }
};

static const luaL_Reg functions[] = {
	{ "new", l_new },
	{ "validate", l_validate },
	{ "defaults", l_defaults },
	{ "now", l_now },
	{ "now_precise", l_now_precise },
	{ "clock_set", l_clock_set },
	{ "clock_frozen", l_clock_frozen },
	{ "sleep", l_sleep },
	{ "region_anon", l_region_anon },
	{ "region_named", l_region_named },
	{ "region_unlink", l_region_unlink },
	{ NULL, NULL }
};

int luaopen_breaker_core(lua_State *L);

/* Pins this shared object in memory. The list of shared regions is a
 * process-wide static (shm.c): when nginx reloads, its master closes the
 * Lua VM, which would dlclose this library and forget every region, and
 * init_by_lua could not find them again. RTLD_NODELETE keeps it loaded. */
static void pin_library(void)
{
	Dl_info info;
	if (dladdr((void *)(uintptr_t)&luaopen_breaker_core, &info) && info.dli_fname)
		(void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

/* require "breaker.core" */
int luaopen_breaker_core(lua_State *L)
{
	pin_library();
	if (luaL_newmetatable(L, BREAKER_MT)) {
		lua_newtable(L);
		luaL_setfuncs(L, methods, 0);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, m_close);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, m_tostring);
		lua_setfield(L, -2, "__tostring");
		lua_pushliteral(L, BREAKER_MT);
		lua_setfield(L, -2, "__name");
	}
	lua_pop(L, 1);
	if (luaL_newmetatable(L, REGION_MT)) {
		lua_newtable(L);
		luaL_setfuncs(L, region_methods, 0);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, r_tostring);
		lua_setfield(L, -2, "__tostring");
	}
	lua_pop(L, 1);

	luaL_newlib(L, functions);
	lua_pushliteral(L, BREAKER_VERSION);
	lua_setfield(L, -2, "_VERSION");
	return 1;
}
