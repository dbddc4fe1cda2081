/*
 * http.h - a small blocking HTTP client over libcurl, with no Lua in it.
 *
 * A client owns one curl multi handle, so every request made through it
 * shares one connection cache (keep-alive) whether it runs alone or in a
 * parallel batch. Requests are prepared from a spec, run to completion by
 * http_perform (one or many at once), and then read through their result.
 *
 * Thread safety: libcurl's global init runs once (pthread_once) and every
 * handle is made with CURLOPT_NOSIGNAL, so clients can be used from any
 * thread; one client must not be used by two threads at the same time.
 * The Lua binding is lhttp.c; nothing here calls back into Lua except
 * through the http_chunk_fn a caller supplies.
 */
#ifndef BREAKER_HTTP_H
#define BREAKER_HTTP_H

#include <stddef.h>
#include <time.h>

/* Why a request failed; HTTP_OK when a complete response arrived, whatever
 * its status. Names (http_kind_name) are the `kind` of Lua errors. */
typedef enum http_kind {
	HTTP_OK = 0,
	HTTP_ETIMEOUT,   /* "timeout": total or connect timeout expired */
	HTTP_ECONNECT,   /* "connect": refused or unreachable */
	HTTP_EDNS,       /* "dns": host name did not resolve */
	HTTP_ETLS,       /* "tls": handshake or certificate verification */
	HTTP_ERESET,     /* "reset": connection closed or reset mid-way */
	HTTP_ETOOLARGE,  /* "too_large": body beyond max_body, or headers too big */
	HTTP_EINVALID,   /* "invalid": curl refused the request (bad URL, option) */
	HTTP_EABORTED,   /* "aborted": the chunk callback asked to stop */
	HTTP_EPROTOCOL,  /* "protocol": the server broke HTTP */
	HTTP_EOTHER      /* "other": anything else (out of memory, ...) */
} http_kind;

/* The stable name of a kind ("timeout", "connect", ...); never NULL. */
const char *http_kind_name(http_kind kind);

/* One header; the strings need not be NUL-terminated. */
typedef struct http_header {
	const char *name;
	size_t name_len;
	const char *value;
	size_t value_len;
} http_header;

/* Client-wide settings. Strings are copied by http_client_new. */
typedef struct http_client_config {
	int verify_tls;          /* 0 only when the caller explicitly asked */
	const char *ca_file;     /* CA bundle, or NULL for curl's default */
	const char *ca_path;     /* CA directory, or NULL */
	const char *user_agent;  /* or NULL for none */
	long max_connections;    /* per host, 0 = unlimited */
} http_client_config;

/* Receives body bytes as they arrive, for 2xx responses only (other
 * responses are buffered so their error body can be read). Returns 0 to go
 * on; any other value aborts the transfer with HTTP_EABORTED and is kept as
 * the result's chunk_status. */
typedef int (*http_chunk_fn)(void *ud, const char *data, size_t len);

/* What to send. Everything is borrowed: method, url and headers only until
 * http_request_new returns (curl copies them); body until the request is
 * freed. */
typedef struct http_request_spec {
	const char *method;          /* NULL: POST with a body, else GET */
	const char *url;             /* http:// or https:// (checked by curl) */
	const http_header *headers;
	size_t nheaders;
	const char *body;            /* NULL: no body */
	size_t body_len;
	long timeout_ms;             /* whole transfer, 0 = none */
	long connect_timeout_ms;     /* 0 = curl's default */
	size_t max_body;             /* bytes of body accepted (streamed too) */
	http_chunk_fn on_chunk;      /* NULL: buffer the body */
	void *chunk_ud;              /* passed to on_chunk, borrowed */
} http_request_spec;

/* The outcome of a finished request. Pointers are owned by the request and
 * valid until http_request_free. */
