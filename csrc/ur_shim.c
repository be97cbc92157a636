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
		out |= UR_POLL_READY;
	if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))
		out |= UR_POLL_HUP;
	if (wakefd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
		out |= UR_POLL_WOKEN;
	return out;
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

int ur_mincore(uint64_t addr, uint64_t len, unsigned char *vec)
{
	return mincore((void *)(uintptr_t)addr, len, vec) < 0 ? -errno : 0;
}
