/*
 * shm.h - shared-memory regions holding breakers by name (no Lua).
 *
 * A region is one mapping: a header, then `capacity` fixed-size slots, each
 * a name and a breaker block (breaker.c) marked shared. Two kinds:
 *
 *  - anonymous: MAP_SHARED|MAP_ANONYMOUS, made before fork (nginx's
 *    init_by_lua), so every child sees it. Kept in a per-process list by
 *    key, so running init_by_lua again (nginx -s reload) finds and reuses it.
 *  - named: shm_open("/breaker.<name>"), joined by any process that opens
 *    the same name; it lives until brk_region_unlink.
 *
 * Mappings are never unmapped while the process lives: breaker objects may
 * still point into them, and a reload must find them again.
 */
#ifndef BREAKER_SHM_H
#define BREAKER_SHM_H

#include <stddef.h>
#include <stdint.h>

#include "breaker.h"

#define BRK_NAME_MAX 63   /* bytes of a breaker name in a region */
#define BRK_REGION_NAME_MAX 200

typedef struct brk_region brk_region;

/* Region creation options. */
typedef struct brk_region_opts {
	uint32_t capacity;        /* number of breakers it can hold */
	uint32_t max_window;      /* largest count window (outcomes) a slot holds */
	uint32_t max_buckets;     /* largest time window (buckets) a slot holds */
} brk_region_opts;

void brk_region_opts_default(brk_region_opts *o);

/* Finds the anonymous region of `key` made earlier by this process (or its
 * parent before fork) or makes it. NULL with *err on failure. */
brk_region *brk_region_anon(const char *key, const brk_region_opts *o, const char **err);

/* Opens the named region, making it if it does not exist yet. A region that
 * exists keeps its own layout; *created tells which happened. A name this
 * process mapped before gives the same mapping while the name still names
 * that object; after brk_region_unlink it gives the current object (made
 * anew if need be), and the old mapping stays for the breakers in it. */
brk_region *brk_region_named(const char *name, const brk_region_opts *o, int *created,
			     const char **err);

/* Removes a named region's name (processes that have it mapped keep it). */
int brk_region_unlink(const char *name);

/* Finds the breaker `name`, or makes it with cfg if absent. An existing one
 * whose config differs is an error naming the first differing key (written
 * into errbuf). *created tells whether it was made. */
brk_t *brk_region_breaker(brk_region *r, const char *name, const brk_config *cfg,
			  int *created, char *errbuf, size_t errlen);

/* Finds a breaker by name, or NULL. */
brk_t *brk_region_find(brk_region *r, const char *name);

/* Name of the breaker in slot i, or NULL if the slot is free; i < capacity. */
const char *brk_region_slot_name(brk_region *r, uint32_t i, brk_t **b);

/* Layout and use. */
uint32_t brk_region_capacity(const brk_region *r);
uint32_t brk_region_used(brk_region *r);
size_t brk_region_bytes(const brk_region *r);
size_t brk_region_slot_bytes(const brk_region *r);
const char *brk_region_name(const brk_region *r);
int brk_region_is_named(const brk_region *r);

#endif
