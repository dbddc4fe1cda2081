/*
 * http.c - the libcurl transport behind breaker.curl, with no Lua in it.
 * See http.h for the contract.
 */
#include "http.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define POOL_MAX 64                  /* idle requests (with handles) a client keeps */
#define KEEP_BUF_MAX (16 * 1024)     /* a pooled request keeps buffers up to this */
#define IDLE_CONNECTIONS 64          /* open connections a client keeps, at least */
#define HEADER_BYTES_MAX (256 * 1024) /* response header bytes accepted */
#define MESSAGE_MAX (CURL_ERROR_SIZE + 160)

/* ------------------------------------------------------------------------
 * Growable byte buffer
 * ---------------------------------------------------------------------- */

typedef struct buf {
	char *data;   /* owned, malloc'd; NULL while empty */
	size_t len;
	size_t cap;
} buf;

/* Makes room for n more bytes (and the NUL kept after them); returns the
 * place to write them, or NULL when out of memory (buffer unchanged). */
static char *buf_reserve(buf *b, size_t n)
{
	if (n > SIZE_MAX - b->len - 1)
		return NULL;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		char *data;
		while (cap < b->len + n + 1)
			cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
		data = realloc(b->data, cap);
		if (data == NULL)
			return NULL;
		b->data = data;
		b->cap = cap;
	}
	return b->data + b->len;
}

