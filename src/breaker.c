/*
 * breaker.c - circuit breaker state machine (see breaker.h).
 *
 * Layout of a breaker: struct brk followed by its window, either
 * window_size outcome bytes (count window) or window_buckets time buckets.
 * Nothing inside is a pointer, so the block can move between processes.
 */
#include "breaker.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BRK_MAGIC 0x42524b31u /* "BRK1" */
#define BRK_F_SHARED 0x1u
#define NS 1000000000.0
/* Durations and clock values are kept in int64 nanoseconds: at most 1e9 s
 * (31 years) each, so sums of two stay far from overflow. */
#define MAX_SECONDS 1e9
#define RETRY_AFTER_MAX 3600.0  /* the longest a retry_after stretches an open */

/* Count-window slot: one byte per outcome. */
#define SLOT_USED 0x01
#define SLOT_FAIL 0x02
#define SLOT_SLOW 0x04

/* Permit encoding: generation * 4 + kind, exact as a double up to 2^51. */
#define PERMIT_CLOSED 1
#define PERMIT_PROBE 2
#define PERMIT_DISABLED 3

/* The histogram halves every bucket once it holds this many samples in
 * all (hist_n), so it holds 8-16 thousand and the percentiles follow
 * roughly the last 8-16 thousand calls whatever their spread; no uint16
 * bucket can pass 16384. */
#define HIST_DECAY 16384u
/* Histogram unit: 8 microseconds. */
#define HIST_UNITS_PER_SEC 125000.0

/* A time-window bucket. Which slice of time it holds follows from its
 * slot and the head's epoch. The rule counts are 64-bit (one long bucket
 * of a busy shared breaker can pass 2^32 calls); the stats-only counts
 * stop at UINT32_MAX, within the bucket and so within the window. */
typedef struct brk_bucket {
	uint64_t calls, failures, slow;   /* calls = successes + failures */
	uint32_t ignored, rejected, late;
	uint32_t pad;
} brk_bucket;

struct brk {
	/* Read by LuaJIT FFI as brk_head_t: keep these two first. */
	int32_t state;
	uint32_t gen;

	uint32_t magic;
	uint32_t size;                  /* bytes of the whole block */
	uint32_t lock;                  /* shared blocks: pid of the holder, 0 = free */
	uint32_t flags;                 /* BRK_F_SHARED */
	brk_config cfg;

	int64_t state_since;            /* ns */
	int64_t open_until;             /* ns, while open */
	int64_t open_ns;                /* duration of the current/last open period */
	int64_t probe_progress;         /* ns of the last half-open grant or result */
	int64_t bucket_ns;              /* time window: width of a bucket */
	int64_t head_epoch;             /* time window: newest bucket epoch */
	int64_t head_end;               /* time window: ns when the head bucket ends */
	uint32_t head_slot;             /* time window: slot of the head bucket */

	uint32_t probes_granted, probes_succeeded;
	uint32_t consec_failures;
	uint32_t reopen_level;

	/* Count window: ring position, filled slots and running totals. The
	 * time window keeps its totals here too (sum of live buckets). 64-bit:
	 * a time window's or a long-open count window's totals pass 2^32. */
	uint32_t pos;
	uint64_t w_calls, w_failures, w_slow;
	uint64_t w_ignored, w_rejected, w_late;

	uint64_t transitions, opened;
	uint64_t lock_takeovers;        /* shared: locks taken over from dead holders */
	uint64_t total_calls, total_failures, total_rejected;
	uint64_t rng;

	uint32_t log_next;              /* total entries ever written */
	/* Time window: buckets holding calls left the window since the trip
	 * rules last ran, so the rates may have moved. Set by time_advance
	 * (whoever moves the head: a record, stats, a rejection), cleared
	 * when record_slow runs the rules; the fast path declines while set. */
	uint8_t rates_dirty;
	uint16_t hist_n;                /* samples in hist, < HIST_DECAY */
	brk_transition log[BRK_LOG_SIZE];

	uint16_t hist[BRK_HIST_BUCKETS];

	/* Window storage: uint8_t[window_size] or brk_bucket[window_buckets]. */
	_Alignas(8) unsigned char window[];
};

/* ======================================================================
 * Clock
 * ====================================================================== */

static int clock_frozen;
static int64_t clock_frozen_ns;

