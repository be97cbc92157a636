package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/remote"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

// Layout describes a loaded snapshot as the attach protocol sends it.
type Layout struct {
	Backing   string         `json:"backing"` // "hugetlb" or "shmem"
	PageSize  int            `json:"page_size"`
	ChunkSize int            `json:"chunk_size"`
	FileSize  uint64         `json:"file_size"`
	Snapshot  string         `json:"snapshot"`
	Regions   []LayoutRegion `json:"regions"`
}

// LayoutRegion is one region of the snapshot in the backing file. It is
// also what the attach protocol's hello carries (attach.Region).
type LayoutRegion struct {
	Name   string `json:"name"`
	Offset uint64 `json:"offset"` // offset in the backing file, page aligned
	Size   uint64 `json:"size"`   // bytes mapped: Length rounded up to the page size
	Length uint64 `json:"length"` // the region's true length in bytes
	Addr   uint64 `json:"addr"`   // original virtual address, 0 if unknown
	Prot   uint32 `json:"prot"`   // PROT_READ=1 | PROT_WRITE=2 | PROT_EXEC=4
}

// Loader holds a snapshot loaded into a backing file and serves the faults
// of any number of views on it: the server side of `uffdrestore load`, and
// the engine of the in-process helper.
type Loader struct {
	f         *format.File
	b         *backing
	e         *engine
	layout    Layout
	ready     time.Duration
	start     time.Time // NewLoader's start (zero for a helper's or an adopting loader)
	closeOnce sync.Once
	closed    bool
	mu        sync.Mutex
}

// NewLoader opens the snapshot at path and creates its backing. In eager
// mode it returns once every chunk is in the backing; in prefetch mode the
// fill runs on in the background; in lazy mode nothing is filled until a
// view faults.
func NewLoader(ctx context.Context, path string, opts ...Option) (_ *Loader, err error) {
	t0 := time.Now()
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	var f *format.File
	if remote.IsURL(path) {
		f, err = format.OpenRemote(path, cfg.remote)
	} else {
		f, err = format.Open(path)
	}
	if err != nil {
		return nil, fmt.Errorf("restore: open snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	if err := checkNotEmpty(f.Reader, path); err != nil {
		return nil, err
	}
	// Targets map each region from its offset in the backing: with huge
	// pages, every region must start on a huge-page boundary, which a
	// snapshot of chunks smaller than a huge page does not guarantee.
	if hp := uffd.DefaultHugePageSize(); cfg.forTargets && cfg.backing != BackingShmem {
		if r, ok := misalignedRegion(f.Regions(), f.ChunkSize(), uint64(hp)); ok {
			if cfg.backing != BackingAuto {
				return nil, fmt.Errorf("restore: region %d %q starts at backing offset %d, not a multiple of the %d KiB huge page (the snapshot's chunk size is %d KiB), so a target cannot map it from a %v backing: use --backing shmem, or re-create the snapshot with --chunk-size 2M",
					r, f.Regions()[r].Name, uint64(f.Regions()[r].FirstChunk)*uint64(f.ChunkSize()), hp>>10, f.ChunkSize()>>10, cfg.backing)
			}
			cfg.backing = BackingShmem // auto: the backing every target can map
		}
	}
	size := int64(f.TotalSize())
	if unit := int64(max(f.ChunkSize(), int(uffd.DefaultHugePageSize()))); cfg.backing != BackingShmem {
		size = roundUp(size, unit)
	}
	b, err := newBacking(cfg.backing, size, cfg.hugetlbfsDir)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	l, err := newLoader(ctx, f, b, cfg, filepath.Base(path))
	if err != nil {
		return nil, err
	}
	l.ready, l.start = time.Since(t0), t0
	return l, nil
}

// ErrEmptySnapshot is returned (wrapped, naming the file) for a snapshot
// that holds no memory: there is nothing to restore or serve.
var ErrEmptySnapshot = errors.New("restore: the snapshot holds no memory")

func checkNotEmpty(r *format.Reader, path string) error {
	if r.TotalSize() == 0 {
		return fmt.Errorf("%w: %s holds 0 bytes in %d region(s); re-create it from a non-empty image or process", ErrEmptySnapshot, path, len(r.Regions()))
	}
	return nil
}

func newLoader(ctx context.Context, f *format.File, b *backing, cfg config, name string) (*Loader, error) {
	if rem := f.Remote(); rem != nil {
		cfg.fetchParallel = rem.Parallel()
	}
	e, err := newEngine(f.Reader, b, cfg)
	if err != nil {
		return nil, err
	}
	switch {
	case cfg.journalFile != nil:
		if e.journal, err = mapJournal(int(cfg.journalFile.Fd()), "(the memfd its Open keeps)", e.nUnits, cfg.adopt != nil); err != nil {
			e.close()
			return nil, err
		}
	case cfg.journal != "":
		if e.journal, err = openJournal(cfg.journal, e.nUnits, cfg.adopt != nil); err != nil {
			e.close()
			return nil, err
		}
	}
	if cfg.adopt != nil {
		if err := e.adoptPresent(cfg.adopt); err != nil {
			e.close()
			return nil, err
		}
	}
	l := &Loader{f: f, b: b, e: e}
	l.layout = layoutOf(f.Reader, b, name)
	switch cfg.mode {
	case ModeEager:
		e.extendPrefetch()
		e.startPrefetch()
		select {
		case <-e.allPresent:
		case <-ctx.Done():
			e.close()
			return nil, fmt.Errorf("restore: eager fill: %w", ctx.Err())
		}
		if p := e.c.poisoned.Load(); p > 0 {
			err := e.err()
			e.close()
			return nil, fmt.Errorf("restore: eager fill: %d unit(s) failed: %w", p, err)
		}
	case ModePrefetch:
		e.extendPrefetch()
		e.startPrefetch()
	case ModeWorkingSet:
		e.startPrefetch()
	}
	return l, nil
}

// Layout returns the snapshot's layout in the backing.
func (l *Loader) Layout() Layout { return l.layout }

// BackingFile is the backing file. The loader owns it: callers borrow its
// Fd (to send it, map it) and never Close or Release it.
func (l *Loader) BackingFile() *uffd.File { return l.b.fd }

// BackingKind is the backing actually in use (auto resolved).
func (l *Loader) BackingKind() BackingKind { return l.b.kind }

// AttachView starts serving the faults of u, a userfaultfd on which the
// ranges of the backing are registered MISSING|MINOR. It takes ownership of
// u, also on error.
func (l *Loader) AttachView(u *uffd.FD, ranges []ViewRange, name string) (*View, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		u.Close()
		return nil, os.ErrClosed
	}
	return l.e.newView(u, ranges, name)
}