typedef struct http_result {
	http_kind kind;
	int curl_code;          /* CURLcode, 0 on success */
	int chunk_status;       /* what on_chunk returned when it aborted */
	long status;            /* HTTP status, 0 when none arrived */
	int streamed;           /* 1 when the body went to on_chunk */
	const char *message;    /* NUL-terminated; "" on success */
	const char *body;       /* buffered body (not NUL-terminated) */
	size_t body_len;
	size_t received;        /* body bytes received, streamed or not */
	const http_header *headers;  /* of the final response; names lower-case */
	size_t nheaders;
	double connect_time;    /* seconds from start: connected */
	double first_byte_time; /* seconds from start: first response byte */
	double total_time;      /* seconds from start: done */
} http_result;

typedef struct http_client http_client;
typedef struct http_request http_request;

/* Makes a client, or returns NULL and writes why into err (errlen bytes). */
http_client *http_client_new(const http_client_config *cfg, char *err, size_t errlen);

/* Frees a client, its idle handles and its open connections. The client
 * must not be inside http_perform. NULL is allowed. */
void http_client_free(http_client *c);

/* Prepares a request on c. Returns NULL only when out of memory; a request
 * curl refuses to set up, or whose method or headers fail http_is_token /
 * http_is_field_value / http_is_framing_header, is returned already
 * finished with an error, so http_perform skips it. */
http_request *http_request_new(http_client *c, const http_request_spec *spec);

/* The same for a caller that has already checked the method and headers
 * with those two functions (the Lua binding). Not exported from the shared
 * object: a C or FFI caller cannot skip the checks. */
http_request *http_request_new_checked(http_client *c, const http_request_spec *spec)
	__attribute__((visibility("hidden")));

/* Runs the n requests in parallel until every one is finished. Returns 0, or
 * -1 when the multi interface itself failed (the requests then carry an
 * error). Must not be called again from inside an on_chunk callback. */
int http_perform(http_client *c, http_request *const *reqs, size_t n);

/* The result of a finished request (kind HTTP_EOTHER before it ran). */
const http_result *http_request_result(const http_request *r);

/* Frees a request. With c, the client that made it, the request goes back
 * to c's pool whole (its curl handle, configured for c, and its buffers)
 * for c's next request; never pass another client. With c NULL (e.g. the
 * client is gone) it is destroyed. */
void http_request_free(http_client *c, http_request *r);

/* Parses a Retry-After value: delta-seconds ("120") or an HTTP-date (with
 * curl_getdate; the seconds from now, seconds since the epoch with its
 * fraction, to that date; a past date gives 0). Stores seconds in *out and
 * returns 1, or returns 0 for anything else: empty, garbage, negative, NUL
 * bytes, longer than 256 bytes, or beyond HTTP_RETRY_AFTER_MAX seconds. */
int http_parse_retry_after(const char *s, size_t len, double now, double *out);

/* Parses a retry-after-ms value ("1500", "1500.5") into seconds, with the
 * same rules (the limit is HTTP_RETRY_AFTER_MAX milliseconds). */
int http_parse_retry_after_ms(const char *s, size_t len, double *out);

/* Largest Retry-After accepted: anything bigger is treated as garbage. */
#define HTTP_RETRY_AFTER_MAX 2147483647.0

/* 1 when s[0, len) is a non-empty HTTP token (RFC 9110): a valid method or
 * header name. Shared by the C API's checks and the Lua binding's. */
int http_is_token(const char *s, size_t len);

/* 1 when s[0, len) holds no CR, LF or NUL, so it cannot end a header line
 * early: a valid header value. Shared like http_is_token. */
int http_is_field_value(const char *s, size_t len);

/* 1 when the header name s[0, len) is one the transport sets itself and a
 * caller may not (Content-Length, Transfer-Encoding, Connection: a caller's
 * value could frame the body differently from what is sent, and the next
 * request on the kept-alive connection would read the wrong answer). */
int http_is_framing_header(const char *s, size_t len);

#endif
