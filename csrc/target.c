/*
 * target.c - uffdrestore-target, an example target process for the attach
 * protocol, and the program the tests and benchmarks attach.
 *
 *   uffdrestore-target --socket PATH [--server-uid UID] [--private] [--readonly] [--at-original-addr]
 *       [--pattern sequential|random|fraction:F] [--threads N] [--seed N]
 *       [--write] [--dump FILE] [--wait] [--hold] [--stats]
 *       [--unmap-part] [--mremap] [--remove] [--fork] [--churn] [--pause-before-dump]
 *       [--delay-us N] [--reattach-timeout-ms MS] [--write-xor B]
 *   uffdrestore-target --map-file PATH [--pattern ..] [--threads N] [--seed N] [--write] [--write-xor B]
 *
 * It attaches (ur_attach), touches one byte of every page of every region
 * (pages covering each region's length) in the order asked for, prints one
 * JSON line on stdout:
 *
 *   {"ready_ms":..,"first_byte_ms":..,"touch_ms":..,"pages":..,"page_size":..,
 *    "threads":..,"pattern":"..","lat_us":{"p50":..,"p90":..,"p99":..,"max":..},
 *    "checksum":..,"regions":..,"bytes":..,"backing":"hugetlb|shmem",
 *    "uffd":"device|syscall|user-mode-only","fork_events":true|false}
 *
 * (times in ms since the program started; latency of each touch as the
 * touching thread saw it), optionally writes every region's bytes in hello
 * order to FILE (so `cmp` against `uffdrestore snapshot extract` works), and
 * detaches. --wait waits for a line on stdin after attaching and before
 * touching; --hold waits for stdin EOF, SIGTERM/SIGINT or the server's
 * shutdown notice before detaching. Exit status 0 on success, 1 on error
 * (also when the server ends the session with an error while the target
 * touches or dumps: a fault it could not answer; the message is printed).
 *
 * --write-xor B writes each touched byte back xor B (1..255), so the dump
 * shows which writes this target kept. --delay-us N sleeps N microseconds after each touch (so a server restart
 * can be staged in the middle of a restore). When the server dies, the
 * watcher thread re-attaches to a restarted `uffdrestore load --adopt` on the
 * same socket (ur_poll; PROTOCOL.md section 5.1) within
 * --reattach-timeout-ms (default 30000; a negative value turns it off: the
 * server's death is then only reported and a touch of an unfilled page
 * waits); if none took it back in time, or the new server serves another
 * snapshot, it says why and exits 1 instead of blocking. The JSON line then
 * has "reattaches":N.
 *
 * It attaches only to a server running as root or as its own uid (checked
 * with SO_PEERCRED before it maps anything); --server-uid UID trusts one
 * more uid. --readonly maps PROT_READ. A server that gives read-only
 * access (load --read-only-targets) needs --private.
 *
 * Address-space events (the server must follow them; see PROTOCOL.md §7).
 * Each runs after attaching (and after --wait), before the touch, on the
 * "part region": the first region with at least 3 whole pages (page_size
 * from the hello: 2 MiB with a hugetlb backing, so every part is a multiple
 * of it). Its middle part is whole pages [n/3, n/3 + max(1, n/3)) of its n
 * whole pages.
 *   --unmap-part  munmaps the middle part (an UNMAP event) and puts a
 *                 PROT_NONE anonymous placeholder there (so nothing else
 *                 lands in the hole before ur_detach unmaps the region).
 *                 The touch and the dump skip the part: the dump is the
 *                 image without those bytes (nothing is written for them).
 *   --mremap      touches the part's first page, then moves the part with
 *                 mremap(MREMAP_MAYMOVE|MREMAP_FIXED) to a new page-aligned
 *                 address (a REMAP event); the touch and the dump read it
 *                 there, so the dump is still the whole image. The moved
 *                 part is munmapped before detaching (an UNMAP event).
 *   --remove      touches pages M = n/3 and P = M+1 (saving their bytes),
 *                 writes a 64-byte marker at the start of M, then drops P:
 *                 MADV_REMOVE with a shared mapping (punches P out of the
 *                 backing file for every target), MADV_DONTNEED with
 *                 --private (after writing the marker into P's private copy
 *                 too). It then checks P reads back the snapshot's bytes
 *                 (not zeros, not the marker) and M still holds the marker,
 *                 prints what it checked on stderr, restores M's bytes (so
 *                 the dump is the image) and fails if a check failed.
 *   --fork        touches the first half of the pages (in touch-list
 *                 order), forks; the child touches the other half (pages
 *                 the parent has not touched), dumps its view to FILE.child
 *                 (with --dump FILE) and, with --private, writes a byte the
 *                 parent has read and checks it reads it back; it exits
 *                 without detaching (the session is the parent's). The
 *                 parent waits for it, fails if it failed, checks (with
 *                 --private) that the child's write did not reach it, and
 *                 goes on with its own touch and dump. Without fork events
 *                 ("fork_events":false: no CAP_SYS_PTRACE) the client marks
 *                 the regions MADV_DONTFORK, so the child dies of SIGSEGV on
 *                 its first touch and the target fails.
 *   --churn       while the touch threads run, one more thread drops the
 *                 first page of the touch list with MADV_DONTNEED in a loop
 *                 (a REMOVE event each time) until they are done.
 *   --pause-before-dump  waits for a line on stdin after the touch, before
 *                 the dump (stderr says "touched").
 * The JSON line then has an "events" object saying what was done.
 *
 * --map-file PATH (instead of --socket) is the floor to compare a restore
 * with: no server, no userfaultfd. It maps the whole file at PATH (a shmem
 * or hugetlbfs file whose pages are already in memory, e.g. a memfd as
 * /proc/PID/fd/N) MAP_SHARED and touches one byte of every page of it the
 * same way (page_size: the hugetlbfs block size, else the base page size),
 * printing the same JSON line with "backing":"hugetlb|shmem|file" and
 * "uffd":"none" (ready_ms: the file mapped).
 */
