/*
 * ur_shim.c - see ur_shim.h. Each function is one raw call, returning -errno.
 */
#define _GNU_SOURCE
#include "ur_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MFD_HUGE_SHIFT
#define MFD_HUGE_SHIFT 26
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#endif


int ur_uffd_open_syscall(int flags, int user_mode_only)
{
	long fd = syscall(__NR_userfaultfd, flags | (user_mode_only ? UFFD_USER_MODE_ONLY : 0));
	return fd < 0 ? -errno : (int)fd;
}

int ur_uffd_open_dev(int flags, int user_mode_only)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -errno;
	int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags | (user_mode_only ? UFFD_USER_MODE_ONLY : 0));
	int err = errno;
	close(dev);
	return fd < 0 ? -err : fd;
}

int ur_uffd_api(int fd, uint64_t *features, uint64_t *ioctls)
{
	struct uffdio_api api;
	memset(&api, 0, sizeof(api));
	api.api = UFFD_API;
	api.features = *features;
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*features = api.features;
	*ioctls = api.ioctls;
	return 0;
}

int ur_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
	struct uffdio_register reg;
	memset(&reg, 0, sizeof(reg));
	reg.range.start = start;
	reg.range.len = len;
	reg.mode = mode;
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	*ioctls = reg.ioctls;
	return 0;
}

int ur_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { .start = start, .len = len };
	return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

long ur_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_continue c;
	memset(&c, 0, sizeof(c));
	c.range.start = start;
	c.range.len = len;
	c.mode = mode;
	int rc = ioctl(fd, UFFDIO_CONTINUE, &c);
	int err = errno;
	if (done)
		*done = c.mapped;
	if (rc == 0)
		return (long)len;
	/* A partial success (some pages mapped, then one already mapped) is
	 * EAGAIN with the count in mapped. */
	if (err == EAGAIN && c.mapped > 0)
		return (long)c.mapped;
	return -err;
}

int ur_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_copy c;
	memset(&c, 0, sizeof(c));
	c.dst = dst;
	c.src = src;
	c.len = len;
	c.mode = mode;
	int rc = ioctl(fd, UFFDIO_COPY, &c);
	int err = errno;
	if (done)
		*done = c.copy;
	return rc < 0 ? -err : 0;
}

int ur_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_zeropage z;
	memset(&z, 0, sizeof(z));
	z.range.start = start;
	z.range.len = len;
	z.mode = mode;
	int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
	int err = errno;
	if (done)
		*done = z.zeropage;
	return rc < 0 ? -err : 0;
}

int ur_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { .start = start, .len = len };
	return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

int ur_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_poison p;
	memset(&p, 0, sizeof(p));
	p.range.start = start;
	p.range.len = len;
	p.mode = mode;
	int rc = ioctl(fd, UFFDIO_POISON, &p);
	int err = errno;
	if (done)
		*done = p.updated;
	return rc < 0 ? -err : 0;
}

long ur_uffd_read(int fd, void *buf, size_t n)
{
	ssize_t r = read(fd, buf, n);
	return r < 0 ? -errno : (long)r;
}

int ur_poll2(int fd, int wakefd, int timeout_ms)
{
	struct pollfd p[2] = { { .fd = fd, .events = POLLIN }, { .fd = wakefd, .events = POLLIN } };
	int n = poll(p, wakefd >= 0 ? 2 : 1, timeout_ms);
	if (n < 0)
		return -errno;
	int out = 0;
	if (p[0].revents & POLLIN)
		out |= 1;
	if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))
		out |= 4;
	if (wakefd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
		out |= 2;
	return out;
}

