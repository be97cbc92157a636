/*
 * preload_prog.c - an ordinary program that knows nothing of uffdrestore:
 * it opens a file, checks its size, mmaps it and reads it. The run tests
 * start it under `uffdrestore run` (the preload library) with the file a
 * snapshot marker.
 *
 *   preload_prog dump FILE OUT shared|private fixed|any
 *	open O_RDWR, fstat, lseek(SEEK_END), mmap the whole size (MAP_FIXED at
 *	a 2 MiB aligned address it reserved, or anywhere), copy it to OUT
 *	(through a buffer), then map it a second time through a dup of the
 *	fd (the other of shared/private) and check both read the same.
 *   preload_prog scribble FILE BYTE
 *	map private, write BYTE over every byte, check it reads back.
 *   preload_prog truncate FILE
 *	lseek END == st_size; ftruncate(size) and ftruncate(size/2) succeed,
 *	ftruncate(size + 1) fails with EFBIG.
 *   preload_prog mapbig FILE
 *	mmap st_size + 2 MiB: prints the errno.
 *   preload_prog fork FILE OUT
 *	map it shared (untouched), fork twice: child 1 copies the inherited
 *	mapping to OUT.inherit, child 2 opens and maps FILE itself and copies
 *	that to OUT.reopen; prints how each ended, then copies its own to OUT.
 * Exit 0 on success; otherwise prints why and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define ALIGN (2u << 20)

static int die(const char *what)
{
	printf("FAIL %s: %s\n", what, strerror(errno));
	return 1;
}

static int open_sized(const char *path, size_t *size)
{
	int fd = open(path, O_RDWR);
	if (fd < 0)
		return -1;
	struct stat st;
	if (fstat(fd, &st) < 0)
		return -1;
	off_t end = lseek(fd, 0, SEEK_END);
	if (end != st.st_size) {
		printf("FAIL lseek END %lld != st_size %lld\n", (long long)end, (long long)st.st_size);
		exit(1);
	}
	*size = (size_t)st.st_size;
	return fd;
}

static unsigned char *map(int fd, size_t size, int shared, int fixed)
{
	void *want = NULL;
	int flags = shared ? MAP_SHARED : MAP_PRIVATE;
	if (fixed) {
		/* Reserve, then map over the reservation, as VMMs do. */
		unsigned char *r = mmap(NULL, size + ALIGN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (r == MAP_FAILED)
			return MAP_FAILED;
		want = (void *)(((uintptr_t)r + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1));
		flags |= MAP_FIXED;
	}
	unsigned char *a = mmap(want, size, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (a != MAP_FAILED && fixed && a != want) {
		printf("FAIL MAP_FIXED mapped at %p, not %p\n", (void *)a, want);
		exit(1);
	}
	return a;
}

static int copy_out(const unsigned char *a, size_t size, const char *path)
{
	FILE *out = fopen(path, "w");
	if (!out)
		return die("fopen OUT");
	static unsigned char buf[1 << 16];
	for (size_t o = 0; o < size; o += sizeof buf) {
		size_t n = size - o < sizeof buf ? size - o : sizeof buf;
		memcpy(buf, a + o, n);
		if (fwrite(buf, 1, n, out) != n)
			return die("fwrite");
	}
	if (fclose(out) != 0)
		return die("fclose");
	return 0;
}

