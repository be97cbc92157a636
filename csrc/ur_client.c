/*
 * ur_client.c - see ur_client.h and PROTOCOL.md.
 *
 * Self-contained: a SOCK_SEQPACKET socket, SCM_RIGHTS, the userfaultfd
 * calls, and a small bounds-checked JSON reader for exactly the shapes the
 * server sends (hello, ready, error, stats, bye, shutdown). It does not use
 * ur_shim.c, so the library links on its own.
 */
#define _GNU_SOURCE
#include "ur_client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <linux/capability.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>

/* What Debian's 6.1 uapi headers may lack; values from upstream. */
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1 << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define UR_MAX_FDS 4
#define UR_MAX_NAME 4096
#define UR_MAX_DEPTH 32
#define UR_ERRLEN 512

struct ur_session {
	int sock;
	int uffd;
	uint64_t features;
	unsigned uffd_flags; /* UR_UFFD_* */
	uint64_t page_size, chunk_size, file_size;
	char backing[16];
	char *snapshot;
	size_t nregions;
	struct ur_region *regions;
	int timeout_ms;
	int shutdown_requested;
	char err[UR_ERRLEN];
	/* Re-attaching (PROTOCOL.md 5.1): what a reconnect needs. */
	char *path;
	int backing_fd; /* kept to hand back to a restarted server; -1 if it cannot re-attach */
	int private_mapping;
	uint32_t server_uid;
	int reattach_ms; /* < 0: off */
	char snapshot_id[64];
	unsigned reattaches;
	/* ur_connect / ur_attach_mappings: mappings the program made itself. */
	int pending; /* s->sock has the hello read and no attach sent yet (ur_connect) */
	int fork_events; /* ask for UFFD_FEATURE_EVENT_FORK on new userfaultfds */
	struct ur_link *links; /* one per ur_attach_mappings call, newest first */
};

/* One attach of ur_attach_mappings: its connection (the session's own
 * socket for the first call of a ur_connect session, sock == -1 here
 * then), its userfaultfd and the ranges it registered. */
struct ur_link {
	struct ur_link *next;
	int sock, uffd;
	size_t n;
	struct ur_mapping *maps;
};

static __thread char last_err[UR_ERRLEN];

