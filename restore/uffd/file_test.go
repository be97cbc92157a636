package uffd

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// isOpen reports whether fd is an open descriptor of this process.
func isOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// TestFileOwnership: Close closes the descriptor once; Release hands it on
// open, leaving nothing for Close; Dup is a close-on-exec descriptor of the
// same file.
func TestFileOwnership(t *testing.T) {
	f, err := MemfdCreate("uffdrestore-file", false, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd := f.Fd()
	if !isOpen(fd) {
		t.Fatalf("MemfdCreate's fd %d is not open", fd)
	}
	d, err := f.Dup()
	if err != nil {
		t.Fatal(err)
	}
	if d.Fd() == fd {
		t.Fatalf("Dup returned the same fd %d", fd)
	}
	if flags, err := unix.FcntlInt(uintptr(d.Fd()), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("Dup's fd flags %#x, %v: want FD_CLOEXEC", flags, err)
	}
	var st1, st2 unix.Stat_t
	unix.Fstat(fd, &st1)
	unix.Fstat(d.Fd(), &st2)
	if st1.Ino != st2.Ino {
		t.Errorf("Dup is another file (inode %d, want %d)", st2.Ino, st1.Ino)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if isOpen(fd) || f.Fd() != -1 {
		t.Fatalf("after Close: fd %d open %v, Fd() = %d", fd, isOpen(fd), f.Fd())
	}
	if err := f.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Close = %v, want os.ErrClosed", err)
	}

	dfd := d.Fd()
	if got := d.Release(); got != dfd {
		t.Fatalf("Release = %d, want %d", got, dfd)
	}
	if !isOpen(dfd) {
		t.Fatal("Release closed the descriptor")
	}
	if err := d.Close(); !errors.Is(err, os.ErrClosed) || !isOpen(dfd) {
		t.Fatalf("Close after Release = %v (fd open %v): want os.ErrClosed and the fd left to its new owner", err, isOpen(dfd))
	}
	unix.Close(dfd)

	var nilFile *File
	if nilFile.Fd() != -1 || nilFile.Release() != -1 || !errors.Is(nilFile.Close(), os.ErrClosed) {
		t.Error("a nil *File is not a closed one")
	}
}

// TestReopen: Reopen opens the same file with another access mode, as a
// descriptor of its own; a closed descriptor is an error.
func TestReopen(t *testing.T) {
	f, err := MemfdCreate("uffdrestore-reopen", false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := unix.Pwrite(f.Fd(), []byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	ro, err := Reopen(f.Fd(), unix.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	var st1, st2 unix.Stat_t
	unix.Fstat(f.Fd(), &st1)
	unix.Fstat(ro.Fd(), &st2)
	if ro.Fd() == f.Fd() || st1.Ino != st2.Ino {
		t.Fatalf("Reopen: fd %d inode %d, want a new fd on inode %d", ro.Fd(), st2.Ino, st1.Ino)
	}
	if _, err := unix.Pwrite(ro.Fd(), []byte("y"), 0); err != unix.EBADF {
		t.Errorf("write through the read-only reopen: %v, want EBADF", err)
	}
	b := make([]byte, 1)
	if _, err := unix.Pread(ro.Fd(), b, 0); err != nil || b[0] != 'x' {
		t.Errorf("read through the reopen: %q, %v", b, err)
	}
	if flags, _ := unix.FcntlInt(uintptr(ro.Fd()), unix.F_GETFD, 0); flags&unix.FD_CLOEXEC == 0 {
		t.Error("the reopened fd is not close-on-exec")
	}
	d, _ := f.Dup()
	dfd := d.Fd()
	d.Close()
	if r, err := Reopen(dfd, unix.O_RDONLY); err == nil {
		r.Close()
		t.Error("Reopen of a closed fd succeeded")
	}
}
