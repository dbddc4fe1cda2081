/*
 * shm.c - shared-memory regions holding breakers by name (see shm.h).
 */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define REGION_MAGIC 0x42524b52u  /* "BRKR" */
/* Bumped whenever the header, a slot or a breaker block changes: a region
 * of another layout is refused (3: 64-bit window counts, 40-byte buckets). */
#define REGION_LAYOUT 3
#define STR_(x) #x
#define STR(x) STR_(x)

enum slot_state { SLOT_FREE = 0, SLOT_READY = 1 };

/* At the start of the mapping. */
typedef struct region_header {
	uint32_t magic;
	uint32_t layout;
	uint32_t lock;             /* brk_lock_word: guards slot allocation */
	uint32_t ready;            /* set last, once the header is filled */
	uint32_t capacity;
	uint32_t used;
	uint64_t slot_bytes;       /* bytes of one slot, header included */
	uint64_t total_bytes;
	uint64_t pidns_dev;        /* the maker's PID namespace (0, 0: unknown) */
	uint64_t pidns_ino;
	brk_region_opts opts;
} region_header;

typedef struct slot_header {
	uint32_t state;            /* enum slot_state, written under the region lock */
	uint32_t name_len;
	char name[BRK_NAME_MAX + 1];
	/* the breaker block follows, 8-aligned */
} slot_header;

#define SLOT_HDR_BYTES ((sizeof(slot_header) + 7) & ~(size_t)7)
#define REGION_HDR_BYTES ((sizeof(region_header) + 63) & ~(size_t)63)

/* The process-local handle. */
struct brk_region {
	region_header *h;          /* the mapping; never unmapped */
	size_t bytes;
	int named;
	int replaced;              /* named: its name now names another object */
	uint64_t dev, ino;         /* named: the shared-memory object mapped */
	char name[BRK_REGION_NAME_MAX + 1];
	struct brk_region *next;   /* list of anonymous regions of this process */
};

static pthread_mutex_t anon_mutex = PTHREAD_MUTEX_INITIALIZER;
static brk_region *anon_list;  /* every region this process mapped; owned, kept until exit */

void brk_region_opts_default(brk_region_opts *o)
{
	o->capacity = 1024;
	o->max_window = 512;
	o->max_buckets = 16;
}

static const char *check_opts(const brk_region_opts *o)
{
	if (o->capacity < 1 || o->capacity > 1000000)
		return "capacity: expected an integer in [1, 1000000]";
	if (o->max_window < 1 || o->max_window > 1000000)
		return "max_window: expected an integer in [1, 1000000]";
	if (o->max_buckets < 1 || o->max_buckets > 3600)
		return "max_buckets: expected an integer in [1, 3600]";
	return NULL;
}

/* Bytes of a breaker block big enough for either window limit. */
static size_t block_bytes(const brk_region_opts *o)
{
	brk_config c;
	size_t a, b;
	brk_config_default(&c);
	c.window_type = BRK_WINDOW_COUNT;
	c.window_size = o->max_window;
	a = brk_size(&c);
	c.window_type = BRK_WINDOW_TIME;
	c.window_buckets = o->max_buckets;
	b = brk_size(&c);
	return ((a > b ? a : b) + 7) & ~(size_t)7;
}

/* The smallest block any slot must hold (a count window of one outcome). */
static size_t block_bytes_min(void)
{
	brk_region_opts o;
	brk_region_opts_default(&o);
	o.max_window = 1;
	o.max_buckets = 1;
	return block_bytes(&o);
}

static size_t layout_bytes(const brk_region_opts *o, size_t *slot_bytes)
{
	*slot_bytes = SLOT_HDR_BYTES + block_bytes(o);
	return REGION_HDR_BYTES + (size_t)o->capacity * *slot_bytes;
}

static slot_header *slot_at(const brk_region *r, uint32_t i)
{
	return (slot_header *)(void *)((char *)r->h + REGION_HDR_BYTES + (size_t)i * r->h->slot_bytes);
}

static brk_t *block_of(slot_header *s)
{
	return (brk_t *)(void *)((char *)s + SLOT_HDR_BYTES);
}

/* The PID namespace this process lives in, as the device and inode of
 * /proc/self/ns/pid; 0, 0 when that cannot be read. Locks in a region name
 * their holder by pid (to take a lock over from a dead holder), and a pid
 * means another process in another namespace. */
static void pid_namespace(uint64_t *dev, uint64_t *ino)
{
	struct stat st;
	if (stat("/proc/self/ns/pid", &st) == 0) {
		*dev = (uint64_t)st.st_dev;
		*ino = (uint64_t)st.st_ino;
	} else {
		*dev = *ino = 0;
	}
}