static void seterr(char *dst, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void seterr(char *dst, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(dst, UR_ERRLEN, fmt, ap);
	va_end(ap);
}

const char *ur_strerror(int code)
{
	switch (code) {
	case 0:
		return "success";
	case UR_EMALFORMED:
		return "malformed message from the server";
	case UR_ETOOLARGE:
		return "message too large";
	case UR_EREFUSED:
		return "refused by the server";
	case UR_EVERSION:
		return "unsupported protocol version";
	case UR_ECLOSED:
		return "the server closed the connection";
	case UR_ENOFEATURE:
		return "the kernel lacks userfaultfd minor faults for this backing";
	case UR_EADDR:
		return "region has no usable original address";
	case UR_ETIMEDOUT:
		return "timed out waiting for the server";
	case UR_ESNAPSHOT:
		return "the restarted server serves another snapshot";
	case UR_EUNTRUSTED:
		return "the server runs as an untrusted uid";
	case UR_ENOREGION:
		return "no such region (or an empty one)";
	case UR_EMAPRANGE:
		return "mapping range misaligned or outside its region";
	case UR_ENOTBACKING:
		return "the range is not a mapping of the session's backing";
	}
	if (code < 0 && code > -4096)
		return strerror(-code);
	return "unknown error";
}

const char *ur_session_error(const struct ur_session *s)
{
	return s ? s->err : last_err;
}

/* ---- JSON reading ------------------------------------------------------ */

struct jp {
	const char *s;
	size_t n, i;
	int depth;
};

static void jws(struct jp *p)
{
	while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r'))
		p->i++;
}

static int jpeek(struct jp *p)
{
	jws(p);
	return p->i < p->n ? (unsigned char)p->s[p->i] : -1;
}

static int jexpect(struct jp *p, char c)
{
	if (jpeek(p) != (unsigned char)c)
		return -1;
	p->i++;
	return 0;
}

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int jhex4(struct jp *p, unsigned *v)
{
	if (p->n - p->i < 4)
		return -1;
	*v = 0;
	for (int k = 0; k < 4; k++) {
		int h = hexval((unsigned char)p->s[p->i++]);
		if (h < 0)
			return -1;
		*v = *v << 4 | (unsigned)h;
	}
	return 0;
}

/* Decodes a string into out (NUL-terminated, at most cap-1 bytes) or, with
 * out == NULL, skips it. Returns -1 on a syntax error or when it is longer. */
static int jstring(struct jp *p, char *out, size_t cap)
{
	size_t o = 0;
	if (jexpect(p, '"') < 0)
		return -1;
	for (;;) {
		if (p->i >= p->n)
			return -1;
		unsigned char c = (unsigned char)p->s[p->i++];
		char enc[4];
		size_t elen = 1;
		if (c == '"')
			break;
		if (c < 0x20)
			return -1;
		enc[0] = (char)c;
		if (c == '\\') {
			if (p->i >= p->n)
				return -1;
			c = (unsigned char)p->s[p->i++];
			switch (c) {
			case '"': case '\\': case '/':
				enc[0] = (char)c;
				break;
			case 'b': enc[0] = '\b'; break;
			case 'f': enc[0] = '\f'; break;
			case 'n': enc[0] = '\n'; break;
			case 'r': enc[0] = '\r'; break;
			case 't': enc[0] = '\t'; break;
			case 'u': {
				unsigned cp, lo;
				if (jhex4(p, &cp) < 0)
					return -1;
				if (cp >= 0xD800 && cp <= 0xDBFF) {
					if (p->n - p->i < 6 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u')
						return -1;
					p->i += 2;
					if (jhex4(p, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
						return -1;
					cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				} else if (cp >= 0xDC00 && cp <= 0xDFFF) {
					return -1;
				}
				if (cp == 0)
					return -1; /* no NULs inside names */
				if (cp < 0x80) {
					enc[0] = (char)cp;
				} else if (cp < 0x800) {
					enc[0] = (char)(0xC0 | cp >> 6);
					enc[1] = (char)(0x80 | (cp & 0x3F));
					elen = 2;
				} else if (cp < 0x10000) {
					enc[0] = (char)(0xE0 | cp >> 12);
					enc[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
					enc[2] = (char)(0x80 | (cp & 0x3F));
					elen = 3;
				} else {
					enc[0] = (char)(0xF0 | cp >> 18);
					enc[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
					enc[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
					enc[3] = (char)(0x80 | (cp & 0x3F));
					elen = 4;
				}
				break;
			}
			default:
				return -1;
			}
		}
		if (out) {
			if (o + elen >= cap)
				return -1;
			memcpy(out + o, enc, elen);
		}
		o += elen;
	}
	if (out)
		out[o] = 0;
	return 0;
}

/* A non-negative integer without sign, fraction or exponent, < 2^64. */
static int juint(struct jp *p, uint64_t *v)
{
	int c = jpeek(p);
	if (c < '0' || c > '9')
		return -1;
	uint64_t x = 0;
	size_t start = p->i;
	while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') {
		unsigned d = (unsigned)(p->s[p->i] - '0');
		if (x > (UINT64_MAX - d) / 10)
			return -1;
		x = x * 10 + d;
		p->i++;
	}
	if (p->i - start > 1 && p->s[start] == '0')
		return -1;
	if (p->i < p->n && (p->s[p->i] == '.' || p->s[p->i] == 'e' || p->s[p->i] == 'E'))
		return -1;
	*v = x;
	return 0;
}

static int jlit(struct jp *p, const char *lit)
{
	size_t l = strlen(lit);
	jws(p);
	if (p->n - p->i < l || memcmp(p->s + p->i, lit, l) != 0)
		return -1;
	p->i += l;
	return 0;
}

/* Skips any JSON value (bounded nesting). */
static int jskip(struct jp *p)
{
	int c = jpeek(p);
	switch (c) {
	case '"':
		return jstring(p, NULL, 0);
	case 't':
		return jlit(p, "true");
	case 'f':
		return jlit(p, "false");
	case 'n':
		return jlit(p, "null");
	case '{':
	case '[': {
		char close = c == '{' ? '}' : ']';
		if (++p->depth > UR_MAX_DEPTH)
			return -1;
		p->i++;
		if (jpeek(p) == close) {
			p->i++;
			p->depth--;
			return 0;
		}
		for (;;) {
			if (c == '{') {
				if (jstring(p, NULL, 0) < 0 || jexpect(p, ':') < 0)
					return -1;
			}
			if (jskip(p) < 0)
				return -1;
			int d = jpeek(p);
			p->i++;
			if (d == ',')
				continue;
			if (d == close)
				break;
			return -1;
		}
		p->depth--;
		return 0;
	}
	}
	/* A number: -?digits(.digits)?([eE][+-]?digits)? */
	if (c == '-')
		p->i++;
	size_t d0 = p->i;
	while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
		p->i++;
	if (p->i == d0)
		return -1;
	if (p->i < p->n && p->s[p->i] == '.') {
		size_t f0 = ++p->i;
		while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
			p->i++;
		if (p->i == f0)
			return -1;
	}
	if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
		p->i++;
		if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-'))
			p->i++;
		size_t e0 = p->i;
		while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
			p->i++;
		if (p->i == e0)
			return -1;
	}
	return 0;
}

/* Iterates the members of an object: call with *first = 1; returns 1 with
 * key filled and the parser at the value, 0 at the end, -1 on error. */
static int jmember(struct jp *p, int *first, char *key, size_t cap)
{
	if (*first) {
		if (jexpect(p, '{') < 0)
			return -1;
		*first = 0;
		if (jpeek(p) == '}') {
			p->i++;
			return 0;
		}
	} else {
		int c = jpeek(p);
		if (c == '}') {
			p->i++;
			return 0;
		}
		if (c != ',')
			return -1;
		p->i++;
	}
	/* A key longer than cap is not one we know: skip it. */
	size_t save = p->i;
	if (jstring(p, key, cap) < 0) {
		p->i = save;
		if (jstring(p, NULL, 0) < 0)
			return -1;
		key[0] = 0;
	}
	if (jexpect(p, ':') < 0)
		return -1;
	return 1;
}

/* ---- messages ------------------------------------------------------------ */

struct msg {
	char type[16];
	int has_version;
	uint64_t version;
	char error[UR_ERRLEN];
	const char *stats; /* span of the "stats" value */
	size_t stats_len;
	/* hello */
	char backing[16];
	uint64_t page_size, chunk_size, file_size;
	char *snapshot;
	uint64_t region_count; /* hello: how many regions the batches carry */
	char snapshot_id[64]; /* hello: the snapshot's identity */
	int reattach, adopting; /* hello: the server accepts reattach; it has no backing yet */
	int has_first;
	uint64_t first; /* regions: index of the batch's first region */
	size_t nregions;
	struct ur_region *regions;
	char field[64]; /* where parsing failed */
};

static void msg_free(struct msg *m)
{
	free(m->snapshot);
	if (m->regions) {
		for (size_t i = 0; i < m->nregions; i++)
			free((char *)m->regions[i].name);
		free(m->regions);
	}
	m->snapshot = NULL;
	m->regions = NULL;
	m->nregions = 0;
}

static int parse_region(struct jp *p, struct ur_region *r)
{
	char key[32];
	int first = 1, k;
	char *name = malloc(UR_MAX_NAME);
	if (!name)
		return -1;
	name[0] = 0;
	int have_name = 0;
	unsigned seen = 0; /* known members read so far: a second one is an error */
	static const char *const known[] = { "name", "offset", "size", "length", "addr", "prot" };
	while ((k = jmember(p, &first, key, sizeof key)) == 1) {
		int rc = 0;
		uint64_t v = 0;
		for (unsigned j = 0; j < sizeof known / sizeof known[0]; j++) {
			if (!strcmp(key, known[j])) {
				if (seen & (1u << j)) {
					free(name);
					return -1;
				}
				seen |= 1u << j;
			}
		}
		if (!strcmp(key, "name")) {
			rc = jstring(p, name, UR_MAX_NAME);
			have_name = 1;
		} else if (!strcmp(key, "offset")) {
			rc = juint(p, &r->offset);
		} else if (!strcmp(key, "size")) {
			rc = juint(p, &r->size);
		} else if (!strcmp(key, "length")) {
			rc = juint(p, &r->length);
		} else if (!strcmp(key, "addr")) {
			rc = juint(p, &r->orig_addr);
		} else if (!strcmp(key, "prot")) {
			rc = juint(p, &v);
			if (rc == 0 && v > 7)
				rc = -1;
			r->prot = (uint32_t)v;
		} else {
			rc = jskip(p);
		}
		if (rc < 0) {
			free(name);
			return -1;
		}
	}
	if (k < 0 || !have_name) {
		free(name);
		return -1;
	}
	r->name = strdup(name);
	free(name);
	return r->name ? 0 : -1;
}

/* Parses one server message. Returns 0 or UR_EMALFORMED (m->field says where). */
static int parse_msg(const char *buf, size_t n, struct msg *m)
{
	struct jp p = { .s = buf, .n = n };
	char key[32];
	int first = 1, k;
	memset(m, 0, sizeof(*m));
	unsigned seen = 0; /* known members read so far: a second one is an error */
	static const char *const known[] = { "type",	   "version",	 "error",	"stats",    "backing",	"page_size",
					     "chunk_size", "file_size", "snapshot", "regions", "snapshot_id", "reattach",
					     "adopting" };
	while ((k = jmember(&p, &first, key, sizeof key)) == 1) {
		int rc;
		for (unsigned j = 0; j < sizeof known / sizeof known[0]; j++) {
			if (!strcmp(key, known[j])) {
				if (seen & (1u << j)) {
					snprintf(m->field, sizeof m->field, "%s (appears twice)", key);
					msg_free(m);
					return UR_EMALFORMED;
				}
				seen |= 1u << j;
			}
		}
		if (!strcmp(key, "type")) {
			rc = jstring(&p, m->type, sizeof m->type);
		} else if (!strcmp(key, "version")) {
			rc = juint(&p, &m->version);
			m->has_version = 1;
		} else if (!strcmp(key, "error")) {
			/* Truncate long error texts instead of failing. */
			size_t save = p.i;
			rc = jstring(&p, m->error, sizeof m->error);
			if (rc < 0) {
				p.i = save;
				rc = jstring(&p, NULL, 0);
				snprintf(m->error, sizeof m->error, "(error message too long)");
			}
		} else if (!strcmp(key, "stats")) {
			jws(&p);
			size_t s0 = p.i;
			rc = jskip(&p);
			m->stats = buf + s0;
			m->stats_len = p.i - s0;
		} else if (!strcmp(key, "backing")) {
			rc = jstring(&p, m->backing, sizeof m->backing);
		} else if (!strcmp(key, "page_size")) {
			rc = juint(&p, &m->page_size);
		} else if (!strcmp(key, "chunk_size")) {
			rc = juint(&p, &m->chunk_size);
		} else if (!strcmp(key, "file_size")) {
			rc = juint(&p, &m->file_size);
		} else if (!strcmp(key, "snapshot")) {
			free(m->snapshot);
			m->snapshot = malloc(UR_MAX_NAME);
			rc = m->snapshot ? jstring(&p, m->snapshot, UR_MAX_NAME) : -1;
		} else if (!strcmp(key, "region_count")) {
			rc = juint(&p, &m->region_count);
		} else if (!strcmp(key, "snapshot_id")) {
			rc = jstring(&p, m->snapshot_id, sizeof m->snapshot_id);
		} else if (!strcmp(key, "reattach") || !strcmp(key, "adopting")) {
			int *flag = key[0] == 'r' ? &m->reattach : &m->adopting;
			jws(&p);
			*flag = jpeek(&p) == 't';
			rc = *flag ? jlit(&p, "true") : jlit(&p, "false");
		} else if (!strcmp(key, "first")) {
			rc = juint(&p, &m->first);
			m->has_first = 1;
		} else if (!strcmp(key, "regions")) {
			size_t cap = 0;
			msg_free(m);
			rc = jexpect(&p, '[');
			if (rc == 0 && jpeek(&p) == ']') {
				p.i++;
			} else {
				while (rc == 0) {
					/* The message is bounded (UR_MAX_MSG), so is the count. */
					if (m->nregions == cap) {
						cap = cap ? 2 * cap : 16;
						struct ur_region *nr = realloc(m->regions, cap * sizeof(*nr));
						if (!nr) {
							rc = -1;
							break;
						}
						m->regions = nr;
					}
					struct ur_region *nr = m->regions;
					memset(&nr[m->nregions], 0, sizeof(*nr));
					if (parse_region(&p, &nr[m->nregions]) < 0) {
						snprintf(m->field, sizeof m->field, "regions[%zu]", m->nregions);
						msg_free(m);
						return UR_EMALFORMED;
					}
					m->nregions++;
					int c = jpeek(&p);
					p.i++;
					if (c == ']')
						break;
					if (c != ',')
						rc = -1;
				}
			}
		} else {
			rc = jskip(&p);
		}
		if (rc < 0) {
			snprintf(m->field, sizeof m->field, "%s", key);
			msg_free(m);
			return UR_EMALFORMED;
		}
	}
	if (k < 0 || jpeek(&p) != -1) {
		snprintf(m->field, sizeof m->field, "(not one JSON object)");
		msg_free(m);
		return UR_EMALFORMED;
	}
	if (!m->type[0]) {
		snprintf(m->field, sizeof m->field, "type");
		msg_free(m);
		return UR_EMALFORMED;
	}
	return 0;
}

/* Appends s as a JSON string. */
static int jput_string(char *b, size_t cap, size_t *o, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	if (*o + 1 >= cap)
		return -1;
	b[(*o)++] = '"';
	for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
		char e[7];
		size_t l = 0;
		if (*c == '"' || *c == '\\') {
			e[l++] = '\\';
			e[l++] = (char)*c;
		} else if (*c < 0x20) {
			e[l++] = '\\';
			e[l++] = 'u';
			e[l++] = '0';
			e[l++] = '0';
			e[l++] = hex[*c >> 4];
			e[l++] = hex[*c & 15];
		} else {
			e[l++] = (char)*c;
		}
		if (*o + l + 1 >= cap)
			return -1;
		memcpy(b + *o, e, l);
		*o += l;
	}
	if (*o + 2 >= cap)
		return -1;
	b[(*o)++] = '"';
	b[*o] = 0;
	return 0;
}

static int jputf(char *b, size_t cap, size_t *o, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int jputf(char *b, size_t cap, size_t *o, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(b + *o, cap - *o, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= cap - *o)
		return -1;
	*o += (size_t)n;
	return 0;
}

/* ---- transport ------------------------------------------------------------ */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sends one message with fd and, when fd2 >= 0, fd2 too (a reattach). */
static int send_msg2(int sock, const char *buf, size_t n, int fd, int fd2)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = n };
	int nfd = fd2 >= 0 ? 2 : 1;
	int fdv[2] = { fd, fd2 };
	union {
		char b[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} cb;
	struct msghdr mh;
	memset(&mh, 0, sizeof(mh));
	memset(&cb, 0, sizeof(cb));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	if (fd >= 0) {
		mh.msg_control = cb.b;
		mh.msg_controllen = CMSG_SPACE(nfd * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(nfd * sizeof(int));
		memcpy(CMSG_DATA(c), fdv, nfd * sizeof(int));
	}
	ssize_t r;
	do
		r = sendmsg(sock, &mh, MSG_NOSIGNAL);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	if ((size_t)r != n)
		return -EMSGSIZE;
	return 0;
}

static int send_msg(int sock, const char *buf, size_t n, int fd) { return send_msg2(sock, buf, n, fd, -1); }

/* Receives one message into buf (cap >= UR_MAX_MSG + 1) and up to
 * UR_MAX_FDS fds. Waits at most timeout_ms (< 0: forever; 0: do not wait,
 * returning -EAGAIN when nothing is pending). Returns the length. */
static long recv_msg(int sock, char *buf, size_t cap, int *fds, int *nfds, int timeout_ms)
{
	*nfds = 0;
	int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
	for (;;) {
		int wait = timeout_ms < 0 ? -1 : 0;
		if (timeout_ms > 0) {
			int64_t left = deadline - now_ms();
			wait = left > 0 ? (int)left : 0;
		}
		struct pollfd pf = { .fd = sock, .events = POLLIN };
		int pr = poll(&pf, 1, wait);
		if (pr < 0 && errno == EINTR)
			continue;
		if (pr < 0)
			return -errno;
		if (pr == 0)
			return timeout_ms == 0 ? -EAGAIN : UR_ETIMEDOUT;
		break;
	}
	struct iovec iov = { .iov_base = buf, .iov_len = cap };
	union {
		char b[CMSG_SPACE(UR_MAX_FDS * sizeof(int))];
		struct cmsghdr align;
	} cb;
	struct msghdr mh;
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cb.b;
	mh.msg_controllen = sizeof(cb.b);
	ssize_t r;
	do
		r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t j = 0; j < k; j++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof(int));
			if (*nfds < UR_MAX_FDS)
				fds[(*nfds)++] = fd;
			else
				close(fd);
		}
	}
	if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || (size_t)r > UR_MAX_MSG) {
		for (int j = 0; j < *nfds; j++)
			close(fds[j]);
		*nfds = 0;
		return UR_ETOOLARGE;
	}
	if (r == 0) {
		for (int j = 0; j < *nfds; j++)
			close(fds[j]);
		*nfds = 0;
		return UR_ECLOSED;
	}
	return (long)r;
}

static void close_fds(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

/* Receives a message and parses it. A {"type":"error"} becomes
 * UR_EREFUSED with its text in err. */
static int recv_parse(int sock, char *buf, struct msg *m, int timeout_ms, int *fds, int *nfds, char *err)
{
	int lfds[UR_MAX_FDS], ln = 0;
	if (!fds) {
		fds = lfds;
		nfds = &ln;
	}
	long n = recv_msg(sock, buf, UR_MAX_MSG + 1, fds, nfds, timeout_ms);
	if (n < 0) {
		if (n == UR_ETOOLARGE)
			seterr(err, "message too large (over %d bytes or %d fds)", UR_MAX_MSG, UR_MAX_FDS);
		else if (n == UR_ECLOSED)
			seterr(err, "the server closed the connection");
		else if (n == UR_ETIMEDOUT)
			seterr(err, "no answer from the server within %d ms", timeout_ms);
		else if (n != -EAGAIN)
			seterr(err, "recvmsg: %s", strerror((int)-n));
		return (int)n;
	}
	int rc = parse_msg(buf, (size_t)n, m);
	if (rc < 0) {
		seterr(err, "malformed message from the server (field %s)", m->field);
	} else if (!strcmp(m->type, "error")) {
		seterr(err, "server: %s", m->error[0] ? m->error : "(no message)");
		rc = UR_EREFUSED;
	}
	if (rc < 0) {
		close_fds(fds, *nfds);
		*nfds = 0;
		msg_free(m);
	} else if (fds == lfds) {
		close_fds(lfds, ln);
	}
	return rc;
}

/* ---- userfaultfd ------------------------------------------------------------ */

/* Opens a userfaultfd the first way this process is allowed to and says which
 * in *how:
 *   1. /dev/userfaultfd + USERFAULTFD_IOC_NEW (Linux >= 6.1): full fault
 *      handling for whoever may open the device;
 *   2. userfaultfd(2): full, with CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1;
 *   3. userfaultfd(UFFD_USER_MODE_ONLY) (Linux >= 5.11): any user; only faults
 *      raised in user mode are delivered (see UR_UFFD_USER_MODE_ONLY).
 * When none is allowed it returns the syscall's -errno: that is the one to fix. */
static int uffd_open(unsigned *how)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
		if (fd >= 0) {
			*how = UR_UFFD_DEVICE;
			return fd;
		}
	}
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0) {
		*how = UR_UFFD_SYSCALL;
		return fd;
	}
	int err = errno;
	if (err != EPERM)
		return -err; /* ENOSYS: no userfaultfd in this kernel at all */
	fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd >= 0) {
		*how = UR_UFFD_USER_MODE_ONLY;
		return fd;
	}
	return -err;
}