static void report(const char *who, int st)
{
	if (WIFEXITED(st))
		printf("%s: exit %d\n", who, WEXITSTATUS(st));
	else
		printf("%s: signal %d\n", who, WTERMSIG(st));
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: see the source\n");
		return 2;
	}
	size_t size;
	int fd = open_sized(argv[2], &size);
	if (fd < 0)
		return die("open");
	if (!strcmp(argv[1], "dump") && argc == 6) {
		int shared = !strcmp(argv[4], "shared"), fixed = !strcmp(argv[5], "fixed");
		unsigned char *a = map(fd, size, shared, fixed);
		if (a == MAP_FAILED)
			return die("mmap");
		FILE *out = fopen(argv[3], "w");
		if (!out)
			return die("fopen OUT");
		static unsigned char buf[1 << 16];
		for (size_t o = 0; o < size; o += sizeof buf) {
			size_t n = size - o < sizeof buf ? size - o : sizeof buf;
			memcpy(buf, a + o, n);
			if (fwrite(buf, 1, n, out) != n)
				return die("fwrite");
		}
		if (fclose(out) != 0)
			return die("fclose");
		/* A second mapping of the same file (through a dup of the fd),
		 * the other kind, anywhere. */
		unsigned char *b = map(dup(fd), size, !shared, 0);
		if (b == MAP_FAILED)
			return die("mmap (second)");
		if (memcmp(a, b, size) != 0) {
			printf("FAIL the two mappings differ\n");
			return 1;
		}
		close(fd); /* the mappings go on working */
		if (memcmp(a, b, size) != 0) {
			printf("FAIL the mappings differ after close\n");
			return 1;
		}
		printf("ok %zu\n", size);
		return 0;
	}
	if (!strcmp(argv[1], "scribble") && argc == 4) {
		int v = atoi(argv[3]);
		unsigned char *a = map(fd, size, 0, 0);
		if (a == MAP_FAILED)
			return die("mmap");
		memset(a, v, size);
		for (size_t i = 0; i < size; i++)
			if (a[i] != (unsigned char)v) {
				printf("FAIL byte %zu is %d after the write\n", i, a[i]);
				return 1;
			}
		printf("ok %zu\n", size);
		return 0;
	}
	if (!strcmp(argv[1], "truncate")) {
		if (ftruncate(fd, (off_t)size) != 0)
			return die("ftruncate(size)");
		if (ftruncate(fd, (off_t)size / 2) != 0)
			return die("ftruncate(size/2)");
		struct stat st;
		if (fstat(fd, &st) != 0 || (size_t)st.st_size != size) {
			printf("FAIL size changed\n");
			return 1;
		}
		if (ftruncate(fd, (off_t)size + 1) == 0) {
			printf("FAIL ftruncate(size+1) succeeded\n");
			return 1;
		}
		printf("ok ftruncate(size+1): %s\n", strerror(errno));
		return 0;
	}
	if (!strcmp(argv[1], "fork") && argc == 4) {
		unsigned char *a = map(fd, size, 1, 0);
		if (a == MAP_FAILED)
			return die("mmap");
		char path[4096];
		fflush(stdout);
		pid_t c1 = fork();
		if (c1 == 0) {
			snprintf(path, sizeof path, "%s.inherit", argv[3]);
			_exit(copy_out(a, size, path));
		}
		pid_t c2 = fork();
		if (c2 == 0) {
			size_t sz;
			int fd2 = open_sized(argv[2], &sz);
			if (fd2 < 0)
				_exit(die("open in the child"));
			unsigned char *b = map(fd2, sz, 0, 1);
			if (b == MAP_FAILED)
				_exit(die("mmap in the child"));
			snprintf(path, sizeof path, "%s.reopen", argv[3]);
			_exit(copy_out(b, sz, path));
		}
		int st;
		if (c1 < 0 || c2 < 0 || waitpid(c1, &st, 0) != c1)
			return die("fork/wait");
		report("inherit", st);
		if (waitpid(c2, &st, 0) != c2)
			return die("wait");
		report("reopen", st);
		return copy_out(a, size, argv[3]);
	}
	if (!strcmp(argv[1], "mapbig")) {
		void *a = mmap(NULL, size + ALIGN, PROT_READ, MAP_SHARED, fd, 0);
		if (a != MAP_FAILED) {
			printf("FAIL an oversized mmap succeeded\n");
			return 1;
		}
		printf("mmap: %s\n", strerror(errno));
		return 0;
	}
	fprintf(stderr, "bad arguments\n");
	return 2;
}