static void init_header(region_header *h, const brk_region_opts *o, size_t slot_bytes, size_t total)
{
	pid_namespace(&h->pidns_dev, &h->pidns_ino);
	h->magic = REGION_MAGIC;
	h->layout = REGION_LAYOUT;
	h->capacity = o->capacity;
	h->slot_bytes = slot_bytes;
	h->total_bytes = total;
	h->opts = *o;
	__atomic_store_n(&h->ready, 1, __ATOMIC_RELEASE);
}

/* ======================================================================
 * Anonymous regions
 * ====================================================================== */

brk_region *brk_region_anon(const char *key, const brk_region_opts *o, const char **err)
{
	brk_region *r;
	size_t slot_bytes, total;
	void *m;
	const char *msg = check_opts(o);

	if (msg) {
		*err = msg;
		return NULL;
	}
	if (strlen(key) > BRK_REGION_NAME_MAX) {
		*err = "name: longer than 200 bytes";
		return NULL;
	}
	pthread_mutex_lock(&anon_mutex);
	for (r = anon_list; r; r = r->next) {
		if (!r->named && strcmp(r->name, key) == 0) {
			pthread_mutex_unlock(&anon_mutex);
			return r; /* made before: a reload runs init_by_lua again */
		}
	}
	total = layout_bytes(o, &slot_bytes);
	r = calloc(1, sizeof(*r));
	if (!r) {
		pthread_mutex_unlock(&anon_mutex);
		*err = "out of memory";
		return NULL;
	}
	m = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		free(r);
		pthread_mutex_unlock(&anon_mutex);
		*err = "mmap of the shared region failed (out of memory?)";
		return NULL;
	}
	r->h = m;
	r->bytes = total;
	r->named = 0;
	strcpy(r->name, key);
	init_header(r->h, o, slot_bytes, total);
	r->next = anon_list;
	anon_list = r;
	pthread_mutex_unlock(&anon_mutex);
	return r;
}

/* ======================================================================
 * Named regions
 * ====================================================================== */

static int shm_path(const char *name, char *buf, size_t len)
{
	const char *p;
	if (name[0] == '\0' || strlen(name) > BRK_REGION_NAME_MAX)
		return -1;
	for (p = name; *p; p++)
		if (*p == '/')
			return -1;
	snprintf(buf, len, "/breaker.%s", name);
	return 0;
}

static brk_region *named_open_locked(const char *name, const char *path, const brk_region_opts *o,
				     int *created, const char **err);

brk_region *brk_region_named(const char *name, const brk_region_opts *o, int *created,
			     const char **err)
{
	char path[BRK_REGION_NAME_MAX + 16];
	brk_region *r;
	const char *msg = check_opts(o);

	*created = 0;
	if (msg) {
		*err = msg;
		return NULL;
	}
	if (shm_path(name, path, sizeof(path)) != 0) {
		*err = "name: expected 1 to 200 bytes without '/'";
		return NULL;
	}
	/* One lock over the lookup and the insert: two threads opening the
	 * same name get one mapping. */
	pthread_mutex_lock(&anon_mutex);
	r = named_open_locked(name, path, o, created, err);
	pthread_mutex_unlock(&anon_mutex);
	return r;
}

