/*
 * ur_preload.c - bin/libuffdrestore-preload.so: makes an unmodified program
 * map a snapshot served by `uffdrestore load` lazily (README "run").
 *
 *	UFFDRESTORE_SOCKET=/run/snap.sock \
 *	UFFDRESTORE_MAP=/vm/ram=#0:/vm/other=heap \
 *	LD_PRELOAD=bin/libuffdrestore-preload.so prog ...
 *
 * (`uffdrestore run` sets these.) UFFDRESTORE_MAP is a ':'-separated list of
 * MARKER[=REGION]: MARKER is a path (need not exist; compared after making it
 * absolute), REGION a region name or #INDEX (default: the snapshot's only
 * region). UFFDRESTORE_SERVER_UID names one more uid the server may run as
 * (besides root and the program's own uid). UFFDRESTORE_SOCKET_FD, when
 * `uffdrestore run` sets it, is its connection to the server (checked,
 * hello unread): the first session uses it instead of connecting.
 *
 * When the program opens a marker (open, open64, __open_2, __open64_2,
 * openat, openat64, __openat_2, __openat64_2, fopen, fopen64) the library
 * connects to the server (ur_connect, once per process) and returns a
 * duplicate of the server's backing fd. On such an fd: fstat/fstat64 report
 * the region's size; lseek/lseek64 move a position of their own within it;
 * ftruncate to the region's size or less succeeds and does nothing, to more
 * fails (EFBIG); fallocate fails (EOPNOTSUPP); read/write/pread/pwrite fail
 * (EINVAL: they would bypass the server); dup/dup2/dup3 of it are marker fds
 * too. mmap/mmap64 of it maps the region
 * (file offset 0 = the region's first byte) with the program's flags
 * (MAP_SHARED or MAP_PRIVATE, MAP_FIXED or not; MAP_POPULATE is dropped) and
 * registers the mapping (ur_attach_mapping): pages fill on first touch.
 * close() of it leaves the session alone. It is close-on-exec whatever the
 * flags: only this process knows it is a snapshot, and an fd handed to
 * another (exec, SCM_RIGHTS) maps the backing without the lazy restore —
 * pages not filled yet read as zeros there — so do not hand it on. A forked child that opens or maps a
 * marker connects on its own; what it inherited mapped follows
 * ur_client.h's fork rules (served with fork events, else not mapped in the
 * child: MADV_DONTFORK).
 *
 * Every failure prints one line "uffdrestore-preload: ..." on stderr naming
 * the cause and the fix, and the intercepted call fails with an errno.
 */
#define _GNU_SOURCE
#include "ur_client.c"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>

#define EXPORT __attribute__((visibility("default")))
#define PFX "uffdrestore-preload: "
#define UR_PRELOAD_MAXFD 65536
#define UR_PRELOAD_MAXMARKERS 64

struct marker {
	char *path; /* absolute, normalized */
	const char *base; /* its last component */
	char *region; /* as given, NULL: the only region */
	long index; /* resolved region index, -1 not yet */
};

static struct marker markers[UR_PRELOAD_MAXMARKERS];
static int nmarkers;
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
/* Recursive: the client code calls open/read/fstat, which come back here. */
static pthread_mutex_t lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static struct ur_session *sess;
static pid_t sess_pid;
/* UFFDRESTORE_SOCKET_FD: the connection `uffdrestore run` made to check the
 * server (hello unread), used for the first session, so that the check is
 * not a target that came and went (which would end a `load --once`). */
static int handed_fd = -1;
static pid_t handed_pid;

/* Per fd: 1 + the region index of a marker fd, 0 otherwise; and its position. */
static _Atomic int fd_region[UR_PRELOAD_MAXFD];
static int64_t fd_pos[UR_PRELOAD_MAXFD];