static int64_t ts_ns(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

/* clock_gettime as the kernel's vDSO exports it, called directly: glibc's
 * wrapper adds a few nanoseconds to every read, and an open breaker's
 * rejection is little more than one coarse clock read. Resolved on first
 * use; libc's clock_gettime where there is no vDSO (valgrind, non-Linux)
 * or it lacks the symbol. Both give the same clocks. */
typedef int (*gettime_fn)(clockid_t, struct timespec *);
static gettime_fn gettime_ptr;

static __attribute__((noinline, cold)) gettime_fn resolve_gettime(void)
{
	gettime_fn f = NULL;
	/* Only where the vDSO's function takes this build's struct timespec
	 * and dlsym gives a callable address: x86_64 and arm64. (32-bit ABIs
	 * have an old 32-bit-time entry point; ppc64 returns descriptors.) */
#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))
	void *h = dlopen("linux-vdso.so.1", RTLD_LAZY | RTLD_NOLOAD);
	if (h != NULL && sizeof(time_t) == 8) {
#if defined(__x86_64__)
		void *sym = dlsym(h, "__vdso_clock_gettime");
#else
		void *sym = dlsym(h, "__kernel_clock_gettime");
#endif
		memcpy(&f, &sym, sizeof(f));
		/* no dlclose: the vDSO stays mapped for the process's life */
	}
#endif
	if (f == NULL)
		f = clock_gettime;
	__atomic_store_n(&gettime_ptr, f, __ATOMIC_RELAXED);
	return f;
}

static inline void read_clock(clockid_t id, struct timespec *ts)
{
	gettime_fn f = __atomic_load_n(&gettime_ptr, __ATOMIC_RELAXED);
	if (f == NULL)
		f = resolve_gettime();
	if (f(id, ts) != 0 && f != clock_gettime)
		clock_gettime(id, ts);
}

static int64_t now_coarse_ns(void)
{
	struct timespec ts;
	if (clock_frozen)
		return clock_frozen_ns;
#ifdef CLOCK_MONOTONIC_COARSE
	read_clock(CLOCK_MONOTONIC_COARSE, &ts);
#else
	read_clock(CLOCK_MONOTONIC, &ts);
#endif
	return ts_ns(&ts);
}

static int64_t now_precise_ns(void)
{
	struct timespec ts;
	if (clock_frozen)
		return clock_frozen_ns;
	read_clock(CLOCK_MONOTONIC, &ts);
	return ts_ns(&ts);
}

double brk_now(void)
{
	return (double)now_coarse_ns() / NS;
}

double brk_now_precise(void)
{
	return (double)now_precise_ns() / NS;
}

void brk_clock_set(int frozen, double seconds)
{
	if (!(seconds >= 0 && seconds <= MAX_SECONDS))
		seconds = 0; /* the binding checks the range; stay defined anyway */
	clock_frozen_ns = (int64_t)llround(seconds * NS);
	clock_frozen = frozen != 0;
}

int brk_clock_frozen(void)
{
	return clock_frozen;
}

void brk_sleep(double seconds)
{
	struct timespec ts, rem;
	if (!(seconds > 0))
		return;
	if (seconds > 1e9)
		seconds = 1e9;
	ts.tv_sec = (time_t)seconds;
	ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * NS);
	if (ts.tv_nsec >= 1000000000)
		ts.tv_nsec = 999999999;
	while (nanosleep(&ts, &rem) != 0 && errno == EINTR)
		ts = rem;
}

/* ======================================================================
 * Configuration
 * ====================================================================== */

void brk_config_default(brk_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->window_type = BRK_WINDOW_COUNT;
	cfg->window_size = 20;
	cfg->window_buckets = 10;
	cfg->minimum_calls = 10;
	cfg->failure_rate_threshold = 50;
	cfg->slow_call_rate_threshold = -1;
	cfg->slow_call_duration = 60;
	cfg->consecutive_failures = 5;
	cfg->half_open_calls = 3;
	cfg->open_duration = 30;
	cfg->open_duration_factor = 1;
	cfg->open_duration_max = 600;
	cfg->open_duration_jitter = 0;
	cfg->probe_timeout = 120;
}

static int bad_rate(double r)
{
	return isnan(r) || (r >= 0 && (r <= 0 || r > 100));
}

static int bad_duration(double d)
{
	return !(d >= 0 && d <= MAX_SECONDS);
}

const char *brk_config_check(const brk_config *c)
{
	if (c->window_type != BRK_WINDOW_COUNT && c->window_type != BRK_WINDOW_TIME)
		return "window_type: expected \"count\" or \"time\"";
	if (c->window_size < 1)
		return "window_size: expected an integer >= 1";
	if (c->window_type == BRK_WINDOW_COUNT && c->window_size > 1000000)
		return "window_size: expected at most 1000000 outcomes for a count window";
	if (c->window_type == BRK_WINDOW_TIME && c->window_size > 86400)
		return "window_size: expected at most 86400 seconds for a time window";
	if (c->window_buckets < 1 || c->window_buckets > 3600)
		return "window_buckets: expected an integer in [1, 3600]";
	if (c->window_type == BRK_WINDOW_TIME &&
	    (double)c->window_size / c->window_buckets < 0.001)
		return "window_buckets: expected buckets of at least 1 ms (window_size / window_buckets)";
	if (c->window_type == BRK_WINDOW_COUNT && c->minimum_calls > c->window_size)
		return "minimum_calls: expected at most window_size for a count window";
	if (bad_rate(c->failure_rate_threshold))
		return "failure_rate_threshold: expected a percentage in (0, 100] or false";
	if (bad_rate(c->slow_call_rate_threshold))
		return "slow_call_rate_threshold: expected a percentage in (0, 100] or false";
	if (bad_duration(c->slow_call_duration) || c->slow_call_duration <= 0)
		return "slow_call_duration: expected seconds in (0, 1e9]";
	if (c->half_open_calls < 1 || c->half_open_calls > 1000000)
		return "half_open_calls: expected an integer in [1, 1000000]";
	if (bad_duration(c->open_duration))
		return "open_duration: expected seconds in [0, 1e9]";
	if (!(c->open_duration_factor >= 1 && c->open_duration_factor <= 1000))
		return "open_duration_factor: expected a number in [1, 1000]";
	if (bad_duration(c->open_duration_max) || c->open_duration_max < c->open_duration)
		return "open_duration_max: expected seconds in [open_duration, 1e9]";
	if (!(c->open_duration_jitter >= 0 && c->open_duration_jitter < 1))
		return "open_duration_jitter: expected a fraction in [0, 1)";
	if (bad_duration(c->probe_timeout) || c->probe_timeout <= 0)
		return "probe_timeout: expected seconds in (0, 1e9]";
	return NULL;
}

static size_t window_bytes(const brk_config *cfg)
{
	if (cfg->window_type == BRK_WINDOW_TIME)
		return (size_t)cfg->window_buckets * sizeof(brk_bucket);
	return ((size_t)cfg->window_size + 7) & ~(size_t)7;
}

size_t brk_size(const brk_config *cfg)
{
	return sizeof(struct brk) + window_bytes(cfg);
}

const brk_config *brk_get_config(const brk_t *b)
{
	return &b->cfg;
}

/* ======================================================================
 * Window
 * ====================================================================== */

static brk_bucket *buckets(brk_t *b)
{
	return (brk_bucket *)(void *)b->window;
}

/* Slot of a bucket epoch (epochs are >= 0 for a real clock; a test clock
 * may go below). */
