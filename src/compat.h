/*
 * compat.h - Lua 5.2+ auxiliary functions for Lua 5.1 and LuaJIT.
 *
 * LuaJIT 2.1's lauxlib does have luaL_setfuncs and luaL_newlib, but plain
 * Lua 5.1 does not: a module built against LuaJIT's headers that called them
 * would fail to load in lua5.1 with an undefined symbol. The shim below is
 * used for both, so one shared object serves either interpreter.
 */
#ifndef BREAKER_COMPAT_H
#define BREAKER_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if !defined(LUA_VERSION_NUM) || LUA_VERSION_NUM < 502
/* Register every function of l into the table on top of the stack, with nup
 * upvalues shared by all of them (taken from the stack below the table). */
static inline void compat_setfuncs(lua_State *L, const luaL_Reg *l, int nup)
{
	luaL_checkstack(L, nup + 1, "too many upvalues");
	for (; l->name != NULL; l++) {
		int i;
		for (i = 0; i < nup; i++)
			lua_pushvalue(L, -nup);
		lua_pushcclosure(L, l->func, nup);
		lua_setfield(L, -(nup + 2), l->name);
	}
	lua_pop(L, nup);
}
#undef luaL_setfuncs
#undef luaL_newlib
#define luaL_setfuncs(L, l, n) compat_setfuncs((L), (l), (n))
#define luaL_newlib(L, l) (lua_newtable(L), compat_setfuncs((L), (l), 0))
#ifndef lua_rawlen
#define lua_rawlen(L, i) lua_objlen((L), (i))
#endif
#endif

#endif