static brk_region *named_open_locked(const char *name, const char *path, const brk_region_opts *o,
				     int *created, const char **err)
{
	size_t slot_bytes, total;
	struct stat st;
	brk_region *r, *cached = NULL;
	region_header *h;
	void *m;
	int fd = -1, i;

	for (r = anon_list; r; r = r->next) {
		if (r->named && !r->replaced && strcmp(r->name, name) == 0) {
			cached = r;
			break;
		}
	}
	if (cached) {
		/* This process has mapped the name before. Still the object the
		 * name names? After shared.unlink(name) other processes make and
		 * join a new one, and this process must join it too. */
		fd = shm_open(path, O_RDWR, 0600);
		if (fd < 0 && errno != ENOENT)
			return cached; /* cannot tell (permissions, no fds): keep it */
		if (fd >= 0 && fstat(fd, &st) == 0 &&
		    (uint64_t)st.st_dev == cached->dev && (uint64_t)st.st_ino == cached->ino) {
			close(fd);
			return cached;
		}
		/* Unlinked (fd < 0: make it anew below) or another object now. */
	}
	total = layout_bytes(o, &slot_bytes);
	if (fd < 0) {
		fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
		if (fd >= 0) {
			if (ftruncate(fd, (off_t)total) != 0) {
				close(fd);
				shm_unlink(path);
				*err = "ftruncate of the shared region failed";
				return NULL;
			}
			*created = 1;
		} else if (errno == EEXIST) {
			fd = shm_open(path, O_RDWR, 0600);
			if (fd < 0) {
				*err = "shm_open of the existing region failed (permissions?)";
				return NULL;
			}
		} else {
			*err = "shm_open failed (is /dev/shm mounted and writable?)";
			return NULL;
		}
	}
	if (!*created) {
		/* Its maker may still be sizing it: wait until it is. */
		for (i = 0; i < 2000; i++) {
			if (fstat(fd, &st) == 0 && st.st_size >= (off_t)REGION_HDR_BYTES)
				break;
			usleep(1000);
		}
		if (fstat(fd, &st) != 0 || st.st_size < (off_t)REGION_HDR_BYTES) {
			close(fd);
			*err = "the existing region has no valid size";
			return NULL;
		}
		total = (size_t)st.st_size;
	} else if (fstat(fd, &st) != 0) {
		close(fd);
		shm_unlink(path);
		*err = "fstat of the new shared region failed";
		return NULL;
	}
	m = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (m == MAP_FAILED) {
		*err = "mmap of the shared region failed";
		return NULL;
	}
	h = m;
	if (*created) {
		init_header(h, o, slot_bytes, total);
	} else {
		for (i = 0; i < 2000 && !__atomic_load_n(&h->ready, __ATOMIC_ACQUIRE); i++)
			usleep(1000);
		if (!h->ready) {
			munmap(m, total);
			*err = "the existing region was never initialised (its maker died?); "
			       "remove it with breaker.shared.unlink(name)";
			return NULL;
		}
		if (h->magic == REGION_MAGIC && h->layout != REGION_LAYOUT) {
			munmap(m, total);
			*err = "the existing region was made by another version of breaker "
			       "(its block layout is not layout " STR(REGION_LAYOUT) "); remove it with "
			       "breaker.shared.unlink(name) once no process uses it, or use "
			       "another name";
			return NULL;
		}
		/* Bounds first, so the size product below cannot wrap. */
		if (h->magic != REGION_MAGIC || h->layout != REGION_LAYOUT ||
		    h->total_bytes != total || h->capacity < 1 || h->capacity > 1000000 ||
		    h->slot_bytes < SLOT_HDR_BYTES + block_bytes_min() || h->slot_bytes > ((uint64_t)1 << 30) ||
		    REGION_HDR_BYTES + (uint64_t)h->capacity * h->slot_bytes > total ||
		    check_opts(&h->opts) != NULL) {
			munmap(m, total);
			*err = "the existing region is not a breaker region of this version";
			return NULL;
		}
		{
			uint64_t dev, ino;
			pid_namespace(&dev, &ino);
			if (ino != 0 && h->pidns_ino != 0 &&
			    (dev != h->pidns_dev || ino != h->pidns_ino)) {
				munmap(m, total);
				*err = "the region was made in another PID namespace (another "
				       "container?); its locks name their holders by process id, "
				       "which means other processes here: give each namespace its "
				       "own region name";
				return NULL;
			}
		}
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		munmap(m, total);
		*err = "out of memory";
		return NULL;
	}
	r->h = h;
	r->bytes = total;
	r->named = 1;
	r->dev = (uint64_t)st.st_dev;
	r->ino = (uint64_t)st.st_ino;
	strcpy(r->name, name);
	r->next = anon_list;
	anon_list = r;
	/* The old mapping stays (breakers may point into it), but the name
	 * finds the new one from now on. */
	if (cached)
		cached->replaced = 1;
	return r;
}

int brk_region_unlink(const char *name)
{
	char path[BRK_REGION_NAME_MAX + 16];
	if (shm_path(name, path, sizeof(path)) != 0)
		return -1;
	return shm_unlink(path);
}

/* ======================================================================
 * Breakers in a region
 * ====================================================================== */

static brk_t *find_locked(brk_region *r, const char *name, size_t len)
{
	uint32_t i;
	for (i = 0; i < r->h->capacity; i++) {
		slot_header *s = slot_at(r, i);
		if (s->state == SLOT_READY && s->name_len == len && memcmp(s->name, name, len) == 0)
			return block_of(s);
	}
	return NULL;
}