static uint32_t slot_of(int64_t epoch, uint32_t n)
{
	int64_t r = epoch % (int64_t)n;
	return (uint32_t)(r < 0 ? r + n : r);
}

static int64_t floor_div(int64_t a, int64_t d)
{
	int64_t q = a / d;
	return (a % d != 0 && a < 0) ? q - 1 : q;
}

static void window_clear(brk_t *b, int64_t now)
{
	memset(b->window, 0, window_bytes(&b->cfg));
	b->pos = 0;
	b->w_calls = b->w_failures = b->w_slow = 0;
	b->w_ignored = b->w_rejected = b->w_late = 0;
	b->rates_dirty = 0;
	if (b->cfg.window_type == BRK_WINDOW_TIME) {
		int64_t e = floor_div(now, b->bucket_ns);
		b->head_epoch = e;
		b->head_end = (e + 1) * b->bucket_ns;
		b->head_slot = slot_of(e, b->cfg.window_buckets);
	}
}

/* Time window: moves the head to now's bucket, dropping the buckets that
 * fell out of the window from the running totals (and marking the rates
 * dirty when a dropped bucket held calls). */
static brk_bucket *time_advance(brk_t *b, int64_t now)
{
	uint32_t n = b->cfg.window_buckets;
	int64_t e;
	brk_bucket *bk = buckets(b);

	if (now < b->head_end)
		return &bk[b->head_slot]; /* still the head bucket (or clock went back) */
	e = floor_div(now, b->bucket_ns);
	if (e > b->head_epoch) {
		int64_t steps = e - b->head_epoch, i;
		if (steps > (int64_t)n)
			steps = n;
		for (i = 1; i <= steps; i++) {
			brk_bucket *x = &bk[slot_of(e - steps + i, n)];
			b->rates_dirty |= x->calls != 0;
			b->w_calls -= x->calls;
			b->w_failures -= x->failures;
			b->w_slow -= x->slow;
			b->w_ignored -= x->ignored;
			b->w_rejected -= x->rejected;
			b->w_late -= x->late;
			memset(x, 0, sizeof(*x));
		}
		b->head_epoch = e;
		b->head_end = (e + 1) * b->bucket_ns;
		b->head_slot = slot_of(e, n);
	}
	return &bk[b->head_slot];
}

/* Adds a success/failure to the window. Time buckets that expire on the
 * way set rates_dirty. */
static void window_add(brk_t *b, int failed, int slow, int64_t now)
{
	b->w_calls += 1;
	b->w_failures += (uint64_t)failed;
	b->w_slow += (uint64_t)slow;
	if (b->cfg.window_type == BRK_WINDOW_COUNT) {
		uint8_t *slot = &b->window[b->pos];
		uint8_t old = *slot;
		if (old & SLOT_USED) {
			b->w_calls -= 1;
			b->w_failures -= (old & SLOT_FAIL) ? 1 : 0;
			b->w_slow -= (old & SLOT_SLOW) ? 1 : 0;
		}
		*slot = (uint8_t)(SLOT_USED | (failed ? SLOT_FAIL : 0) | (slow ? SLOT_SLOW : 0));
		if (++b->pos == b->cfg.window_size)
			b->pos = 0;
	} else {
		brk_bucket *x = time_advance(b, now);
		x->calls++;
		x->failures += (uint64_t)failed;
		x->slow += (uint64_t)slow;
	}
}

/* Counts n rejected, ignored or late calls in the window. A time bucket's
 * count stops at UINT32_MAX, and the window's total counts what the bucket
 * took, so the total stays the sum of the live buckets. */
enum side_count { SIDE_IGNORED, SIDE_REJECTED, SIDE_LATE };

static void window_side(brk_t *b, enum side_count which, uint64_t n, int64_t now)
{
	uint64_t *total = which == SIDE_IGNORED ? &b->w_ignored :
	                  which == SIDE_REJECTED ? &b->w_rejected : &b->w_late;
	if (b->cfg.window_type == BRK_WINDOW_TIME) {
		brk_bucket *x = time_advance(b, now);
		uint32_t *c = which == SIDE_IGNORED ? &x->ignored :
		              which == SIDE_REJECTED ? &x->rejected : &x->late;
		uint64_t room = UINT32_MAX - *c;
		if (n > room)
			n = room;
		*c += (uint32_t)n;
	}
	*total += n;
}

/* ======================================================================
 * Latency histogram: 4 buckets per power of two of 8 us units, 8 us .. 268 s.
 * ====================================================================== */

static inline int hist_index(double latency)
{
	double u = latency * HIST_UNITS_PER_SEC;
	uint64_t bits;
	int idx;
	if (!(u >= 4.0))
		return u >= 1.0 ? (int)u : 0; /* 0..3, and 0 for NaN or below 0 */
	/* u >= 4: the exponent is floor(log2(u)) and the two mantissa bits
	 * below the leading one pick the quarter, read straight off the bits
	 * of the double (no conversion to an integer, no bit scan). */
	memcpy(&bits, &u, sizeof(bits));
	idx = ((int)((bits >> 52) & 0x7ff) - 1024) * 4 + (int)((bits >> 50) & 3);
	return idx < BRK_HIST_BUCKETS ? idx : BRK_HIST_BUCKETS - 1;
}

/* Bounds of bucket idx in 8 us units. */
static void hist_bounds(int idx, double *lo, double *hi)
{
	if (idx < 4) {
		*lo = idx;
		*hi = idx + 1;
	} else {
		int k = idx / 4 + 1, sub = idx % 4;
		*lo = ldexp(4 + sub, k - 2);
		*hi = ldexp(5 + sub, k - 2);
	}
}

/* Halves every bucket (rounding down) and counts what is left. Bucket
 * `keep` (the one the sample that made the halving due went to, or -1)
 * rounds up, so that sample is never erased by its own halving: a lone slow
 * call stays visible until a later halving. */
