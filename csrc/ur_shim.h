/*
 * ur_shim.h - the raw kernel calls uffdrestore makes: userfaultfd, its ioctls,
 * memfd, mmap, fallocate and file seals.
 *
 * Every function returns a non-negative value on success and -errno on
 * failure; none of them retries or prints. The Go package restore/uffd is the
 * only caller (the only package that reaches the kernel through "C";
 * internal/touch imports "C" only to touch memory in benchmarks and tests).
 *
 * Constants and struct layouts come from <linux/userfaultfd.h>. Debian 12
 * ships 6.1 headers, so whatever newer kernels added is defined below with
 * #ifndef, with the values from the upstream uapi header.
 */
#ifndef UR_SHIM_H
#define UR_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>

/* Added in Linux 6.6 (UFFDIO_POISON). */
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
/* Added in Linux 6.1/6.4/6.5/6.6. */
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

/* Opening. flags: O_CLOEXEC | O_NONBLOCK; user_mode_only adds UFFD_USER_MODE_ONLY. */
int ur_uffd_open_syscall(int flags, int user_mode_only);
int ur_uffd_open_dev(int flags, int user_mode_only);

/* UFFDIO_API: request features; on success *features and *ioctls hold what the kernel reports. */
int ur_uffd_api(int fd, uint64_t *features, uint64_t *ioctls);

int ur_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int ur_uffd_unregister(int fd, uint64_t start, uint64_t len);
/* The range ioctls report how much they did in *done (mapped/copy/zeropage/updated) unless done is NULL. */
/* CONTINUE returns the bytes mapped (len, or fewer when it stopped at a page
 * that was mapped already: the kernel's partial-success EAGAIN) or -errno when
 * nothing was mapped (EEXIST: the first page is mapped already). */
long ur_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ur_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int ur_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ur_uffd_wake(int fd, uint64_t start, uint64_t len);
int ur_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);

/* Reads up to n bytes of struct uffd_msg records; returns bytes read. */
long ur_uffd_read(int fd, void *buf, size_t n);
/* Waits for fd (and optionally wakefd) to be readable; returns a bitmask of UR_POLL_*. */
enum { UR_POLL_READY = 1, UR_POLL_WOKEN = 2, UR_POLL_HUP = 4 };
int ur_poll2(int fd, int wakefd, int timeout_ms);


/* Memory and files. */
int ur_memfd_create(const char *name, unsigned int flags, int hugetlb, int page_shift);
/* Maps and returns the address in *addr; addr_hint is used with MAP_FIXED_NOREPLACE when flags ask for it. */
int ur_mmap(uint64_t addr_hint, uint64_t len, int prot, int flags, int fd, int64_t off, void **addr);
int ur_munmap(void *addr, uint64_t len);
int ur_madvise(void *addr, uint64_t len, int advice);
int ur_fallocate(int fd, int mode, int64_t off, int64_t len);
int ur_ftruncate(int fd, int64_t len);
int ur_add_seals(int fd, int seals);
int ur_get_seals(int fd);

/* mincore(2): one byte per page of [addr, addr+len) in vec, bit 0 set when
 * the page is resident (for shmem: in the page cache). */
int ur_mincore(uint64_t addr, uint64_t len, unsigned char *vec);

#endif