void ur_get_abi(struct ur_abi *a)
{
	memset(a, 0, sizeof(*a));
	a->sizeof_uffd_msg = sizeof(struct uffd_msg);
	a->off_event = offsetof(struct uffd_msg, event);
	a->off_pf_flags = offsetof(struct uffd_msg, arg.pagefault.flags);
	a->off_pf_address = offsetof(struct uffd_msg, arg.pagefault.address);
	a->off_pf_ptid = offsetof(struct uffd_msg, arg.pagefault.feat.ptid);
	a->off_fork_ufd = offsetof(struct uffd_msg, arg.fork.ufd);
	a->off_remap_from = offsetof(struct uffd_msg, arg.remap.from);
	a->off_remap_to = offsetof(struct uffd_msg, arg.remap.to);
	a->off_remap_len = offsetof(struct uffd_msg, arg.remap.len);
	a->off_remove_start = offsetof(struct uffd_msg, arg.remove.start);
	a->off_remove_end = offsetof(struct uffd_msg, arg.remove.end);
	a->sizeof_uffdio_api = sizeof(struct uffdio_api);
	a->sizeof_uffdio_register = sizeof(struct uffdio_register);
	a->sizeof_uffdio_continue = sizeof(struct uffdio_continue);
	a->sizeof_uffdio_copy = sizeof(struct uffdio_copy);
	a->sizeof_uffdio_poison = sizeof(struct uffdio_poison);
	a->ioctl_api = UFFDIO_API;
	a->ioctl_register = UFFDIO_REGISTER;
	a->ioctl_unregister = UFFDIO_UNREGISTER;
	a->ioctl_wake = UFFDIO_WAKE;
	a->ioctl_copy = UFFDIO_COPY;
	a->ioctl_zeropage = UFFDIO_ZEROPAGE;
	a->ioctl_continue = UFFDIO_CONTINUE;
	a->ioctl_poison = UFFDIO_POISON;
	a->ioctl_dev_new = USERFAULTFD_IOC_NEW;
	a->feat_minor_hugetlbfs = UFFD_FEATURE_MINOR_HUGETLBFS;
	a->feat_minor_shmem = UFFD_FEATURE_MINOR_SHMEM;
	a->feat_poison = UFFD_FEATURE_POISON;
	a->feat_missing_hugetlbfs = UFFD_FEATURE_MISSING_HUGETLBFS;
	a->feat_missing_shmem = UFFD_FEATURE_MISSING_SHMEM;
	a->feat_event_fork = UFFD_FEATURE_EVENT_FORK;
	a->feat_event_remap = UFFD_FEATURE_EVENT_REMAP;
	a->feat_event_remove = UFFD_FEATURE_EVENT_REMOVE;
	a->feat_event_unmap = UFFD_FEATURE_EVENT_UNMAP;
	a->feat_sigbus = UFFD_FEATURE_SIGBUS;
	a->feat_thread_id = UFFD_FEATURE_THREAD_ID;
	a->feat_exact_address = UFFD_FEATURE_EXACT_ADDRESS;
	a->feat_wp_hugetlbfs_shmem = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
	a->feat_move = UFFD_FEATURE_MOVE;
	a->event_pagefault = UFFD_EVENT_PAGEFAULT;
	a->event_fork = UFFD_EVENT_FORK;
	a->event_remap = UFFD_EVENT_REMAP;
	a->event_remove = UFFD_EVENT_REMOVE;
	a->event_unmap = UFFD_EVENT_UNMAP;
	a->pf_flag_write = UFFD_PAGEFAULT_FLAG_WRITE;
	a->pf_flag_wp = UFFD_PAGEFAULT_FLAG_WP;
	a->pf_flag_minor = UFFD_PAGEFAULT_FLAG_MINOR;
	a->mode_missing = UFFDIO_REGISTER_MODE_MISSING;
	a->mode_wp = UFFDIO_REGISTER_MODE_WP;
	a->mode_minor = UFFDIO_REGISTER_MODE_MINOR;
}

int ur_memfd_create(const char *name, unsigned int flags, int hugetlb, int page_shift)
{
	if (hugetlb) {
		flags |= MFD_HUGETLB;
		if (page_shift > 0)
			flags |= (unsigned int)page_shift << MFD_HUGE_SHIFT;
	}
	long fd = syscall(__NR_memfd_create, name, flags);
	return fd < 0 ? -errno : (int)fd;
}

int ur_mmap(uint64_t addr_hint, uint64_t len, int prot, int flags, int fd, int64_t off, void **addr)
{
	void *p = mmap((void *)(uintptr_t)addr_hint, len, prot, flags, fd, off);
	if (p == MAP_FAILED)
		return -errno;
	*addr = p;
	return 0;
}

int ur_munmap(void *addr, uint64_t len) { return munmap(addr, len) < 0 ? -errno : 0; }

int ur_madvise(void *addr, uint64_t len, int advice) { return madvise(addr, len, advice) < 0 ? -errno : 0; }

int ur_fallocate(int fd, int mode, int64_t off, int64_t len)
{
	return fallocate(fd, mode, off, len) < 0 ? -errno : 0;
}

int ur_ftruncate(int fd, int64_t len) { return ftruncate(fd, len) < 0 ? -errno : 0; }

int ur_add_seals(int fd, int seals) { return fcntl(fd, F_ADD_SEALS, seals) < 0 ? -errno : 0; }

int ur_get_seals(int fd)
{
	int r = fcntl(fd, F_GET_SEALS);
	return r < 0 ? -errno : r;
}

#include <time.h>

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t ur_touch(uint64_t addr, uint64_t len, uint64_t stride, int write,
		  const uint32_t *order, uint64_t norder, uint64_t *lat_ns)
{
	volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)addr;
	uint64_t n = stride ? (len + stride - 1) / stride : 0;
	uint64_t sum = 0;
	if (order)
		n = norder;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t idx = order ? order[i] : i;
		uint64_t off = idx * stride;
		if (off >= len)
			continue;
		uint64_t t0 = lat_ns ? now_ns() : 0;
		unsigned char v = p[off];
		if (write)
			p[off] = v;
		if (lat_ns)
			lat_ns[i] = now_ns() - t0;
		sum = sum * 31 + v;
	}
	return sum;
}

int ur_mincore(uint64_t addr, uint64_t len, unsigned char *vec)
{
	return mincore((void *)(uintptr_t)addr, len, vec) < 0 ? -errno : 0;
}