static int uffd_api(int fd, uint64_t want, uint64_t *got)
{
	struct uffdio_api api;
	memset(&api, 0, sizeof(api));
	api.api = UFFD_API;
	api.features = want;
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*got = api.features;
	return 0;
}

/* Whether CAP_SYS_PTRACE is in this thread's effective set, which
 * UFFD_FEATURE_EVENT_FORK needs. Unknown counts as yes: the UFFDIO_API retry
 * in uffd_setup settles it. */
static int have_cap_sys_ptrace(void)
{
	struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct d[_LINUX_CAPABILITY_U32S_3];
	memset(d, 0, sizeof d);
	if (syscall(SYS_capget, &h, d) < 0)
		return 1;
	return (d[CAP_SYS_PTRACE / 32].effective >> (CAP_SYS_PTRACE % 32)) & 1;
}

/* Step 2 of ur_attach: a userfaultfd with the features the backing needs, in
 * s->uffd, the features enabled on it in s->features and how it was opened in
 * s->uffd_flags. UFFDIO_API is accepted once per fd, so the probe (features
 * 0: what the kernel supports) uses a throw-away fd. */
static int uffd_setup(struct ur_session *s, int hugetlb, int fork_events, char *err)
{
	uint64_t required = hugetlb ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM;
	uint64_t want = required | (hugetlb ? UFFD_FEATURE_MISSING_HUGETLBFS : UFFD_FEATURE_MISSING_SHMEM) |
			UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
	uint64_t have = 0, got = 0;
	unsigned how = 0;
	int probe = uffd_open(&how);
	if (probe == -ENOSYS) {
		seterr(err, "userfaultfd: %s: this kernel has no userfaultfd (build it with CONFIG_USERFAULTFD=y)",
		       strerror(ENOSYS));
		return probe;
	}
	if (probe < 0) {
		seterr(err, "userfaultfd: %s: neither /dev/userfaultfd, userfaultfd(2) nor userfaultfd(UFFD_USER_MODE_ONLY) "
			    "is allowed (see `uffdrestore doctor` for the fix on this machine)", strerror(-probe));
		return probe;
	}
	int rc = uffd_api(probe, 0, &have);
	close(probe);
	if (rc < 0) {
		seterr(err, "ioctl UFFDIO_API: %s", strerror(-rc));
		return rc;
	}
	if ((have & required) != required) {
		seterr(err, "the kernel lacks minor faults on %s (needs Linux >= %s)", hugetlb ? "hugetlbfs" : "shmem",
		       hugetlb ? "5.13" : "5.14");
		return UR_ENOFEATURE;
	}
	/* Fork events need CAP_SYS_PTRACE (in the initial user namespace). */
	if (fork_events && have_cap_sys_ptrace())
		want |= UFFD_FEATURE_EVENT_FORK;
	want &= have;
	for (;;) {
		s->uffd = uffd_open(&how);
		if (s->uffd < 0) {
			rc = s->uffd;
			seterr(err, "userfaultfd: %s", strerror(-rc));
			return rc;
		}
		rc = uffd_api(s->uffd, want, &got);
		if (rc == -EPERM && (want & UFFD_FEATURE_EVENT_FORK)) {
			/* CAP_SYS_PTRACE only inside a user namespace, or an LSM
			 * refused it: go on without fork events, on a fresh fd (a
			 * refused UFFDIO_API may leave this one unusable). */
			close(s->uffd);
			s->uffd = -1;
			want &= ~(uint64_t)UFFD_FEATURE_EVENT_FORK;
			continue;
		}
		break;
	}
	if (rc < 0) {
		seterr(err, "ioctl UFFDIO_API: %s", strerror(-rc));
		return rc;
	}
	/* The kernel reports every feature it supports; enabled are those asked for. */
	s->features = want & got;
	s->uffd_flags = how | (s->features & UFFD_FEATURE_EVENT_FORK ? 0 : UR_UFFD_NO_FORK_EVENTS);
	return 0;
}

/* Without fork events the kernel drops the userfaultfd from a forked child's
 * copy of a registered mapping (checked on Linux 6.18): the child then reads
 * zeros where the server has not filled yet, and with MAP_SHARED those zero
 * pages (and the child's writes to them) land in the backing file until the
 * server's fill overwrites them. MADV_DONTFORK leaves a child no mapping
 * there at all, so a touch raises SIGSEGV instead of reading wrong bytes. */
static int uffd_guard_fork(struct ur_session *s, char *err)
{
	if (!(s->uffd_flags & UR_UFFD_NO_FORK_EVENTS))
		return 0;
	for (size_t i = 0; i < s->nregions; i++) {
		struct ur_region *r = &s->regions[i];
		if (r->addr && madvise(r->addr, r->size, MADV_DONTFORK) < 0) {
			int rc = -errno;
			seterr(err, "madvise(MADV_DONTFORK) region \"%s\" (no fork events): %s", r->name, strerror(errno));
			return rc;
		}
	}
	return 0;
}

/* ---- sessions ------------------------------------------------------------ */