#define _GNU_SOURCE
#include "ur_client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *prog = "uffdrestore-target";

#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif
#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

struct page {
	unsigned char *addr;
};

struct worker {
	pthread_t th;
	const struct page *pages;
	const uint64_t *order;
	uint64_t *lat;
	uint64_t from, to;
	int write;
	unsigned char xor_; /* --write-xor: what each write flips */
	uint64_t first_done; /* now_ns() when the first touch completed */
	long delay_us;
	uint64_t sum;
};

static void *touch(void *arg)
{
	struct worker *w = arg;
	uint64_t sum = 0;
	for (uint64_t i = w->from; i < w->to; i++) {
		volatile unsigned char *p = w->pages[w->order[i]].addr;
		uint64_t t0 = now_ns();
		unsigned char v = *p;
		if (w->write)
			*p = v ^ w->xor_;
		uint64_t t1 = now_ns();
		w->lat[i] = t1 - t0;
		if (i == w->from)
			w->first_done = t1;
		sum = sum * 31 + v;
		if (w->delay_us > 0) {
			struct timespec ts = { .tv_sec = w->delay_us / 1000000, .tv_nsec = (w->delay_us % 1000000) * 1000 };
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
			}
		}
	}
	w->sum = sum;
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct_us(const uint64_t *sorted, uint64_t n, unsigned p)
{
	if (n == 0)
		return 0;
	uint64_t rank = (n * p + 99) / 100; /* nearest rank, 1-based */
	if (rank == 0)
		rank = 1;
	return (double)sorted[rank - 1] / 1000.0;
}

/* How the pages are touched (the options both modes share). */
struct touch_opts {
	int random_order;
	double fraction;
	uint64_t seed;
	long threads;
	int write;
	unsigned char xor_;
	long delay_us;
};

/* What touch_pages did: ntouch pages on threads threads between t0 and t1,
 * the first touch done at first (0: none), their checksum; lat (ntouch
 * entries) sorted. */
struct touch_result {
	uint64_t ntouch, first, sum, t0, t1;
	long threads;
};

/* Touches pages in the order o asks for (order and lat: npages entries
 * each), on o->threads threads. */
static void touch_pages(const struct page *pages, uint64_t npages, uint64_t *order, uint64_t *lat,
			const struct touch_opts *o, struct touch_result *res)
{
	for (uint64_t i = 0; i < npages; i++)
		order[i] = i;
	uint64_t ntouch = npages;
	long threads = o->threads;
	if (o->random_order) {
		uint64_t st = o->seed;
		for (uint64_t i = npages; i > 1; i--) {
			uint64_t j = splitmix(&st) % i;
			uint64_t t = order[i - 1];
			order[i - 1] = order[j];
			order[j] = t;
		}
		double want = o->fraction * (double)npages;
		ntouch = (uint64_t)want;
		if ((double)ntouch < want)
			ntouch++;
		if (ntouch > npages)
			ntouch = npages;
	}
	if ((uint64_t)threads > ntouch && ntouch > 0)
		threads = (long)ntouch;

	struct worker *w = calloc((size_t)threads, sizeof(*w));
	if (!w)
		die("out of memory");
	res->t0 = now_ns();
	for (long t = 0; t < threads; t++) {
		w[t].pages = pages;
		w[t].order = order;
		w[t].lat = lat;
		w[t].from = ntouch * (uint64_t)t / (uint64_t)threads;
		w[t].to = ntouch * (uint64_t)(t + 1) / (uint64_t)threads;
		w[t].write = o->write;
		w[t].delay_us = o->delay_us;
		w[t].xor_ = o->xor_;
		if (t == 0)
			continue;
		int e = pthread_create(&w[t].th, NULL, touch, &w[t]);
		if (e)
			die("pthread_create: %s", strerror(e));
	}
	touch(&w[0]);
	uint64_t first = 0, sum = 0;
	for (long t = 0; t < threads; t++) {
		if (t > 0)
			pthread_join(w[t].th, NULL);
		if (w[t].from < w[t].to && (first == 0 || w[t].first_done < first))
			first = w[t].first_done;
		sum = sum * 1000003 + w[t].sum;
	}
	res->t1 = now_ns();
	free(w);
	qsort(lat, ntouch, sizeof(*lat), cmp_u64);
	res->ntouch = ntouch;
	res->threads = threads;
	res->first = first;
	res->sum = sum;
}

static const char *pattern_name(const struct touch_opts *o)
{
	return o->random_order ? (o->fraction < 1 ? "fraction" : "random") : "sequential";
}

/* --map-file: maps the file at path MAP_SHARED and touches every page of
 * it, without a server or a userfaultfd (the floor a restore is compared
 * with). */
