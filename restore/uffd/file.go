package uffd

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// File owns one file descriptor (a memfd, a backing file): Close closes it,
// once; Release hands it on (to an *os.File, a child process) and leaves
// nothing to close. Calls that only use the descriptor borrow it with Fd,
// for as long as the File is open. A File is not closed by the garbage
// collector: one that is dropped without Close leaks its descriptor, which
// the tests' descriptor-leak checks (internal/testutil) report.
//
// Close and Release must not race with each other or with a use of Fd.
type File struct {
	fd int
}

// NewFile takes ownership of fd.
func NewFile(fd int) *File { return &File{fd: fd} }

// Fd is the descriptor, borrowed: valid until Close or Release; -1 after.
func (f *File) Fd() int {
	if f == nil {
		return -1
	}
	return f.fd
}

// Close closes the descriptor. Later calls return os.ErrClosed.
func (f *File) Close() error {
	if f == nil || f.fd < 0 {
		return os.ErrClosed
	}
	fd := f.fd
	f.fd = -1
	if err := unix.Close(fd); err != nil {
		return os.NewSyscallError("close", err)
	}
	return nil
}

// Release gives up ownership: it returns the descriptor (-1 if there is
// none) for the caller to close, and the File is closed.
func (f *File) Release() int {
	if f == nil {
		return -1
	}
	fd := f.fd
	f.fd = -1
	return fd
}

// Dup returns a new File on a close-on-exec duplicate of the descriptor.
func (f *File) Dup() (*File, error) {
	if f == nil || f.fd < 0 {
		return nil, os.ErrClosed
	}
	n, err := unix.FcntlInt(uintptr(f.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return NewFile(n), nil
}

// Reopen opens the file behind fd again, through /proc/self/fd, with flags
// (O_CLOEXEC added): a new open file description, so another access mode
// than fd's (a read-only one of a read-write backing, or the reverse). It
// fails unless what it opened is the file fd is (the same device and
// inode).
func Reopen(fd int, flags int) (*File, error) {
	var st, st2 unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, os.NewSyscallError("fstat", err)
	}
	n, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "reopen", Path: fmt.Sprintf("/proc/self/fd/%d", fd), Err: err}
	}
	if err := unix.Fstat(n, &st2); err != nil || st2.Dev != st.Dev || st2.Ino != st.Ino {
		unix.Close(n)
		return nil, fmt.Errorf("reopen /proc/self/fd/%d: opened another file", fd)
	}
	return NewFile(n), nil
}