static void session_free(struct ur_session *s)
{
	if (!s)
		return;
	/* The program's own mappings (ur_attach_mappings): unregistered, never unmapped. */
	while (s->links) {
		struct ur_link *l = s->links;
		s->links = l->next;
		for (size_t i = 0; i < l->n; i++) {
			struct uffdio_range rg = { .start = (uintptr_t)l->maps[i].addr, .len = l->maps[i].len };
			ioctl(l->uffd, UFFDIO_UNREGISTER, &rg);
		}
		close(l->uffd);
		if (l->sock >= 0)
			close(l->sock);
		free(l->maps);
		free(l);
	}
	for (size_t i = 0; i < s->nregions; i++) {
		struct ur_region *r = &s->regions[i];
		if (r->addr) {
			if (s->uffd >= 0) {
				struct uffdio_range rg = { .start = (uintptr_t)r->addr, .len = r->size };
				ioctl(s->uffd, UFFDIO_UNREGISTER, &rg);
			}
		}
	}
	/* Unregistered first, so the munmaps raise no UNMAP events that would
	 * wait for a server that may be gone. */
	if (s->uffd >= 0)
		close(s->uffd);
	if (s->backing_fd >= 0)
		close(s->backing_fd);
	free(s->path);
	for (size_t i = 0; i < s->nregions; i++) {
		struct ur_region *r = &s->regions[i];
		if (r->addr)
			munmap(r->addr, r->size);
		free((char *)r->name);
	}
	free(s->regions);
	free(s->snapshot);
	if (s->sock >= 0)
		close(s->sock);
	free(s);
}

/* Checks the hello message itself (version, backing, page size, the number
 * of regions announced). The regions follow in batches: validate_regions. */
static int validate_hello(const struct msg *m, char *err)
{
	if (!m->has_version || m->version != UR_PROTOCOL_VERSION) {
		seterr(err, "hello: version %llu, this client speaks %d (%s)", (unsigned long long)m->version, UR_PROTOCOL_VERSION,
		       m->version < UR_PROTOCOL_VERSION ? "the server is older: run the uffdrestore load of this release"
							: "the server is newer: rebuild this target with its ur_client.c");
		return UR_EVERSION;
	}
	if (strcmp(m->backing, "hugetlb") && strcmp(m->backing, "shmem")) {
		seterr(err, "hello: backing: \"%s\" is neither \"hugetlb\" nor \"shmem\"", m->backing);
		return UR_EMALFORMED;
	}
	uint64_t ps = m->page_size;
	if (ps < 4096 || (ps & (ps - 1))) {
		seterr(err, "hello: page_size: %llu is not a power of two >= 4096", (unsigned long long)ps);
		return UR_EMALFORMED;
	}
	if (m->region_count == 0 || m->region_count > UR_MAX_REGIONS) {
		seterr(err, "hello: region_count: %llu, want 1..%d", (unsigned long long)m->region_count, UR_MAX_REGIONS);
		return UR_EMALFORMED;
	}
	return 0;
}

static int validate_regions(const struct ur_region *rs, size_t n, uint64_t ps, uint64_t file_size, char *err)
{
	for (size_t i = 0; i < n; i++) {
		const struct ur_region *r = &rs[i];
		if (r->offset % ps || r->size % ps || r->length > r->size || (r->size && r->size - r->length >= ps) ||
		    r->offset > file_size || r->size > file_size - r->offset) {
			seterr(err, "hello: regions[%zu] (\"%s\"): offset %llu size %llu length %llu is not a page-aligned range of the %llu-byte file",
			       i, r->name, (unsigned long long)r->offset, (unsigned long long)r->size,
			       (unsigned long long)r->length, (unsigned long long)file_size);
			return UR_EMALFORMED;
		}
	}
	return 0;
}

/* Receives the "regions" batches after the hello until s has count
 * regions (in order: each batch's "first" is the number received so far). */
static int recv_regions(struct ur_session *s, char *buf, uint64_t count, char *err)
{
	size_t cap = 0;
	while (s->nregions < count) {
		struct msg bm;
		int fds[UR_MAX_FDS], nfds = 0;
		int rc = recv_parse(s->sock, buf, &bm, s->timeout_ms, fds, &nfds, err);
		if (rc < 0)
			return rc;
		close_fds(fds, nfds);
		if (strcmp(bm.type, "regions") || !bm.has_first || bm.first != s->nregions || bm.nregions == 0 ||
		    bm.nregions > count - s->nregions || nfds) {
			seterr(err, "regions: expected a \"regions\" message with regions %zu.. (of %llu) and no fds, got \"%s\" with first %llu, %zu regions, %d fds",
			       s->nregions, (unsigned long long)count, bm.type, (unsigned long long)bm.first, bm.nregions, nfds);
			msg_free(&bm);
			return UR_EMALFORMED;
		}
		if (s->nregions + bm.nregions > cap) {
			size_t nc = cap ? cap : 64;
			while (nc < s->nregions + bm.nregions)
				nc *= 2;
			if (nc > count)
				nc = (size_t)count;
			struct ur_region *nr = realloc(s->regions, nc * sizeof(*nr));
			if (!nr) {
				msg_free(&bm);
				seterr(err, "out of memory for %llu regions", (unsigned long long)count);
				return -ENOMEM;
			}
			s->regions = nr;
			cap = nc;
		}
		for (size_t i = 0; i < bm.nregions; i++) {
			s->regions[s->nregions] = bm.regions[i];
			s->regions[s->nregions].addr = NULL;
			s->nregions++;
			bm.regions[i].name = NULL; /* now s's */
		}
		msg_free(&bm);
	}
	return 0;
}

/* Why an mmap of region i may have failed with ENOMEM: a process may have
 * at most vm.max_map_count mappings, and a target maps every region. */
static const char *map_count_hint(int e, size_t nregions, char *b, size_t n)
{
	b[0] = 0;
	if (e != ENOMEM || nregions < 1000)
		return b;
	long limit = -1;
	FILE *f = fopen("/proc/sys/vm/max_map_count", "re");
	if (f) {
		if (fscanf(f, "%ld", &limit) != 1)
			limit = -1;
		fclose(f);
	}
	snprintf(b, n, " (this target maps %zu regions, one mapping each, besides its own: it may have reached vm.max_map_count=%ld mappings; raise it with sysctl -w vm.max_map_count=N)",
		 nregions, limit);
	return b;
}

/* Sends the mapped regions as "mappings" batches, each at most UR_MAX_MSG
 * bytes, naming each mapping's region by its index. */
static int send_mappings(struct ur_session *s, char *buf, int private_mapping)
{
	char one[256];
	size_t o = 0, first = 0, n = 0;
	for (size_t i = 0; i <= s->nregions; i++) {
		const struct ur_region *r = i < s->nregions ? &s->regions[i] : NULL;
		size_t ol = 0;
		if (r && !r->addr)
			continue;
		if (r && jputf(one, sizeof one, &ol,
			       "{\"region\":%zu,\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":%llu,\"page_size\":%llu,\"private\":%s}",
			       i, (unsigned long long)(uintptr_t)r->addr, (unsigned long long)r->size,
			       (unsigned long long)r->offset, (unsigned long long)s->page_size,
			       private_mapping ? "true" : "false") < 0)
			return UR_ETOOLARGE; /* cannot happen: 6 numbers fit */
		/* Flush when the next one would not fit (2 for "]}"), or at the end. */
		if (n > 0 && (!r || o + 1 + ol + 2 > UR_MAX_MSG)) {
			buf[o++] = ']';
			buf[o++] = '}';
			int rc = send_msg(s->sock, buf, o, -1);
			if (rc < 0) {
				seterr(last_err, "sendmsg (mappings %zu..): %s", first, strerror(-rc));
				return rc;
			}
			first += n;
			n = 0;
		}
		if (!r)
			break;
		if (n == 0) {
			o = 0;
			if (jputf(buf, UR_MAX_MSG + 1, &o, "{\"type\":\"mappings\",\"first\":%zu,\"mappings\":[", first) < 0)
				return UR_ETOOLARGE;
		} else {
			buf[o++] = ',';
		}
		memcpy(buf + o, one, ol);
		o += ol;
		n++;
	}
	return 0;
}

static int attach_common(const char *socket_path, const struct ur_attach_opts *opts, struct ur_session **out,
			 int connect_only);

int ur_attach(const char *socket_path, const struct ur_attach_opts *opts, struct ur_session **out)
{
	return attach_common(socket_path, opts, out, 0);
}

int ur_connect(const char *socket_path, const struct ur_attach_opts *opts, struct ur_session **out)
{
	return attach_common(socket_path, opts, out, 1);
}

