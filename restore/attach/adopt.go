package attach

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// ErrNotThisBacking: a re-attaching target maps a backing file that is not
// the server's.
var ErrNotThisBacking = errors.New("attach: the target's backing file is not this server's")

// Adopter is a Backend that may have no backing yet (BackingFile nil): the
// first re-attaching target hands its backing over, and Adopt makes it the
// server's (PROTOCOL.md §5.1).
type Adopter interface {
	Backend
	Adopt(fd int) error
}

// AdoptBackend serves a snapshot whose backing a re-attaching target hands
// back (`uffdrestore load --adopt`). Until then its hello is plan (no fd:
// "adopting") and it serves no fresh target.
type AdoptBackend struct {
	mu   sync.Mutex
	plan Hello
	open func(fd int) (Backend, error)
	b    Backend
}

// NewAdoptBackend announces plan (the layout the first server had: the
// same snapshot and backing kind) and, for the first re-attaching target,
// calls open with its backing fd (open must not keep fd: it reopens it).
func NewAdoptBackend(plan Hello, open func(fd int) (Backend, error)) *AdoptBackend {
	return &AdoptBackend{plan: plan, open: open}
}

// Backend is the adopted backend, nil until a target handed its backing back.
func (a *AdoptBackend) Backend() Backend {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.b
}

// Hello is the adopted backend's hello, or the plan before.
func (a *AdoptBackend) Hello() Hello {
	if b := a.Backend(); b != nil {
		return b.Hello()
	}
	h := a.plan
	h.Regions = slices.Clone(a.plan.Regions)
	return h
}

// BackingFile is the adopted backing, nil before.
func (a *AdoptBackend) BackingFile() *uffd.File {
	if b := a.Backend(); b != nil {
		return b.BackingFile()
	}
	return nil
}

// AttachView serves a view on the adopted backend.
func (a *AdoptBackend) AttachView(u *uffd.FD, ranges []Range, name string) (View, error) {
	b := a.Backend()
	if b == nil {
		u.Close()
		return nil, errors.New("attach: no backing adopted yet")
	}
	return b.AttachView(u, ranges, name)
}

// Adopt makes fd (a re-attaching target's backing) the backing, unless one
// was adopted already (the caller then checks fd is that one).
func (a *AdoptBackend) Adopt(fd int) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.b != nil {
		return nil
	}
	b, err := a.open(fd)
	if err != nil {
		return fmt.Errorf("adopt the backing this target handed back: %w", err)
	}
	if err := sameLayout(a.plan, b.Hello()); err != nil {
		if c, ok := b.(io.Closer); ok {
			c.Close()
		}
		return err
	}
	a.b = b
	return nil
}

// sameLayout checks that the adopted backing's layout is the one announced.
func sameLayout(plan, got Hello) error {
	if plan.Backing != got.Backing || plan.PageSize != got.PageSize || plan.FileSize != got.FileSize {
		return fmt.Errorf("the backing handed back is %s (pages of %d bytes, %d bytes), this server announced %s (%d, %d): restart it with the first server's --backing",
			got.Backing, got.PageSize, got.FileSize, plan.Backing, plan.PageSize, plan.FileSize)
	}
	if plan.SnapshotID != got.SnapshotID || !slices.Equal(plan.Regions, got.Regions) {
		return errors.New("the adopted backing's layout differs from the one announced")
	}
	return nil
}

// sameFile reports whether fds a and b are the same file.
func sameFile(a, b int) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		return false, os.NewSyscallError("fstat", err)
	}
	if err := unix.Fstat(b, &sb); err != nil {
		return false, os.NewSyscallError("fstat", err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}
