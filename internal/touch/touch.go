// Package touch reads memory from C, for benchmarks and tests of lazily
// restored memory: one byte every stride bytes, optionally timing each
// access. It is not part of the kernel gateway (restore/uffd, which keeps
// to raw calls); it imports "C" only so that the goroutine touching memory
// holds no P while it waits on a fault, letting a Go fault handler in the
// same process run, and so that latencies are those a C target thread sees.
package touch

/*
#cgo CFLAGS: -Wall -Werror -O2
#include <stdint.h>
#include <time.h>

static inline uint64_t ur_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// Touches one byte per stride in [addr, addr+len) (reads, or writes back the
// byte it read when write != 0), in the order of order[] (stride indexes)
// or sequentially when order is NULL; lat_ns, when not NULL, receives each
// touch's latency. Returns a checksum of the bytes read.
static uint64_t ur_touch(uint64_t addr, uint64_t len, uint64_t stride, int write,
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
		uint64_t t0 = lat_ns ? ur_now_ns() : 0;
		unsigned char v = p[off];
		if (write)
			p[off] = v;
		if (lat_ns)
			lat_ns[i] = ur_now_ns() - t0;
		sum = sum * 31 + v;
	}
	return sum;
}
*/
import "C"

import "unsafe"

// Touch reads (or, with write, rewrites) one byte every stride bytes of
// [addr, addr+length), in order (stride indexes; those beyond length are
// skipped) or sequentially when order is nil, from C. lat, when not nil,
// receives each touch's latency in nanoseconds and must have a place for
// every touch (it panics otherwise: a caller's bug). It returns a checksum
// of the bytes read.
func Touch(addr uintptr, length, stride int, write bool, order []uint32, lat []uint64) uint64 {
	w := C.int(0)
	if write {
		w = 1
	}
	n := 0
	if stride > 0 {
		n = (length + stride - 1) / stride
	}
	var op *C.uint32_t
	if order != nil {
		n = len(order)
		if n > 0 {
			op = (*C.uint32_t)(unsafe.Pointer(&order[0]))
		}
	}
	var lp *C.uint64_t
	if lat != nil {
		if len(lat) < n {
			panic("touch.Touch: latency slice too short")
		}
		if n > 0 {
			lp = (*C.uint64_t)(unsafe.Pointer(&lat[0]))
		}
	}
	return uint64(C.ur_touch(C.uint64_t(addr), C.uint64_t(length), C.uint64_t(stride), w, op, C.uint64_t(len(order)), lp))
}