static int attach_common(const char *socket_path, const struct ur_attach_opts *opts, struct ur_session **out,
			 int connect_only)
{
	static const struct ur_attach_opts defaults;
	struct msg m;
	int fds[UR_MAX_FDS], nfds = 0, backing = -1, rc;
	char *buf = NULL;
	struct ur_session *s = NULL;

	memset(&m, 0, sizeof(m));
	last_err[0] = 0;
	if (!out || !socket_path) {
		seterr(last_err, "ur_attach: NULL argument");
		return -EINVAL;
	}
	*out = NULL;
	if (!opts)
		opts = &defaults;
	s = calloc(1, sizeof(*s));
	buf = malloc(UR_MAX_MSG + 1);
	if (!s || !buf) {
		free(s);
		free(buf);
		seterr(last_err, "out of memory");
		return -ENOMEM;
	}
	s->sock = -1;
	s->uffd = -1;
	s->backing_fd = -1;
	s->timeout_ms = opts->timeout_ms == 0 ? 10000 : opts->timeout_ms;
	s->reattach_ms = opts->reattach_timeout_ms == 0 ? 30000 : opts->reattach_timeout_ms;
	s->private_mapping = opts->private_mapping;
	s->server_uid = opts->server_uid;
	s->path = strdup(socket_path);
	if (!s->path) {
		seterr(last_err, "out of memory");
		rc = -ENOMEM;
		goto fail;
	}

	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(socket_path) >= sizeof(sa.sun_path)) {
		seterr(last_err, "socket path %s is too long (at most %zu bytes)", socket_path, sizeof(sa.sun_path) - 1);
		rc = -ENAMETOOLONG;
		goto fail;
	}
	strcpy(sa.sun_path, socket_path);
	s->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s->sock < 0) {
		rc = -errno;
		seterr(last_err, "socket: %s", strerror(errno));
		goto fail;
	}
	if (connect(s->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rc = -errno;
		seterr(last_err, "connect to %s: %s", socket_path, strerror(errno));
		goto fail;
	}
	/* 0. Who is the server? Anyone who could bind the path could serve
	 * its own bytes and receive our userfaultfd: check before trusting
	 * anything it sends. */
	struct ucred cred;
	socklen_t credlen = sizeof(cred);
	if (getsockopt(s->sock, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0) {
		rc = -errno;
		seterr(last_err, "getsockopt SO_PEERCRED on %s: %s", socket_path, strerror(errno));
		goto fail;
	}
	uid_t me = geteuid();
	if (cred.uid != 0 && cred.uid != me && cred.uid != opts->server_uid) {
		seterr(last_err,
		       "the server on %s runs as uid %u (pid %d), not root or this process's uid %u: refusing to map its memory or send it a userfaultfd (if uid %u is trusted: --server-uid %u, ur_attach_opts.server_uid)",
		       socket_path, (unsigned)cred.uid, (int)cred.pid, (unsigned)me, (unsigned)cred.uid, (unsigned)cred.uid);
		rc = UR_EUNTRUSTED;
		goto fail;
	}

	/* 1. hello + the backing file. */
	rc = recv_parse(s->sock, buf, &m, s->timeout_ms, fds, &nfds, last_err);
	if (rc < 0)
		goto fail;
	if (strcmp(m.type, "hello")) {
		seterr(last_err, "expected a hello, got \"%s\"", m.type);
		rc = UR_EMALFORMED;
		goto reject;
	}
	if (m.adopting && nfds == 0) {
		seterr(last_err, "the server is adopting the targets of a server that died (load --adopt): it serves only re-attaching targets until one hands back the backing; attach again later");
		rc = UR_EREFUSED;
		goto reject;
	}
	if (nfds != 1) {
		seterr(last_err, "hello came with %d file descriptors, want 1", nfds);
		rc = UR_EMALFORMED;
		goto reject;
	}
	backing = fds[0];
	nfds = 0;
	rc = validate_hello(&m, last_err);
	if (rc < 0)
		goto reject;
	if (connect_only) {
		/* ur_connect: the program maps the backing itself and hands its
		 * mappings over with ur_attach_mappings (the attach is sent then). */
		s->page_size = m.page_size;
		s->chunk_size = m.chunk_size;
		s->file_size = m.file_size;
		snprintf(s->backing, sizeof s->backing, "%s", m.backing);
		s->snapshot = m.snapshot ? m.snapshot : strdup("");
		m.snapshot = NULL;
		snprintf(s->snapshot_id, sizeof s->snapshot_id, "%s", m.snapshot_id);
		s->reattach_ms = -1; /* mappings the program made are not re-attached */
		msg_free(&m);
		rc = recv_regions(s, buf, m.region_count, last_err);
		if (rc < 0)
			goto reject;
		rc = validate_regions(s->regions, s->nregions, s->page_size, s->file_size, last_err);
		if (rc < 0)
			goto reject;
		s->backing_fd = backing;
		s->pending = 1;
		s->fork_events = !opts->no_fork_events;
		free(buf);
		*out = s;
		return 0;
	}
	/* A server with read-only targets sends an O_RDONLY fd: only a
	 * MAP_PRIVATE mapping of it can be registered (the kernel refuses
	 * UFFDIO_REGISTER on a shared mapping the process may not write). */
	int accmode = fcntl(backing, F_GETFL);
	if (accmode >= 0 && (accmode & O_ACCMODE) == O_RDONLY && !opts->private_mapping) {
		seterr(last_err, "the server gives read-only access to the snapshot (load --read-only-targets): "
				 "map it private (--private, private_mapping)");
		rc = -EACCES;
		goto reject;
	}
	s->page_size = m.page_size;
	s->chunk_size = m.chunk_size;
	s->file_size = m.file_size;
	snprintf(s->backing, sizeof s->backing, "%s", m.backing);
	s->snapshot = m.snapshot ? m.snapshot : strdup("");
	m.snapshot = NULL;
	snprintf(s->snapshot_id, sizeof s->snapshot_id, "%s", m.snapshot_id);
	if (!m.reattach)
		s->reattach_ms = -1; /* an older server: it would not take a reattach */
	msg_free(&m);
	/* 1b. The regions, in batches after the hello. */
	rc = recv_regions(s, buf, m.region_count, last_err);
	if (rc < 0)
		goto reject; /* a closed connection included: the error is then not delivered */
	rc = validate_regions(s->regions, s->nregions, s->page_size, s->file_size, last_err);
	if (rc < 0)
		goto reject;

	/* 2. A userfaultfd with the features this backing needs. */
	int hugetlb = !strcmp(s->backing, "hugetlb");
	rc = uffd_setup(s, hugetlb, !opts->no_fork_events, last_err);
	if (rc < 0)
		goto fail;

	/* 3. Map and register every region, in hello order. */
	int prot = opts->readonly ? PROT_READ : PROT_READ | PROT_WRITE;
	int flags = opts->private_mapping ? MAP_PRIVATE : MAP_SHARED;
	for (size_t i = 0; i < s->nregions; i++) {
		struct ur_region *r = &s->regions[i];
		void *hint = NULL;
		int fl = flags;
		if (r->size == 0)
			continue; /* an empty region: nothing to map */
		if (opts->at_original_addr) {
			if (r->orig_addr == 0 || r->orig_addr % s->page_size) {
				seterr(last_err, "region %zu \"%s\": original address %#llx is not a non-zero multiple of the page size %llu%s",
				       i, r->name, (unsigned long long)r->orig_addr, (unsigned long long)s->page_size,
				       hugetlb ? " (a hugetlb backing needs huge-page-aligned addresses)" : "");
				rc = UR_EADDR;
				goto fail;
			}
			hint = (void *)(uintptr_t)r->orig_addr;
			fl |= MAP_FIXED_NOREPLACE;
		}
		void *a = mmap(hint, r->size, prot, fl, backing, (off_t)r->offset);
		if (a == MAP_FAILED) {
			char hint_[256];
			rc = -errno;
			seterr(last_err, "mmap region %zu \"%s\" (%llu bytes at offset %llu): %s%s", i, r->name,
			       (unsigned long long)r->size, (unsigned long long)r->offset, strerror(-rc),
			       map_count_hint(-rc, s->nregions, hint_, sizeof hint_));
			goto fail;
		}
		if (hint && a != hint) { /* a kernel without MAP_FIXED_NOREPLACE took it as a hint */
			munmap(a, r->size);
			seterr(last_err, "region %zu \"%s\": address %p is taken", i, r->name, hint);
			rc = -EEXIST;
			goto fail;
		}
		r->addr = a;
		struct uffdio_register reg;
		memset(&reg, 0, sizeof(reg));
		reg.range.start = (uintptr_t)a;
		reg.range.len = r->size;
		reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR;
		if (ioctl(s->uffd, UFFDIO_REGISTER, &reg) < 0) {
			rc = -errno;
			seterr(last_err, "ioctl UFFDIO_REGISTER region %zu \"%s\": %s", i, r->name, strerror(errno));
			goto fail;
		}
	}
	rc = uffd_guard_fork(s, last_err);
	if (rc < 0)
		goto fail;
	/* Kept: to hand it back to a restarted server (PROTOCOL.md 5.1), and
	 * for the program to map (ur_session_backing_fd). */
	s->backing_fd = backing;
	s->fork_events = !opts->no_fork_events;
	backing = -1;

	/* 4. attach + the userfaultfd, then the mappings in batches. */
	size_t nmapped = 0;
	for (size_t i = 0; i < s->nregions; i++)
		nmapped += s->regions[i].addr != NULL;
	size_t o = 0;
	if (jputf(buf, UR_MAX_MSG + 1, &o, "{\"type\":\"attach\",\"version\":%d,\"uffd_features\":%llu,\"mapping_count\":%zu}",
		  UR_PROTOCOL_VERSION, (unsigned long long)s->features, nmapped) < 0) {
		seterr(last_err, "attach message over %d bytes", UR_MAX_MSG);
		rc = UR_ETOOLARGE;
		goto fail;
	}
	rc = send_msg(s->sock, buf, o, s->uffd);
	if (rc < 0) {
		seterr(last_err, "sendmsg: %s", strerror(-rc));
		goto fail;
	}
	rc = send_mappings(s, buf, opts->private_mapping);
	if (rc < 0)
		goto fail;

	/* 5. ready. */
	rc = recv_parse(s->sock, buf, &m, s->timeout_ms, NULL, NULL, last_err);
	if (rc < 0)
		goto fail;
	if (strcmp(m.type, "ready")) {
		seterr(last_err, "expected ready, got \"%s\"", m.type);
		rc = UR_EMALFORMED;
		goto fail;
	}
	msg_free(&m);
	free(buf);
	*out = s;
	return 0;

reject:
	/* Tell the server why its hello was refused (PROTOCOL.md §3.4). */
	{
		size_t eo = 0;
		if (jputf(buf, UR_MAX_MSG + 1, &eo, "{\"type\":\"error\",\"error\":") == 0 &&
		    jput_string(buf, UR_MAX_MSG + 1, &eo, last_err) == 0 && jputf(buf, UR_MAX_MSG + 1, &eo, "}") == 0)
			send_msg(s->sock, buf, eo, -1);
	}
fail:
	close_fds(fds, nfds);
	if (backing >= 0)
		close(backing);
	msg_free(&m);
	free(buf);
	session_free(s);
	return rc;
}

/* ---- mappings the program made (ur_connect, ur_attach_mappings) ------------ */

int ur_session_backing_fd(const struct ur_session *s) { return s ? s->backing_fd : -EINVAL; }

/* Reads /proc/self/maps whole (NUL-terminated, malloc'd) or NULL. */
static char *read_self_maps(void)
{
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 65536, n = 0;
	char *b = malloc(cap);
	while (b) {
		if (n + 4097 > cap) {
			char *nb = realloc(b, cap * 2);
			if (!nb) {
				free(b);
				b = NULL;
				break;
			}
			b = nb;
			cap *= 2;
		}
		ssize_t r = read(fd, b + n, cap - n - 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			free(b);
			b = NULL;
			break;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	if (b)
		b[n] = 0;
	return b;
}

/* Checks that [addr, addr+len) is, all of it, a mapping of the file dev/ino
 * at file offset off (MAP_SHARED when shared, else MAP_PRIVATE), from the
 * kernel's own list (/proc/self/maps). Returns 0 or UR_ENOTBACKING. */
static int check_is_backing(const char *maps, uintptr_t addr, size_t len, uint64_t off, int shared, dev_t dev, ino_t ino,
			    char *err)
{
	uintptr_t cur = addr, end = addr + len;
	for (const char *l = maps; l && *l && cur < end; l = strchr(l, '\n'), l = l ? l + 1 : NULL) {
		unsigned long long start, stop, pgoff, inode;
		unsigned maj, min;
		char perms[8];
		if (sscanf(l, "%llx-%llx %7s %llx %x:%x %llu", &start, &stop, perms, &pgoff, &maj, &min, &inode) != 7)
			continue;
		if (stop <= cur)
			continue;
		if (start > cur)
			break; /* a hole at cur */
		uint64_t want = off + (cur - addr);
		if (maj != major(dev) || min != minor(dev) || inode != (unsigned long long)ino ||
		    pgoff + (cur - start) != want) {
			seterr(err, "address %#llx is not a mapping of the session's backing at offset %llu (it maps %x:%x inode %llu at offset %llu): map ur_session_backing_fd() at the region's offset",
			       (unsigned long long)cur, (unsigned long long)want, maj, min, inode,
			       (unsigned long long)(pgoff + (cur - start)));
			return UR_ENOTBACKING;
		}
		if ((perms[3] == 's') != !!shared) {
			seterr(err, "address %#llx is mapped %s, but the flags say %s", (unsigned long long)cur,
			       perms[3] == 's' ? "MAP_SHARED" : "MAP_PRIVATE", shared ? "MAP_SHARED" : "MAP_PRIVATE");
			return UR_ENOTBACKING;
		}
		cur = stop;
	}
	if (cur < end) {
		seterr(err, "address %#llx (of [%#llx, +%zu)) is not mapped: mmap ur_session_backing_fd() there first",
		       (unsigned long long)cur, (unsigned long long)addr, len);
		return UR_ENOTBACKING;
	}
	return 0;
}

/* Connects one more time to the session's server for another attach: the
 * server must be trusted (as in ur_attach) and serve the same snapshot,
 * layout and backing file. Returns the socket or < 0. */
static int link_connect(struct ur_session *s, char *buf)
{
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", s->path);
	int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		seterr(s->err, "socket: %s", strerror(errno));
		return -errno;
	}
	int rc;
	if (connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rc = -errno;
		seterr(s->err, "connect to %s: %s", s->path, strerror(errno));
		goto fail;
	}
	struct ucred cred;
	socklen_t credlen = sizeof(cred);
	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0) {
		rc = -errno;
		seterr(s->err, "getsockopt SO_PEERCRED on %s: %s", s->path, strerror(errno));
		goto fail;
	}
	if (cred.uid != 0 && cred.uid != geteuid() && cred.uid != s->server_uid) {
		seterr(s->err, "the server now on %s runs as uid %u (pid %d), not root, this process's uid or server_uid: refusing it",
		       s->path, (unsigned)cred.uid, (int)cred.pid);
		rc = UR_EUNTRUSTED;
		goto fail;
	}
	struct msg m;
	int fds[UR_MAX_FDS], nfds = 0;
	rc = recv_parse(sock, buf, &m, s->timeout_ms, fds, &nfds, s->err);
	if (rc < 0)
		goto fail;
	if (strcmp(m.type, "hello")) {
		seterr(s->err, "expected a hello, got \"%s\"", m.type);
		rc = UR_EMALFORMED;
	} else {
		rc = validate_hello(&m, s->err);
	}
	struct stat a, b;
	if (rc == 0 && (nfds != 1 || fstat(fds[0], &a) < 0 || fstat(s->backing_fd, &b) < 0 || a.st_dev != b.st_dev ||
			a.st_ino != b.st_ino || strcmp(m.snapshot_id, s->snapshot_id) || strcmp(m.backing, s->backing) ||
			m.page_size != s->page_size || m.file_size != s->file_size || m.region_count != s->nregions)) {
		seterr(s->err, "the server now on %s serves another snapshot or backing file than this session's (restarted?): attach again with ur_connect",
		       s->path);
		rc = UR_ESNAPSHOT;
	}
	uint64_t count = m.region_count;
	close_fds(fds, nfds);
	msg_free(&m);
	if (rc < 0)
		goto fail;
	struct ur_session t;
	memset(&t, 0, sizeof(t));
	t.sock = sock;
	t.timeout_ms = s->timeout_ms;
	rc = recv_regions(&t, buf, count, s->err);
	for (size_t i = 0; rc == 0 && i < t.nregions; i++) {
		const struct ur_region *x = &t.regions[i], *y = &s->regions[i];
		if (x->offset != y->offset || x->size != y->size || x->length != y->length) {
			seterr(s->err, "region %zu of the server now on %s is not this session's", i, s->path);
			rc = UR_ESNAPSHOT;
		}
	}
	for (size_t i = 0; i < t.nregions; i++)
		free((char *)t.regions[i].name);
	free(t.regions);
	if (rc < 0)
		goto fail;
	return sock;
fail:
	close(sock);
	return rc;
}

int ur_attach_mapping(struct ur_session *s, void *addr, size_t len, size_t region, uint64_t offset, int flags)
{
	struct ur_mapping m = { .addr = addr, .len = len, .region = region, .offset = offset, .flags = flags };
	return ur_attach_mappings(s, &m, 1);
}

int ur_attach_mappings(struct ur_session *s, const struct ur_mapping *maps, size_t n)
{
	if (!s)
		return -EINVAL;
	if (!maps || n == 0 || n > UR_MAX_REGIONS) {
		seterr(s->err, "ur_attach_mappings: %zu mappings, want 1..%d", n, UR_MAX_REGIONS);
		return -EINVAL;
	}
	if (s->backing_fd < 0) {
		seterr(s->err, "ur_attach_mappings: this session has no backing fd");
		return -EBADF;
	}
	uint64_t ps = s->page_size;
	/* 1. Every range: its region, alignment, bounds, no overlap. */
	for (size_t i = 0; i < n; i++) {
		const struct ur_mapping *m = &maps[i];
		uintptr_t a = (uintptr_t)m->addr;
		int type = m->flags & MAP_TYPE;
		if (m->region >= s->nregions || s->regions[m->region].size == 0) {
			seterr(s->err, "mapping %zu: region %zu: %s (the snapshot has %zu regions)", i, m->region,
			       m->region >= s->nregions ? "no such region" : "the region is empty", s->nregions);
			return UR_ENOREGION;
		}
		const struct ur_region *r = &s->regions[m->region];
		if (type != MAP_SHARED && type != MAP_PRIVATE && type != MAP_SHARED_VALIDATE) {
			seterr(s->err, "mapping %zu: flags %#x are neither MAP_SHARED nor MAP_PRIVATE", i, (unsigned)m->flags);
			return -EINVAL;
		}
		if (a == 0 || a % ps || m->len == 0 || m->len % ps || m->offset % ps || a + m->len < a) {
			seterr(s->err, "mapping %zu: address %p, %zu bytes at offset %llu: each must be a multiple of the backing's page size %llu (and non-zero)",
			       i, m->addr, m->len, (unsigned long long)m->offset, (unsigned long long)ps);
			return UR_EMAPRANGE;
		}
		if (m->offset > r->size || m->len > r->size - m->offset) {
			seterr(s->err, "mapping %zu: %zu bytes at offset %llu go past the end of region %zu \"%s\" (%llu bytes)", i,
			       m->len, (unsigned long long)m->offset, m->region, r->name, (unsigned long long)r->size);
			return UR_EMAPRANGE;
		}
		for (size_t j = 0; j < i; j++) {
			uintptr_t b = (uintptr_t)maps[j].addr;
			if (a < b + maps[j].len && b < a + m->len) {
				seterr(s->err, "mappings %zu and %zu overlap", j, i);
				return -EBUSY;
			}
		}
		/* A range attached before and still registered: the kernel says
		 * so (EBUSY); one the program unmapped and mapped again is fine. */
	}
	/* 2. Each really is a mapping of the backing at that offset. */
	struct stat st;
	if (fstat(s->backing_fd, &st) < 0) {
		seterr(s->err, "fstat backing: %s", strerror(errno));
		return -errno;
	}
	char *pm = read_self_maps();
	if (!pm) {
		seterr(s->err, "read /proc/self/maps: %s", strerror(errno));
		return -errno ? -errno : -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		const struct ur_mapping *m = &maps[i];
		int rc = check_is_backing(pm, (uintptr_t)m->addr, m->len, s->regions[m->region].offset + m->offset,
					  (m->flags & MAP_TYPE) != MAP_PRIVATE, st.st_dev, st.st_ino, s->err);
		if (rc < 0) {
			char e[UR_ERRLEN];
			memcpy(e, s->err, sizeof e);
			e[UR_ERRLEN - 40] = 0;
			seterr(s->err, "mapping %zu: %s", i, e);
			free(pm);
			return rc;
		}
	}
	free(pm);

	/* 3. A connection: the session's own while nothing was attached on it
	 * (unless the server gave up waiting for the attach), else a new one. */
	char *buf = malloc(UR_MAX_MSG + 1);
	struct ur_link *l = calloc(1, sizeof(*l));
	if (l)
		l->maps = malloc(n * sizeof(*l->maps));
	if (!buf || !l || !l->maps) {
		free(buf);
		if (l)
			free(l->maps);
		free(l);
		seterr(s->err, "out of memory");
		return -ENOMEM;
	}
	memcpy(l->maps, maps, n * sizeof(*maps));
	l->n = 0; /* registered so far */
	l->uffd = -1;
	l->sock = -1;
	int primary = 0, rc, sock;
	if (s->pending) {
		struct pollfd pf = { .fd = s->sock, .events = POLLIN };
		if (poll(&pf, 1, 0) != 0) { /* the server's "no attach within" error, or a close */
			close(s->sock);
			s->sock = -1;
			s->pending = 0;
		}
	}
	if (s->pending) {
		primary = 1;
		sock = s->sock;
	} else {
		sock = link_connect(s, buf);
		if (sock < 0) {
			rc = sock;
			goto fail;
		}
		if (s->sock < 0) { /* the session's own connection is gone: this one is it now */
			primary = 1;
			s->sock = sock;
		} else {
			l->sock = sock;
		}
	}
	s->pending = 0;

	/* 4. A userfaultfd, the ranges registered on it. */
	struct ur_session t;
	memset(&t, 0, sizeof(t));
	t.uffd = -1;
	rc = uffd_setup(&t, !strcmp(s->backing, "hugetlb"), s->fork_events, s->err);
	if (rc < 0)
		goto fail;
	l->uffd = t.uffd;
	if (!s->links && s->uffd < 0) { /* a ur_connect session: these are its features */
		s->features = t.features;
		s->uffd_flags = t.uffd_flags;
	}
	for (size_t i = 0; i < n; i++) {
		struct uffdio_register reg;
		memset(&reg, 0, sizeof(reg));
		reg.range.start = (uintptr_t)maps[i].addr;
		reg.range.len = maps[i].len;
		reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR;
		if (ioctl(l->uffd, UFFDIO_REGISTER, &reg) < 0) {
			rc = -errno;
			seterr(s->err, "mapping %zu: ioctl UFFDIO_REGISTER [%p, +%zu): %s%s", i, maps[i].addr, maps[i].len,
			       strerror(errno),
			       errno == EBUSY ? " (registered on another userfaultfd already)"
			       : errno == EPERM ? " (a MAP_SHARED mapping of a file this process may not write: map it MAP_PRIVATE)"
						: "");
			goto fail;
		}
		l->n = i + 1;
		if ((t.uffd_flags & UR_UFFD_NO_FORK_EVENTS) && madvise(maps[i].addr, maps[i].len, MADV_DONTFORK) < 0) {
			rc = -errno;
			seterr(s->err, "mapping %zu: madvise(MADV_DONTFORK) (no fork events): %s", i, strerror(errno));
			goto fail;
		}
	}

	/* 5. attach + the userfaultfd, the mappings, ready. */
	size_t o = 0;
	if (jputf(buf, UR_MAX_MSG + 1, &o, "{\"type\":\"attach\",\"version\":%d,\"uffd_features\":%llu,\"mapping_count\":%zu}",
		  UR_PROTOCOL_VERSION, (unsigned long long)t.features, n) < 0) {
		rc = UR_ETOOLARGE;
		goto fail;
	}
	rc = send_msg(sock, buf, o, l->uffd);
	if (rc < 0) {
		seterr(s->err, "sendmsg attach: %s", strerror(-rc));
		goto fail;
	}
	char one[256];
	size_t first = 0, k = 0;
	o = 0;
	for (size_t i = 0; i <= n; i++) {
		size_t ol = 0;
		if (i < n) {
			const struct ur_mapping *m = &maps[i];
			jputf(one, sizeof one, &ol,
			      "{\"region\":%zu,\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":%llu,\"page_size\":%llu,\"private\":%s}",
			      m->region, (unsigned long long)(uintptr_t)m->addr, (unsigned long long)m->len,
			      (unsigned long long)(s->regions[m->region].offset + m->offset), (unsigned long long)ps,
			      (m->flags & MAP_TYPE) == MAP_PRIVATE ? "true" : "false");
		}
		if (k > 0 && (i == n || o + 1 + ol + 2 > UR_MAX_MSG)) {
			buf[o++] = ']';
			buf[o++] = '}';
			rc = send_msg(sock, buf, o, -1);
			if (rc < 0) {
				seterr(s->err, "sendmsg (mappings %zu..): %s", first, strerror(-rc));
				goto fail;
			}
			first += k;
			k = 0;
		}
		if (i == n)
			break;
		if (k == 0) {
			o = 0;
			jputf(buf, UR_MAX_MSG + 1, &o, "{\"type\":\"mappings\",\"first\":%zu,\"mappings\":[", first);
		} else {
			buf[o++] = ',';
		}
		memcpy(buf + o, one, ol);
		o += ol;
		k++;
	}
	struct msg rm;
	rc = recv_parse(sock, buf, &rm, s->timeout_ms, NULL, NULL, s->err);
	if (rc < 0)
		goto fail;
	if (strcmp(rm.type, "ready")) {
		seterr(s->err, "expected ready, got \"%s\"", rm.type);
		msg_free(&rm);
		rc = UR_EMALFORMED;
		goto fail;
	}
	msg_free(&rm);
	free(buf);
	l->next = s->links;
	s->links = l;
	return 0;

fail:
	for (size_t i = 0; i < l->n; i++) {
		struct uffdio_range rg = { .start = (uintptr_t)maps[i].addr, .len = maps[i].len };
		ioctl(l->uffd, UFFDIO_UNREGISTER, &rg);
	}
	if (l->uffd >= 0)
		close(l->uffd);
	if (primary && s->sock >= 0) {
		close(s->sock); /* the server refuses the attach and closes: the next call connects again */
		s->sock = -1;
	} else if (l->sock >= 0) {
		close(l->sock);
	}
	free(l->maps);
	free(l);
	free(buf);
	return rc;
}

size_t ur_session_nregions(const struct ur_session *s) { return s->nregions; }

const struct ur_region *ur_session_region(const struct ur_session *s, size_t i)
{
	return i < s->nregions ? &s->regions[i] : NULL;
}

size_t ur_session_find_next(const struct ur_session *s, const char *name, size_t from)
{
	for (size_t i = from; i < s->nregions; i++)
		if (!strcmp(s->regions[i].name, name))
			return i;
	return s->nregions;
}

const struct ur_region *ur_session_find(const struct ur_session *s, const char *name)
{
	size_t i = ur_session_find_next(s, name, 0);
	if (i == s->nregions || ur_session_find_next(s, name, i + 1) != s->nregions)
		return NULL; /* none, or ambiguous */
	return &s->regions[i];
}

const char *ur_session_snapshot(const struct ur_session *s) { return s->snapshot; }
const char *ur_session_backing(const struct ur_session *s) { return s->backing; }
uint64_t ur_session_page_size(const struct ur_session *s) { return s->page_size; }
uint64_t ur_session_chunk_size(const struct ur_session *s) { return s->chunk_size; }
uint64_t ur_session_uffd_features(const struct ur_session *s) { return s->features; }
unsigned ur_session_uffd_flags(const struct ur_session *s) { return s->uffd_flags; }
int ur_session_socket(const struct ur_session *s) { return s->sock; }

/* One reattach attempt on a new connection (PROTOCOL.md 5.1): the server's
 * uid, its hello (the same snapshot and layout, or UR_ESNAPSHOT), then
 * reattach + [uffd, backing] and the mappings, and ready. Returns 0 (s->sock
 * is the new socket), a fatal error (UR_ESNAPSHOT, UR_EUNTRUSTED,
 * UR_EREFUSED: retrying would not help), or another one (the caller retries
 * until its deadline). */
static int reattach_once(struct ur_session *s, int sock, char *buf)
{
	struct ucred cred;
	socklen_t credlen = sizeof(cred);
	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0) {
		seterr(s->err, "reattach: getsockopt SO_PEERCRED on %s: %s", s->path, strerror(errno));
		return -errno;
	}
	uid_t me = geteuid();
	if (cred.uid != 0 && cred.uid != me && cred.uid != s->server_uid) {
		seterr(s->err, "reattach: the server now on %s runs as uid %u (pid %d), not root or this process's uid %u: refusing to send it the userfaultfd",
		       s->path, (unsigned)cred.uid, (int)cred.pid, (unsigned)me);
		return UR_EUNTRUSTED;
	}
	struct msg m;
	int fds[UR_MAX_FDS], nfds = 0;
	int rc = recv_parse(sock, buf, &m, s->timeout_ms, fds, &nfds, s->err);
	if (rc < 0)
		return rc;
	close_fds(fds, nfds); /* the backing of a server that has one: ours is mapped already */
	if (strcmp(m.type, "hello")) {
		seterr(s->err, "reattach: expected a hello, got \"%s\"", m.type);
		msg_free(&m);
		return UR_EMALFORMED;
	}
	rc = validate_hello(&m, s->err);
	if (rc == 0 && !m.reattach) {
		seterr(s->err, "reattach: the server now on %s does not take re-attaching targets (an older uffdrestore load)", s->path);
		rc = UR_ESNAPSHOT;
	}
	if (rc == 0 && strcmp(m.snapshot_id, s->snapshot_id)) {
		seterr(s->err, "reattach: the server now on %s serves another snapshot (\"%s\", id %s; this target maps id %s): refusing it; restart `uffdrestore load` with the snapshot this target was restored from",
		       s->path, m.snapshot ? m.snapshot : "", m.snapshot_id[0] ? m.snapshot_id : "none", s->snapshot_id);
		rc = UR_ESNAPSHOT;
	}
	if (rc == 0 && (strcmp(m.backing, s->backing) || m.page_size != s->page_size || m.file_size != s->file_size ||
			m.region_count != s->nregions)) {
		seterr(s->err, "reattach: the server now on %s lays the snapshot out differently (backing %s, pages of %llu bytes, %llu bytes; this target maps %s, %llu, %llu): restart it with the first server's --backing",
		       s->path, m.backing, (unsigned long long)m.page_size, (unsigned long long)m.file_size, s->backing,
		       (unsigned long long)s->page_size, (unsigned long long)s->file_size);
		rc = UR_ESNAPSHOT;
	}
	uint64_t count = m.region_count;
	msg_free(&m);
	if (rc < 0)
		return rc;
	/* Its regions must be ours. */
	struct ur_session t;
	memset(&t, 0, sizeof(t));
	t.sock = sock;
	t.timeout_ms = s->timeout_ms;
	rc = recv_regions(&t, buf, count, s->err);
	for (size_t i = 0; rc == 0 && i < t.nregions; i++) {
		const struct ur_region *a = &t.regions[i], *b = &s->regions[i];
		if (a->offset != b->offset || a->size != b->size || a->length != b->length) {
			seterr(s->err, "reattach: region %zu of the server now on %s is not the one this target maps", i, s->path);
			rc = UR_ESNAPSHOT;
		}
	}
	for (size_t i = 0; i < t.nregions; i++)
		free((char *)t.regions[i].name);
	free(t.regions);
	if (rc < 0)
		return rc;
	size_t nmapped = 0;
	for (size_t i = 0; i < s->nregions; i++)
		nmapped += s->regions[i].addr != NULL;
	size_t o = 0;
	if (jputf(buf, UR_MAX_MSG + 1, &o, "{\"type\":\"reattach\",\"version\":%d,\"uffd_features\":%llu,\"mapping_count\":%zu}",
		  UR_PROTOCOL_VERSION, (unsigned long long)s->features, nmapped) < 0)
		return UR_ETOOLARGE;
	rc = send_msg2(sock, buf, o, s->uffd, s->backing_fd);
	if (rc < 0) {
		seterr(s->err, "reattach: sendmsg: %s", strerror(-rc));
		return rc;
	}
	int old = s->sock;
	s->sock = sock;
	rc = send_mappings(s, buf, s->private_mapping);
	if (rc == 0)
		rc = recv_parse(sock, buf, &m, s->timeout_ms, NULL, NULL, s->err);
	s->sock = old;
	if (rc < 0)
		return rc;
	if (strcmp(m.type, "ready")) {
		seterr(s->err, "reattach: expected ready, got \"%s\"", m.type);
		msg_free(&m);
		return UR_EMALFORMED;
	}
	msg_free(&m);
	return 0;
}