static __attribute__((noinline, cold)) void hist_decay(brk_t *b, int keep)
{
	uint32_t t = 0;
	int i;
	for (i = 0; i < BRK_HIST_BUCKETS; i++) {
		b->hist[i] = (uint16_t)((b->hist[i] + (i == keep)) / 2);
		t += b->hist[i];
	}
	b->hist_n = (uint16_t)t;
}

static inline void hist_add(brk_t *b, double latency)
{
	int i = hist_index(latency);
	b->hist[i]++;
	if (++b->hist_n >= HIST_DECAY)
		hist_decay(b, i);
}

static uint32_t hist_total(const brk_t *b)
{
	uint32_t t = 0;
	int i;
	for (i = 0; i < BRK_HIST_BUCKETS; i++)
		t += b->hist[i];
	return t;
}

static double hist_quantile(const brk_t *b, double q)
{
	double target, seen = 0;
	uint32_t total = hist_total(b);
	int i;
	if (total == 0)
		return -1;
	target = q * total;
	for (i = 0; i < BRK_HIST_BUCKETS; i++) {
		double c = b->hist[i];
		if (c > 0 && seen + c >= target) {
			double lo, hi;
			hist_bounds(i, &lo, &hi);
			return (lo + (hi - lo) * ((target - seen) / c)) / HIST_UNITS_PER_SEC;
		}
		seen += c;
	}
	return -1;
}

/* ======================================================================
 * Transitions
 * ====================================================================== */

static uint64_t rng_next(brk_t *b)
{
	uint64_t x = b->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	b->rng = x;
	return x;
}

/* A seed that differs per breaker even when the test clock is frozen and
 * malloc hands back the same address. */
static uint64_t seed(void)
{
	static uint64_t counter;
	struct timespec ts;
	uint64_t x;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	x = (uint64_t)ts_ns(&ts) ^ (__atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED) * 0x9E3779B97F4A7C15ull);
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	return x | 1;
}

static void transition(brk_t *b, int to, int reason, int64_t now)
{
	brk_transition *t = &b->log[b->log_next % BRK_LOG_SIZE];
	uint32_t gen = b->gen + 1;
	t->gen = gen;
	t->from = (uint8_t)b->state;
	t->to = (uint8_t)to;
	t->reason = (uint8_t)reason;
	t->pad = 0;
	t->at = (double)now / NS;
	b->log_next++;
	b->state_since = now;
	b->transitions++;
	b->probes_granted = b->probes_succeeded = 0;
	/* The state first, then the generation (release): a lock-free reader
	 * of a shared block reads the generation first (acquire), so a new
	 * generation always comes with its new state. */
	__atomic_store_n(&b->state, (int32_t)to, __ATOMIC_RELAXED);
	__atomic_store_n(&b->gen, gen, __ATOMIC_RELEASE);
}

/* The open duration of escalation level `level`: open_duration *
 * factor^level, capped at open_duration_max. An open_duration of 0 stays 0
 * at every level (0 * an overflowed pow() would be NaN). Otherwise the
 * power is in [1, inf] and the product in (0, inf], never NaN, and the cap
 * catches inf. */
static double escalated_duration(const brk_config *c, uint32_t level)
{
	double d = c->open_duration;
	if (d > 0 && level > 0 && c->open_duration_factor > 1)
		d *= pow(c->open_duration_factor, (double)level);
	return d < c->open_duration_max ? d : c->open_duration_max;
}

/* Opens the breaker; level 0 is the first open after closed. */
static void go_open(brk_t *b, int reason, double retry_after, int64_t now)
{
	const brk_config *c = &b->cfg;
	double d = escalated_duration(c, b->reopen_level);
	if (c->open_duration_jitter > 0) {
		double r = (double)(rng_next(b) >> 11) / 9007199254740992.0; /* [0,1) */
		d *= 1 + c->open_duration_jitter * (2 * r - 1);
	}
	/* a server's Retry-After stretches the open time, by an hour at most:
	 * a garbage or hostile value cannot lock a breaker for years */
	if (retry_after > RETRY_AFTER_MAX)
		retry_after = RETRY_AFTER_MAX;
	if (retry_after > d)
		d = retry_after;
	if (!(d <= MAX_SECONDS))
		d = MAX_SECONDS;
	transition(b, BRK_OPEN, reason, now);
	b->open_ns = (int64_t)(d * NS);
	/* now < 1e9 s (brk_clock_set and the real clock), so this cannot overflow */
	b->open_until = now + b->open_ns;
	b->opened++;
}

static void go_half_open(brk_t *b, int reason, int64_t now)
{
	transition(b, BRK_HALF_OPEN, reason, now);
	b->probe_progress = now;
}

static void go_closed(brk_t *b, int reason, int64_t now)
{
	transition(b, BRK_CLOSED, reason, now);
	b->reopen_level = 0;
	b->consec_failures = 0;
	window_clear(b, now);
}

/* Which trip rule the closed window breaks, or BRK_R_NONE. */
static int trip_reason(const brk_t *b)
{
	const brk_config *c = &b->cfg;
	if (c->consecutive_failures > 0 && b->consec_failures >= c->consecutive_failures)
		return BRK_R_CONSECUTIVE_FAILURES;
	if (b->w_calls >= c->minimum_calls && b->w_calls > 0) {
		double calls = b->w_calls;
		if (c->failure_rate_threshold > 0 &&
		    b->w_failures * 100.0 >= c->failure_rate_threshold * calls)
			return BRK_R_FAILURE_RATE;
		if (c->slow_call_rate_threshold > 0 &&
		    b->w_slow * 100.0 >= c->slow_call_rate_threshold * calls)
			return BRK_R_SLOW_CALL_RATE;
	}
	return BRK_R_NONE;
}

/* ======================================================================
 * Lifecycle
 * ====================================================================== */