/* Names the first config key that differs, or returns NULL. */
static const char *config_diff(const brk_config *a, const brk_config *b)
{
#define DIFF(f) if (a->f != b->f) return #f
	DIFF(window_type);
	DIFF(window_size);
	DIFF(window_buckets);
	DIFF(minimum_calls);
	DIFF(failure_rate_threshold);
	DIFF(slow_call_rate_threshold);
	DIFF(slow_call_duration);
	DIFF(consecutive_failures);
	DIFF(half_open_calls);
	DIFF(open_duration);
	DIFF(open_duration_factor);
	DIFF(open_duration_max);
	DIFF(open_duration_jitter);
	DIFF(probe_timeout);
#undef DIFF
	return NULL;
}

brk_t *brk_region_breaker(brk_region *r, const char *name, const brk_config *cfg,
			  int *created, char *errbuf, size_t errlen)
{
	size_t len = strlen(name);
	const char *msg, *diff;
	brk_t *b;
	uint32_t i;

	*created = 0;
	if (len == 0 || len > BRK_NAME_MAX) {
		snprintf(errbuf, errlen, "breaker name of %zu bytes does not fit a region slot (1 to %d bytes)",
			 len, BRK_NAME_MAX);
		return NULL;
	}
	msg = brk_config_check(cfg);
	if (msg) {
		snprintf(errbuf, errlen, "bad value for %s", msg);
		return NULL;
	}
	if (cfg->window_type == BRK_WINDOW_COUNT && cfg->window_size > r->h->opts.max_window) {
		snprintf(errbuf, errlen, "window_size %u is larger than the region's max_window %u",
			 cfg->window_size, r->h->opts.max_window);
		return NULL;
	}
	if (cfg->window_type == BRK_WINDOW_TIME && cfg->window_buckets > r->h->opts.max_buckets) {
		snprintf(errbuf, errlen, "window_buckets %u is more than the region's max_buckets %u",
			 cfg->window_buckets, r->h->opts.max_buckets);
		return NULL;
	}

	brk_lock_word(&r->h->lock);
	b = find_locked(r, name, len);
	if (b && (!brk_check_block(b, r->h->slot_bytes - SLOT_HDR_BYTES) ||
		  brk_config_check(brk_get_config(b)) != NULL)) {
		brk_unlock_word(&r->h->lock);
		snprintf(errbuf, errlen, "breaker '%s': its slot in the region is corrupted", name);
		return NULL;
	}
	if (b) {
		brk_unlock_word(&r->h->lock);
		diff = config_diff(brk_get_config(b), cfg);
		if (diff) {
			snprintf(errbuf, errlen,
				 "breaker '%s' exists in the region with another config ('%s' differs)",
				 name, diff);
			return NULL;
		}
		return b;
	}
	for (i = 0; i < r->h->capacity; i++) {
		slot_header *s = slot_at(r, i);
		if (s->state == SLOT_FREE) {
			b = block_of(s);
			brk_init(b, cfg);
			brk_set_shared(b);
			memcpy(s->name, name, len);
			s->name[len] = '\0';
			s->name_len = (uint32_t)len;
			__atomic_store_n(&s->state, SLOT_READY, __ATOMIC_RELEASE);
			r->h->used++;
			brk_unlock_word(&r->h->lock);
			*created = 1;
			return b;
		}
	}
	brk_unlock_word(&r->h->lock);
	snprintf(errbuf, errlen, "the region is full (%u breakers); make it with a larger capacity",
		 r->h->capacity);
	return NULL;
}

brk_t *brk_region_find(brk_region *r, const char *name)
{
	brk_t *b;
	brk_lock_word(&r->h->lock);
	b = find_locked(r, name, strlen(name));
	brk_unlock_word(&r->h->lock);
	return b;
}

const char *brk_region_slot_name(brk_region *r, uint32_t i, brk_t **b)
{
	slot_header *s;
	if (i >= r->h->capacity)
		return NULL;
	s = slot_at(r, i);
	if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != SLOT_READY)
		return NULL;
	if (b)
		*b = block_of(s);
	return s->name;
}

uint32_t brk_region_capacity(const brk_region *r)
{
	return r->h->capacity;
}

uint32_t brk_region_used(brk_region *r)
{
	return __atomic_load_n(&r->h->used, __ATOMIC_RELAXED);
}

size_t brk_region_bytes(const brk_region *r)
{
	return r->bytes;
}

size_t brk_region_slot_bytes(const brk_region *r)
{
	return r->h->slot_bytes;
}

const char *brk_region_name(const brk_region *r)
{
	return r->name;
}

int brk_region_is_named(const brk_region *r)
{
	return r->named;
}