// Prefetch starts filling every absent unit in the background (faults still
// go first).
func (l *Loader) Prefetch() {
	l.e.extendPrefetch()
	l.e.startPrefetch()
}

// Profile returns the working-set profile recorded so far (WithRecord), or
// an error when the loader is not recording.
func (l *Loader) Profile() (format.Profile, error) {
	if l.e.rec == nil {
		return format.Profile{}, errors.New("restore: not recording (WithRecord)")
	}
	return l.e.rec.profile(l.e.cfg.record), nil
}

// Reader is the snapshot's reader (for SaveProfile, SnapshotID).
func (l *Loader) Reader() *format.Reader { return l.f.Reader }

// Wait fills whatever is not filled yet and waits until every unit is
// present. It returns the engine's error if a unit failed.
func (l *Loader) Wait(ctx context.Context) error {
	l.e.extendPrefetch()
	l.e.startPrefetch()
	select {
	case <-l.e.allPresent:
	case <-ctx.Done():
		return ctx.Err()
	}
	if l.e.c.poisoned.Load() > 0 {
		return l.e.err()
	}
	return nil
}

// Err returns the last fill error (a corrupt chunk, an I/O error), or nil.
func (l *Loader) Err() error { return l.e.err() }

// Stats returns the totals over every view, past and present.
func (l *Loader) Stats() Stats {
	s := l.e.stats()
	s.TimeToReady = l.ready
	if l.e.cfg.mode == ModeEager {
		s.TimeToFirstByte = l.ready
	} else if !s.FirstFaultAt.IsZero() && !l.start.IsZero() {
		s.TimeToFirstByte = s.FirstFaultAt.Sub(l.start)
		s.FirstByte = firstByteTrace(l.start, l.ready, s.FirstByteMarks)
	}
	if rem := l.f.Remote(); rem != nil {
		rs := rem.Stats()
		s.Remote = &rs
	}
	return s
}

// Close stops serving every view, stops the fillers, unmaps, and frees the
// backing (its huge pages go back to the pool once no other process maps
// it). It is idempotent: later calls return os.ErrClosed.
func (l *Loader) Close() error {
	err := os.ErrClosed
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
		l.e.viewsMu.RLock()
		views := append([]*View(nil), l.e.views...)
		l.e.viewsMu.RUnlock()
		for _, v := range views {
			v.Close()
		}
		l.e.close()
		err = l.b.close()
		if cerr := l.f.Close(); err == nil {
			err = cerr
		}
	})
	return err
}

// misalignedRegion returns the first non-empty region whose backing offset
// is not a multiple of page.
func misalignedRegion(rs []format.Region, chunk int, page uint64) (int, bool) {
	for i, r := range rs {
		if r.Length > 0 && uint64(r.FirstChunk)*uint64(chunk)%page != 0 {
			return i, true
		}
	}
	return 0, false
}