void brk_init(brk_t *b, const brk_config *cfg)
{
	int64_t now = now_coarse_ns();
	memset(b, 0, brk_size(cfg));
	b->magic = BRK_MAGIC;
	b->size = (uint32_t)brk_size(cfg);
	b->cfg = *cfg;
	b->state = BRK_CLOSED;
	b->gen = 1;
	b->state_since = now;
	b->bucket_ns = (int64_t)((double)cfg->window_size * NS / cfg->window_buckets);
	if (b->bucket_ns < 1)
		b->bucket_ns = 1;
	b->rng = seed();
	window_clear(b, now);
}

brk_t *brk_new(const brk_config *cfg, const char **err)
{
	brk_t *b;
	const char *msg = brk_config_check(cfg);
	if (msg) {
		if (err)
			*err = msg;
		return NULL;
	}
	b = malloc(brk_size(cfg));
	if (!b) {
		if (err)
			*err = "out of memory";
		return NULL;
	}
	brk_init(b, cfg);
	return b;
}

void brk_free(brk_t *b)
{
	if (b) {
		b->magic = 0;
		free(b);
	}
}

/* ======================================================================
 * Hot path
 * ====================================================================== */

static double permit_of(const brk_t *b, int kind)
{
	return (double)b->gen * 4.0 + kind;
}

static double reject(brk_t *b, double wait, int64_t now)
{
	b->total_rejected++;
	window_side(b, SIDE_REJECTED, 1, now);
	return -(1.0 + wait);
}

static double allow_nl(brk_t *b)
{
	int64_t now;
	switch (b->state) {
	case BRK_CLOSED:
		return permit_of(b, PERMIT_CLOSED);
	case BRK_DISABLED:
		return permit_of(b, PERMIT_DISABLED);
	case BRK_FORCED_OPEN:
		b->total_rejected++;
		window_side(b, SIDE_REJECTED, 1, b->cfg.window_type == BRK_WINDOW_TIME ? now_coarse_ns() : 0);
		return -HUGE_VAL;
	case BRK_OPEN:
		now = now_coarse_ns();
		if (now < b->open_until)
			return reject(b, (double)(b->open_until - now) * (1.0 / NS), now);
		go_half_open(b, BRK_R_OPEN_ELAPSED, now);
		break;
	default: /* BRK_HALF_OPEN */
		now = now_coarse_ns();
		break;
	}
	/* half_open: probes whose results never came back (a crashed or hung
	 * caller) expire, and a fresh half-open generation starts. */
	if (b->probes_granted > b->probes_succeeded &&
	    now - b->probe_progress >= (int64_t)(b->cfg.probe_timeout * NS))
		go_half_open(b, BRK_R_PROBE_EXPIRED, now);
	if (b->probes_granted < b->cfg.half_open_calls) {
		b->probes_granted++;
		b->probe_progress = now;
		return permit_of(b, PERMIT_PROBE);
	}
	return reject(b, 0, now);
}

/* n + 1, but never past UINT32_MAX (a count a long run can reach). */
static inline uint32_t sat_inc(uint32_t n)
{
	return n + (n != UINT32_MAX);
}

/* Everything but the fast path of brk_record. */
static __attribute__((noinline)) void
record_slow(brk_t *b, double permit, int outcome, double latency, double retry_after)
{
	int64_t pi;
	int kind;
	uint32_t pgen;
	int slow, failed;
	int64_t now = 0;
	int have_now = 0;

	if (!(permit > 0 && permit < 9007199254740992.0))
		return; /* a rejection is not a call */
	pi = (int64_t)permit;


	kind = (int)(pi & 3);
	pgen = (uint32_t)(pi >> 2);
	if (!(latency >= 0))
		latency = 0;
	hist_add(b, latency);
	if (b->cfg.window_type == BRK_WINDOW_TIME || b->state == BRK_HALF_OPEN) {
		now = now_coarse_ns();
		have_now = 1;
	}

	/* A result of an earlier generation is late. So is one of this
	 * generation that is not a probe's while half-open: only a caller that
	 * read the generation and the state out of order can hold such a
	 * permit, and it must not pass for a probe. */
	if (pgen != b->gen || (b->state == BRK_HALF_OPEN && kind != PERMIT_PROBE)) {
		window_side(b, SIDE_LATE, 1, now);
		return;
	}
	if (outcome == BRK_IGNORED) {
		window_side(b, SIDE_IGNORED, 1, now);
		if (kind == PERMIT_PROBE && b->probes_granted > 0)
			b->probes_granted--; /* the probe told nothing: hand it back */
		return;
	}
	failed = outcome == BRK_FAILURE;
	slow = latency >= b->cfg.slow_call_duration;
	b->total_calls++;
	b->total_failures += (uint64_t)failed;

	switch (b->state) {
	case BRK_CLOSED: {
		int reason;
		window_add(b, failed, slow, now);
		b->consec_failures = failed ? sat_inc(b->consec_failures) : 0;
		/* A fast success cannot raise a rate, except by bringing the
		 * window up to minimum_calls or after old buckets expired (in
		 * this call or since the rules last ran: rates_dirty). */
		if (!(failed | slow | b->rates_dirty) && b->w_calls != b->cfg.minimum_calls)
			break;
		b->rates_dirty = 0;
		reason = trip_reason(b);
		if (reason != BRK_R_NONE)
			go_open(b, reason, retry_after, have_now ? now : now_coarse_ns());
		break;
	}
	case BRK_DISABLED:
		window_add(b, failed, slow, now);
		b->consec_failures = failed ? sat_inc(b->consec_failures) : 0;
		break;
	case BRK_HALF_OPEN:
		b->probe_progress = now;
		if (failed) {
			b->reopen_level = sat_inc(b->reopen_level);
			go_open(b, BRK_R_PROBE_FAILED, retry_after, now);
		} else if (slow && b->cfg.slow_call_rate_threshold > 0) {
			b->reopen_level = sat_inc(b->reopen_level);
			go_open(b, BRK_R_PROBE_SLOW, retry_after, now);
		} else if (++b->probes_succeeded >= b->cfg.half_open_calls) {
			go_closed(b, BRK_R_PROBES_SUCCEEDED, now);
		}
		break;
	default:
		break; /* open states grant no permits of the current generation */
	}
}

