/*
 * breaker.h - circuit breaker state machine, in plain C (no Lua).
 *
 * A breaker is one flat block of memory with no pointers inside, so it can be
 * placed in malloc'd memory or in a region shared by several processes. The
 * hot calls (brk_allow, brk_record) are part of the C ABI so that LuaJIT can
 * call them through FFI; lbreaker.c binds the rest for the classic Lua API.
 *
 * Time is a monotonic clock in nanoseconds (CLOCK_MONOTONIC_COARSE for
 * state timers and window buckets). Tests can freeze it with brk_clock_set().
 *
 * Threads: a private breaker (brk_new) takes no lock; use it from one thread
 * at a time (one Lua state). A shared breaker (in a region, shm.h) takes
 * its own lock in every call and may be used from any process or thread.
 * The frozen test clock is process-wide and meant for single-threaded tests.
 */
#ifndef BREAKER_H
#define BREAKER_H

#include <stddef.h>
#include <stdint.h>

/* States. The numbers are part of the FFI ABI (lua/breaker/init.lua). */
enum brk_state {
	BRK_CLOSED = 0,
	BRK_OPEN = 1,
	BRK_HALF_OPEN = 2,
	BRK_FORCED_OPEN = 3,
	BRK_DISABLED = 4
};

/* Outcomes of a call, as passed to brk_record. */
enum brk_outcome {
	BRK_SUCCESS = 0,
	BRK_FAILURE = 1,
	BRK_IGNORED = 2
};

/* Why a transition happened. */
enum brk_reason {
	BRK_R_NONE = 0,
	BRK_R_FAILURE_RATE,
	BRK_R_SLOW_CALL_RATE,
	BRK_R_CONSECUTIVE_FAILURES,
	BRK_R_OPEN_ELAPSED,      /* open -> half_open once the open duration ran out */
	BRK_R_PROBE_FAILED,      /* half_open -> open */
	BRK_R_PROBE_SLOW,        /* half_open -> open: a probe was slow */
	BRK_R_PROBES_SUCCEEDED,  /* half_open -> closed */
	BRK_R_PROBE_EXPIRED,     /* half_open -> half_open: permits not returned in time */
	BRK_R_FORCED_OPEN,
	BRK_R_DISABLED,
	BRK_R_RESET,
	BRK_R_COUNT
};

enum brk_window { BRK_WINDOW_COUNT = 0, BRK_WINDOW_TIME = 1 };

/* Configuration. Rates are percentages; a negative threshold turns its rule
 * off. Durations are in seconds. brk_config_default fills the defaults. */
typedef struct brk_config {
	int window_type;                 /* BRK_WINDOW_COUNT or BRK_WINDOW_TIME */
	uint32_t window_size;            /* outcomes (count) or seconds (time) */
	uint32_t window_buckets;         /* time window: number of buckets */
	uint32_t minimum_calls;          /* calls in the window before rate rules apply */
	double failure_rate_threshold;   /* percent in (0, 100], < 0 = off */
	double slow_call_rate_threshold; /* percent in (0, 100], < 0 = off */
	double slow_call_duration;       /* seconds; a call this long or longer is slow */
	uint32_t consecutive_failures;   /* trips after this many in a row, 0 = off */
	uint32_t half_open_calls;        /* probes admitted in half_open */
	double open_duration;            /* seconds open before the first probe */
	double open_duration_factor;     /* growth per consecutive re-open, >= 1 */
	double open_duration_max;        /* cap of the escalated duration */
	double open_duration_jitter;     /* fraction in [0, 1): +- random share */
	double probe_timeout;            /* seconds after which unreturned probe permits expire */
} brk_config;

/* One state transition, as kept in the breaker's transition log. */
typedef struct brk_transition {
	uint32_t gen;          /* generation the transition started */
	uint8_t from, to;      /* enum brk_state */
	uint8_t reason, pad;   /* enum brk_reason */
	double at;             /* clock seconds */
} brk_transition;

#define BRK_LOG_SIZE 8
#define BRK_HIST_BUCKETS 96

/* A snapshot of a breaker, filled by brk_stats. "Window" counts cover the
 * current window (count: last window_size outcomes; time: the buckets of the
 * last window_size seconds); rejected, ignored and late count since the
 * window was last cleared (count window) or within the window (time). */
typedef struct brk_stats {
	int state;
	uint32_t generation;
	double time_in_state;            /* seconds */
	double retry_after;              /* seconds until a probe, when open */
	uint64_t transitions;
	uint64_t opened;                 /* times the breaker went to open */
	uint64_t calls, successes, failures, slow, ignored, rejected, late;
	double failure_rate, slow_rate;  /* percent of calls; -1 below minimum_calls */
	uint32_t consecutive_failures;
	uint32_t half_open_granted, half_open_succeeded;
	uint32_t reopen_level;
	double open_duration;            /* duration of the current/last open period */
	uint64_t total_calls, total_failures, total_rejected;
	double p50, p90, p99;            /* latency seconds, -1 without samples */
	uint32_t latency_samples;
	size_t memory;                   /* bytes of the breaker's block */
	uint64_t lock_takeovers;         /* shared: locks taken over from dead holders */
} brk_stats;

