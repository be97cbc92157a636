package uffd

/*
#include <stdlib.h>
#include "ur_shim.h"
*/
import "C"

import (
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// MemfdCreate creates a memfd. With hugetlb it is backed by huge pages of
// 1<<pageShift bytes (0: the default huge page size). The fd is close-on-exec
// and allows sealing; the caller owns it.
func MemfdCreate(name string, hugetlb bool, pageShift int) (*File, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	h := C.int(0)
	if hugetlb {
		h = 1
	}
	rc := C.ur_memfd_create(cname, C.uint(unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING), h, C.int(pageShift))
	if rc < 0 {
		return nil, errno("memfd_create", rc)
	}
	return NewFile(int(rc)), nil
}

// Fallocate allocates (or with unix.FALLOC_FL_PUNCH_HOLE|KEEP_SIZE frees)
// a range of fd.
func Fallocate(fd int, mode uint32, off, length int64) error {
	rc := retry(func() C.int { return C.ur_fallocate(C.int(fd), C.int(mode), C.int64_t(off), C.int64_t(length)) })
	return errno("fallocate", rc)
}

// Ftruncate sets fd's size.
func Ftruncate(fd int, length int64) error {
	rc := retry(func() C.int { return C.ur_ftruncate(C.int(fd), C.int64_t(length)) })
	return errno("ftruncate", rc)
}

// AddSeals adds F_SEAL_* seals to a memfd.
func AddSeals(fd int, seals int) error {
	return errno("fcntl F_ADD_SEALS", C.ur_add_seals(C.int(fd), C.int(seals)))
}

// Seals returns a memfd's seals.
func Seals(fd int) (int, error) {
	rc := C.ur_get_seals(C.int(fd))
	if rc < 0 {
		return 0, errno("fcntl F_GET_SEALS", rc)
	}
	return int(rc), nil
}

// Mapping is a memory mapping owned by the caller. Close unmaps it; it is
// idempotent and returns os.ErrClosed after the first call.
type Mapping struct {
	ptr    unsafe.Pointer
	n      int
	closed atomic.Bool
}

// Mmap maps length bytes of fd at off. hint, with unix.MAP_FIXED_NOREPLACE in
// flags, asks for that address.
func Mmap(hint uintptr, length int, prot, flags, fd int, off int64) (*Mapping, error) {
	var p unsafe.Pointer
	rc := C.ur_mmap(C.uint64_t(hint), C.uint64_t(length), C.int(prot), C.int(flags), C.int(fd), C.int64_t(off), &p)
	if rc < 0 {
		return nil, errno("mmap", rc)
	}
	return &Mapping{ptr: p, n: length}, nil
}

// Addr is the mapping's start address.
func (m *Mapping) Addr() uintptr { return uintptr(m.ptr) }

// Len is the mapping's length in bytes.
func (m *Mapping) Len() int { return m.n }

// Bytes returns the mapping as a slice. It is invalid after Close.
func (m *Mapping) Bytes() []byte { return unsafe.Slice((*byte)(m.ptr), m.n) }

// Madvise applies advice to [off, off+length) of the mapping.
func (m *Mapping) Madvise(off, length int, advice int) error {
	return errno("madvise", C.ur_madvise(unsafe.Add(m.ptr, off), C.uint64_t(length), C.int(advice)))
}

// Close unmaps the mapping.
func (m *Mapping) Close() error {
	if m.closed.Swap(true) {
		return os.ErrClosed
	}
	return errno("munmap", C.ur_munmap(m.ptr, C.uint64_t(m.n)))
}

// Resident reports which pages of [off, off+length) of the mapping are
// resident, one byte per base page (os.Getpagesize(), also for huge page
// mappings), bit 0 set when resident; for a shared shmem mapping that means
// "in the page cache". vec must hold (length+pagesize-1)/pagesize bytes: the
// kernel writes that many.
func (m *Mapping) Resident(off, length int, vec []byte) error {
	ps := os.Getpagesize()
	if off < 0 || length <= 0 || off+length > m.n || len(vec) < (length+ps-1)/ps {
		return os.NewSyscallError("mincore", unix.EINVAL)
	}
	return errno("mincore", C.ur_mincore(C.uint64_t(uintptr(m.ptr)+uintptr(off)), C.uint64_t(length), (*C.uchar)(unsafe.Pointer(&vec[0]))))
}
