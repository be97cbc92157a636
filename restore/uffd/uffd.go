// Package uffd is uffdrestore's one gateway to the kernel: the only package
// that makes kernel calls through "C". It wraps the C shim in csrc/
// (userfaultfd and its ioctls, memfd, mmap, fallocate, seals) in a typed Go
// API and keeps to raw calls (benchmarks touch memory through
// internal/touch). Every ABI value (feature and ioctl bits, modes, events,
// the uffd_msg layout) is a constant taken from <linux/userfaultfd.h> by
// cgo, pinned to the kernel's ABI by TestABI.
//
// Every failure is an *os.SyscallError wrapping a unix.Errno, so
// errors.Is(err, unix.EEXIST) keeps working. EINTR is retried in one place
// (retry). No cgo type appears in the exported API.
package uffd

/*
#cgo CFLAGS: -Wall -Werror -I${SRCDIR}/../../csrc
#include <stddef.h>
#include <stdlib.h>
#include "ur_shim.h"

// The layout of struct uffd_msg and the _UFFDIO_* ioctl numbers, as the C
// compiler reads them from <linux/userfaultfd.h>, for the constants below.
enum {
	ur_msg_size = sizeof(struct uffd_msg),
	ur_off_event = offsetof(struct uffd_msg, event),
	ur_off_pf_flags = offsetof(struct uffd_msg, arg.pagefault.flags),
	ur_off_pf_address = offsetof(struct uffd_msg, arg.pagefault.address),
	ur_off_pf_ptid = offsetof(struct uffd_msg, arg.pagefault.feat.ptid),
	ur_off_fork_ufd = offsetof(struct uffd_msg, arg.fork.ufd),
	ur_off_remap_from = offsetof(struct uffd_msg, arg.remap.from),
	ur_off_remap_to = offsetof(struct uffd_msg, arg.remap.to),
	ur_off_remap_len = offsetof(struct uffd_msg, arg.remap.len),
	ur_off_remove_start = offsetof(struct uffd_msg, arg.remove.start),
	ur_off_remove_end = offsetof(struct uffd_msg, arg.remove.end),
	ur_nr_register = _UFFDIO_REGISTER,
	ur_nr_unregister = _UFFDIO_UNREGISTER,
	ur_nr_wake = _UFFDIO_WAKE,
	ur_nr_copy = _UFFDIO_COPY,
	ur_nr_zeropage = _UFFDIO_ZEROPAGE,
	ur_nr_continue = _UFFDIO_CONTINUE,
	ur_nr_poison = _UFFDIO_POISON,
	ur_nr_api = _UFFDIO_API,
};
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Features are UFFD_FEATURE_* bits.
type Features uint64

// Feature bits, from <linux/userfaultfd.h> (csrc/ur_shim.h defines those
// newer than the build host's headers). TestABI pins them to the kernel ABI.
const (
	FeatureMinorHugetlbfs   Features = C.UFFD_FEATURE_MINOR_HUGETLBFS
	FeatureMinorShmem       Features = C.UFFD_FEATURE_MINOR_SHMEM
	FeaturePoison           Features = C.UFFD_FEATURE_POISON
	FeatureMissingHugetlbfs Features = C.UFFD_FEATURE_MISSING_HUGETLBFS
	FeatureMissingShmem     Features = C.UFFD_FEATURE_MISSING_SHMEM
	FeatureEventFork        Features = C.UFFD_FEATURE_EVENT_FORK
	FeatureEventRemap       Features = C.UFFD_FEATURE_EVENT_REMAP
	FeatureEventRemove      Features = C.UFFD_FEATURE_EVENT_REMOVE
	FeatureEventUnmap       Features = C.UFFD_FEATURE_EVENT_UNMAP
	FeatureSigbus           Features = C.UFFD_FEATURE_SIGBUS
	FeatureThreadID         Features = C.UFFD_FEATURE_THREAD_ID
	FeatureExactAddress     Features = C.UFFD_FEATURE_EXACT_ADDRESS
	FeatureWPHugetlbfsShmem Features = C.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
	FeatureMove             Features = C.UFFD_FEATURE_MOVE
)

// Mode is a UFFDIO_REGISTER_MODE_* set.
type Mode uint64

// Registration modes, from <linux/userfaultfd.h>.
const (
	ModeMissing Mode = C.UFFDIO_REGISTER_MODE_MISSING
	ModeWP      Mode = C.UFFDIO_REGISTER_MODE_WP
	ModeMinor   Mode = C.UFFDIO_REGISTER_MODE_MINOR
)

// Event is a uffd_msg event type.
type Event uint8

// Events, from <linux/userfaultfd.h>.
const (
	EventPagefault Event = C.UFFD_EVENT_PAGEFAULT
	EventFork      Event = C.UFFD_EVENT_FORK
	EventRemap     Event = C.UFFD_EVENT_REMAP
	EventRemove    Event = C.UFFD_EVENT_REMOVE
	EventUnmap     Event = C.UFFD_EVENT_UNMAP
)

// Page fault flags, from <linux/userfaultfd.h>.
const (
	PFWrite uint64 = C.UFFD_PAGEFAULT_FLAG_WRITE
	PFWP    uint64 = C.UFFD_PAGEFAULT_FLAG_WP
	PFMinor uint64 = C.UFFD_PAGEFAULT_FLAG_MINOR
)

// Ioctl bits reported by UFFDIO_API / UFFDIO_REGISTER (1 << _UFFDIO_*).
const (
	IoctlRegister   uint64 = 1 << C.ur_nr_register
	IoctlUnregister uint64 = 1 << C.ur_nr_unregister
	IoctlWake       uint64 = 1 << C.ur_nr_wake
	IoctlCopy       uint64 = 1 << C.ur_nr_copy
	IoctlZeropage   uint64 = 1 << C.ur_nr_zeropage
	IoctlContinue   uint64 = 1 << C.ur_nr_continue
	IoctlPoison     uint64 = 1 << C.ur_nr_poison
	IoctlAPI        uint64 = 1 << C.ur_nr_api
)

// The DONTWAKE mode bits of the resolving ioctls.
const (
	continueDontWake = C.UFFDIO_CONTINUE_MODE_DONTWAKE
	copyDontWake     = C.UFFDIO_COPY_MODE_DONTWAKE
	zeropageDontWake = C.UFFDIO_ZEROPAGE_MODE_DONTWAKE
	poisonDontWake   = C.UFFDIO_POISON_MODE_DONTWAKE
)

// wakeMode is the mode of a resolving ioctl: its DONTWAKE bit when noWake.
func wakeMode(noWake bool, bit C.uint64_t) C.uint64_t {
	if noWake {
		return bit
	}
	return 0
}

// errno turns a shim return code into an error naming the operation.
func errno(op string, rc C.int) error {
	if rc >= 0 {
		return nil
	}
	return os.NewSyscallError(op, unix.Errno(-rc))
}

// retry runs f until it returns something other than -EINTR. It is the one
// place EINTR is handled: every shim call that can be interrupted goes
// through it.
func retry[T C.int | C.long](f func() T) T {
	for {
		rc := f()
		if rc != -T(unix.EINTR) {
			return rc
		}
	}
}

// OpenOptions say how to open a userfaultfd.
type OpenOptions struct {
	NonBlock bool
	// UserModeOnly asks for UFFD_USER_MODE_ONLY: only faults raised from user
	// mode are delivered, which an unprivileged user may ask for even when
	// vm.unprivileged_userfaultfd is 0. A kernel access (read(2) into an
	// unfilled page, for example) then fails with EFAULT instead of waiting.
	UserModeOnly bool
	// Via chooses how to open: the userfaultfd(2) syscall, /dev/userfaultfd,
	// or (ViaAuto) the syscall first and the device when that is refused.
	Via Via
	// FallbackUserModeOnly: when both the syscall and the device are
	// refused, open with UFFD_USER_MODE_ONLY (allowed to any user) rather
	// than fail. Via then reports ViaUserModeOnly.
	FallbackUserModeOnly bool
}

// Via says how a userfaultfd is opened.
type Via int

// Ways to open a userfaultfd.
const (
	ViaAuto Via = iota
	ViaSyscall
	ViaDevice
	// ViaUserModeOnly: the syscall with UFFD_USER_MODE_ONLY, after the full
	// kinds were refused (OpenOptions.FallbackUserModeOnly).
	ViaUserModeOnly
)

func (v Via) String() string {
	switch v {
	case ViaSyscall:
		return "syscall"
	case ViaDevice:
		return "/dev/userfaultfd"
	case ViaUserModeOnly:
		return "userfaultfd(UFFD_USER_MODE_ONLY)"
	}
	return "auto"
}

// FD is a userfaultfd. Its methods are safe for concurrent use; Close is
// idempotent and returns os.ErrClosed after the first call.
type FD struct {
	fd       int
	closed   atomic.Bool
	closeMu  sync.RWMutex
	features Features
	ioctls   uint64
	via      Via
}

func openRaw(o OpenOptions) (int, Via, error) {
	opened.Add(1)
	flags := C.int(unix.O_CLOEXEC)
	if o.NonBlock {
		flags |= C.int(unix.O_NONBLOCK)
	}
	umo := C.int(0)
	if o.UserModeOnly {
		umo = 1
	}
	if o.Via != ViaDevice {
		rc := C.ur_uffd_open_syscall(flags, umo)
		if rc >= 0 {
			return int(rc), ViaSyscall, nil
		}
		if o.Via == ViaSyscall || (rc != -C.int(unix.EPERM) && rc != -C.int(unix.ENOSYS)) {
			return -1, ViaSyscall, errno("userfaultfd", rc)
		}
	}
	rc := C.ur_uffd_open_dev(flags, umo)
	if rc >= 0 {
		return int(rc), ViaDevice, nil
	}
	if o.FallbackUserModeOnly && umo == 0 && o.Via == ViaAuto {
		if um := C.ur_uffd_open_syscall(flags, 1); um >= 0 {
			return int(um), ViaUserModeOnly, nil
		}
	}
	return -1, ViaDevice, fmt.Errorf("userfaultfd refused (run as root or with CAP_SYS_PTRACE, or get read/write access to /dev/userfaultfd; see `uffdrestore doctor`): %w", errno("open /dev/userfaultfd", rc))
}

// Supported opens a userfaultfd, asks the kernel which features and ioctls it
// offers (UFFDIO_API with no features), and closes it again: a userfaultfd
// accepts UFFDIO_API only once, so probing and enabling need two fds. The
// answer is the kernel's and does not change while the process runs: it is
// kept, per way of opening, so that later probes (and Opens) open no
// userfaultfd for it. A failed probe is not kept.
func Supported(o OpenOptions) (Features, uint64, error) {
	key := probeKey{o.UserModeOnly, o.Via, o.FallbackUserModeOnly}
	if v, ok := probes.Load(key); ok {
		p := v.(probeResult)
		return p.feat, p.ioctls, nil
	}
	feat, ioctls, err := probe(o)
	if err == nil {
		probes.Store(key, probeResult{feat, ioctls})
	}
	return feat, ioctls, err
}

type probeKey struct {
	userModeOnly bool
	via          Via
	fallback     bool
}

type probeResult struct {
	feat   Features
	ioctls uint64
}

// probes holds Supported's answers.
var probes sync.Map

// opened counts the userfaultfds this process opened (tests).
var opened atomic.Int64

func probe(o OpenOptions) (Features, uint64, error) {
	fd, _, err := openRaw(o)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(fd)
	var feat, ioctls C.uint64_t
	if rc := C.ur_uffd_api(C.int(fd), &feat, &ioctls); rc < 0 {
		return 0, 0, errno("ioctl UFFDIO_API", rc)
	}
	return Features(feat), uint64(ioctls), nil
}

// Open opens a userfaultfd and enables want with UFFDIO_API. Features the
// kernel lacks are reported as a *NotSupportedError before anything is
// enabled (the probe-close-reopen rule of the man page).
func Open(o OpenOptions, want Features) (*FD, error) {
	have, _, err := Supported(o)
	if err != nil {
		return nil, err
	}
	if missing := want &^ have; missing != 0 {
		return nil, missingFeatureError(missing)
	}
	fd, via, err := openRaw(o)
	if err != nil {
		return nil, err
	}
	feat := C.uint64_t(want)
	var ioctls C.uint64_t
	if rc := C.ur_uffd_api(C.int(fd), &feat, &ioctls); rc < 0 {
		unix.Close(fd)
		return nil, errno("ioctl UFFDIO_API", rc)
	}
	// The kernel answers with every feature it supports; enabled are
	// exactly those asked for (it refuses the call otherwise).
	return &FD{fd: fd, features: want, ioctls: uint64(ioctls), via: via}, nil
}

// FromFD wraps a userfaultfd received from elsewhere (another process, over
// SCM_RIGHTS) on which UFFDIO_API has already been called. FD takes
// ownership of fd.
func FromFD(fd int, features Features) *FD {
	return &FD{fd: fd, features: features, ioctls: ^uint64(0), via: ViaAuto}
}

// Fd returns the file descriptor number (valid until Close).
func (u *FD) Fd() int { return u.fd }

// Features returns the features enabled on this fd.
func (u *FD) Features() Features { return u.features }

// Ioctls returns the ioctl bits UFFDIO_API reported.
func (u *FD) Ioctls() uint64 { return u.ioctls }

// Via says how the fd was opened.
func (u *FD) Via() Via { return u.via }

// Close closes the fd. Calls that are in flight finish first.
func (u *FD) Close() error {
	if u.closed.Swap(true) {
		return os.ErrClosed
	}
	u.closeMu.Lock()
	defer u.closeMu.Unlock()
	return unix.Close(u.fd)
}

// do runs an ioctl with the fd held open.
func (u *FD) do(f func(fd C.int) C.int) C.int {
	u.closeMu.RLock()
	defer u.closeMu.RUnlock()
	if u.closed.Load() {
		return -C.int(unix.EBADF)
	}
	return retry(func() C.int { return f(C.int(u.fd)) })
}

// Register registers [addr, addr+length) in mode and returns the range
// ioctls the kernel allows on it.
func (u *FD) Register(addr, length uintptr, mode Mode) (uint64, error) {
	var ioctls C.uint64_t
	rc := u.do(func(fd C.int) C.int {
		return C.ur_uffd_register(fd, C.uint64_t(addr), C.uint64_t(length), C.uint64_t(mode), &ioctls)
	})
	return uint64(ioctls), errno("ioctl UFFDIO_REGISTER", rc)
}

// Unregister undoes Register over the range.
func (u *FD) Unregister(addr, length uintptr) error {
	rc := u.do(func(fd C.int) C.int { return C.ur_uffd_unregister(fd, C.uint64_t(addr), C.uint64_t(length)) })
	return errno("ioctl UFFDIO_UNREGISTER", rc)
}

// Outcome is what a resolving ioctl did.
type Outcome int

// Outcomes of Continue.
const (
	Mapped        Outcome = iota // page-table entries were installed
	AlreadyMapped                // EEXIST: another thread or a race got there first; success
)

// Continue resolves a minor fault: it installs page-table entries for the
// page-cache pages already in [addr, addr+length) and wakes the waiters
// (unless dontWake). It returns how many bytes it mapped: the kernel stops at
// the first page that is mapped already, so that may be fewer than length
// (with a nil error). EEXIST on the first page comes back as AlreadyMapped
// with a nil error; EAGAIN (the address space is changing), EFAULT (a page
// is not in the page cache) and the target-gone errnos (ENOENT, ESRCH,
// ENOSPC) come back as errors that errors.Is can test.
func (u *FD) Continue(addr, length uintptr, dontWake bool) (Outcome, error) {
	_, out, err := u.continueN(addr, length, dontWake)
	return out, err
}

func (u *FD) continueN(addr, length uintptr, noWake bool) (uintptr, Outcome, error) {
	mode := wakeMode(noWake, continueDontWake)
	var rc C.long
	u.closeMu.RLock()
	if u.closed.Load() {
		u.closeMu.RUnlock()
		return 0, Mapped, os.NewSyscallError("ioctl UFFDIO_CONTINUE", unix.EBADF)
	}
	// nil for the mapped count: passing a Go pointer to C would make it
	// escape, one allocation per fault.
	rc = retry(func() C.long {
		return C.ur_uffd_continue(C.int(u.fd), C.uint64_t(addr), C.uint64_t(length), mode, nil)
	})
	u.closeMu.RUnlock()
	switch {
	case rc >= 0:
		return uintptr(rc), Mapped, nil
	case rc == -C.long(unix.EEXIST):
		return 0, AlreadyMapped, nil
	}
	return 0, Mapped, os.NewSyscallError("ioctl UFFDIO_CONTINUE", unix.Errno(-rc))
}

// ContinueRange maps every page of [addr, addr+length) that is not mapped
// yet, stepping over pages that are (one CONTINUE would stop at the first of
// them). It returns the number of ioctls it made. Waiters on pages that were
// mapped already are not woken: use Wake for those. EAGAIN (the address
// space is changing: an event is pending on this uffd) is returned at once,
// since only reading that event lets it settle.
func (u *FD) ContinueRange(addr, length, pageSize uintptr) (int, error) {
	calls := 0
	for length > 0 {
		n, out, err := u.continueN(addr, length, false)
		calls++
		switch {
		case err == nil && out == AlreadyMapped:
			n = pageSize
		case err == nil:

		default:
			return calls, err
		}
		if n > length {
			n = length
		}
		addr += n
		length -= n
	}
	return calls, nil
}

// Copy resolves a missing fault by copying length bytes from src into the
// registered range at dst (UFFDIO_COPY). EEXIST is AlreadyMapped.
func (u *FD) Copy(dst, src, length uintptr, noWake bool) (Outcome, error) {
	mode := wakeMode(noWake, copyDontWake)
	rc := u.do(func(fd C.int) C.int {
		return C.ur_uffd_copy(fd, C.uint64_t(dst), C.uint64_t(src), C.uint64_t(length), mode, nil)
	})
	if rc == -C.int(unix.EEXIST) {
		return AlreadyMapped, nil
	}
	return Mapped, errno("ioctl UFFDIO_COPY", rc)
}

// ZeroPage resolves a missing fault with zero pages (anonymous memory only).
func (u *FD) ZeroPage(addr, length uintptr, noWake bool) (Outcome, error) {
	mode := wakeMode(noWake, zeropageDontWake)
	rc := u.do(func(fd C.int) C.int {
		return C.ur_uffd_zeropage(fd, C.uint64_t(addr), C.uint64_t(length), mode, nil)
	})
	if rc == -C.int(unix.EEXIST) {
		return AlreadyMapped, nil
	}
	return Mapped, errno("ioctl UFFDIO_ZEROPAGE", rc)
}

// Wake wakes threads waiting on faults in the range.
func (u *FD) Wake(addr, length uintptr) error {
	rc := u.do(func(fd C.int) C.int { return C.ur_uffd_wake(fd, C.uint64_t(addr), C.uint64_t(length)) })
	return errno("ioctl UFFDIO_WAKE", rc)
}

// Poison marks the range poisoned (UFFDIO_POISON, Linux >= 6.6): an access
// raises SIGBUS instead of reading the page. Used when a chunk fails its
// checksum, so a target never sees wrong bytes.
func (u *FD) Poison(addr, length uintptr, noWake bool) error {
	mode := wakeMode(noWake, poisonDontWake)
	rc := u.do(func(fd C.int) C.int {
		return C.ur_uffd_poison(fd, C.uint64_t(addr), C.uint64_t(length), mode, nil)
	})
	if rc == -C.int(unix.EEXIST) {
		return nil
	}
	return errno("ioctl UFFDIO_POISON", rc)
}

// Msg is one decoded uffd_msg.
type Msg struct {
	Event   Event
	Flags   uint64 // page fault: PFWrite, PFWP, PFMinor
	Address uint64 // page fault address
	PTID    uint32 // faulting thread (with FeatureThreadID)
	// Fork: the new userfaultfd of the child.
	ForkUFD uint32
	// Remap (mremap): from, to, len.
	RemapFrom, RemapTo, RemapLen uint64
	// Remove (MADV_REMOVE/DONTNEED) and unmap: [Start, End).
	Start, End uint64
}

// MsgBuf is a reusable buffer for ReadMsgs, so reading faults allocates
// nothing.
type MsgBuf struct {
	raw []byte
}

// NewMsgBuf returns a buffer for up to n messages.
func NewMsgBuf(n int) *MsgBuf { return &MsgBuf{raw: make([]byte, n*msgSize)} }

// ReadMsgs reads up to len(out) messages without blocking (the fd must be
// non-blocking for that) and decodes them into out. No message pending is
// (0, nil).
func (u *FD) ReadMsgs(buf *MsgBuf, out []Msg) (int, error) {
	const sz = msgSize
	n := len(out)
	if n*sz > len(buf.raw) {
		n = len(buf.raw) / sz
	}
	if n == 0 {
		return 0, nil
	}
	var r C.long
	u.closeMu.RLock()
	if u.closed.Load() {
		u.closeMu.RUnlock()
		return 0, os.ErrClosed
	}
	r = retry(func() C.long { return C.ur_uffd_read(C.int(u.fd), unsafe.Pointer(&buf.raw[0]), C.size_t(n*sz)) })
	u.closeMu.RUnlock()
	if r == -C.long(unix.EAGAIN) {
		return 0, nil
	}
	if r < 0 {
		return 0, os.NewSyscallError("read userfaultfd", unix.Errno(-r))
	}
	if r == 0 {
		return 0, ErrHangup
	}
	cnt := int(r) / sz
	for i := 0; i < cnt; i++ {
		out[i] = decodeMsg(buf.raw[i*sz : (i+1)*sz])
	}
	return cnt, nil
}

func le64(b []byte) uint64 {
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

func le32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// The layout of struct uffd_msg, from <linux/userfaultfd.h>.
const (
	msgSize        = C.ur_msg_size
	offEvent       = C.ur_off_event
	offPFFlags     = C.ur_off_pf_flags
	offPFAddress   = C.ur_off_pf_address
	offPFPtid      = C.ur_off_pf_ptid
	offForkUFD     = C.ur_off_fork_ufd
	offRemapFrom   = C.ur_off_remap_from
	offRemapTo     = C.ur_off_remap_to
	offRemapLen    = C.ur_off_remap_len
	offRemoveStart = C.ur_off_remove_start
	offRemoveEnd   = C.ur_off_remove_end
)

func decodeMsg(b []byte) Msg {
	m := Msg{Event: Event(b[offEvent])}
	switch m.Event {
	case EventPagefault:
		m.Flags = le64(b[offPFFlags:])
		m.Address = le64(b[offPFAddress:])
		m.PTID = le32(b[offPFPtid:])
	case EventFork:
		m.ForkUFD = le32(b[offForkUFD:])
	case EventRemap:
		m.RemapFrom = le64(b[offRemapFrom:])
		m.RemapTo = le64(b[offRemapTo:])
		m.RemapLen = le64(b[offRemapLen:])
	case EventRemove, EventUnmap:
		m.Start = le64(b[offRemoveStart:])
		m.End = le64(b[offRemoveEnd:])
	}
	return m
}

// ErrHangup means the userfaultfd has no process left behind it.
var ErrHangup = errors.New("uffd: userfaultfd hung up (the target process exited)")

// Poll waits until the uffd (fd) or wakefd (if >= 0) is readable, or
// timeoutMS passes (-1 forever). It reports which is ready; hangup means fd
// has no users left.
func Poll(fd, wakefd int, timeoutMS int) (ready, woken, hangup bool, err error) {
	rc := retry(func() C.int { return C.ur_poll2(C.int(fd), C.int(wakefd), C.int(timeoutMS)) })
	if rc < 0 {
		return false, false, false, errno("poll", rc)
	}
	return rc&C.UR_POLL_READY != 0, rc&C.UR_POLL_WOKEN != 0, rc&C.UR_POLL_HUP != 0, nil
}

// NotSupportedError says a kernel feature is missing and which Linux release
// added it.
type NotSupportedError struct {
	Feature  string
	MinLinux string
}

func (e *NotSupportedError) Error() string {
	return fmt.Sprintf("uffd: %s not supported by this kernel: requires Linux >= %s", e.Feature, e.MinLinux)
}

// Is makes errors.Is(err, ErrNotSupported) true.
func (e *NotSupportedError) Is(target error) bool { return target == ErrNotSupported }

// ErrNotSupported matches every *NotSupportedError.
var ErrNotSupported = errors.New("uffd: feature not supported by this kernel")

// FeatureInfo names a feature bit and the first Linux release with it.
type FeatureInfo struct {
	Bit      Features
	Name     string
	MinLinux string
}

// KnownFeatures lists the features uffdrestore cares about.
func KnownFeatures() []FeatureInfo {
	return []FeatureInfo{
		{FeatureMissingHugetlbfs, "missing faults on hugetlbfs", "4.11"},
		{FeatureMissingShmem, "missing faults on shmem", "4.11"},
		{FeatureEventFork, "fork events", "4.11"},
		{FeatureEventRemap, "mremap events", "4.11"},
		{FeatureEventRemove, "remove (MADV_REMOVE/DONTNEED) events", "4.11"},
		{FeatureEventUnmap, "unmap events", "4.11"},
		{FeatureSigbus, "SIGBUS mode", "4.14"},
		{FeatureThreadID, "faulting thread id", "4.14"},
		{FeatureMinorHugetlbfs, "minor faults on hugetlbfs", "5.13"},
		{FeatureMinorShmem, "minor faults on shmem", "5.14"},
		{FeatureExactAddress, "exact fault addresses", "5.18"},
		{FeatureWPHugetlbfsShmem, "write-protect on hugetlbfs/shmem", "5.19"},
		{FeaturePoison, "UFFDIO_POISON", "6.6"},
		{FeatureMove, "UFFDIO_MOVE", "6.8"},
	}
}

func missingFeatureError(missing Features) error {
	for _, f := range KnownFeatures() {
		if missing&f.Bit != 0 {
			return &NotSupportedError{Feature: f.Name, MinLinux: f.MinLinux}
		}
	}
	return &NotSupportedError{Feature: fmt.Sprintf("userfaultfd features %#x", uint64(missing)), MinLinux: "unknown"}
}