#define REAL(ret, name, args)                                                                       \
	static ret(*real_##name) args;                                                               \
	static ret(*get_##name(void)) args                                                           \
	{                                                                                            \
		if (!real_##name)                                                                    \
			real_##name = (ret(*) args)dlsym(RTLD_NEXT, #name);                          \
		return real_##name;                                                                  \
	}

REAL(int, open, (const char *, int, ...))
REAL(int, open64, (const char *, int, ...))
REAL(int, __open_2, (const char *, int))
REAL(int, __open64_2, (const char *, int))
REAL(int, openat, (int, const char *, int, ...))
REAL(int, openat64, (int, const char *, int, ...))
REAL(int, __openat_2, (int, const char *, int))
REAL(int, __openat64_2, (int, const char *, int))
REAL(FILE *, fopen, (const char *, const char *))
REAL(FILE *, fopen64, (const char *, const char *))
REAL(void *, mmap, (void *, size_t, int, int, int, off_t))
REAL(void *, mmap64, (void *, size_t, int, int, int, off64_t))
REAL(int, fstat, (int, struct stat *))
REAL(int, fstat64, (int, struct stat64 *))
REAL(off_t, lseek, (int, off_t, int))
REAL(off64_t, lseek64, (int, off64_t, int))
REAL(int, ftruncate, (int, off_t))
REAL(int, ftruncate64, (int, off64_t))
REAL(int, fallocate, (int, int, off_t, off_t))
REAL(int, fallocate64, (int, int, off64_t, off64_t))
REAL(int, close, (int))
REAL(int, dup, (int))
REAL(int, dup2, (int, int))
REAL(int, dup3, (int, int, int))
REAL(ssize_t, read, (int, void *, size_t))
REAL(ssize_t, write, (int, const void *, size_t))
REAL(ssize_t, pread, (int, void *, size_t, off_t))
REAL(ssize_t, pread64, (int, void *, size_t, off64_t))
REAL(ssize_t, pwrite, (int, const void *, size_t, off_t))
REAL(ssize_t, pwrite64, (int, const void *, size_t, off64_t))

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char b[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(b, sizeof b - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof b - 2)
		n = sizeof b - 2;
	b[n++] = '\n';
	ssize_t w = write(2, b, (size_t)n) ;
	(void)w;
}

/* Makes path absolute (relative to dir) and removes ".", ".." and "//". */
static char *normalize(const char *dir, const char *path)
{
	size_t dl = path[0] == '/' ? 0 : strlen(dir);
	char *in = malloc(dl + strlen(path) + 2);
	if (!in)
		return NULL;
	if (dl)
		sprintf(in, "%s/%s", dir, path);
	else
		strcpy(in, path);
	char *out = malloc(strlen(in) + 2);
	if (!out) {
		free(in);
		return NULL;
	}
	size_t o = 0;
	for (char *p = in; *p;) {
		while (*p == '/')
			p++;
		char *e = p;
		while (*e && *e != '/')
			e++;
		size_t l = (size_t)(e - p);
		if (l == 0)
			break;
		if (l == 1 && p[0] == '.') {
		} else if (l == 2 && p[0] == '.' && p[1] == '.') {
			while (o > 0 && out[o - 1] != '/')
				o--;
			if (o > 0)
				o--;
		} else {
			out[o++] = '/';
			memcpy(out + o, p, l);
			o += l;
		}
		p = e;
	}
	if (o == 0)
		out[o++] = '/';
	out[o] = 0;
	free(in);
	return out;
}

static void parse_env(void)
{
	const char *v = getenv("UFFDRESTORE_MAP");
	if (!v || !*v)
		return;
	char cwd[PATH_MAX];
	if (!getcwd(cwd, sizeof cwd))
		strcpy(cwd, "/");
	char *copy = strdup(v), *save = NULL;
	for (char *item = copy ? strtok_r(copy, ":", &save) : NULL; item; item = strtok_r(NULL, ":", &save)) {
		if (nmarkers == UR_PRELOAD_MAXMARKERS) {
			say(PFX "UFFDRESTORE_MAP: more than %d markers: the rest are ignored", UR_PRELOAD_MAXMARKERS);
			break;
		}
		char *eq = strchr(item, '=');
		if (eq)
			*eq = 0;
		struct marker *m = &markers[nmarkers];
		m->path = normalize(cwd, item);
		if (!m->path)
			continue;
		m->base = strrchr(m->path, '/') + 1;
		m->region = eq && eq[1] ? strdup(eq + 1) : NULL;
		m->index = -1;
		nmarkers++;
	}
	free(copy);
}

/* The marker path names, or -1. Cheap for every other path: the last
 * component is compared before anything is resolved. */
static int marker_of(int dirfd, const char *path)
{
	pthread_once(&env_once, parse_env);
	if (nmarkers == 0 || !path)
		return -1;
	const char *base = strrchr(path, '/');
	base = base ? base + 1 : path;
	int any = 0;
	for (int i = 0; i < nmarkers && !any; i++)
		any = !strcmp(base, markers[i].base) || !strcmp(base, ".") || !strcmp(base, "..") || !*base;
	if (!any)
		return -1;
	char dir[PATH_MAX];
	if (path[0] != '/') {
		if (dirfd == AT_FDCWD) {
			if (!getcwd(dir, sizeof dir))
				return -1;
		} else {
			char l[64];
			snprintf(l, sizeof l, "/proc/self/fd/%d", dirfd);
			ssize_t n = readlink(l, dir, sizeof dir - 1);
			if (n < 0)
				return -1;
			dir[n] = 0;
		}
	} else {
		dir[0] = 0;
	}
	char *abs = normalize(dir, path);
	int found = -1;
	for (int i = 0; abs && i < nmarkers && found < 0; i++)
		if (!strcmp(abs, markers[i].path))
			found = i;
	free(abs);
	return found;
}

static int errno_of(int rc)
{
	if (rc > -4096 && rc < 0)
		return -rc;
	switch (rc) {
	case UR_EREFUSED:
	case UR_EUNTRUSTED:
		return EACCES;
	case UR_ETIMEDOUT:
		return ETIMEDOUT;
	case UR_ENOREGION:
		return ENXIO;
	case UR_EMAPRANGE:
		return EINVAL;
	case UR_ENOFEATURE:
		return EOPNOTSUPP;
	}
	return EIO;
}

/* Forgets a session inherited over fork: closes this process's copies of
 * its fds; the parent's mappings and registrations are not touched (a
 * child's copies are served through fork events, or are not there). */
static void forget_inherited(struct ur_session *s)
{
	while (s->links) {
		struct ur_link *l = s->links;
		s->links = l->next;
		close(l->uffd);
		if (l->sock >= 0)
			close(l->sock);
		free(l->maps);
		free(l);
	}
	if (s->uffd >= 0)
		close(s->uffd);
	if (s->backing_fd >= 0)
		close(s->backing_fd);
	if (s->sock >= 0)
		close(s->sock);
	/* The rest is a small leak, once per forked child that maps a marker. */
}

/* The session (connecting once per process), or NULL with errno set and
 * the cause printed. Called with lock held. */
static struct ur_session *session(const char *what)
{
	if (sess && sess_pid != getpid()) {
		forget_inherited(sess);
		sess = NULL;
	}
	if (sess)
		return sess;
	const char *sock = getenv("UFFDRESTORE_SOCKET");
	if (!sock || !*sock) {
		say(PFX "%s: UFFDRESTORE_SOCKET is not set: run the program with `uffdrestore run --socket SOCKET --map ...`", what);
		errno = EINVAL;
		return NULL;
	}
	struct ur_attach_opts o;
	memset(&o, 0, sizeof o);
	const char *su = getenv("UFFDRESTORE_SERVER_UID");
	if (su && *su)
		o.server_uid = (uint32_t)strtoul(su, NULL, 10);
	int rc = UR_ECLOSED;
	if (handed_fd >= 0 && handed_pid != getpid()) { /* the parent's */
		get_close()(handed_fd);
		handed_fd = -1;
	}
	if (handed_fd >= 0) {
		/* The server may have given up waiting for an attach on it (its
		 * handshake timeout): then connect again. */
		rc = attach_common(sock, &o, &sess, 1, handed_fd);
		handed_fd = -1;
	}
	if (rc == UR_ECLOSED || rc == UR_EREFUSED || rc == -ECONNRESET || rc == -EPIPE)
		rc = ur_connect(sock, &o, &sess);
	if (rc < 0) {
		const char *fix = "";
		if (rc == -ENOENT || rc == -ECONNREFUSED)
			fix = " (is the server running? start `uffdrestore load SNAPSHOT --socket SOCKET` first)";
		else if (rc == UR_EREFUSED && strstr(ur_session_error(NULL), "may not attach"))
			fix = " (start the server with --allow-uid for this uid)";
		else if (rc == UR_EUNTRUSTED)
			fix = "";
		else if (rc == -EACCES)
			fix = " (the socket's permissions: load --socket-mode)";
		say(PFX "%s: cannot attach to the uffdrestore server on %s: %s%s", what, sock, ur_session_error(NULL), fix);
		sess = NULL;
		errno = errno_of(rc);
		return NULL;
	}
	sess_pid = getpid();
	return sess;
}

/* The region index of marker m, or -1 (printed, errno set). Lock held. */
static long marker_region(int mi, const char *what)
{
	struct marker *m = &markers[mi];
	size_t n = ur_session_nregions(sess);
	if (m->index >= 0 && (size_t)m->index < n)
		return m->index;
	long idx = -1;
	if (!m->region) {
		if (n == 1)
			idx = 0;
		else {
			say(PFX "%s: the snapshot has %zu regions: name one with --map %s=NAME or %s=#INDEX (UFFDRESTORE_MAP)",
			    what, n, m->path, m->path);
			errno = ENXIO;
			return -1;
		}
	} else if (m->region[0] == '#') {
		char *end;
		errno = 0;
		unsigned long v = strtoul(m->region + 1, &end, 10);
		if (errno || *end || end == m->region + 1 || v >= n) {
			say(PFX "%s: region %s does not exist: the snapshot has regions #0..#%zu", what, m->region, n - 1);
			errno = ENXIO;
			return -1;
		}
		idx = (long)v;
	} else {
		size_t i = ur_session_find_next(sess, m->region, 0);
		if (i == n) {
			char list[512] = "";
			size_t o = 0;
			for (size_t k = 0; k < n && o < sizeof list - 64; k++)
				o += (size_t)snprintf(list + o, sizeof list - o, "%s#%zu \"%s\"", k ? ", " : "", k,
						      ur_session_region(sess, k)->name);
			say(PFX "%s: the snapshot has no region \"%s\" (its regions: %s): fix --map %s=NAME or =#INDEX", what,
			    m->region, list, m->path);
			errno = ENXIO;
			return -1;
		}
		if (ur_session_find_next(sess, m->region, i + 1) != n) {
			say(PFX "%s: several regions are named \"%s\": name one by index, --map %s=#INDEX", what, m->region,
			    m->path);
			errno = ENXIO;
			return -1;
		}
		idx = (long)i;
	}
	if (ur_session_region(sess, (size_t)idx)->size == 0) {
		say(PFX "%s: region #%ld \"%s\" is empty: nothing to map", what, idx, ur_session_region(sess, (size_t)idx)->name);
		errno = ENXIO;
		return -1;
	}
	m->index = idx;
	return idx;
}

/* open of marker mi: a duplicate of the backing fd, or -1 with errno. */
static int open_marker(int mi, int flags)
{
	char what[PATH_MAX + 16];
	snprintf(what, sizeof what, "open %s", markers[mi].path);
	if ((flags & O_CREAT) && (flags & O_EXCL)) {
		errno = EEXIST;
		return -1;
	}
	if (flags & O_TRUNC) {
		say(PFX "%s: O_TRUNC would discard the snapshot: open it without O_TRUNC", what);
		errno = EPERM;
		return -1;
	}
	pthread_mutex_lock(&lock);
	int fd = -1;
	long idx = -1;
	if (session(what))
		idx = marker_region(mi, what);
	if (idx >= 0) {
		/* Always close-on-exec: a program run by exec would map it as a
		 * plain file, without the lazy restore (zeros where nothing was
		 * filled yet); without the fd it fails instead. */
		fd = fcntl(ur_session_backing_fd(sess), F_DUPFD_CLOEXEC, 3);
		if (fd < 0) {
			say(PFX "%s: dup of the backing fd: %s", what, strerror(errno));
		} else if (fd >= UR_PRELOAD_MAXFD) {
			get_close()(fd);
			fd = -1;
			say(PFX "%s: no file descriptor below %d left", what, UR_PRELOAD_MAXFD);
			errno = EMFILE;
		} else {
			fd_pos[fd] = 0;
			atomic_store(&fd_region[fd], (int)idx + 1);
		}
	}
	int e = errno;
	pthread_mutex_unlock(&lock);
	errno = e;
	return fd;
}

/* The region of a marker fd (checked to still be the backing: an fd
 * number reused behind our back, e.g. by dup2, is not one), or -1. */
static long fd_marker(int fd)
{
	if (fd < 0 || fd >= UR_PRELOAD_MAXFD)
		return -1;
	int r = atomic_load(&fd_region[fd]);
	if (r == 0)
		return -1;
	/* Also in a forked child (an inherited session: same server, same
	 * layout), the fd is a marker while it is still the backing. */
	struct stat a, b;
	pthread_mutex_lock(&lock);
	int ok = sess && get_fstat()(fd, &a) == 0 && get_fstat()(ur_session_backing_fd(sess), &b) == 0 &&
		 a.st_dev == b.st_dev && a.st_ino == b.st_ino;
	pthread_mutex_unlock(&lock);
	if (!ok) {
		atomic_store(&fd_region[fd], 0);
		return -1;
	}
	return r - 1;
}

/* A thread holding the lock while another forks must not leave the child a locked lock. */
static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork(void) { pthread_mutex_unlock(&lock); }
/* The child's thread has another tid than the one that owns the (recursive)
 * lock, so it cannot unlock it: it makes it anew. */
static void after_fork_child(void)
{
	pthread_mutexattr_t a;
	pthread_mutexattr_init(&a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
	pthread_mutex_init(&lock, &a);
	pthread_mutexattr_destroy(&a);
}
__attribute__((constructor)) static void preload_init(void)
{
	pthread_atfork(before_fork, after_fork, after_fork_child);
	const char *v = getenv("UFFDRESTORE_SOCKET_FD"), *path = getenv("UFFDRESTORE_SOCKET");
	if (!v)
		return;
	/* Only this process uses it: not its children, nor what it executes. */
	char *end;
	long fd = strtol(v, &end, 10);
	unsetenv("UFFDRESTORE_SOCKET_FD");
	int type = 0;
	socklen_t tl = sizeof type;
	struct sockaddr_un sa;
	socklen_t sl = sizeof sa;
	if (*end || end == v || fd < 0 || fd > INT_MAX || !path ||
	    getsockopt((int)fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_SEQPACKET ||
	    getpeername((int)fd, (struct sockaddr *)&sa, &sl) < 0 || sa.sun_family != AF_UNIX)
		return; /* not a connection to a server: leave the fd alone */
	/* Who the server is, is checked when it is used (as for any connection). */
	fcntl((int)fd, F_SETFD, FD_CLOEXEC);
	handed_fd = (int)fd;
	handed_pid = getpid();
}

/* An fd a real open returned is no marker (whatever a close we did not
 * see, such as close_range, left in its entry). */
static int fresh(int fd)
{
	if (fd >= 0 && fd < UR_PRELOAD_MAXFD)
		atomic_store(&fd_region[fd], 0);
	return fd;
}

/* A duplicate of a marker fd is one too (fd_marker checks it on use). */
static int dup_of(int old, int fd)
{
	if (fd >= 0 && fd < UR_PRELOAD_MAXFD) {
		int r = old >= 0 && old < UR_PRELOAD_MAXFD ? atomic_load(&fd_region[old]) : 0;
		if (r)
			fd_pos[fd] = 0;
		atomic_store(&fd_region[fd], r);
	}
	return fd;
}

static uint64_t region_size(long idx)
{
	return ur_session_region(sess, (size_t)idx)->size;
}

/* open, open64, openat, openat64 (mode only with O_CREAT or O_TMPFILE), and
 * glibc's fortified __open_2 ... forms. */
#define OPEN_VARIADIC(name, params, dirfd, ...)                                              \
	EXPORT int name params                                                               \
	{                                                                                    \
		mode_t mode = 0;                                                             \
		if (flags & (O_CREAT | __O_TMPFILE)) {                                       \
			va_list ap;                                                          \
			va_start(ap, flags);                                                 \
			mode = va_arg(ap, mode_t);                                           \
			va_end(ap);                                                          \
		}                                                                            \
		int mi = marker_of(dirfd, path);                                             \
		return mi < 0 ? fresh(get_##name()(__VA_ARGS__, mode)) : open_marker(mi, flags); \
	}
#define OPEN_FORTIFIED(name, params, dirfd, ...)                                             \
	EXPORT int name params                                                               \
	{                                                                                    \
		int mi = marker_of(dirfd, path);                                             \
		return mi < 0 ? fresh(get_##name()(__VA_ARGS__)) : open_marker(mi, flags);     \
	}

OPEN_VARIADIC(open, (const char *path, int flags, ...), AT_FDCWD, path, flags)
OPEN_VARIADIC(open64, (const char *path, int flags, ...), AT_FDCWD, path, flags)
OPEN_VARIADIC(openat, (int dirfd, const char *path, int flags, ...), dirfd, dirfd, path, flags)
OPEN_VARIADIC(openat64, (int dirfd, const char *path, int flags, ...), dirfd, dirfd, path, flags)
OPEN_FORTIFIED(__open_2, (const char *path, int flags), AT_FDCWD, path, flags)
OPEN_FORTIFIED(__open64_2, (const char *path, int flags), AT_FDCWD, path, flags)
OPEN_FORTIFIED(__openat_2, (int dirfd, const char *path, int flags), dirfd, dirfd, path, flags)
OPEN_FORTIFIED(__openat64_2, (int dirfd, const char *path, int flags), dirfd, dirfd, path, flags)

static FILE *fopen_marker(int mi, const char *mode)
{
	int flags = strchr(mode, '+') ? O_RDWR : mode[0] == 'r' ? O_RDONLY : O_WRONLY;
	if (mode[0] == 'w')
		flags |= O_TRUNC;
	if (strchr(mode, 'e'))
		flags |= O_CLOEXEC;
	int fd = open_marker(mi, flags);
	if (fd < 0)
		return NULL;
	FILE *f = fdopen(fd, mode);
	if (!f) {
		int e = errno;
		close(fd);
		errno = e;
	}
	return f;
}

EXPORT FILE *fopen(const char *path, const char *mode)
{
	int mi = marker_of(AT_FDCWD, path);
	if (mi >= 0)
		return fopen_marker(mi, mode);
	FILE *f = get_fopen()(path, mode);
	if (f)
		fresh(fileno(f));
	return f;
}

EXPORT FILE *fopen64(const char *path, const char *mode)
{
	int mi = marker_of(AT_FDCWD, path);
	if (mi >= 0)
		return fopen_marker(mi, mode);
	FILE *f = get_fopen64()(path, mode);
	if (f)
		fresh(fileno(f));
	return f;
}

/* mmap of a marker fd: the region at the file offset, registered. */
static void *mmap_marker(long idx, void *addr, size_t len, int prot, int flags, int fd, int64_t off)
{
	char what[128];
	snprintf(what, sizeof what, "mmap of %zu bytes at offset %lld of a snapshot marker", len, (long long)off);
	pthread_mutex_lock(&lock);
	void *ret = MAP_FAILED;
	int e = EINVAL;
	if (!session(what)) {
		e = errno;
		goto out;
	}
	const struct ur_region *r = ur_session_region(sess, (size_t)idx);
	uint64_t ps = ur_session_page_size(sess);
	uint64_t mlen = ((uint64_t)len + ps - 1) / ps * ps;
	int type = flags & MAP_TYPE;
	if (len == 0 || off < 0 || (uint64_t)off % ps) {
		say(PFX "%s: the offset must be a multiple of the backing's page size %llu", what, (unsigned long long)ps);
		goto out;
	}
	if ((uint64_t)off > r->size || mlen > r->size - (uint64_t)off) {
		say(PFX "%s: the mapping (%llu bytes with the page size %llu) goes past the end of region #%ld \"%s\" (%llu bytes): map at most the region's size",
		    what, (unsigned long long)mlen, (unsigned long long)ps, idx, r->name, (unsigned long long)r->size);
		goto out;
	}
	void *a = get_mmap()(addr, mlen, prot, flags & ~MAP_POPULATE, fd, (off_t)(r->offset + (uint64_t)off));
	if (a == MAP_FAILED) {
		e = errno;
		int am = fcntl(fd, F_GETFL);
		if (e == EACCES && am >= 0 && (am & O_ACCMODE) == O_RDONLY && type != MAP_PRIVATE && (prot & PROT_WRITE))
			say(PFX "%s: the server gives read-only access to the snapshot (load --read-only-targets): map it MAP_PRIVATE (for QEMU: share=off)",
			    what);
		goto out;
	}
	int rc = ur_attach_mapping(sess, a, mlen, (size_t)idx, (uint64_t)off, type == MAP_PRIVATE ? MAP_PRIVATE : MAP_SHARED);
	if (rc < 0) {
		say(PFX "%s: %s: %s", what, ur_strerror(rc), ur_session_error(sess));
		munmap(a, mlen);
		e = errno_of(rc);
		goto out;
	}
	ret = a;
out:
	pthread_mutex_unlock(&lock);
	errno = e;
	return ret;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	long idx = fd_marker(fd);
	return idx < 0 ? get_mmap()(addr, len, prot, flags, fd, off) : mmap_marker(idx, addr, len, prot, flags, fd, off);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	long idx = fd_marker(fd);
	return idx < 0 ? get_mmap64()(addr, len, prot, flags, fd, off) : mmap_marker(idx, addr, len, prot, flags, fd, off);
}

EXPORT int fstat(int fd, struct stat *st)
{
	int rc = get_fstat()(fd, st);
	long idx = rc == 0 ? fd_marker(fd) : -1;
	if (idx >= 0) {
		st->st_size = (off_t)region_size(idx);
		st->st_blocks = st->st_size / 512;
	}
	return rc;
}

EXPORT int fstat64(int fd, struct stat64 *st)
{
	int rc = get_fstat64()(fd, st);
	long idx = rc == 0 ? fd_marker(fd) : -1;
	if (idx >= 0) {
		st->st_size = (off64_t)region_size(idx);
		st->st_blocks = st->st_size / 512;
	}
	return rc;
}

static int64_t seek_marker(int fd, long idx, int64_t off, int whence)
{
	int64_t size = (int64_t)region_size(idx), pos;
	switch (whence) {
	case SEEK_SET:
		pos = off;
		break;
	case SEEK_CUR:
		pos = fd_pos[fd] + off;
		break;
	case SEEK_END:
		pos = size + off;
		break;
	case SEEK_DATA:
		if (off >= size) {
			errno = ENXIO;
			return -1;
		}
		pos = off;
		break;
	case SEEK_HOLE:
		if (off >= size) {
			errno = ENXIO;
			return -1;
		}
		pos = size;
		break;
	default:
		errno = EINVAL;
		return -1;
	}
	if (pos < 0) {
		errno = EINVAL;
		return -1;
	}
	fd_pos[fd] = pos;
	return pos;
}

EXPORT off_t lseek(int fd, off_t off, int whence)
{
	long idx = fd_marker(fd);
	return idx < 0 ? get_lseek()(fd, off, whence) : (off_t)seek_marker(fd, idx, off, whence);
}

EXPORT off64_t lseek64(int fd, off64_t off, int whence)
{
	long idx = fd_marker(fd);
	return idx < 0 ? get_lseek64()(fd, off, whence) : (off64_t)seek_marker(fd, idx, off, whence);
}

static int truncate_marker(long idx, int64_t len)
{
	uint64_t size = region_size(idx);
	if (len < 0) {
		errno = EINVAL;
		return -1;
	}
	if ((uint64_t)len <= size)
		return 0; /* the snapshot stays as it is: a no-op */
	say(PFX "ftruncate of a snapshot marker to %lld bytes: region #%ld \"%s\" has %llu bytes and cannot grow: give the program a size of at most %llu",
	    (long long)len, idx, ur_session_region(sess, (size_t)idx)->name, (unsigned long long)size,
	    (unsigned long long)size);
	errno = EFBIG;
	return -1;
}

EXPORT int ftruncate(int fd, off_t len)
{
	long idx = fd_marker(fd);
	return idx < 0 ? get_ftruncate()(fd, len) : truncate_marker(idx, len);
}

EXPORT int ftruncate64(int fd, off64_t len)
{
	long idx = fd_marker(fd);
	return idx < 0 ? get_ftruncate64()(fd, len) : truncate_marker(idx, len);
}

EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
	if (fd_marker(fd) >= 0) {
		errno = EOPNOTSUPP; /* punching the shared backing would discard snapshot pages */
		return -1;
	}
	return get_fallocate()(fd, mode, off, len);
}

EXPORT int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
	if (fd_marker(fd) >= 0) {
		errno = EOPNOTSUPP;
		return -1;
	}
	return get_fallocate64()(fd, mode, off, len);
}

EXPORT int dup(int old) { return dup_of(old, get_dup()(old)); }
EXPORT int dup2(int old, int fd) { return old == fd ? get_dup2()(old, fd) : dup_of(old, get_dup2()(old, fd)); }
EXPORT int dup3(int old, int fd, int flags) { return dup_of(old, get_dup3()(old, fd, flags)); }

EXPORT int close(int fd)
{
	if (fd >= 0 && fd < UR_PRELOAD_MAXFD)
		atomic_store(&fd_region[fd], 0);
	return get_close()(fd);
}

/* read(2)/write(2) of the backing bypass the server: pages it has not
 * filled yet would read as zeros. */
static int io_refused(int fd, const char *call)
{
	if (fd < 0 || fd >= UR_PRELOAD_MAXFD || atomic_load(&fd_region[fd]) == 0 || fd_marker(fd) < 0)
		return 0;
	say(PFX "%s of a snapshot marker is not supported (it would bypass the lazy restore): mmap it instead", call);
	errno = EINVAL;
	return 1;
}

EXPORT ssize_t read(int fd, void *b, size_t n) { return io_refused(fd, "read") ? -1 : get_read()(fd, b, n); }
EXPORT ssize_t write(int fd, const void *b, size_t n) { return io_refused(fd, "write") ? -1 : get_write()(fd, b, n); }
EXPORT ssize_t pread(int fd, void *b, size_t n, off_t o) { return io_refused(fd, "pread") ? -1 : get_pread()(fd, b, n, o); }
EXPORT ssize_t pread64(int fd, void *b, size_t n, off64_t o)
{
	return io_refused(fd, "pread") ? -1 : get_pread64()(fd, b, n, o);
}
EXPORT ssize_t pwrite(int fd, const void *b, size_t n, off_t o)
{
	return io_refused(fd, "pwrite") ? -1 : get_pwrite()(fd, b, n, o);
}
EXPORT ssize_t pwrite64(int fd, const void *b, size_t n, off64_t o)
{
	return io_refused(fd, "pwrite") ? -1 : get_pwrite64()(fd, b, n, o);
}