/* The server closed the session: connect to the same path again and
 * re-attach, with a back-off (10 ms doubling to 500 ms) until
 * s->reattach_ms have passed. Faults raised meanwhile wait in the
 * userfaultfd for the new server. */
static int reattach(struct ur_session *s)
{
	char *buf = malloc(UR_MAX_MSG + 1);
	if (!buf)
		return -ENOMEM;
	char first[UR_ERRLEN];
	snprintf(first, sizeof first, "%s", s->err);
	int64_t deadline = now_ms() + s->reattach_ms;
	int delay = 10, rc = UR_ECLOSED, attempts = 0;
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", s->path);
	for (;;) {
		attempts++;
		int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
		if (sock < 0) {
			rc = -errno;
			seterr(s->err, "reattach: socket: %s", strerror(errno));
		} else if (connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			rc = -errno;
			seterr(s->err, "reattach: connect to %s: %s", s->path, strerror(errno));
		} else {
			rc = reattach_once(s, sock, buf);
			if (rc == 0) {
				close(s->sock);
				s->sock = sock;
				s->shutdown_requested = 0;
				s->reattaches++;
				break;
			}
		}
		if (sock >= 0)
			close(sock);
		if (rc == UR_ESNAPSHOT || rc == UR_EUNTRUSTED || rc == UR_EREFUSED)
			break;
		int64_t left = deadline - now_ms();
		if (left <= 0) {
			char last[UR_ERRLEN];
			snprintf(last, sizeof last, "%s", s->err);
			seterr(s->err, "%s; no server re-attached this target within %d ms (%d attempts; last: %s)", first,
			       s->reattach_ms, attempts, last);
			rc = UR_ETIMEDOUT;
			break;
		}
		struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)(delay < left ? delay : left) * 1000000L };
		while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
		}
		delay = delay * 2 > 500 ? 500 : delay * 2;
	}
	free(buf);
	return rc;
}