typedef struct brk brk_t;

/* ---- lifecycle --------------------------------------------------------- */

/* Fills cfg with the documented defaults. */
void brk_config_default(brk_config *cfg);

/* Checks cfg. Returns NULL when valid, else a static message naming the key
 * and what it expected. */
const char *brk_config_check(const brk_config *cfg);

/* Bytes a breaker with this (valid) config occupies. */
size_t brk_size(const brk_config *cfg);

/* Initialises a breaker in caller-provided memory of brk_size(cfg) bytes. */
void brk_init(brk_t *b, const brk_config *cfg);

/* Allocates and initialises a breaker; NULL if cfg is invalid (message in
 * *err) or memory is short. Free with brk_free. */
brk_t *brk_new(const brk_config *cfg, const char **err);
void brk_free(brk_t *b);

/* The config a breaker was made with. */
const brk_config *brk_get_config(const brk_t *b);

/* ---- hot path (C ABI used through LuaJIT FFI) --------------------------- */

/* Asks to make a call. Returns a permit (> 0) to pass to brk_record, or a
 * value <= 0 when rejected: -(1 + seconds until a probe may be allowed),
 * -inf while forced open. Moves open to half_open once the open time ran
 * out. Never blocks. */
double brk_allow(brk_t *b);

/* Records the outcome of a call made under `permit` with its latency in
 * seconds. retry_after (seconds, 0 for none) stretches the open duration if
 * this outcome opens the breaker. A permit from an earlier generation only
 * counts as late. */
void brk_record(brk_t *b, double permit, int outcome, double latency, double retry_after);

/* Current generation and state (cheap reads). */
uint32_t brk_generation(const brk_t *b);
int brk_state(const brk_t *b);

/* ---- operator calls ---------------------------------------------------- */

void brk_force_open(brk_t *b);
void brk_disable(brk_t *b);
void brk_reset(brk_t *b);

/* ---- inspection -------------------------------------------------------- */

void brk_get_stats(brk_t *b, brk_stats *st);

/* Copies the transitions with generation > since (oldest first) into out,
 * at most max of them; returns how many. Older ones may have been
 * overwritten: the log keeps BRK_LOG_SIZE entries. */
int brk_transitions(brk_t *b, uint32_t since, brk_transition *out, int max);

const char *brk_state_name(int state);
const char *brk_reason_name(int reason);

/* ---- shared blocks (used by shm.c) -------------------------------------- */

/* Marks a block as shared between processes: from then on every call takes
 * its lock. */
void brk_set_shared(brk_t *b);
int brk_is_shared(const brk_t *b);

/* 1 if the memory at b holds an initialised breaker of at most avail bytes. */
int brk_check_block(const brk_t *b, size_t avail);

/* The cross-process lock used for shared blocks and region headers: a word
 * holding the holder's pid; a dead holder's lock is taken over. */
void brk_lock_word(uint32_t *word);
void brk_unlock_word(uint32_t *word);

/* For specs only: leaves b as a process killed inside a record would. It
 * takes b's lock, writes a failure into the next count-window slot without
 * updating the running counts, and returns with the lock still held (the
 * caller then exits). 0, or -1 unless b is a shared count-window breaker. */
int brk_debug_half_record(brk_t *b);

/* For specs only: counts n outcomes of kind `what` in b's window at once, as
 * n calls would, without the latency histogram and without checking the
 * trip rules: BRK_SUCCESS or BRK_FAILURE (time window only: a count window
 * holds at most window_size of them), BRK_IGNORED, BRK_DEBUG_REJECTED or
 * BRK_DEBUG_LATE. 0, or -1 for a kind it cannot count. */
#define BRK_DEBUG_REJECTED 3
#define BRK_DEBUG_LATE 4
int brk_debug_count(brk_t *b, int what, uint64_t n);

/* ---- clock ------------------------------------------------------------- */

/* Monotonic clock in seconds: coarse (timers) and precise (latency). */
double brk_now(void);
double brk_now_precise(void);

/* Freezes the clock of this process at `seconds` (both clocks), or returns
 * to the real clock when frozen is 0. For tests. */
void brk_clock_set(int frozen, double seconds);
int brk_clock_frozen(void);

/* Sleeps the calling thread for `seconds` (restarting after signals). */
void brk_sleep(double seconds);

#endif