/* Appends n bytes; returns 0, or -1 when out of memory (buffer unchanged). */
static int buf_append(buf *b, const char *p, size_t n)
{
	char *at = buf_reserve(b, n);
	if (at == NULL)
		return -1;
	memcpy(at, p, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

static void buf_free(buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

/* ------------------------------------------------------------------------
 * Types
 * ---------------------------------------------------------------------- */

enum { ABORT_NONE, ABORT_TOO_LARGE, ABORT_HEADERS, ABORT_CHUNK, ABORT_NOMEM, ABORT_LENGTHS };
enum { BODY_UNDECIDED, BODY_BUFFER, BODY_STREAM };

struct http_client {
	CURLM *multi;             /* owned; holds the connection cache */
	/* Finished requests kept for reuse, each with its configured curl
	 * handle and its buffers: the next request skips the allocations and
	 * the options that would be set to the same values again. */
	http_request *idle[POOL_MAX];
	size_t nidle;
	int verify_tls;
	char *ca_file;            /* owned copies, or NULL */
	char *ca_path;
	/* The one line "User-Agent: ..." (or NULL): added to each request's
	 * headers, and the whole header list of a proxy's CONNECT. */
	struct curl_slist *ua_header;
	/* The environment's proxy settings, read once when the client is made
	 * (curl would call getenv up to seven times per request), each "" when
	 * unset: the proxy for http and for https URLs, and no_proxy. */
	char *proxy_http;
	char *proxy_https;
	char *no_proxy;
};

struct http_request {
	/* Kept while the request waits in its client's pool. The handle's
	 * ERRORBUFFER, PRIVATE, WRITEDATA and HEADERDATA point at this struct,
	 * set once; set_* remember what the last request gave curl. */
	CURL *easy;                   /* owned */
	char *hdr_block;              /* owned: header list nodes and lines */
	size_t hdr_cap;
	buf body_buf;                 /* owned: buffered response body */
	buf head_buf;                 /* owned: "name\0value\0" pairs */
	http_header *index;           /* owned: built from head_buf when done */
	size_t index_cap;
	buf set_url;                  /* CURLOPT_URL as last set */
#if LIBCURL_VERSION_NUM >= 0x073f00
	CURLU *url_handle;            /* owned: set_url parsed, or NULL */
#endif
	int set_curlu;                /* CURLOPT_CURLU is url_handle */
	long set_timeout_ms, set_connect_ms;
	curl_off_t set_max_body;
	int set_https;                /* -1 before the first request */
	int set_nobody, set_custom;   /* NOBODY 1 / a CUSTOMREQUEST is set */

	/* This request's own, cleared by http_request_new */
	struct curl_slist *headers;   /* into hdr_block, or NULL */
	const char *body;             /* borrowed from the spec */
	size_t body_len;
	size_t max_body;
	http_chunk_fn on_chunk;       /* borrowed callback and its argument */
	void *chunk_ud;
	int body_mode;
	int abort;                    /* ABORT_* reason set by a callback */
	int in_multi;                 /* added to the client's multi handle */
	int done;                     /* result is final */
	CURLcode setup_error;         /* first option curl refused */
	size_t head_bytes;            /* raw header bytes of this response */
	int head_done;                /* its head ended: later lines are trailers */
	unsigned char clen_len;       /* bytes of the first Content-Length, or 0 */
	char clen[23];                /* its value, leading zeros dropped */
	char errbuf[CURL_ERROR_SIZE]; /* curl's CURLOPT_ERRORBUFFER */
	char message[MESSAGE_MAX];
	http_result result;
};

/* ------------------------------------------------------------------------
 * Global init and kinds
 * ---------------------------------------------------------------------- */

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_status = CURLE_FAILED_INIT;

static void global_init(void)
{
	global_status = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static const char *const kind_names[] = {
	"ok", "timeout", "connect", "dns", "tls", "reset", "too_large",
	"invalid", "aborted", "protocol", "other"
};

const char *http_kind_name(http_kind kind)
{
	if ((unsigned)kind < sizeof(kind_names) / sizeof(kind_names[0]))
		return kind_names[kind];
	return "other";
}

/* Maps a CURLcode to the kind of failure it means for a caller. */
static http_kind classify(CURLcode code)
{
	switch (code) {
	case CURLE_OK:
		return HTTP_OK;
	case CURLE_OPERATION_TIMEDOUT:
		return HTTP_ETIMEOUT;
	case CURLE_COULDNT_CONNECT:
		return HTTP_ECONNECT;
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
		return HTTP_EDNS;
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_CIPHER:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_CRL_BADFILE:
	case CURLE_SSL_ISSUER_ERROR:
	case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
	case CURLE_SSL_INVALIDCERTSTATUS:
	case CURLE_SSL_ENGINE_NOTFOUND:
	case CURLE_SSL_ENGINE_SETFAILED:
	case CURLE_SSL_ENGINE_INITFAILED:
	case CURLE_SSL_SHUTDOWN_FAILED:
	case CURLE_USE_SSL_FAILED:
		return HTTP_ETLS;
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_GOT_NOTHING:
	case CURLE_PARTIAL_FILE:
	/* HTTP/2's reset: the server closed this request's stream (RST_STREAM)
	 * before it was done; the connection itself may live on. Providers
	 * answer HTTPS over HTTP/2, so this is their connection reset. curl
	 * 7.88 gives the same code when nghttp2 rejects a reply that breaks
	 * HTTP/2 (nginx's own aborts come as PROTOCOL_ERROR too, so the two
	 * cannot be told apart): such a reply is then retried like a reset,
	 * and still counts as the breaker's failure. */
	case CURLE_HTTP2_STREAM:
		return HTTP_ERESET;
	case CURLE_FILESIZE_EXCEEDED:
		return HTTP_ETOOLARGE;
	case CURLE_URL_MALFORMAT:
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_BAD_FUNCTION_ARGUMENT:
	case CURLE_UNKNOWN_OPTION:
	case CURLE_NOT_BUILT_IN:
		return HTTP_EINVALID;
	case CURLE_ABORTED_BY_CALLBACK:
		return HTTP_EABORTED;
	case CURLE_WEIRD_SERVER_REPLY:
	case CURLE_HTTP2:
	case CURLE_BAD_CONTENT_ENCODING:
	case CURLE_TOO_MANY_REDIRECTS:
	case CURLE_RANGE_ERROR:
		return HTTP_EPROTOCOL;
	default:
		return HTTP_EOTHER;
	}
}

/* Finishes r with an error of kind, message from fmt. */
static void fail(http_request *r, http_kind kind, int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r->message, sizeof(r->message), fmt, ap);
	va_end(ap);
	r->result.kind = kind;
	r->result.curl_code = code;
	r->result.message = r->message;
	r->done = 1;
}

/* ------------------------------------------------------------------------
 * Typed wrappers around curl_easy_setopt: the compiler checks each value,
 * and the first option curl refuses is remembered in setup_error.
 * ---------------------------------------------------------------------- */

static void opt_long(http_request *r, CURLoption o, long v)
{
	CURLcode rc = curl_easy_setopt(r->easy, o, v);
	if (rc != CURLE_OK && r->setup_error == CURLE_OK)
		r->setup_error = rc;
}

static void opt_off(http_request *r, CURLoption o, curl_off_t v)
{
	CURLcode rc = curl_easy_setopt(r->easy, o, v);
	if (rc != CURLE_OK && r->setup_error == CURLE_OK)
		r->setup_error = rc;
}

/* Strings are copied by curl, except POSTFIELDS (borrowed, see spec). */
static void opt_str(http_request *r, CURLoption o, const char *v)
{
	CURLcode rc = curl_easy_setopt(r->easy, o, v);
	if (rc != CURLE_OK && r->setup_error == CURLE_OK)
		r->setup_error = rc;
}

static void opt_ptr(http_request *r, CURLoption o, void *v)
{
	CURLcode rc = curl_easy_setopt(r->easy, o, v);
	if (rc != CURLE_OK && r->setup_error == CURLE_OK)
		r->setup_error = rc;
}

static void opt_slist(http_request *r, CURLoption o, struct curl_slist *v)
{
	CURLcode rc = curl_easy_setopt(r->easy, o, v);
	if (rc != CURLE_OK && r->setup_error == CURLE_OK)
		r->setup_error = rc;
}

static void opt_write_fn(http_request *r, CURLoption o, curl_write_callback v)
{
	CURLcode rc = curl_easy_setopt(r->easy, o, v);
	if (rc != CURLE_OK && r->setup_error == CURLE_OK)
		r->setup_error = rc;
}

/* ------------------------------------------------------------------------
 * What may go on a request line or header line
 * ---------------------------------------------------------------------- */

/* RFC 9110 token (header names, methods): 1 when s[0, len) is one. */
int http_is_token(const char *s, size_t len)
{
	size_t i;
	if (len == 0)
		return 0;
	for (i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		    (ch >= '0' && ch <= '9'))
			continue;
		if (ch == 0 || strchr("!#$%&'*+-.^_`|~", ch) == NULL)
			return 0;
	}
	return 1;
}

int http_is_field_value(const char *s, size_t len)
{
	size_t i;
	for (i = 0; i < len; i++)
		if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
			return 0;
	return 1;
}

/* ------------------------------------------------------------------------
 * Client
 * ---------------------------------------------------------------------- */

static char *dup_or_null(const char *s, int *failed)
{
	char *d;
	size_t n;
	if (s == NULL)
		return NULL;
	n = strlen(s) + 1;
	d = malloc(n);
	if (d == NULL) {
		*failed = 1;
		return NULL;
	}
	memcpy(d, s, n);
	return d;
}

/* getenv, with an empty value taken as unset, as curl takes it. */
static const char *env_value(const char *name)
{
	const char *v = getenv(name);
	return v != NULL && v[0] != '\0' ? v : NULL;
}

http_client *http_client_new(const http_client_config *cfg, char *err, size_t errlen)
{
	http_client *c;
	int failed = 0;

	pthread_once(&global_once, global_init);
	if (global_status != CURLE_OK) {
		snprintf(err, errlen, "curl_global_init: %s", curl_easy_strerror(global_status));
		return NULL;
	}
	if (cfg->user_agent != NULL &&
	    !http_is_field_value(cfg->user_agent, strlen(cfg->user_agent))) {
		snprintf(err, errlen, "user_agent must not contain CR or LF");
		return NULL;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	c->verify_tls = cfg->verify_tls;
	c->ca_file = dup_or_null(cfg->ca_file, &failed);
	c->ca_path = dup_or_null(cfg->ca_path, &failed);
	{
		/* the variables curl's own lookup reads, in its order: the
		 * scheme's (HTTP_PROXY never: a CGI request could set it), then
		 * all_proxy; no_proxy exempts hosts */
		const char *all = env_value("all_proxy"), *h, *hs, *np;
		if (all == NULL)
			all = env_value("ALL_PROXY");
		h = env_value("http_proxy");
		hs = env_value("https_proxy");
		if (hs == NULL)
			hs = env_value("HTTPS_PROXY");
		np = env_value("no_proxy");
		if (np == NULL)
			np = env_value("NO_PROXY");
		c->proxy_http = dup_or_null(h != NULL ? h : all != NULL ? all : "", &failed);
		c->proxy_https = dup_or_null(hs != NULL ? hs : all != NULL ? all : "", &failed);
		c->no_proxy = dup_or_null(np != NULL ? np : "", &failed);
	}
	/* Sent as a header line of our own rather than CURLOPT_USERAGENT, which
	 * curl formats anew for every request. */
	if (cfg->user_agent != NULL && !failed) {
		size_t n = strlen(cfg->user_agent) + sizeof("User-Agent: ");
		char *line = malloc(n);
		if (line != NULL) {
			snprintf(line, n, "User-Agent: %s", cfg->user_agent);
			c->ua_header = curl_slist_append(NULL, line); /* copies it */
			free(line);
		}
		if (c->ua_header == NULL)
			failed = 1;
	}
	c->multi = failed ? NULL : curl_multi_init();
	if (c->multi == NULL) {
		snprintf(err, errlen, failed ? "out of memory" : "curl_multi_init failed");
		http_client_free(c);
		return NULL;
	}
	/* The connection cache's size. curl's default is four per easy handle
	 * in the multi, and requests leave the multi as they finish: the last
	 * ones of a request_many batch returned their connections to a cache
	 * sized for two or three handles and closed others, so every batch of
	 * 16 opened new connections (a TLS handshake each over https). */
	curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS,
	                  cfg->max_connections > IDLE_CONNECTIONS ? cfg->max_connections
	                                                          : (long)IDLE_CONNECTIONS);
	if (cfg->max_connections > 0)
		curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, cfg->max_connections);
	return c;
}

void http_client_free(http_client *c)
{
	size_t i;
	if (c == NULL)
		return;
	for (i = 0; i < c->nidle; i++)
		http_request_free(NULL, c->idle[i]);
	if (c->multi != NULL)
		curl_multi_cleanup(c->multi);
	free(c->ca_file);
	free(c->ca_path);
	free(c->proxy_http);
	free(c->proxy_https);
	free(c->no_proxy);
	curl_slist_free_all(c->ua_header);
	free(c);
}

/* ------------------------------------------------------------------------
 * Response callbacks
 * ---------------------------------------------------------------------- */

static int is_space(char ch)
{
	return ch == ' ' || ch == '\t';
}

/* Receives one header line of a response. A status line starts a new
 * response (after 1xx or a redirect) and drops the headers seen so far. */
/* 1 when p[0, len) is a status line: "HTTP/" version SP 3 digits, then
 * the end or SP. A header or trailer line that merely begins with "HTTP/"
 * (it has a colon) is not one, so it cannot make the head start over. */
static int is_status_line(const char *p, size_t len)
{
	size_t i = 5;
	if (len < 5 || memcmp(p, "HTTP/", 5) != 0)
		return 0;
	while (i < len && ((p[i] >= '0' && p[i] <= '9') || p[i] == '.'))
		i++;
	if (i == 5 || i + 4 > len || p[i] != ' ')
		return 0;
	if (!(p[i + 1] >= '0' && p[i + 1] <= '9' && p[i + 2] >= '0' && p[i + 2] <= '9' &&
	      p[i + 3] >= '0' && p[i + 3] <= '9'))
		return 0;
	return i + 4 == len || p[i + 4] == ' ';
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *ud)
{
	http_request *r = ud;
	size_t n = size * nmemb, len = n, i, k, colon;
	char *out;

	r->head_bytes += n;
	if (r->head_bytes > HEADER_BYTES_MAX) {
		r->abort = ABORT_HEADERS;
		return 0;
	}
	while (len > 0 && (p[len - 1] == '\r' || p[len - 1] == '\n'))
		len--;
	if (is_status_line(p, len)) {
		r->head_buf.len = 0;
		r->head_bytes = n;
		r->head_done = 0;
		r->clen_len = 0;
		return n;
	}
	if (len == 0) {
		r->head_done = 1;
		return n;
	}
	/* Trailers of a chunked body come here too: they are not the
	 * response's headers (a trailer could otherwise pose as one). */
	if (r->head_done)
		return n;
	/* head_buf is "name\0value\0" pairs: a NUL inside a line would shift
	 * every later pair (curl >= 7.x rejects such lines itself). */
	if (memchr(p, '\0', len) != NULL)
		return n;
	if (is_space(p[0])) {
		/* obsolete line folding: continue the previous value */
		size_t start = 0;
		if (r->head_buf.len == 0)
			return n;
		while (start < len && is_space(p[start]))
			start++;
		while (len > start && is_space(p[len - 1]))
			len--;
		r->head_buf.len--; /* drop the previous value's NUL */
		if (buf_append(&r->head_buf, " ", 1) != 0 ||
		    buf_append(&r->head_buf, p + start, len - start) != 0 ||
		    buf_append(&r->head_buf, "", 1) != 0) {
			r->abort = ABORT_NOMEM;
			return 0;
		}
		return n;
	}
	for (colon = 0; colon < len && p[colon] != ':'; colon++)
		;
	if (colon == 0 || colon == len || colon >= 256)
		return n; /* not a header line; ignore it */
	i = colon + 1;
	while (i < len && is_space(p[i]))
		i++;
	while (len > i && is_space(p[len - 1]))
		len--;
	/* "name\0value\0", the name lower-cased on the way */
	out = buf_reserve(&r->head_buf, colon + 1 + (len - i) + 1);
	if (out == NULL) {
		r->abort = ABORT_NOMEM;
		return 0;
	}
	r->head_buf.len += colon + 1 + (len - i) + 1;
	for (k = 0; k < colon; k++) {
		char ch = p[k];
		*out++ = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
	}
	*out++ = '\0';
	memcpy(out, p + i, len - i);
	out[len - i] = '\0';
	out[len - i + 1] = '\0';  /* the buffer's own NUL after its bytes */
	if (colon == 14 && memcmp(out - 15, "content-length", 14) == 0) {
		/* Two different lengths: which one frames the body is anyone's
		 * guess (curl takes the last), the setup of response splitting.
		 * A protocol error, as breaker.cosocket has it. */
		const char *v = p + i;
		size_t vlen = len - i;
		while (vlen > 1 && v[0] == '0') {  /* "05" is 5 */
			v++;
			vlen--;
		}
		if (vlen > sizeof(r->clen)) {
			/* past 10^23: no length at all, and curl refuses it */
		} else if (r->clen_len == 0) {
			r->clen_len = (unsigned char)vlen;
			memcpy(r->clen, v, vlen);
		} else if (vlen != r->clen_len || memcmp(r->clen, v, vlen) != 0) {
			r->abort = ABORT_LENGTHS;
			return 0;
		}
	}
	return n;
}

/* Receives body bytes: streams them to on_chunk for a 2xx response when the
 * caller gave one, buffers them otherwise; enforces max_body on both. */
static size_t on_write(char *p, size_t size, size_t nmemb, void *ud)
{
	http_request *r = ud;
	size_t n = size * nmemb;

	if (r->body_mode == BODY_UNDECIDED) {
		long status = 0;
		if (r->on_chunk != NULL)
			curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
		r->body_mode = (status >= 200 && status < 300) ? BODY_STREAM : BODY_BUFFER;
	}
	if (n > r->max_body - r->result.received) {
		r->abort = ABORT_TOO_LARGE;
		return 0;
	}
	r->result.received += n;
	if (r->body_mode == BODY_STREAM) {
		int rc = r->on_chunk(r->chunk_ud, p, n);
		if (rc != 0) {
			r->result.chunk_status = rc;
			r->abort = ABORT_CHUNK;
			return 0;
		}
		return n;
	}
	if (buf_append(&r->body_buf, p, n) != 0) {
		r->abort = ABORT_NOMEM;
		return 0;
	}
	return n;
}

/* ------------------------------------------------------------------------
 * Requests
 * ---------------------------------------------------------------------- */

/* 1 when the header name s[0, len) is `lower` (lower case), in any case. */
static int name_is(const char *s, size_t len, const char *lower)
{
	size_t i;
	if (strlen(lower) != len)
		return 0;
	for (i = 0; i < len; i++) {
		char ch = s[i];
		if (ch >= 'A' && ch <= 'Z')
			ch = (char)(ch - 'A' + 'a');
		if (ch != lower[i])
			return 0;
	}
	return 1;
}

static int header_is(const http_header *h, const char *name)
{
	return name_is(h->name, h->name_len, name);
}

/* Length of the line for h: "name: value", or "name;" for an empty value
 * (how curl is told to send an empty header); without its NUL. */
static size_t header_line_len(const http_header *h)
{
	return h->name_len + (h->value_len == 0 ? 1 : 2 + h->value_len);
}

static char *write_header_line(char *p, const http_header *h)
{
	memcpy(p, h->name, h->name_len);
	p += h->name_len;
	if (h->value_len == 0) {
		*p++ = ';';
	} else {
		*p++ = ':';
		*p++ = ' ';
		memcpy(p, h->value, h->value_len);
		p += h->value_len;
	}
	*p++ = '\0';
	return p;
}

/* 1 when every header of spec is a token name with a value that cannot
 * end the line (no request smuggling through a name or value), and the
 * method, if any, is a token. Checked here for C callers too; the Lua
 * binding raises on the same rules before. */
int http_is_framing_header(const char *s, size_t len)
{
	return name_is(s, len, "content-length") || name_is(s, len, "transfer-encoding") ||
	       name_is(s, len, "connection");
}

static int spec_is_valid(const http_request_spec *spec)
{
	size_t i;
	if (spec->method != NULL && !http_is_token(spec->method, strlen(spec->method)))
		return 0;
	for (i = 0; i < spec->nheaders; i++) {
		const http_header *h = &spec->headers[i];
		if (!http_is_token(h->name, h->name_len) || !http_is_field_value(h->value, h->value_len) ||
		    http_is_framing_header(h->name, h->name_len))
			return 0;
	}
	return 1;
}

/* Builds r's request header list from the spec, as curl_slist nodes and
 * their lines in one block that the pooled request keeps (curl only reads
 * the list). Returns 0 or -1. */
static int build_headers(const http_client *c, http_request *r, const http_request_spec *spec)
{
	const char *extra[3];
	size_t i, n = 0, nextra = 0, bytes = 0, need;
	int has_expect = 0, has_type = 0, has_agent = 0;
	struct curl_slist *nodes;
	char *p;

	for (i = 0; i < spec->nheaders; i++) {
		const http_header *h = &spec->headers[i];
		if (h->name_len > SIZE_MAX / 4 || h->value_len > SIZE_MAX / 4)
			return -1;
		has_expect |= header_is(h, "expect");
		has_type |= header_is(h, "content-type");
		has_agent |= header_is(h, "user-agent");
		bytes += header_line_len(h) + 1;
		if (bytes > SIZE_MAX / 4)
			return -1;
	}
	/* No "Expect: 100-continue" round trip, and no form content type that
	 * curl would otherwise invent for a body. A value-less "Name:" line
	 * tells curl to drop its own header. curl asks for 100-continue only
	 * above 1024 bytes of body (1 MiB since 7.63), so a smaller body needs
	 * no line (each costs curl some work on every request). */
	if (!has_expect && spec->body != NULL && spec->body_len > 1024)
		extra[nextra++] = "Expect:";
	if (spec->body != NULL && !has_type)
		extra[nextra++] = "Content-Type:";
	/* the client's User-Agent, unless the request brings its own */
	if (c->ua_header != NULL && !has_agent)
		extra[nextra++] = c->ua_header->data;
	for (i = 0; i < nextra; i++)
		bytes += strlen(extra[i]) + 1;
	n = spec->nheaders + nextra;
	r->headers = NULL;
	if (n == 0)
		return 0;
	need = n * sizeof(struct curl_slist) + bytes;
	if (need > r->hdr_cap) {
		char *block = realloc(r->hdr_block, need);
		if (block == NULL)
			return -1;
		r->hdr_block = block;
		r->hdr_cap = need;
	}
	nodes = (struct curl_slist *)(void *)r->hdr_block;
	p = r->hdr_block + n * sizeof(struct curl_slist);
	for (i = 0; i < n; i++) {
		nodes[i].data = p;
		nodes[i].next = i + 1 < n ? &nodes[i + 1] : NULL;
		if (i < spec->nheaders) {
			p = write_header_line(p, &spec->headers[i]);
		} else {
			size_t len = strlen(extra[i - spec->nheaders]) + 1;
			memcpy(p, extra[i - spec->nheaders], len);
			p += len;
		}
	}
	r->headers = nodes;
	return 0;
}

/* Sets the options that are the same for every request of c; a handle
 * keeps them while it waits in c's pool. */
static void setup_handle(http_client *c, http_request *r)
{
	opt_long(r, CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500 /* 7.85.0 */
	opt_str(r, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	opt_long(r, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	opt_write_fn(r, CURLOPT_WRITEFUNCTION, on_write);
	opt_write_fn(r, CURLOPT_HEADERFUNCTION, on_header);
	opt_long(r, CURLOPT_SSL_VERIFYPEER, c->verify_tls ? 1L : 0L);
	opt_long(r, CURLOPT_SSL_VERIFYHOST, c->verify_tls ? 2L : 0L);
	if (c->ca_file != NULL)
		opt_str(r, CURLOPT_CAINFO, c->ca_file);
	if (c->ca_path != NULL)
		opt_str(r, CURLOPT_CAPATH, c->ca_path);
	opt_long(r, CURLOPT_TCP_KEEPALIVE, 1L);
	opt_str(r, CURLOPT_NOPROXY, c->no_proxy);
	/* Request headers (the Authorization among them) go to the server only;
	 * a proxy's CONNECT gets only the User-Agent. curl's default since 7.42.1,
	 * set here so that it holds whatever the build. */
	opt_long(r, CURLOPT_HEADEROPT, CURLHEADER_SEPARATE);
	if (c->ua_header != NULL)
		opt_slist(r, CURLOPT_PROXYHEADER, c->ua_header);
}

/* A request from c's pool, or a new one with a configured handle; NULL
 * when out of memory. Its own fields are cleared either way. */
static http_request *take_request(http_client *c)
{
	http_request *r;
	if (c->nidle > 0) {
		r = c->idle[--c->nidle];
	} else {
		r = calloc(1, sizeof(*r));
		if (r == NULL)
			return NULL;
		r->set_timeout_ms = r->set_connect_ms = -1;
		r->set_max_body = -1;
		r->set_https = -1;
		r->easy = curl_easy_init();
		if (r->easy == NULL) {
			free(r);
			return NULL;
		}
		setup_handle(c, r);
		opt_ptr(r, CURLOPT_ERRORBUFFER, r->errbuf);
		opt_ptr(r, CURLOPT_PRIVATE, r);
		opt_ptr(r, CURLOPT_WRITEDATA, r);
		opt_ptr(r, CURLOPT_HEADERDATA, r);
	}
	r->headers = NULL;
	r->body = NULL;
	r->body_len = 0;
	r->max_body = 0;
	r->on_chunk = NULL;
	r->chunk_ud = NULL;
	r->body_mode = BODY_UNDECIDED;
	r->abort = ABORT_NONE;
	r->in_multi = 0;
	r->done = 0;
	/* setup_error stays: a handle that refused an option is never pooled */
	r->head_bytes = 0;
	r->head_done = 0;
	r->clen_len = 0;
	r->body_buf.len = 0;
	r->head_buf.len = 0;
	r->errbuf[0] = '\0';
	memset(&r->result, 0, sizeof(r->result));
	return r;
}

/* Gives curl the URL, parsed here once for every request that repeats it.
 * Given a URL string, curl parses it and writes it out again, normalised,
 * at the start of every transfer: about 12k instructions, a sixth of a
 * keep-alive request (callgrind). Given a parsed handle (CURLOPT_CURLU),
 * it copies the handle instead. The string is still set: curl reports it
 * (effective URL) and would resolve redirects against it. The parse takes
 * the flags curl gives its own; a URL it refuses goes to curl as a string
 * alone, so curl reports it as it always has. */
static void set_url(http_request *r, const char *url)
{
	opt_str(r, CURLOPT_URL, url);
#if LIBCURL_VERSION_NUM >= 0x073f00  /* 7.63.0: CURLOPT_CURLU */
	{
		int parsed = 0;
		if (r->url_handle == NULL)
			r->url_handle = curl_url();
		if (r->url_handle != NULL)
			parsed = curl_url_set(r->url_handle, CURLUPART_URL, url,
					      CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) ==
				 CURLUE_OK;
		if (parsed || r->set_curlu) {
			/* not a setup error if refused: the string serves */
			if (curl_easy_setopt(r->easy, CURLOPT_CURLU,
					     parsed ? r->url_handle : NULL) != CURLE_OK)
				parsed = 0;
			r->set_curlu = parsed;
		}
	}
#endif
}

/* Sets the options of this request: every option a previous request on
 * the same handle may have set, unless it already holds this request's
 * value, so nothing leaks between them. */
static void setup_request(const http_client *c, http_request *r, const http_request_spec *spec)
{
	const char *method = spec->method;
	int https = strncasecmp(spec->url, "https:", 6) == 0;
	size_t url_len = strlen(spec->url);
	curl_off_t max_body = spec->max_body < (size_t)INT64_MAX ? (curl_off_t)spec->max_body : 0;

	if (r->set_url.data == NULL || r->set_url.len != url_len ||
	    memcmp(r->set_url.data, spec->url, url_len) != 0) {
		set_url(r, spec->url);
		r->set_url.len = 0;
		if (buf_append(&r->set_url, spec->url, url_len) != 0)
			buf_free(&r->set_url);  /* set again next time */
	}
	if (https != r->set_https) {
		/* the environment's proxy for this scheme, as read by
		 * http_client_new ("" is none; no_proxy, set with the handle,
		 * still exempts hosts) */
		opt_str(r, CURLOPT_PROXY, https ? c->proxy_https : c->proxy_http);
		/* An https request to a host whose connection is still being set
		 * up waits to learn (by ALPN) whether it speaks HTTP/2, and then
		 * shares it rather than opening a connection of its own:
		 * request_many to a provider makes one TLS handshake, not one per
		 * request. Plain http is HTTP/1.1 here, where waiting would only
		 * hold requests back. */
		opt_long(r, CURLOPT_PIPEWAIT, https ? 1L : 0L);
		r->set_https = https;
	}
	if (spec->timeout_ms != r->set_timeout_ms) {
		opt_long(r, CURLOPT_TIMEOUT_MS, spec->timeout_ms);
		r->set_timeout_ms = spec->timeout_ms;
	}
	if (spec->connect_timeout_ms != r->set_connect_ms) {
		opt_long(r, CURLOPT_CONNECTTIMEOUT_MS, spec->connect_timeout_ms);
		r->set_connect_ms = spec->connect_timeout_ms;
	}
	if (max_body != r->set_max_body) {
		opt_off(r, CURLOPT_MAXFILESIZE_LARGE, max_body);
		r->set_max_body = max_body;
	}
	opt_slist(r, CURLOPT_HTTPHEADER, r->headers);

	/* the method: NOBODY 0 first, as a HEAD before would otherwise stick */
	if (method == NULL)
		method = spec->body != NULL ? "POST" : "GET";
	if (r->set_nobody) {
		opt_long(r, CURLOPT_NOBODY, 0L);
		r->set_nobody = 0;
	}
	if (r->set_custom) {
		opt_str(r, CURLOPT_CUSTOMREQUEST, NULL);
		r->set_custom = 0;
	}
	if (spec->body != NULL || strcmp(method, "POST") == 0) {
		opt_off(r, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)spec->body_len);
		opt_str(r, CURLOPT_POSTFIELDS, spec->body != NULL ? spec->body : "");
		if (strcmp(method, "POST") != 0) {
			opt_str(r, CURLOPT_CUSTOMREQUEST, method);
			r->set_custom = 1;
		}
		return;
	}
	opt_str(r, CURLOPT_POSTFIELDS, NULL);
	opt_off(r, CURLOPT_POSTFIELDSIZE_LARGE, -1);
	opt_long(r, CURLOPT_HTTPGET, 1L);
	if (strcmp(method, "HEAD") == 0) {
		opt_long(r, CURLOPT_NOBODY, 1L);
		r->set_nobody = 1;
	} else if (strcmp(method, "GET") != 0) {
		opt_str(r, CURLOPT_CUSTOMREQUEST, method);
		r->set_custom = 1;
	}
}

static http_request *request_new(http_client *c, const http_request_spec *spec, int checked)
{
	http_request *r = take_request(c);
	if (r == NULL)
		return NULL;
	r->result.kind = HTTP_EOTHER;
	r->result.message = r->message;
	r->body = spec->body;
	r->body_len = spec->body_len;
	r->max_body = spec->max_body;
	r->on_chunk = spec->on_chunk;
	r->chunk_ud = spec->chunk_ud;
	snprintf(r->message, sizeof(r->message), "request did not run");
	if (r->setup_error != CURLE_OK) {  /* a new handle refused a client option */
		CURLcode rc = r->setup_error;
		fail(r, classify(rc) == HTTP_EOTHER ? HTTP_EOTHER : HTTP_EINVALID, (int)rc,
		     "request setup: %s", curl_easy_strerror(rc));
		return r;
	}
	if (!checked && !spec_is_valid(spec)) {
		/* never the value in the message: it may be a credential */
		fail(r, HTTP_EINVALID, CURLE_BAD_FUNCTION_ARGUMENT,
		     "invalid method or header (name not a token, CR, LF or NUL in a value, or a "
		     "header the transport sets: Content-Length, Transfer-Encoding, Connection)");
		return r;
	}
	if (build_headers(c, r, spec) != 0) {
		fail(r, HTTP_EOTHER, CURLE_OUT_OF_MEMORY, "out of memory building request headers");
		return r;
	}
	setup_request(c, r, spec);
	if (r->setup_error != CURLE_OK) {
		CURLcode rc = r->setup_error;
		fail(r, classify(rc) == HTTP_EOTHER ? HTTP_EOTHER : HTTP_EINVALID, (int)rc,
		     "request setup: %s", curl_easy_strerror(rc));
	}
	return r;
}

const http_result *http_request_result(const http_request *r)
{
	return &r->result;
}

http_request *http_request_new(http_client *c, const http_request_spec *spec)
{
	return request_new(c, spec, 0);
}

http_request *http_request_new_checked(http_client *c, const http_request_spec *spec)
{
	return request_new(c, spec, 1);
}

/* Drops a buffer bigger than a pooled request should hold on to. */
static void trim_buf(buf *b)
{
	if (b->cap > KEEP_BUF_MAX)
		buf_free(b);
	b->len = 0;
}

void http_request_free(http_client *c, http_request *r)
{
	if (r == NULL)
		return;
	if (r->easy != NULL && r->in_multi && c != NULL)
		curl_multi_remove_handle(c->multi, r->easy);
	r->in_multi = 0;
	/* A request whose handle refused an option may lack client settings:
	 * never pooled. A pooled one keeps its handle, whose options point at
	 * it, and its buffers up to KEEP_BUF_MAX. */
	if (c != NULL && c->nidle < POOL_MAX && r->easy != NULL && r->setup_error == CURLE_OK) {
		trim_buf(&r->body_buf);
		trim_buf(&r->head_buf);
		if (r->set_url.cap > KEEP_BUF_MAX)
			buf_free(&r->set_url);  /* CURLOPT_URL is then set again */
		if (r->hdr_cap > KEEP_BUF_MAX) {
			free(r->hdr_block);
			r->hdr_block = NULL;
			r->hdr_cap = 0;
			opt_slist(r, CURLOPT_HTTPHEADER, NULL);  /* no pointer into freed memory */
		}
		if (r->index_cap * sizeof(*r->index) > KEEP_BUF_MAX) {
			free(r->index);
			r->index = NULL;
			r->index_cap = 0;
		}
		c->idle[c->nidle++] = r;
		return;
	}
	if (r->easy != NULL)
		curl_easy_cleanup(r->easy);
#if LIBCURL_VERSION_NUM >= 0x073f00
	curl_url_cleanup(r->url_handle);  /* after the handle that points at it */
#endif
	free(r->hdr_block);
	buf_free(&r->body_buf);
	buf_free(&r->head_buf);
	buf_free(&r->set_url);
	free(r->index);
	free(r);
}

/* ------------------------------------------------------------------------
 * Running requests
 * ---------------------------------------------------------------------- */

static double info_seconds(CURL *easy, CURLINFO what)
{
	curl_off_t us = 0;
	if (curl_easy_getinfo(easy, what, &us) != CURLE_OK)
		return 0.0;
	return (double)us / 1e6;
}

/* Points the result's header array into head_buf. Returns 0 or -1. */
static int index_headers(http_request *r)
{
	size_t n = 0, i = 0, off = 0;
	const char *p = r->head_buf.data;

	for (off = 0; off < r->head_buf.len; off++)
		if (p[off] == '\0')
			n++;
	n /= 2;
	if (n == 0)
		return 0;
	if (n > r->index_cap) {
		http_header *index = realloc(r->index, n * sizeof(*index));
		if (index == NULL)
			return -1;
		r->index = index;
		r->index_cap = n;
	}
	off = 0;
	for (i = 0; i < n; i++) {
		http_header *h = &r->index[i];
		h->name = p + off;
		h->name_len = strlen(h->name);
		off += h->name_len + 1;
		h->value = p + off;
		h->value_len = strlen(h->value);
		off += h->value_len + 1;
	}
	r->result.headers = r->index;
	r->result.nheaders = n;
	return 0;
}

/* Fills r's result once curl reports it done with code. */
/* The kind of a transfer that failed with `code`. Once the request went
 * out and a reply came back, codes that otherwise mean a caller's mistake
 * come from that reply: curl 7.88 says "unsupported protocol" for a status
 * line it cannot read (HTTP/0.9, a status of 2000 or 099) and "bad function
 * argument" for a bad chunk size. The server broke HTTP: a protocol error,
 * which the breaker counts, not an invalid request, which it ignores. A
 * header line over curl's 100 KB limit comes back as "out of memory":
 * too_large, as a body over max_body. */
static http_kind kind_of_failure(http_request *r, CURLcode code)
{
	http_kind kind = classify(code);
	long sent = 0;  /* CURLINFO_REQUEST_SIZE is a long */
	if (kind != HTTP_EINVALID && code != CURLE_OUT_OF_MEMORY)
		return kind;
	if (code == CURLE_URL_MALFORMAT)
		return kind;
	if (curl_easy_getinfo(r->easy, CURLINFO_REQUEST_SIZE, &sent) != CURLE_OK)
		sent = 0;
	if (sent <= 0 && r->head_bytes == 0)
		return kind;  /* refused before anything was sent */
	return code == CURLE_OUT_OF_MEMORY ? HTTP_ETOOLARGE : HTTP_EPROTOCOL;
}

static void finish(http_request *r, CURLcode code)
{
	http_result *res = &r->result;
	long status = 0;

	curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
	res->status = status;
	res->connect_time = info_seconds(r->easy, CURLINFO_CONNECT_TIME_T);
	res->first_byte_time = info_seconds(r->easy, CURLINFO_STARTTRANSFER_TIME_T);
	res->total_time = info_seconds(r->easy, CURLINFO_TOTAL_TIME_T);
	/* a 2xx answer with on_chunk streamed, also with no body bytes (HEAD,
	 * 204, empty): as breaker.cosocket has it */
	res->streamed = r->on_chunk != NULL && status >= 200 && status < 300;
	res->body = r->body_buf.data != NULL ? r->body_buf.data : "";
	res->body_len = r->body_buf.len;

	if (code != CURLE_OK && r->abort == ABORT_TOO_LARGE) {
		fail(r, HTTP_ETOOLARGE, (int)code, "response body exceeds max_body (%lu bytes)",
		     (unsigned long)r->max_body);
	} else if (code == CURLE_FILESIZE_EXCEEDED) {
		fail(r, HTTP_ETOOLARGE, (int)code,
		     "response body exceeds max_body (%lu bytes): Content-Length too large",
		     (unsigned long)r->max_body);
	} else if (code != CURLE_OK && r->abort == ABORT_HEADERS) {
		fail(r, HTTP_ETOOLARGE, (int)code, "response headers exceed %d bytes",
		     HEADER_BYTES_MAX);
	} else if (code != CURLE_OK && r->abort == ABORT_CHUNK) {
		fail(r, HTTP_EABORTED, (int)code, "transfer aborted by on_chunk");
	} else if (code != CURLE_OK && r->abort == ABORT_LENGTHS) {
		fail(r, HTTP_EPROTOCOL, (int)code, "the response has conflicting Content-Length headers");
	} else if (code != CURLE_OK && r->abort == ABORT_NOMEM) {
		fail(r, HTTP_EOTHER, (int)code, "out of memory receiving the response");
	} else if (code != CURLE_OK) {
		const char *what = curl_easy_strerror(code);
		http_kind kind = kind_of_failure(r, code);
		if (r->errbuf[0] != '\0' && strcmp(r->errbuf, what) != 0)
			fail(r, kind, (int)code, "%s: %s", what, r->errbuf);
		else
			fail(r, kind, (int)code, "%s", what);
	} else if (index_headers(r) != 0) {
		fail(r, HTTP_EOTHER, CURLE_OUT_OF_MEMORY, "out of memory indexing headers");
	} else {
		res->kind = HTTP_OK;
		res->curl_code = 0;
		r->message[0] = '\0';
		r->done = 1;
	}
}

/* Fails every request still in the multi handle after the multi failed. */
static void fail_running(http_client *c, http_request *const *reqs, size_t n, CURLMcode mc)
{
	size_t i;
	for (i = 0; i < n; i++) {
		http_request *r = reqs[i];
		if (r == NULL || !r->in_multi)
			continue;
		curl_multi_remove_handle(c->multi, r->easy);
		r->in_multi = 0;
		fail(r, HTTP_EOTHER, CURLE_FAILED_INIT, "curl multi: %s", curl_multi_strerror(mc));
	}
}

int http_perform(http_client *c, http_request *const *reqs, size_t n)
{
	size_t i, active = 0;
	CURLMcode mc;

	for (i = 0; i < n; i++) {
		http_request *r = reqs[i];
		if (r == NULL || r->done)
			continue;
		r->errbuf[0] = '\0';
		mc = curl_multi_add_handle(c->multi, r->easy);
		if (mc != CURLM_OK) {
			fail(r, HTTP_EOTHER, CURLE_FAILED_INIT, "curl multi: %s",
			     curl_multi_strerror(mc));
			continue;
		}
		r->in_multi = 1;
		active++;
	}
	while (active > 0) {
		int running = 0, left = 0;
		CURLMsg *msg;

		mc = curl_multi_perform(c->multi, &running);
		if (mc != CURLM_OK) {
			fail_running(c, reqs, n, mc);
			return -1;
		}
		while ((msg = curl_multi_info_read(c->multi, &left)) != NULL) {
			http_request *r = NULL;
			char *priv = NULL;
			if (msg->msg != CURLMSG_DONE)
				continue;
			/* CURLOPT_PRIVATE is the request (set by setup_request):
			 * no scan of reqs, which made a large batch quadratic */
			if (curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv) == CURLE_OK)
				r = (http_request *)(void *)priv;
			if (r != NULL && r->in_multi && r->easy == msg->easy_handle) {
				CURLcode code = msg->data.result;
				/* msg is invalid once the handle is removed */
				curl_multi_remove_handle(c->multi, r->easy);
				r->in_multi = 0;
				finish(r, code);
				active--;
			}
		}
		if (active == 0)
			break;
		/* curl caps the wait at its own next timeout */
		mc = curl_multi_poll(c->multi, NULL, 0, 1000, NULL);
		if (mc != CURLM_OK) {
			fail_running(c, reqs, n, mc);
			return -1;
		}
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Retry-After
 * ---------------------------------------------------------------------- */

/* Trims optional whitespace; returns 0 when the value cannot be one at all. */
static int trim_value(const char **s, size_t *len)
{
	const char *p = *s;
	size_t n = *len;
	if (p == NULL || n == 0 || n > 256 || memchr(p, '\0', n) != NULL)
		return 0;
	while (n > 0 && is_space(*p)) {
		p++;
		n--;
	}
	while (n > 0 && is_space(p[n - 1]))
		n--;
	*s = p;
	*len = n;
	return n > 0;
}

/* Parses DIGITS or, with allow_fraction, DIGITS "." DIGITS, no sign, no
 * exponent, at most 15 integer digits. Returns 1 and *out, or 0. */
static int parse_decimal(const char *p, size_t n, int allow_fraction, double *out)
{
	size_t i = 0, digits = 0;
	double v = 0.0, scale = 1.0;

	for (; i < n && p[i] >= '0' && p[i] <= '9'; i++, digits++) {
		if (digits >= 15)
			return 0;
		v = v * 10.0 + (p[i] - '0');
	}
	if (digits == 0)
		return 0;
	if (i < n && allow_fraction && p[i] == '.') {
		size_t frac = 0;
		for (i++; i < n && p[i] >= '0' && p[i] <= '9'; i++, frac++) {
			if (frac < 9) {
				scale /= 10.0;
				v += (p[i] - '0') * scale;
			}
		}
		if (frac == 0)
			return 0;
	}
	if (i != n)
		return 0;
	*out = v;
	return 1;
}

int http_parse_retry_after(const char *s, size_t len, double now, double *out)
{
	char date[257];
	size_t i;
	int letters = 0;
	time_t when;
	double delta;

	if (!trim_value(&s, &len))
		return 0;
	if (s[0] >= '0' && s[0] <= '9' && parse_decimal(s, len, 0, &delta)) {
		if (delta > HTTP_RETRY_AFTER_MAX)
			return 0;
		*out = delta;
		return 1;
	}
	/* An HTTP-date has a day or month name; bare numbers, signs and
	 * punctuation are garbage, not dates. */
	for (i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch < 0x20 || ch > 0x7e)
			return 0;
		letters += (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z');
	}
	if (letters < 3)
		return 0;
	memcpy(date, s, len);
	date[len] = '\0';
	when = curl_getdate(date, NULL);
	if (when == (time_t)-1)
		return 0;
	delta = (double)when - now;
	if (delta > HTTP_RETRY_AFTER_MAX)
		return 0;
	*out = delta > 0.0 ? delta : 0.0;
	return 1;
}

int http_parse_retry_after_ms(const char *s, size_t len, double *out)
{
	double ms;
	if (!trim_value(&s, &len) || !parse_decimal(s, len, 1, &ms))
		return 0;
	if (ms > HTTP_RETRY_AFTER_MAX)
		return 0;
	*out = ms / 1000.0;
	return 1;
}