/* Whether a result takes brk_record's fast path, the common case: a fast
 * success under a current closed permit. No rule is checked on that path: a
 * fast success cannot raise a rate unless it brings the window up to
 * minimum_calls or old time buckets have expired (record_fast's time
 * branch checks rates_dirty and the head bucket), both left to record_slow. */
static inline __attribute__((always_inline)) int
fast_ok(const brk_t *b, double permit, int outcome, double latency)
{
	return permit > 0 && permit < 9007199254740992.0 &&
	       (uint32_t)((int64_t)permit >> 2) == b->gen &&
	       (b->state | outcome) == 0 &&
	       latency >= 0 && latency < b->cfg.slow_call_duration &&
	       b->w_calls + 1 != b->cfg.minimum_calls;
}

/* A fast success into the count window's ring, branch-free but for one test. */
static inline __attribute__((always_inline)) void count_success(brk_t *b)
{
	uint32_t pos = b->pos;
	uint8_t old = b->window[pos];
	b->window[pos] = SLOT_USED;
	/* Written only when they change: in the steady state (a full window of
	 * fast successes) none of these is touched, which keeps them off the
	 * chain of loads that wait on stores. */
	if (old != SLOT_USED) {
		b->w_calls += (uint64_t)(~old & SLOT_USED);
		b->w_failures -= (uint64_t)((old >> 1) & 1);
		b->w_slow -= (uint64_t)((old >> 2) & 1);
	}
	pos++;
	b->pos = pos == b->cfg.window_size ? 0 : pos;
}

/* What every fast success counts besides its window. */
static inline __attribute__((always_inline)) void success_counts(brk_t *b)
{
	if (b->consec_failures != 0)
		b->consec_failures = 0;
	b->total_calls++;
}

/* The fast path for any window. Returns 0 when the call needs record_slow. */
static int record_fast(brk_t *b, double permit, int outcome, double latency)
{
	if (!fast_ok(b, permit, outcome, latency))
		return 0;
	if (b->cfg.window_type == BRK_WINDOW_COUNT) {
		count_success(b);
	} else {
		/* Time window: only while the head bucket is current, so no
		 * bucket expires here, and while no expiry since the rules
		 * last ran (stats, a rejection, an ignored or late result move
		 * the head too) has left the rates unchecked. */
		if (b->rates_dirty || now_coarse_ns() >= b->head_end)
			return 0;
		buckets(b)[b->head_slot].calls++;
		b->w_calls++;
	}
	success_counts(b);
	hist_add(b, latency);
	return 1;
}

uint32_t brk_generation(const brk_t *b)
{
	return b->gen;
}

int brk_state(const brk_t *b)
{
	return b->state;
}

/* ======================================================================
 * Operator calls
 * ====================================================================== */

static void force_open_nl(brk_t *b)
{
	if (b->state != BRK_FORCED_OPEN)
		transition(b, BRK_FORCED_OPEN, BRK_R_FORCED_OPEN, now_coarse_ns());
}

static void disable_nl(brk_t *b)
{
	if (b->state != BRK_DISABLED) {
		int64_t now = now_coarse_ns();
		transition(b, BRK_DISABLED, BRK_R_DISABLED, now);
		b->consec_failures = 0;
		window_clear(b, now);
	}
}

static void reset_nl(brk_t *b)
{
	go_closed(b, BRK_R_RESET, now_coarse_ns());
}

/* ======================================================================
 * Inspection
 * ====================================================================== */

static void stats_nl(brk_t *b, brk_stats *st)
{
	int64_t now = now_coarse_ns();
	const brk_config *c = &b->cfg;

	if (c->window_type == BRK_WINDOW_TIME)
		time_advance(b, now);
	memset(st, 0, sizeof(*st));
	st->state = b->state;
	st->generation = b->gen;
	st->time_in_state = now > b->state_since ? (double)(now - b->state_since) / NS : 0;
	if (b->state == BRK_OPEN)
		st->retry_after = now < b->open_until ? (double)(b->open_until - now) / NS : 0;
	else if (b->state == BRK_FORCED_OPEN)
		st->retry_after = HUGE_VAL;
	st->transitions = b->transitions;
	st->opened = b->opened;
	st->lock_takeovers = b->lock_takeovers;
	st->calls = b->w_calls;
	st->failures = b->w_failures;
	st->successes = b->w_calls - b->w_failures;
	st->slow = b->w_slow;
	st->ignored = b->w_ignored;
	st->rejected = b->w_rejected;
	st->late = b->w_late;
	if (b->w_calls > 0 && b->w_calls >= c->minimum_calls) {
		st->failure_rate = 100.0 * b->w_failures / b->w_calls;
		st->slow_rate = 100.0 * b->w_slow / b->w_calls;
	} else {
		st->failure_rate = st->slow_rate = -1;
	}
	st->consecutive_failures = b->consec_failures;
	st->half_open_granted = b->probes_granted;
	st->half_open_succeeded = b->probes_succeeded;
	st->reopen_level = b->reopen_level;
	st->open_duration = (double)b->open_ns / NS;
	st->total_calls = b->total_calls;
	st->total_failures = b->total_failures;
	st->total_rejected = b->total_rejected;
	st->p50 = hist_quantile(b, 0.50);
	st->p90 = hist_quantile(b, 0.90);
	st->p99 = hist_quantile(b, 0.99);
	st->latency_samples = hist_total(b);
	st->memory = b->size;
}

