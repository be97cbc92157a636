package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// ErrForeignBacking is returned (wrapped, naming what differs) by
// AdoptLoader for a backing file that cannot be the one a server of this
// snapshot created: another size, kind, owner or seals.
var ErrForeignBacking = errors.New("restore: the backing file is not this snapshot's")

// AdoptInfo says what AdoptLoader found in the backing it adopted.
type AdoptInfo struct {
	Present int // units whose every page was in the page cache: served as they are
	Partial int // units with some pages in it: only the missing pages are filled
	Absent  int // units with none: filled as usual
	// Punched: units the dead server was filling (WithFillJournal): punched
	// out and filled again. Refilling: units it was refilling after a
	// target punched pages out of them, left as they are.
	Punched, Refilling int
	Scan               time.Duration
}

// AdoptLoader is NewLoader for a backing file that already holds the
// snapshot, or part of it: the backing of a server that died, handed back by
// a target that still maps it (restarting `uffdrestore load --adopt`). fd is
// the backing; the loader reopens it (through /proc/self/fd, O_RDWR) and
// the caller keeps fd.
//
// It checks what can be checked cheaply: the file is a memfd (shmem or
// hugetlb, sealed against shrinking and growing) or a hugetlbfs file,
// owned by this process's uid (or root), of exactly the size a backing of
// this snapshot has. Its content cannot be checked without decoding the
// whole snapshot: whoever may hand it back (an allowed uid) could have
// written it, as any shared target can.
//
// Then it learns which units are present: for shmem, mincore on its own
// mapping (a byte per 4 KiB page, the page cache); for hugetlb, where
// mincore reports only this process's page tables and SEEK_DATA is not
// supported, an UFFDIO_CONTINUE probe on its own mapping (it maps a page
// that is in the page cache and fails with EFAULT on one that is not,
// allocating nothing). A unit with every page present is present: it is
// never filled again (a shared target may have written it). A unit with
// no page present is filled as usual. A unit with some pages present is
// filled like one a target punched pages out of: only its missing pages
// are written, the present ones are kept.
func AdoptLoader(ctx context.Context, path string, fd int, opts ...Option) (_ *Loader, info AdoptInfo, err error) {
	t0 := time.Now()
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	f, err := format.Open(path)
	if err != nil {
		return nil, info, fmt.Errorf("restore: open snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	if err := checkNotEmpty(f.Reader, path); err != nil {
		return nil, info, err
	}
	b, err := adoptBacking(fd, f.Reader)
	if err != nil {
		return nil, info, err
	}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	cfg.adopt = &info
	if cfg.mode == ModeEager {
		// Targets are waiting on this loader: fill the rest in the
		// background rather than before serving them.
		cfg.mode = ModePrefetch
	}
	l, err := newLoader(ctx, f, b, cfg, filepath.Base(path))
	if err != nil {
		return nil, info, err
	}
	l.ready = time.Since(t0)
	return l, info, nil
}

// adoptBacking checks fd is a backing of r's snapshot and reopens it.
func adoptBacking(fd int, r *format.Reader) (*backing, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("restore: adopt backing: %w", os.NewSyscallError("fstat", err))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%w: it is not a regular file (mode %#o)", ErrForeignBacking, st.Mode)
	}
	if me := uint32(os.Geteuid()); st.Uid != me && st.Uid != 0 {
		return nil, fmt.Errorf("%w: it belongs to uid %d, not this server's uid %d (a server creates its backing as its own uid)", ErrForeignBacking, st.Uid, me)
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return nil, fmt.Errorf("restore: adopt backing: %w", os.NewSyscallError("fstatfs", err))
	}
	link, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	memfd := strings.HasPrefix(link, "/memfd:")
	var kind BackingKind
	switch {
	case sfs.Type == unix.HUGETLBFS_MAGIC && memfd:
		kind = BackingMemfdHugetlb
	case sfs.Type == unix.HUGETLBFS_MAGIC:
		kind = BackingHugetlbfs
	case sfs.Type == unix.TMPFS_MAGIC && memfd:
		kind = BackingShmem
	default:
		return nil, fmt.Errorf("%w: it is neither a memfd nor a file in a hugetlbfs mount (%s, filesystem %#x)", ErrForeignBacking, link, sfs.Type)
	}
	pageSize := os.Getpagesize()
	size := int64(r.TotalSize())
	if kind.hugetlb() {
		pageSize = int(uffd.DefaultHugePageSize())
		size = roundUp(size, int64(max(r.ChunkSize(), pageSize)))
	}
	size = roundUp(max(size, 1), int64(pageSize))
	if st.Size != size {
		return nil, fmt.Errorf("%w: it is %d bytes, a %v backing of this snapshot is %d", ErrForeignBacking, st.Size, kind, size)
	}
	if kind != BackingHugetlbfs {
		seals, err := uffd.Seals(fd)
		if err != nil {
			return nil, fmt.Errorf("restore: adopt backing: %w", err)
		}
		if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW; seals&want != want {
			return nil, fmt.Errorf("%w: it is not sealed against shrinking and growing (seals %#x), as a server's backing is", ErrForeignBacking, seals)
		}
	}
	own, err := uffd.Reopen(fd, unix.O_RDWR)
	if err != nil {
		return nil, fmt.Errorf("restore: adopt backing: reopen it read-write: %w", err)
	}
	b := backingFromFD(own, kind, size, pageSize)
	b.sealed = kind != BackingHugetlbfs
	return b, nil
}

// adoptPresent marks the units already in the backing's page cache (see
// AdoptLoader). It runs before any view or filler can see the state.
func (e *engine) adoptPresent(info *AdoptInfo) error {
	t0 := time.Now()
	if e.nUnits == 0 {
		return nil
	}
	var err error
	if info.Punched, info.Refilling, err = e.journalRecover(); err != nil {
		return err
	}
	var present func(u uint32) (all, some bool, err error)
	if e.b.kind.hugetlb() {
		// One huge page per unit or more: probe each page with CONTINUE.
		u, err := uffd.Open(viewUffd, uffd.FeatureMinorHugetlbfs)
		if err != nil {
			return fmt.Errorf("restore: adopt: a userfaultfd to probe the huge pages present: %w", err)
		}
		defer u.Close()
		base := e.alias.Addr()
		if _, err := u.Register(base, uintptr(int64(e.nUnits)*int64(e.unitSize)), uffd.ModeMinor); err != nil {
			return fmt.Errorf("restore: adopt: register the backing's mapping: %w", err)
		}
		defer u.Unregister(base, uintptr(int64(e.nUnits)*int64(e.unitSize)))
		ps := uintptr(e.b.pageSize)
		present = func(un uint32) (all, some bool, err error) {
			all = true
			for p := uintptr(0); p < uintptr(e.unitSize); p += ps {
				_, err := u.Continue(base+uintptr(un)*uintptr(e.unitSize)+p, ps, true)
				switch {
				case err == nil:
					some = true
				case errors.Is(err, unix.EFAULT):
					all = false
				default:
					return false, false, fmt.Errorf("restore: adopt: probe unit %d: %w", un, err)
				}
			}
			return all, some, nil
		}
	} else {
		vec := make([]byte, e.unitSize/os.Getpagesize())
		present = func(un uint32) (all, some bool, err error) {
			if err := e.alias.Resident(int(un)*e.unitSize, e.unitSize, vec); err != nil {
				return false, false, fmt.Errorf("restore: adopt: unit %d: %w", un, err)
			}
			all = true
			for _, v := range vec {
				if v&1 != 0 {
					some = true
				} else {
					all = false
				}
			}
			return all, some, nil
		}
	}
	for un := range e.nUnits {
		all, some, err := present(uint32(un))
		if err != nil {
			return err
		}
		switch {
		case all:
			e.state[un].Store(stPresent)
			info.Present++
		case some:
			e.partial[un].Store(true)
			info.Partial++
		default:
			info.Absent++
		}
	}
	e.present.Store(int64(info.Present))
	if info.Present == e.nUnits {
		e.allOnce.Do(func() { close(e.allPresent) })
	}
	info.Scan = time.Since(t0)
	return nil
}

// PlanLayout is the layout NewLoader(ctx, path, opts...) would serve,
// without creating a backing: what `load --adopt` announces to re-attaching
// targets before one of them hands the backing back. BackingAuto resolves as
// NewLoader resolves it now (the huge page pool's free pages included), so
// a restart names the backing the first server used (--backing).
// The second result is the snapshot's SnapshotID.
func PlanLayout(path string, opts ...Option) (Layout, string, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	f, err := format.Open(path)
	if err != nil {
		return Layout{}, "", fmt.Errorf("restore: open snapshot: %w", err)
	}
	defer f.Close()
	if err := checkNotEmpty(f.Reader, path); err != nil {
		return Layout{}, "", err
	}
	kind := cfg.backing
	hp := uffd.DefaultHugePageSize()
	if cfg.forTargets && kind != BackingShmem {
		if _, ok := misalignedRegion(f.Regions(), f.ChunkSize(), uint64(hp)); ok {
			if kind != BackingAuto {
				return Layout{}, "", fmt.Errorf("restore: the snapshot's regions are not on huge-page boundaries: a %v backing cannot serve targets (use --backing shmem)", kind)
			}
			kind = BackingShmem
		}
	}
	size := int64(f.TotalSize())
	if kind == BackingAuto {
		kind = autoBacking(roundUp(size, max(int64(f.ChunkSize()), hp)))
	}
	b := &backing{kind: kind, pageSize: os.Getpagesize()}
	if kind.hugetlb() {
		b.pageSize = int(hp)
		size = roundUp(size, max(int64(f.ChunkSize()), hp))
	}
	b.size = roundUp(max(size, 1), int64(b.pageSize))
	return layoutOf(f.Reader, b, filepath.Base(path)), SnapshotID(f.Reader), nil
}