static int map_file_main(const char *path, const struct touch_opts *o, uint64_t t_start)
{
	int fd = open(path, (o->write ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (fd < 0)
		die("--map-file: open %s: %s", path, strerror(errno));
	struct stat st;
	struct statfs sf;
	if (fstat(fd, &st) < 0 || fstatfs(fd, &sf) < 0)
		die("--map-file: stat %s: %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode) || st.st_size <= 0)
		die("--map-file: %s is not a non-empty regular file (give a shmem, memfd or hugetlbfs file)", path);
	const char *backing = "file";
	uint64_t ps = (uint64_t)sysconf(_SC_PAGESIZE);
	if ((unsigned long)sf.f_type == HUGETLBFS_MAGIC) {
		backing = "hugetlb";
		ps = (uint64_t)sf.f_bsize;
	} else if ((unsigned long)sf.f_type == TMPFS_MAGIC) {
		backing = "shmem";
	}
	uint64_t bytes = (uint64_t)st.st_size;
	if (bytes % ps)
		die("--map-file: %s is %llu bytes, not a multiple of its page size %llu", path, (unsigned long long)bytes,
		    (unsigned long long)ps);
	unsigned char *m = mmap(NULL, bytes, PROT_READ | (o->write ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		die("--map-file: mmap %s (%llu bytes): %s", path, (unsigned long long)bytes, strerror(errno));
	close(fd);
	uint64_t t_ready = now_ns();
	uint64_t npages = bytes / ps;
	struct page *pages = calloc(npages, sizeof(*pages));
	uint64_t *order = calloc(npages, sizeof(*order));
	uint64_t *lat = calloc(npages, sizeof(*lat));
	if (!pages || !order || !lat)
		die("out of memory for %llu pages", (unsigned long long)npages);
	for (uint64_t i = 0; i < npages; i++)
		pages[i].addr = m + i * ps;
	struct touch_result r;
	touch_pages(pages, npages, order, lat, o, &r);
	printf("{\"ready_ms\":%.3f,\"first_byte_ms\":%.3f,\"touch_ms\":%.3f,\"pages\":%llu,\"page_size\":%llu,"
	       "\"threads\":%ld,\"pattern\":\"%s\",\"private\":false,"
	       "\"lat_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},"
	       "\"checksum\":%llu,\"regions\":1,\"bytes\":%llu,\"backing\":\"%s\",\"uffd\":\"none\"}\n",
	       (double)(t_ready - t_start) / 1e6, r.first ? (double)(r.first - t_start) / 1e6 : 0.0,
	       (double)(r.t1 - r.t0) / 1e6, (unsigned long long)r.ntouch, (unsigned long long)ps, r.threads,
	       pattern_name(o), pct_us(lat, r.ntouch, 50), pct_us(lat, r.ntouch, 90), pct_us(lat, r.ntouch, 99),
	       r.ntouch ? (double)lat[r.ntouch - 1] / 1000.0 : 0.0, (unsigned long long)r.sum,
	       (unsigned long long)bytes, backing);
	fflush(stdout);
	munmap(m, bytes);
	free(pages);
	free(order);
	free(lat);
	return 0;
}

/* A region's bytes as the target sees them now: up to 3 segments, in
 * region order, each a run of the region's bytes [off, off+len) mapped at
 * addr (after --unmap-part a part is missing, after --mremap it lives
 * elsewhere). Boundaries are page aligned. */
struct seg {
	unsigned char *addr;
	uint64_t off, len;
};

struct rview {
	struct seg seg[3];
	int nseg;
};

static struct rview *rviews;

static void init_rviews(struct ur_session *s)
{
	size_t n = ur_session_nregions(s);
	rviews = calloc(n ? n : 1, sizeof(*rviews));
	if (!rviews)
		die("out of memory");
	for (size_t i = 0; i < n; i++) {
		const struct ur_region *r = ur_session_region(s, i);
		if (r->length == 0)
			continue;
		rviews[i].seg[0] = (struct seg){ .addr = r->addr, .off = 0, .len = r->length };
		rviews[i].nseg = 1;
	}
}

/* Splits region i's single segment at [lo, hi) (region offsets): the part
 * moves to to, or disappears when to is NULL. */
static void split_rview(size_t i, uint64_t lo, uint64_t hi, unsigned char *to)
{
	struct rview *v = &rviews[i];
	if (v->nseg != 1 || lo >= hi || hi > v->seg[0].len)
		die("split_rview: region %zu: bad part [%llu, %llu)", i, (unsigned long long)lo, (unsigned long long)hi);
	struct seg whole = v->seg[0];
	v->nseg = 0;
	v->seg[v->nseg++] = (struct seg){ .addr = whole.addr, .off = 0, .len = lo };
	if (to)
		v->seg[v->nseg++] = (struct seg){ .addr = to, .off = lo, .len = hi - lo };
	v->seg[v->nseg++] = (struct seg){ .addr = whole.addr + hi, .off = hi, .len = whole.len - hi };
}

static void dump(struct ur_session *s, const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open %s: %s", path, strerror(errno));
	/* Through a bounce buffer, so the faults are raised in user mode (a
	 * write(2) straight from the mapping would fault in the kernel, which a
	 * UFFD_USER_MODE_ONLY userfaultfd answers with EFAULT). */
	size_t bs = 1 << 20;
	unsigned char *b = malloc(bs);
	if (!b)
		die("out of memory");
	for (size_t i = 0; i < ur_session_nregions(s); i++) {
		for (int g = 0; g < rviews[i].nseg; g++) {
			const struct seg *sg = &rviews[i].seg[g];
			for (uint64_t off = 0; off < sg->len;) {
				size_t n = sg->len - off < bs ? (size_t)(sg->len - off) : bs;
				memcpy(b, sg->addr + off, n);
				for (size_t done = 0; done < n;) {
					ssize_t k = write(fd, b + done, n - done);
					if (k < 0 && errno == EINTR)
						continue;
					if (k < 0)
						die("write %s: %s", path, strerror(errno));
					done += (size_t)k;
				}
				off += n;
			}
		}
	}
	free(b);
	if (close(fd) < 0)
		die("close %s: %s", path, strerror(errno));
}

/* How the session's userfaultfd was opened, for the JSON line. */
static const char *uffd_via(const struct ur_session *s)
{
	unsigned f = ur_session_uffd_flags(s);
	if (f & UR_UFFD_USER_MODE_ONLY)
		return "user-mode-only";
	return f & UR_UFFD_DEVICE ? "device" : "syscall";
}

/* Waits for a line (or EOF) on stdin. */
static void wait_line(void)
{
	char c;
	for (;;) {
		ssize_t k = read(0, &c, 1);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0 || c == '\n')
			return;
	}
}

/* Watches the session while the regions are touched: when the server ends
 * it with an error (a fault it could not answer: the faulting thread would
 * wait forever), says why and exits 1. A server that died (the socket
 * closed) is only reported: the touch waits, as PROTOCOL.md section 5 says. */
struct watch {
	pthread_t th;
	struct ur_session *s;
	int stop[2];
};

static int reattach_on = 1;

static void *watch_loop(void *arg)
{
	struct watch *w = arg;
	for (;;) {
		struct pollfd p[2] = {
			{ .fd = ur_session_socket(w->s), .events = POLLIN },
			{ .fd = w->stop[0], .events = POLLIN },
		};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		if (p[1].revents)
			return NULL;
		if (p[0].revents) {
			int r = ur_poll(w->s);
			if (r == UR_EREFUSED)
				die("the server ended the session: %s", ur_session_error(w->s));
			if (r < 0 && reattach_on)
				/* The server died and no server took this target back
				 * (or one of another snapshot): a touch of an unfilled
				 * page would wait forever. */
				die("the server died and this target was not re-attached: %s: %s", ur_strerror(r),
				    ur_session_error(w->s));
			if (r < 0) {
				fprintf(stderr, "%s: %s: %s\n", prog, ur_strerror(r), ur_session_error(w->s));
				return NULL;
			}
		}
	}
}

static void watch_start(struct watch *w, struct ur_session *s)
{
	w->s = s;
	if (pipe2(w->stop, O_CLOEXEC) < 0)
		die("pipe: %s", strerror(errno));
	int e = pthread_create(&w->th, NULL, watch_loop, w);
	if (e)
		die("pthread_create: %s", strerror(e));
}

/* Stops the watcher: the session is used from one thread at a time. */
static void watch_stop(struct watch *w)
{
	char c = 1;
	if (write(w->stop[1], &c, 1) < 0)
		die("write: %s", strerror(errno));
	pthread_join(w->th, NULL);
	close(w->stop[0]);
	close(w->stop[1]);
}

/* Waits for stdin EOF, SIGTERM/SIGINT, or the server's shutdown notice. */
static void hold(struct ur_session *s)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	int sfd = signalfd(-1, &set, SFD_CLOEXEC);
	if (sfd < 0)
		die("signalfd: %s", strerror(errno));
	int stdin_open = 1;
	int r = ur_poll(s); /* the watcher may have read the shutdown notice */
	if (r < 0)
		fprintf(stderr, "%s: %s\n", prog, ur_session_error(s));
	for (; r == 0;) {
		struct pollfd p[3] = {
			{ .fd = sfd, .events = POLLIN },
			{ .fd = ur_session_socket(s), .events = POLLIN },
			{ .fd = stdin_open ? 0 : -1, .events = POLLIN },
		};
		if (poll(p, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		if (p[0].revents)
			break;
		if (p[1].revents) {
			r = ur_poll(s);
			if (r != 0) { /* shutdown asked, or the server is gone */
				if (r < 0)
					fprintf(stderr, "%s: %s\n", prog, ur_session_error(s));
				break;
			}
		}
		if (p[2].revents) {
			char b[256];
			ssize_t k = read(0, b, sizeof b);
			if (k == 0 || (k < 0 && errno != EINTR && errno != EAGAIN))
				break;
		}
	}
	close(sfd);
}

/* ---- address-space events ----------------------------------------------- */

static char events_json[4096];
static size_t events_len;

static void add_event(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void add_event(const char *fmt, ...)
{
	if (events_len > 0 && events_len < sizeof events_json - 1)
		events_json[events_len++] = ',';
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(events_json + events_len, sizeof events_json - events_len, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof events_json - events_len)
		die("events: JSON too long");
	events_len += (size_t)n;
}

/* The part region (the first with at least 3 whole pages) and its middle
 * part [*lo, *hi) (region offsets, whole pages). */
static size_t part_region(struct ur_session *s, uint64_t ps, uint64_t *lo, uint64_t *hi)
{
	for (size_t i = 0; i < ur_session_nregions(s); i++) {
		uint64_t n = ur_session_region(s, i)->length / ps;
		if (n >= 3) {
			uint64_t a = n / 3, c = n / 3 ? n / 3 : 1;
			*lo = a * ps;
			*hi = (a + c) * ps;
			return i;
		}
	}
	die("no region has 3 whole pages of %llu bytes", (unsigned long long)ps);
}

/* Where region i's byte at offset off is mapped now, or NULL. */
static unsigned char *addr_of(size_t i, uint64_t off)
{
	for (int g = 0; g < rviews[i].nseg; g++) {
		const struct seg *sg = &rviews[i].seg[g];
		if (off >= sg->off && off < sg->off + sg->len)
			return sg->addr + (off - sg->off);
	}
	return NULL;
}

/* Maps a PROT_NONE anonymous placeholder at [a, a+n) (a hole we made), so
 * nothing else lands there before ur_detach unmaps the whole region. */
static void placeholder(unsigned char *a, uint64_t n)
{
	void *p = mmap(a, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
	if (p == MAP_FAILED)
		die("placeholder at %p: %s", (void *)a, strerror(errno));
	if (p != a) {
		munmap(p, n);
		die("placeholder at %p: the kernel put it at %p", (void *)a, p);
	}
}

static void do_unmap_part(struct ur_session *s, uint64_t ps)
{
	uint64_t lo, hi;
	size_t i = part_region(s, ps, &lo, &hi);
	const struct ur_region *r = ur_session_region(s, i);
	if (munmap(r->addr + lo, hi - lo) < 0)
		die("unmap-part: munmap: %s", strerror(errno));
	placeholder(r->addr + lo, hi - lo);
	split_rview(i, lo, hi, NULL);
	fprintf(stderr, "%s: unmap-part: region %s: [%llu, %llu) unmapped\n", prog, r->name, (unsigned long long)lo,
		(unsigned long long)hi);
	add_event("\"unmap\":{\"region\":%zu,\"offset\":%llu,\"length\":%llu}", i, (unsigned long long)lo,
		  (unsigned long long)(hi - lo));
}

static unsigned char *moved_addr;
static uint64_t moved_len;

static void do_mremap(struct ur_session *s, uint64_t ps)
{
	uint64_t lo, hi;
	size_t i = part_region(s, ps, &lo, &hi);
	const struct ur_region *r = ur_session_region(s, i);
	unsigned char *old = r->addr + lo;
	uint64_t n = hi - lo;
	/* The first page is mapped before the move (its page table entry
	 * moves with it), the others are not. */
	unsigned char first = *(volatile unsigned char *)old;
	unsigned char *res = mmap(NULL, n + ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (res == MAP_FAILED)
		die("mremap: reserve %llu bytes: %s", (unsigned long long)(n + ps), strerror(errno));
	unsigned char *to = (unsigned char *)(((uintptr_t)res + ps - 1) & ~(uintptr_t)(ps - 1));
	void *got = mremap(old, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, to);
	if (got == MAP_FAILED)
		die("mremap %p -> %p (%llu bytes): %s", (void *)old, (void *)to, (unsigned long long)n, strerror(errno));
	if (to > res)
		munmap(res, (size_t)(to - res));
	if (res + n + ps > to + n)
		munmap(to + n, (size_t)((res + n + ps) - (to + n)));
	placeholder(old, n);
	split_rview(i, lo, hi, to);
	moved_addr = to;
	moved_len = n;
	if (*(volatile unsigned char *)to != first)
		die("mremap: the moved first page reads %u, it read %u before the move", *to, first);
	fprintf(stderr, "%s: mremap: region %s: [%llu, %llu) moved from %p to %p\n", prog, r->name,
		(unsigned long long)lo, (unsigned long long)hi, (void *)old, (void *)to);
	add_event("\"mremap\":{\"region\":%zu,\"offset\":%llu,\"length\":%llu}", i, (unsigned long long)lo,
		  (unsigned long long)n);
}

static void do_remove(struct ur_session *s, uint64_t ps, int private_map)
{
	uint64_t lo, hi;
	size_t i = part_region(s, ps, &lo, &hi);
	const struct ur_region *r = ur_session_region(s, i);
	unsigned char *m = addr_of(i, lo), *p = addr_of(i, lo + ps);
	if (!m || !p || addr_of(i, lo + ps - 1) != m + ps - 1)
		die("remove: pages %llu and %llu of region %s are not both mapped (with --unmap-part?)",
		    (unsigned long long)lo, (unsigned long long)(lo + ps), r->name);
	unsigned char *save_m = malloc(ps), *save_p = malloc(ps), *back = malloc(ps);
	if (!save_m || !save_p || !back)
		die("out of memory");
	unsigned char marker[64];
	for (size_t k = 0; k < sizeof marker; k++)
		marker[k] = (unsigned char)("uffdrestore-target marker "[k % 26] ^ (k >> 5));
	memcpy(save_m, m, ps); /* touches both pages */
	memcpy(save_p, p, ps);
	memcpy(m, marker, sizeof marker);
	if (private_map)
		memcpy(p, marker, sizeof marker);
	const char *adv = private_map ? "MADV_DONTNEED" : "MADV_REMOVE";
	if (madvise(p, ps, private_map ? MADV_DONTNEED : MADV_REMOVE) < 0)
		die("remove: madvise(%s) of page %llu of region %s: %s", adv, (unsigned long long)(lo + ps), r->name,
		    strerror(errno));
	memcpy(back, p, ps); /* the touch again */
	int p_ok = memcmp(back, save_p, ps) == 0;
	int p_zero = 1, snap_zero = 1;
	for (uint64_t k = 0; k < ps; k++) {
		p_zero &= back[k] == 0;
		snap_zero &= save_p[k] == 0;
	}
	int m_ok = memcmp(m, marker, sizeof marker) == 0;
	memcpy(m, save_m, sizeof marker); /* the snapshot's bytes again */
	fprintf(stderr,
		"%s: remove: region %s: %s of the page at offset %llu: %s; the marker page at offset %llu: %s\n", prog,
		r->name, adv, (unsigned long long)(lo + ps),
		p_ok ? "came back with the snapshot's bytes" : (p_zero && !snap_zero ? "came back ZERO" : "came back WRONG"),
		(unsigned long long)lo, m_ok ? "kept the marker" : "LOST the marker");
	add_event("\"remove\":{\"region\":%zu,\"advice\":\"%s\",\"marker_offset\":%llu,\"removed_offset\":%llu,"
		  "\"removed_ok\":%s,\"removed_zero\":%s,\"marker_ok\":%s}",
		  i, adv, (unsigned long long)lo, (unsigned long long)(lo + ps), p_ok ? "true" : "false",
		  p_zero && !snap_zero ? "true" : "false", m_ok ? "true" : "false");
	free(save_m);
	free(save_p);
	free(back);
	if (!p_ok || !m_ok)
		die("remove: check failed");
}

static void do_fork(struct ur_session *s, const struct page *pages, uint64_t npages, const char *dump_path,
		    int private_map)
{
	uint64_t half = npages / 2;
	for (uint64_t i = 0; i < half; i++)
		(void)*(volatile unsigned char *)pages[i].addr;
	unsigned char *wp = npages ? pages[0].addr : NULL;
	unsigned char before = wp ? *(volatile unsigned char *)wp : 0;
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		/* The child: pages the parent has not touched first. It never
		 * talks on the socket: the session is the parent's. */
		for (uint64_t i = half; i < npages; i++)
			(void)*(volatile unsigned char *)pages[i].addr;
		if (dump_path) {
			char path[4096];
			if (snprintf(path, sizeof path, "%s.child", dump_path) >= (int)sizeof path)
				die("fork: dump path too long");
			dump(s, path);
		}
		int rc = 0;
		if (private_map && wp) {
			*(volatile unsigned char *)wp = (unsigned char)~before;
			if (*(volatile unsigned char *)wp != (unsigned char)~before) {
				fprintf(stderr, "%s: fork child: its own write does not read back\n", prog);
				rc = 1;
			}
		}
		_exit(rc);
	}
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			die("waitpid: %s", strerror(errno));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		die("fork: the child %s %d", WIFEXITED(st) ? "exited with" : "was killed by signal",
		    WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
	const char *isolated = "null";
	if (private_map && wp) {
		if (*(volatile unsigned char *)wp != before)
			die("fork: the child's write to its private copy shows in the parent");
		isolated = "true";
	}
	fprintf(stderr, "%s: fork: child %d touched %llu pages the parent had not, exited 0\n", prog, (int)pid,
		(unsigned long long)(npages - half));
	add_event("\"fork\":{\"child_pid\":%d,\"parent_touched\":%llu,\"child_touched\":%llu,\"child_dump\":%s,"
		  "\"private_write_isolated\":%s}",
		  (int)pid, (unsigned long long)half, (unsigned long long)(npages - half), dump_path ? "true" : "false",
		  isolated);
}

struct churn {
	pthread_t th;
	unsigned char *addr;
	uint64_t ps;
	int stop;
	uint64_t n;
};

/* Drops one page again and again (a REMOVE event each time) until stopped. */
static void *churn_loop(void *arg)
{
	struct churn *c = arg;
	while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
		if (madvise(c->addr, c->ps, MADV_DONTNEED) < 0)
			die("churn: madvise(MADV_DONTNEED): %s", strerror(errno));
		c->n++;
	}
	return NULL;
}

/* usage prints the usage: for --help on stdout with exit status 0, after a
 * usage error on stderr with exit status 2. */
static void usage(int status)
{
	fprintf(status ? stderr : stdout,
		"usage: %s --socket PATH [--server-uid UID] [--private] [--readonly] [--at-original-addr]\n"
		"       [--pattern sequential|random|fraction:F]\n"
		"       [--threads N] [--seed N] [--write] [--dump FILE] [--wait] [--hold] [--stats]\n"
		"       [--unmap-part] [--mremap] [--remove] [--fork] [--churn] [--pause-before-dump]\n"
		"       [--delay-us N] [--reattach-timeout-ms MS] [--write-xor B]\n"
		"   or: %s --map-file PATH [--pattern ..] [--threads N] [--seed N] [--write] [--write-xor B]\n"
		"       (no server, no userfaultfd: touches a shmem/hugetlbfs file mapped MAP_SHARED)\n"
		"Example: %s --socket /run/snap.sock --pattern random --threads 2 --dump out.raw\n",
		prog, prog, prog);
	exit(status);
}

int main(int argc, char **argv)
{
	uint64_t t_start = now_ns();
	const char *sock = NULL, *pattern = "sequential", *dump_path = NULL, *map_file = NULL;
	struct ur_attach_opts opts;
	memset(&opts, 0, sizeof(opts));
	long threads = 1;
	uint64_t seed = 1;
	int do_hold = 0, do_wait = 0, do_write = 0, do_stats = 0;
	int do_unmap = 0, do_mremap_ = 0, do_remove_ = 0, do_fork_ = 0, do_churn = 0, do_pause = 0;
	long delay_us = 0;
	unsigned char write_xor = 0;
	double fraction = 1.0;
	int random_order = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                          \
	do {                                             \
		if (!v)                                  \
			die("%s needs a value", a);      \
		i++;                                     \
	} while (0)
		if (!strcmp(a, "--socket")) {
			NEEDV();
			sock = v;
		} else if (!strcmp(a, "--map-file")) {
			NEEDV();
			map_file = v;
		} else if (!strcmp(a, "--server-uid")) {
			NEEDV();
			char *e;
			unsigned long long u = strtoull(v, &e, 10);
			if (*e || !*v || u > 0xfffffffeULL)
				die("--server-uid: %s is not a uid", v);
			opts.server_uid = (uint32_t)u;
		} else if (!strcmp(a, "--delay-us")) {
			NEEDV();
			char *e;
			delay_us = strtol(v, &e, 10);
			if (*e || !*v || delay_us < 0 || delay_us > 10000000)
				die("--delay-us: %s is not a number of microseconds in 0..10000000", v);
		} else if (!strcmp(a, "--reattach-timeout-ms")) {
			NEEDV();
			char *e;
			long ms = strtol(v, &e, 10);
			if (*e || !*v || ms < -1 || ms > 3600000)
				die("--reattach-timeout-ms: %s is not 0 or -1 (off) or a number of ms up to 3600000", v);
			opts.reattach_timeout_ms = ms == 0 ? -1 : (int)ms;
			reattach_on = ms > 0;
		} else if (!strcmp(a, "--readonly")) {
			opts.readonly = 1;
		} else if (!strcmp(a, "--private")) {
			opts.private_mapping = 1;
		} else if (!strcmp(a, "--at-original-addr")) {
			opts.at_original_addr = 1;
		} else if (!strcmp(a, "--pattern")) {
			NEEDV();
			pattern = v;
		} else if (!strcmp(a, "--threads")) {
			NEEDV();
			char *e;
			threads = strtol(v, &e, 10);
			if (*e || threads < 1 || threads > 1024)
				die("--threads: %s is not a number in 1..1024", v);
		} else if (!strcmp(a, "--seed")) {
			NEEDV();
			char *e;
			seed = strtoull(v, &e, 10);
			if (*e)
				die("--seed: %s is not a number", v);
		} else if (!strcmp(a, "--dump")) {
			NEEDV();
			dump_path = v;
		} else if (!strcmp(a, "--hold")) {
			do_hold = 1;
		} else if (!strcmp(a, "--wait")) {
			do_wait = 1;
		} else if (!strcmp(a, "--write")) {
			do_write = 1;
		} else if (!strcmp(a, "--write-xor")) {
			NEEDV();
			char *e;
			long x = strtol(v, &e, 0);
			if (*e || !*v || x < 1 || x > 255)
				die("--write-xor: %s is not a byte value in 1..255", v);
			do_write = 1;
			write_xor = (unsigned char)x;
		} else if (!strcmp(a, "--stats")) {
			do_stats = 1;
		} else if (!strcmp(a, "--unmap-part")) {
			do_unmap = 1;
		} else if (!strcmp(a, "--mremap")) {
			do_mremap_ = 1;
		} else if (!strcmp(a, "--remove")) {
			do_remove_ = 1;
		} else if (!strcmp(a, "--fork")) {
			do_fork_ = 1;
		} else if (!strcmp(a, "--churn")) {
			do_churn = 1;
		} else if (!strcmp(a, "--pause-before-dump")) {
			do_pause = 1;
		} else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(0);
		} else {
			fprintf(stderr, "%s: unknown argument %s\n", prog, a);
			usage(2);
		}
	}
	if (map_file && (sock || dump_path || do_hold || do_wait || do_stats || do_unmap || do_mremap_ || do_remove_ ||
			 do_fork_ || do_churn || do_pause || opts.private_mapping || opts.readonly || opts.at_original_addr))
		die("--map-file maps a file without a server: it takes only --pattern, --threads, --seed, --write, "
		    "--write-xor and --delay-us");
	if (!sock && !map_file)
		usage(2);
	if (do_unmap && do_mremap_)
		die("--unmap-part and --mremap both act on the same part: choose one");
	if (!strcmp(pattern, "sequential")) {
	} else if (!strcmp(pattern, "random")) {
		random_order = 1;
	} else if (!strncmp(pattern, "fraction:", 9)) {
		char *e;
		fraction = strtod(pattern + 9, &e);
		if (*e || !(fraction > 0 && fraction <= 1))
			die("--pattern fraction:F: F must be in (0, 1], got %s", pattern + 9);
		random_order = 1;
	} else {
		die("--pattern: %s is not sequential, random or fraction:F", pattern);
	}
	struct touch_opts to = { .random_order = random_order, .fraction = fraction, .seed = seed, .threads = threads,
				 .write = do_write, .xor_ = write_xor, .delay_us = delay_us };
	if (map_file)
		return map_file_main(map_file, &to, t_start);
	if (do_hold) {
		/* Blocked before the threads start, so signalfd sees SIGTERM. */
		sigset_t set;
		sigemptyset(&set);
		sigaddset(&set, SIGTERM);
		sigaddset(&set, SIGINT);
		pthread_sigmask(SIG_BLOCK, &set, NULL);
	}

	struct ur_session *s;
	int rc = ur_attach(sock, &opts, &s);
	if (rc < 0)
		die("attach to %s: %s: %s", sock, ur_strerror(rc), ur_session_error(NULL));
	uint64_t t_ready = now_ns();
	fprintf(stderr, "%s: attached to %s (%s, %zu regions)\n", prog, sock, ur_session_backing(s), ur_session_nregions(s));
	struct watch watch;
	watch_start(&watch, s);
	if (do_wait)
		wait_line();

	uint64_t ps = ur_session_page_size(s), npages = 0, bytes = 0;
	init_rviews(s);
	if (do_unmap)
		do_unmap_part(s, ps);
	if (do_mremap_)
		do_mremap(s, ps);
	if (do_remove_)
		do_remove(s, ps, opts.private_mapping);
	for (size_t i = 0; i < ur_session_nregions(s); i++) {
		for (int g = 0; g < rviews[i].nseg; g++) {
			npages += (rviews[i].seg[g].len + ps - 1) / ps;
			bytes += rviews[i].seg[g].len;
		}
	}
	struct page *pages = calloc(npages ? npages : 1, sizeof(*pages));
	uint64_t *order = calloc(npages ? npages : 1, sizeof(*order));
	uint64_t *lat = calloc(npages ? npages : 1, sizeof(*lat));
	if (!pages || !order || !lat)
		die("out of memory for %llu pages", (unsigned long long)npages);
	uint64_t k = 0;
	for (size_t i = 0; i < ur_session_nregions(s); i++) {
		for (int g = 0; g < rviews[i].nseg; g++) {
			const struct seg *sg = &rviews[i].seg[g];
			for (uint64_t off = 0; off < sg->len; off += ps)
				pages[k++].addr = sg->addr + off;
		}
	}
	if (do_fork_)
		do_fork(s, pages, npages, dump_path, opts.private_mapping);
	struct churn ch;
	memset(&ch, 0, sizeof(ch));
	if (do_churn && npages) {
		ch.addr = pages[0].addr;
		ch.ps = ps;
		int e = pthread_create(&ch.th, NULL, churn_loop, &ch);
		if (e)
			die("pthread_create: %s", strerror(e));
	}
	struct touch_result tr;
	touch_pages(pages, npages, order, lat, &to, &tr);
	uint64_t ntouch = tr.ntouch;
	if (do_churn && npages) {
		__atomic_store_n(&ch.stop, 1, __ATOMIC_RELEASE);
		pthread_join(ch.th, NULL);
		add_event("\"churn\":%llu", (unsigned long long)ch.n);
	}

	if (do_pause) {
		fprintf(stderr, "%s: touched\n", prog);
		wait_line();
	}
	if (dump_path)
		dump(s, dump_path);

	watch_stop(&watch);
	char stats[8192] = "";
	if (do_stats) {
		rc = ur_stats(s, stats, sizeof stats);
		if (rc < 0)
			die("stats: %s: %s", ur_strerror(rc), ur_session_error(s));
	}
	printf("{\"ready_ms\":%.3f,\"first_byte_ms\":%.3f,\"touch_ms\":%.3f,\"pages\":%llu,\"page_size\":%llu,"
	       "\"threads\":%ld,\"pattern\":\"%s\",\"private\":%s,"
	       "\"lat_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},"
	       "\"checksum\":%llu,\"regions\":%zu,\"bytes\":%llu,\"backing\":\"%s\","
	       "\"uffd\":\"%s\",\"fork_events\":%s,\"reattaches\":%u%s%s%s%s%s}\n",
	       (double)(t_ready - t_start) / 1e6, tr.first ? (double)(tr.first - t_start) / 1e6 : 0.0,
	       (double)(tr.t1 - tr.t0) / 1e6, (unsigned long long)ntouch, (unsigned long long)ps, tr.threads,
	       pattern_name(&to), opts.private_mapping ? "true" : "false",
	       pct_us(lat, ntouch, 50), pct_us(lat, ntouch, 90), pct_us(lat, ntouch, 99),
	       ntouch ? (double)lat[ntouch - 1] / 1000.0 : 0.0, (unsigned long long)tr.sum,
	       ur_session_nregions(s), (unsigned long long)bytes, ur_session_backing(s), uffd_via(s),
	       ur_session_uffd_flags(s) & UR_UFFD_NO_FORK_EVENTS ? "false" : "true", ur_session_reattaches(s),
	       do_stats ? ",\"stats\":" : "", do_stats ? stats : "", events_len ? ",\"events\":{" : "",
	       events_json, events_len ? "}" : "");
	fflush(stdout);

	if (do_hold)
		hold(s);
	/* The moved part is not where the session mapped it: unmap it while
	 * the server still serves (an UNMAP event it must read). */
	if (moved_addr && munmap(moved_addr, moved_len) < 0)
		die("munmap the moved part: %s", strerror(errno));
	free(rviews);
	free(pages);
	free(order);
	free(lat);
	rc = ur_detach(s);
	if (rc < 0)
		die("detach: %s: %s", ur_strerror(rc), ur_session_error(NULL));
	return 0;
}