static int transitions_nl(const brk_t *b, uint32_t since, brk_transition *out, int max)
{
	uint32_t n = b->log_next < BRK_LOG_SIZE ? b->log_next : BRK_LOG_SIZE;
	uint32_t i;
	int k = 0;
	for (i = b->log_next - n; i < b->log_next && k < max; i++) {
		const brk_transition *t = &b->log[i % BRK_LOG_SIZE];
		if ((int32_t)(t->gen - since) > 0)
			out[k++] = *t;
	}
	return k;
}


/* ======================================================================
 * Locking of shared blocks
 *
 * A breaker in a shared region is updated by several processes. Its lock
 * is a word holding the holder's pid: critical sections are a few dozen
 * instructions and never block, so waiters spin, then yield; a waiter that
 * has waited long checks whether the holder still lives and takes the lock
 * over from a dead one (a worker killed inside a critical section must not
 * wedge every other worker). Private breakers take no lock at all.
 * ====================================================================== */

static uint32_t cached_pid;          /* 0 until first use; reset in fork children */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void pid_after_fork(void)
{
	__atomic_store_n(&cached_pid, (uint32_t)getpid(), __ATOMIC_RELAXED);
}

static void register_atfork(void)
{
	pthread_atfork(NULL, NULL, pid_after_fork);
}

static __attribute__((noinline)) uint32_t self_pid_slow(void)
{
	pthread_once(&atfork_once, register_atfork);
	pid_after_fork();
	return cached_pid;
}

/* This process's pid, without a system call on the hot path. */
static inline uint32_t self_pid(void)
{
	uint32_t me = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);
	return me ? me : self_pid_slow();
}

/* Whether process pid still runs. A zombie (exited, not yet reaped) does
 * not: kill() alone would call it alive and make its lock wait for the reap. */