int ur_reattach(struct ur_session *s)
{
	if (!s)
		return -EINVAL;
	if (s->reattach_ms < 0 || s->backing_fd < 0) {
		seterr(s->err, "re-attaching is off for this session (reattach_timeout_ms < 0, or the server does not take it)");
		return -EOPNOTSUPP;
	}
	return reattach(s);
}

unsigned ur_session_reattaches(const struct ur_session *s) { return s->reattaches; }

int ur_poll(struct ur_session *s)
{
	if (s->pending)
		return 0; /* ur_connect, nothing attached yet: the server has nothing to say */
	if (s->sock < 0) {
		seterr(s->err, "no connection: the last ur_attach_mappings failed");
		return UR_ECLOSED;
	}
	char *buf = malloc(UR_MAX_MSG + 1);
	if (!buf)
		return -ENOMEM;
	int rc = 0;
	/* The connections of later ur_attach_mappings calls: an error or close ends that attach. */
	for (struct ur_link *l = s->links; l && rc == 0; l = l->next) {
		struct msg m;
		if (l->sock < 0)
			continue;
		int r = recv_parse(l->sock, buf, &m, 0, NULL, NULL, s->err);
		if (r == -EAGAIN)
			continue;
		if (r < 0)
			rc = r;
		else if (!strcmp(m.type, "shutdown"))
			s->shutdown_requested = 1;
		if (r >= 0)
			msg_free(&m);
	}
	for (; rc == 0;) {
		struct msg m;
		int r = recv_parse(s->sock, buf, &m, 0, NULL, NULL, s->err);
		if (r == -EAGAIN)
			break;
		if (r == UR_ECLOSED && s->reattach_ms >= 0 && s->backing_fd >= 0) {
			/* The server is gone: a restarted one may take us back. */
			r = reattach(s);
			if (r == 0)
				continue;
		}
		if (r < 0) {
			rc = r;
			break;
		}
		if (!strcmp(m.type, "shutdown"))
			s->shutdown_requested = 1;
		msg_free(&m);
	}
	free(buf);
	if (rc < 0)
		return rc;
	return s->shutdown_requested;
}

