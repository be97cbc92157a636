/*
 * target.c - uffdrestore-target, an example target process for the attach
 * protocol, and the program the tests and benchmarks attach.
 *
 *   uffdrestore-target --socket PATH [--private] [--at-original-addr]
 *       [--pattern sequential|random|fraction:F] [--threads N] [--seed N]
 *       [--write] [--dump FILE] [--wait] [--hold] [--stats]
 *
 * It attaches (ur_attach), touches one byte of every page of every region
 * (pages covering each region's length) in the order asked for, prints one
 * JSON line on stdout:
 *
 *   {"ready_ms":..,"first_byte_ms":..,"touch_ms":..,"pages":..,"page_size":..,
 *    "threads":..,"pattern":"..","lat_us":{"p50":..,"p90":..,"p99":..,"max":..},
 *    "checksum":..,"regions":..,"bytes":..}
 *
 * (times in ms since the program started; latency of each touch as the
 * touching thread saw it), optionally writes every region's bytes in hello
 * order to FILE (so `cmp` against `uffdrestore snapshot extract` works), and
 * detaches. --wait waits for a line on stdin after attaching and before
 * touching; --hold waits for stdin EOF, SIGTERM/SIGINT or the server's
 * shutdown notice before detaching. Exit status 0 on success, 1 on error.
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
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

static const char *prog = "uffdrestore-target";

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
	uint64_t first_done; /* now_ns() when the first touch completed */
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
			*p = v;
		uint64_t t1 = now_ns();
		w->lat[i] = t1 - t0;
		if (i == w->from)
			w->first_done = t1;
		sum = sum * 31 + v;
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
		const struct ur_region *r = ur_session_region(s, i);
		for (uint64_t off = 0; off < r->length;) {
			size_t n = r->length - off < bs ? (size_t)(r->length - off) : bs;
			memcpy(b, r->addr + off, n);
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
	free(b);
	if (close(fd) < 0)
		die("close %s: %s", path, strerror(errno));
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
	for (;;) {
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
			int r = ur_poll(s);
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

static void usage(void)
{
	fprintf(stderr,
		"usage: %s --socket PATH [--private] [--at-original-addr] [--pattern sequential|random|fraction:F]\n"
		"       [--threads N] [--seed N] [--write] [--dump FILE] [--wait] [--hold] [--stats]\n"
		"Example: %s --socket /run/snap.sock --pattern random --threads 2 --dump out.raw\n",
		prog, prog);
	exit(2);
}

int main(int argc, char **argv)
{
	uint64_t t_start = now_ns();
	const char *sock = NULL, *pattern = "sequential", *dump_path = NULL;
	struct ur_attach_opts opts;
	memset(&opts, 0, sizeof(opts));
	long threads = 1;
	uint64_t seed = 1;
	int do_hold = 0, do_wait = 0, do_write = 0, do_stats = 0;
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
		} else if (!strcmp(a, "--stats")) {
			do_stats = 1;
		} else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage();
		} else {
			fprintf(stderr, "%s: unknown argument %s\n", prog, a);
			usage();
		}
	}
	if (!sock)
		usage();
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
	if (do_wait)
		wait_line();

	uint64_t ps = ur_session_page_size(s), npages = 0, bytes = 0;
	for (size_t i = 0; i < ur_session_nregions(s); i++) {
		const struct ur_region *r = ur_session_region(s, i);
		npages += (r->length + ps - 1) / ps;
		bytes += r->length;
	}
	struct page *pages = calloc(npages ? npages : 1, sizeof(*pages));
	uint64_t *order = calloc(npages ? npages : 1, sizeof(*order));
	uint64_t *lat = calloc(npages ? npages : 1, sizeof(*lat));
	if (!pages || !order || !lat)
		die("out of memory for %llu pages", (unsigned long long)npages);
	uint64_t k = 0;
	for (size_t i = 0; i < ur_session_nregions(s); i++) {
		const struct ur_region *r = ur_session_region(s, i);
		for (uint64_t off = 0; off < r->length; off += ps)
			pages[k++].addr = r->addr + off;
	}
	for (uint64_t i = 0; i < npages; i++)
		order[i] = i;
	uint64_t ntouch = npages;
	if (random_order) {
		uint64_t st = seed;
		for (uint64_t i = npages; i > 1; i--) {
			uint64_t j = splitmix(&st) % i;
			uint64_t t = order[i - 1];
			order[i - 1] = order[j];
			order[j] = t;
		}
		double want = fraction * (double)npages;
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
	uint64_t t_touch0 = now_ns();
	for (long t = 0; t < threads; t++) {
		w[t].pages = pages;
		w[t].order = order;
		w[t].lat = lat;
		w[t].from = ntouch * (uint64_t)t / (uint64_t)threads;
		w[t].to = ntouch * (uint64_t)(t + 1) / (uint64_t)threads;
		w[t].write = do_write;
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
	uint64_t t_touch1 = now_ns();
	qsort(lat, ntouch, sizeof(*lat), cmp_u64);

	if (dump_path)
		dump(s, dump_path);

	char stats[8192] = "";
	if (do_stats) {
		rc = ur_stats(s, stats, sizeof stats);
		if (rc < 0)
			die("stats: %s: %s", ur_strerror(rc), ur_session_error(s));
	}
	printf("{\"ready_ms\":%.3f,\"first_byte_ms\":%.3f,\"touch_ms\":%.3f,\"pages\":%llu,\"page_size\":%llu,"
	       "\"threads\":%ld,\"pattern\":\"%s\",\"private\":%s,"
	       "\"lat_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},"
	       "\"checksum\":%llu,\"regions\":%zu,\"bytes\":%llu,\"backing\":\"%s\"%s%s}\n",
	       (double)(t_ready - t_start) / 1e6, first ? (double)(first - t_start) / 1e6 : 0.0,
	       (double)(t_touch1 - t_touch0) / 1e6, (unsigned long long)ntouch, (unsigned long long)ps,
	       threads, random_order ? (fraction < 1 ? "fraction" : "random") : "sequential",
	       opts.private_mapping ? "true" : "false",
	       pct_us(lat, ntouch, 50), pct_us(lat, ntouch, 90), pct_us(lat, ntouch, 99),
	       ntouch ? (double)lat[ntouch - 1] / 1000.0 : 0.0, (unsigned long long)sum,
	       ur_session_nregions(s), (unsigned long long)bytes, ur_session_backing(s),
	       do_stats ? ",\"stats\":" : "", do_stats ? stats : "");
	fflush(stdout);

	if (do_hold)
		hold(s);
	free(pages);
	free(order);
	free(lat);
	free(w);
	rc = ur_detach(s);
	if (rc < 0)
		die("detach: %s: %s", ur_strerror(rc), ur_session_error(NULL));
	return 0;
}