static int process_alive(uint32_t pid)
{
	char path[48], buf[256];
	const char *p;
	ssize_t n;
	int fd;
	if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
		return 0;
	snprintf(path, sizeof(path), "/proc/%u/stat", (unsigned)pid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return 1; /* no /proc: trust kill() */
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 1;
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* the state follows the command name */
	return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
}

/* Returns 1 when the lock was taken over from a holder that died inside
 * its critical section (what it guarded may be half updated), else 0. */
static __attribute__((noinline)) int lock_contended(uint32_t *word, uint32_t me)
{
	unsigned spins = 0;
	for (;;) {
		uint32_t holder = 0;
		if (__atomic_compare_exchange_n(word, &holder, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			return 0;
		if (++spins < 2000) {
#if defined(__x86_64__) || defined(__i386__)
			__builtin_ia32_pause();
#endif
			continue;
		}
		spins = 0;
		if (holder != me && !process_alive(holder) &&
		    __atomic_compare_exchange_n(word, &holder, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			return 1; /* the holder died inside its critical section */
		sched_yield();
	}
}

/* The hot paths below use these inline copies: the exported functions are
 * reached through the PLT from inside this library. lock_word returns 1
 * when it took the lock over from a dead holder. */
static inline int lock_word(uint32_t *word)
{
	uint32_t me = self_pid(), free_word = 0;
	if (!__atomic_compare_exchange_n(word, &free_word, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return lock_contended(word, me);
	return 0;
}

static inline void unlock_word(uint32_t *word)
{
	__atomic_store_n(word, 0, __ATOMIC_RELEASE);
}

void brk_lock_word(uint32_t *word)
{
	(void)lock_word(word);
}

void brk_unlock_word(uint32_t *word)
{
	unlock_word(word);
}

/* Under a lock taken over from a holder that died inside its critical
 * section: rebuilds the window's running counts from what they are kept
 * for (the count window's slots, the time window's buckets) and brings
 * indexes back in range, so a half-done update does not stay. Everything
 * else is either written in one store or only ever counted up. */
static void repair_nl(brk_t *b)
{
	uint32_t i;
	if (b->cfg.window_type == BRK_WINDOW_COUNT) {
		uint64_t calls = 0, failures = 0, slow = 0;
		for (i = 0; i < b->cfg.window_size; i++) {
			uint8_t v = b->window[i];
			if (v & SLOT_USED) {
				calls++;
				failures += (v & SLOT_FAIL) ? 1 : 0;
				slow += (v & SLOT_SLOW) ? 1 : 0;
			}
		}
		b->w_calls = calls;
		b->w_failures = failures;
		b->w_slow = slow;
		if (b->pos >= b->cfg.window_size)
			b->pos = 0;
	} else {
		uint32_t n = b->cfg.window_buckets;
		brk_bucket *bk = buckets(b);
		b->w_calls = b->w_failures = b->w_slow = 0;
		b->w_ignored = b->w_rejected = b->w_late = 0;
		for (i = 0; i < n; i++) {
			b->w_calls += bk[i].calls;
			b->w_failures += bk[i].failures;
			b->w_slow += bk[i].slow;
			b->w_ignored += bk[i].ignored;
			b->w_rejected += bk[i].rejected;
			b->w_late += bk[i].late;
		}
		if (b->head_slot >= n)
			b->head_slot = slot_of(b->head_epoch, n);
		b->rates_dirty = 1; /* the totals were rebuilt: check the rules again */
	}
	{
		/* hist_n may lag its buckets by the one sample a dead holder
		 * added: count it again (and halve if that makes it due). */
		uint32_t t = hist_total(b);
		b->hist_n = (uint16_t)(t < HIST_DECAY ? t : HIST_DECAY - 1);
		if (t >= HIST_DECAY)
			hist_decay(b, -1);
	}
	if (b->probes_granted > b->cfg.half_open_calls)
		b->probes_granted = b->cfg.half_open_calls;
	if (b->probes_succeeded > b->probes_granted)
		b->probes_succeeded = b->probes_granted;
	b->lock_takeovers++;
}

/* Takes a shared block's lock; repairs the block when its holder had died. */
static inline void lock_block(brk_t *b)
{
	if (lock_word(&b->lock))
		repair_nl(b);
}

#define LOCKED(b) ((b)->flags & BRK_F_SHARED)
#define LOCK(b) do { if (LOCKED(b)) lock_block(b); } while (0)
#define UNLOCK(b) do { if (LOCKED(b)) unlock_word(&(b)->lock); } while (0)

int brk_debug_half_record(brk_t *b)
{
	if (!LOCKED(b) || b->cfg.window_type != BRK_WINDOW_COUNT)
		return -1;
	lock_block(b);
	b->window[b->pos] = SLOT_USED | SLOT_FAIL;
	if (++b->pos == b->cfg.window_size)
		b->pos = 0;
	return 0; /* the lock stays held */
}

int brk_debug_count(brk_t *b, int what, uint64_t n)
{
	int64_t now;
	if (what < BRK_SUCCESS || what > BRK_DEBUG_LATE ||
	    (what <= BRK_FAILURE && b->cfg.window_type != BRK_WINDOW_TIME))
		return -1;
	LOCK(b);
	now = now_coarse_ns();
	if (what <= BRK_FAILURE) {
		brk_bucket *x = time_advance(b, now);
		x->calls += n;
		b->w_calls += n;
		b->total_calls += n;
		if (what == BRK_FAILURE) {
			x->failures += n;
			b->w_failures += n;
			b->total_failures += n;
		}
	} else {
		window_side(b, what == BRK_IGNORED ? SIDE_IGNORED :
			    what == BRK_DEBUG_REJECTED ? SIDE_REJECTED : SIDE_LATE, n, now);
	}
	UNLOCK(b);
	return 0;
}

double brk_allow(brk_t *b)
{
	double r;
	uint32_t g;
	if (!LOCKED(b))
		return allow_nl(b);
	/* Closed admits without side effects, so no lock is needed: read the
	 * generation, then the state. If the state moved in between, the
	 * permit is merely stale and its result counts as late. */
	g = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
	if (__atomic_load_n(&b->state, __ATOMIC_ACQUIRE) == BRK_CLOSED)
		return (double)g * 4.0 + PERMIT_CLOSED;
	lock_block(b);
	r = allow_nl(b);
	unlock_word(&b->lock);
	return r;
}

/* The fast path of a count-window breaker as a leaf: it calls nothing (not
 * even the histogram's decay: when the histogram is due to halve it
 * declines before changing anything), so brk_record needs no stack frame
 * for it. */
static inline __attribute__((always_inline)) int
record_fast_count(brk_t *b, double permit, int outcome, double latency)
{
	int h;
	if (!fast_ok(b, permit, outcome, latency))
		return 0;
	h = hist_index(latency);
	if (b->hist_n + 1u >= HIST_DECAY)
		return 0;
	count_success(b);
	success_counts(b);
	b->hist[h]++;
	b->hist_n++;
	return 1;
}

static __attribute__((noinline)) void
record_general(brk_t *b, double permit, int outcome, double latency, double retry_after)
{
	if (!LOCKED(b)) {
		if (!record_fast(b, permit, outcome, latency))
			record_slow(b, permit, outcome, latency, retry_after);
		return;
	}
	lock_block(b);
	if (!record_fast(b, permit, outcome, latency))
		record_slow(b, permit, outcome, latency, retry_after);
	unlock_word(&b->lock);
}

void brk_record(brk_t *b, double permit, int outcome, double latency, double retry_after)
{
	if (b->cfg.window_type == BRK_WINDOW_COUNT) {
		uint32_t me, free_word = 0;
		if (!LOCKED(b)) {
			if (record_fast_count(b, permit, outcome, latency))
				return;
		} else if ((me = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED)) != 0 &&
		           __atomic_compare_exchange_n(&b->lock, &free_word, me, 0,
		                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
			/* Shared, and the lock came at the first try: the same leaf
			 * fast path inside it. Anything else lets go and takes the
			 * general path, which checks everything again (the fast path
			 * changed nothing when it declined). */
			int done = record_fast_count(b, permit, outcome, latency);
			unlock_word(&b->lock);
			if (done)
				return;
		}
	}
	record_general(b, permit, outcome, latency, retry_after);
}

void brk_force_open(brk_t *b)
{
	LOCK(b);
	force_open_nl(b);
	UNLOCK(b);
}

void brk_disable(brk_t *b)
{
	LOCK(b);
	disable_nl(b);
	UNLOCK(b);
}

void brk_reset(brk_t *b)
{
	LOCK(b);
	reset_nl(b);
	UNLOCK(b);
}

void brk_get_stats(brk_t *b, brk_stats *st)
{
	LOCK(b);
	stats_nl(b, st);
	UNLOCK(b);
}

int brk_transitions(brk_t *b, uint32_t since, brk_transition *out, int max)
{
	int n;
	LOCK(b);
	n = transitions_nl(b, since, out, max);
	UNLOCK(b);
	return n;
}

void brk_set_shared(brk_t *b)
{
	b->flags |= BRK_F_SHARED;
}

int brk_is_shared(const brk_t *b)
{
	return LOCKED(b) != 0;
}

int brk_check_block(const brk_t *b, size_t avail)
{
	return b->magic == BRK_MAGIC && b->size <= avail && b->size == brk_size(&b->cfg);
}

static const char *const state_names[] = {
	"closed", "open", "half_open", "forced_open", "disabled"
};

const char *brk_state_name(int state)
{
	return state >= 0 && state <= BRK_DISABLED ? state_names[state] : "unknown";
}

static const char *const reason_names[BRK_R_COUNT] = {
	"none", "failure_rate", "slow_call_rate", "consecutive_failures",
	"open_elapsed", "probe_failed", "probe_slow", "probes_succeeded",
	"probe_expired", "forced_open", "disabled", "reset"
};

const char *brk_reason_name(int reason)
{
	return reason >= 0 && reason < BRK_R_COUNT ? reason_names[reason] : "unknown";
}
