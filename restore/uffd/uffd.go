// Package uffd is uffdrestore's one gateway to the kernel: the only package
// that imports "C". It wraps the C shim in csrc/ (userfaultfd and its ioctls,
// memfd, mmap, fallocate, seals) in a typed Go API.
//
// Every failure is an *os.SyscallError wrapping a unix.Errno, so
// errors.Is(err, unix.EEXIST) keeps working. EINTR is retried in one place
// (retry). No cgo type appears in the exported API.
package uffd

/*
#cgo CFLAGS: -Wall -Werror -I${SRCDIR}/../../csrc
#include <stdlib.h>
#include "ur_shim.h"
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

// ABI is the layout of the kernel's structs and the ioctl numbers, as the C
// compiler sees them in <linux/userfaultfd.h> (plus the shim's fallbacks).
type ABI struct {
	SizeofMsg                                                           uintptr
	OffEvent, OffPFFlags, OffPFAddress, OffPFPtid, OffForkUFD           uintptr
	OffRemapFrom, OffRemapTo, OffRemapLen, OffRemoveStart, OffRemoveEnd uintptr
	SizeofAPI, SizeofRegister, SizeofContinue, SizeofCopy, SizeofPoison uintptr
}

// abi is read from C before any package variable that depends on it.
var abi = func() (a C.struct_ur_abi) { C.ur_get_abi(&a); return a }()

// Features are UFFD_FEATURE_* bits, taken from the kernel header.
type Features uint64

// Feature bits, from <linux/userfaultfd.h>.
var (
	FeatureMinorHugetlbfs   = Features(abi.feat_minor_hugetlbfs)
	FeatureMinorShmem       = Features(abi.feat_minor_shmem)
	FeaturePoison           = Features(abi.feat_poison)
	FeatureMissingHugetlbfs = Features(abi.feat_missing_hugetlbfs)
	FeatureMissingShmem     = Features(abi.feat_missing_shmem)
	FeatureEventFork        = Features(abi.feat_event_fork)
	FeatureEventRemap       = Features(abi.feat_event_remap)
	FeatureEventRemove      = Features(abi.feat_event_remove)
	FeatureEventUnmap       = Features(abi.feat_event_unmap)
	FeatureSigbus           = Features(abi.feat_sigbus)
	FeatureThreadID         = Features(abi.feat_thread_id)
	FeatureExactAddress     = Features(abi.feat_exact_address)
	FeatureWPHugetlbfsShmem = Features(abi.feat_wp_hugetlbfs_shmem)
	FeatureMove             = Features(abi.feat_move)
)

// Mode is a UFFDIO_REGISTER_MODE_* set.
type Mode uint64

// Registration modes.
var (
	ModeMissing = Mode(abi.mode_missing)
	ModeWP      = Mode(abi.mode_wp)
	ModeMinor   = Mode(abi.mode_minor)
)

// Event is a uffd_msg event type.
type Event uint8

// Events.
var (
	EventPagefault = Event(abi.event_pagefault)
	EventFork      = Event(abi.event_fork)
	EventRemap     = Event(abi.event_remap)
	EventRemove    = Event(abi.event_remove)
	EventUnmap     = Event(abi.event_unmap)
)

// Page fault flags.
var (
	PFWrite = uint64(abi.pf_flag_write)
	PFWP    = uint64(abi.pf_flag_wp)
	PFMinor = uint64(abi.pf_flag_minor)
)

// Ioctl bits reported by UFFDIO_API / UFFDIO_REGISTER (1 << _UFFDIO_*).
const (
	IoctlRegister   uint64 = 1 << 0x00
	IoctlUnregister uint64 = 1 << 0x01
	IoctlWake       uint64 = 1 << 0x02
	IoctlCopy       uint64 = 1 << 0x03
	IoctlZeropage   uint64 = 1 << 0x04
	IoctlContinue   uint64 = 1 << 0x07
	IoctlPoison     uint64 = 1 << 0x08
	IoctlAPI        uint64 = 1 << 0x3F
)

// CABI reports the C side's struct sizes and offsets, for tests that pin the
// Go parser to the kernel header.
func CABI() ABI {
	return ABI{
		SizeofMsg: uintptr(abi.sizeof_uffd_msg), OffEvent: uintptr(abi.off_event),
		OffPFFlags: uintptr(abi.off_pf_flags), OffPFAddress: uintptr(abi.off_pf_address),
		OffPFPtid: uintptr(abi.off_pf_ptid), OffForkUFD: uintptr(abi.off_fork_ufd),
		OffRemapFrom: uintptr(abi.off_remap_from), OffRemapTo: uintptr(abi.off_remap_to),
		OffRemapLen: uintptr(abi.off_remap_len), OffRemoveStart: uintptr(abi.off_remove_start),
		OffRemoveEnd: uintptr(abi.off_remove_end), SizeofAPI: uintptr(abi.sizeof_uffdio_api),
		SizeofRegister: uintptr(abi.sizeof_uffdio_register), SizeofContinue: uintptr(abi.sizeof_uffdio_continue),
		SizeofCopy: uintptr(abi.sizeof_uffdio_copy), SizeofPoison: uintptr(abi.sizeof_uffdio_poison),
	}
}

// errno turns a shim return code into an error naming the operation.
func errno(op string, rc C.int) error {
	if rc >= 0 {
		return nil
	}
	return os.NewSyscallError(op, unix.Errno(-rc))
}

// retry runs f until it returns something other than -EINTR. It is the one
// place EINTR is handled.
func retry(f func() C.int) C.int {
	for {
		rc := f()
		if rc != -C.int(unix.EINTR) {
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
// accepts UFFDIO_API only once, so probing and enabling need two fds.
func Supported(o OpenOptions) (Features, uint64, error) {
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

func (u *FD) continueN(addr, length uintptr, dontWake bool) (uintptr, Outcome, error) {
	mode := C.uint64_t(0)
	if dontWake {
		mode = 1 // UFFDIO_CONTINUE_MODE_DONTWAKE
	}
	var rc C.long
	u.closeMu.RLock()
	if u.closed.Load() {
		u.closeMu.RUnlock()
		return 0, Mapped, os.NewSyscallError("ioctl UFFDIO_CONTINUE", unix.EBADF)
	}
	for {
		// nil for the mapped count: passing a Go pointer to C would make it
		// escape, one allocation per fault.
		rc = C.ur_uffd_continue(C.int(u.fd), C.uint64_t(addr), C.uint64_t(length), mode, nil)
		if rc != -C.long(unix.EINTR) {
			break
		}
	}
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
func (u *FD) Copy(dst, src, length uintptr, dontWake bool) (Outcome, error) {
	mode := C.uint64_t(0)
	if dontWake {
		mode = 1
	}
	rc := u.do(func(fd C.int) C.int {
		return C.ur_uffd_copy(fd, C.uint64_t(dst), C.uint64_t(src), C.uint64_t(length), mode, nil)
	})
	if rc == -C.int(unix.EEXIST) {
		return AlreadyMapped, nil
	}
	return Mapped, errno("ioctl UFFDIO_COPY", rc)
}

// ZeroPage resolves a missing fault with zero pages (anonymous memory only).
func (u *FD) ZeroPage(addr, length uintptr, dontWake bool) (Outcome, error) {
	mode := C.uint64_t(0)
	if dontWake {
		mode = 1
	}
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
func (u *FD) Poison(addr, length uintptr, dontWake bool) error {
	mode := C.uint64_t(0)
	if dontWake {
		mode = 1
	}
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
	for {
		r = C.ur_uffd_read(C.int(u.fd), unsafe.Pointer(&buf.raw[0]), C.size_t(n*sz))
		if r != -C.long(unix.EINTR) {
			break
		}
	}
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

// The Go-side layout of struct uffd_msg. TestABI pins these to what the C
// compiler reports for <linux/userfaultfd.h>.
const (
	msgSize        = 32
	offEvent       = 0
	offPFFlags     = 8
	offPFAddress   = 16
	offPFPtid      = 24
	offForkUFD     = 8
	offRemapFrom   = 8
	offRemapTo     = 16
	offRemapLen    = 24
	offRemoveStart = 8
	offRemoveEnd   = 16
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
	return rc&1 != 0, rc&2 != 0, rc&4 != 0, nil
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