/* Sends {"type":typ} and waits for a reply of type want, skipping shutdown
 * notices; copies its stats to sbuf. */
static int request(struct ur_session *s, const char *typ, const char *want, char *sbuf, size_t n)
{
	if (s->pending || s->sock < 0) {
		seterr(s->err, "nothing is attached on this session (ur_connect without a successful ur_attach_mappings)");
		return UR_ECLOSED;
	}
	char *buf = malloc(UR_MAX_MSG + 1);
	if (!buf)
		return -ENOMEM;
	int len = snprintf(buf, UR_MAX_MSG, "{\"type\":\"%s\"}", typ);
	int rc = send_msg(s->sock, buf, (size_t)len, -1);
	if (rc < 0) {
		seterr(s->err, "sendmsg: %s", strerror(-rc));
		goto out;
	}
	for (;;) {
		struct msg m;
		rc = recv_parse(s->sock, buf, &m, s->timeout_ms, NULL, NULL, s->err);
		if (rc < 0)
			goto out;
		if (!strcmp(m.type, "shutdown")) {
			s->shutdown_requested = 1;
			msg_free(&m);
			continue;
		}
		if (strcmp(m.type, want)) {
			seterr(s->err, "expected \"%s\", got \"%s\"", want, m.type);
			msg_free(&m);
			rc = UR_EMALFORMED;
			goto out;
		}
		rc = 0;
		if (sbuf && n > 0) {
			const char *st = m.stats ? m.stats : "{}";
			size_t sl = m.stats ? m.stats_len : 2;
			if (sl + 1 > n) {
				rc = -ERANGE;
				seterr(s->err, "stats (%zu bytes) do not fit the %zu-byte buffer", sl, n);
			} else {
				memcpy(sbuf, st, sl);
				sbuf[sl] = 0;
				rc = (int)sl;
			}
		}
		msg_free(&m);
		goto out;
	}
out:
	free(buf);
	return rc;
}

int ur_stats(struct ur_session *s, char *buf, size_t n)
{
	if (!buf || n == 0)
		return -EINVAL;
	return request(s, "stats", "stats", buf, n);
}

int ur_detach_stats(struct ur_session *s, char *buf, size_t n)
{
	if (!s)
		return -EINVAL;
	/* Later ur_attach_mappings' connections first (their stats are not reported). */
	for (struct ur_link *l = s->links; l; l = l->next) {
		if (l->sock < 0)
			continue;
		int keep = s->sock;
		s->sock = l->sock;
		request(s, "detach", "bye", NULL, 0);
		s->sock = keep;
	}
	int rc = s->pending ? 0 : request(s, "detach", "bye", buf, n);
	if (rc < 0)
		seterr(last_err, "detach: %s", s->err);
	session_free(s);
	return rc < 0 ? rc : 0;
}

int ur_detach(struct ur_session *s) { return ur_detach_stats(s, NULL, 0); }

void ur_close(struct ur_session *s) { session_free(s); }
