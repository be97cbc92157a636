package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/remote"
	"github.com/uffdrestore/uffdrestore/restore/internal/helperlink"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Restore is a snapshot restored into this process: one view of the whole
// backing, as a []byte, filled lazily (or eagerly) from the snapshot.
//
// In lazy and prefetch modes the faults are served by a helper process (this
// program re-executed, see the package documentation for why), so any Go code
// in this process, on any number of goroutines and with any GOMAXPROCS, may
// touch the view.
type Restore struct {
	cfg    config
	layout Layout
	ready  time.Duration
	start  time.Time // Open's start

	b    *backing
	view *uffd.Mapping
	u    *uffd.FD

	// eager: the loader that filled the backing in this process.
	eager *Loader

	// lazy/prefetch/working-set: the helper process, an attach server
	// whose client is this Restore (restore/helper), replaced when it dies.
	helper *helperSet
	// What a new helper needs: the snapshot (a duplicate, or /dev/null
	// for a remote one) and the fill journal (a memfd).
	snap    *os.File
	journal *os.File

	closeOnce sync.Once

	// A remote snapshot: the helper reads the URL itself, pinned to the
	// version (validator) this process opened.
	remoteURL, remoteValidator string
}

// Open restores the snapshot at path into this process. It returns as soon
// as the view is usable: in lazy mode (the default) nothing has been read
// yet; the first touch of each unit fills it.
func Open(ctx context.Context, path string, opts ...Option) (_ *Restore, err error) {
	t0 := time.Now()
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.mode == ModeEager {
		l, err := NewLoader(ctx, path, opts...)
		if err != nil {
			return nil, err
		}
		r := &Restore{cfg: cfg, layout: l.Layout(), eager: l, b: l.b, start: t0}
		r.view = l.e.alias
		r.ready = time.Since(t0)
		return r, nil
	}
	if helperlink.Start == nil {
		return nil, fmt.Errorf("%w (%v mode serves faults from a helper process)", ErrNoHelper, cfg.mode)
	}
	// The helper process first: its fork, exec and Go runtime start (most
	// of the first byte's wait; on a 2-vCPU VM, 10+ ms) run on a thread of
	// their own (restore/helper starts it without waiting for the exec,
	// which on such a VM took 0.5-3.5 ms, more than the rest of Open) and
	// overlap what Open does here; it gets its job (the configuration,
	// snapshot and backing) at the end, in its socket.
	spawned := takePrestarted(cfg.helperExe())
	tookPrestarted := spawned != nil
	if spawned == nil && helperlink.Spawn != nil {
		if spawned, err = helperlink.Spawn(cfg.helperExe()); err != nil {
			return nil, err
		}
	}
	defer func() {
		if spawned != nil {
			spawned.Abandon()
		}
	}()
	var (
		rd       *format.Reader
		f        *os.File // a local snapshot, handed to the helper
		snapSize int64
		rem      *remote.Reader // a remote one: the helper opens the URL again, pinned to this version
	)
	if remote.IsURL(path) {
		rf, err := format.OpenRemote(path, cfg.remote)
		if err != nil {
			return nil, fmt.Errorf("restore: open snapshot: %w", err)
		}
		defer rf.Close()
		rd, rem, snapSize = rf.Reader, rf.Remote(), rf.FileSize()
		// The helper opens the URL again; it inherits /dev/null in the
		// snapshot's place.
		if f, err = os.Open(os.DevNull); err != nil {
			return nil, err
		}
		defer f.Close()
	} else {
		f, err = os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("restore: open snapshot: %w", err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return nil, fmt.Errorf("restore: open snapshot: %w", err)
		}
		snapSize = st.Size()
		// rd is used only until Open returns (the helper reads the index
		// itself): its index can be in the buffer the last Open used.
		buf, kept := takeIndexBuffer()
		rd, buf, err = format.NewReaderBuffer(f, snapSize, buf)
		if kept {
			defer putIndexBuffer(buf)
		}
		if err == nil {
			err = format.AuthenticateFromEnv(rd)
		}
		if err != nil {
			return nil, fmt.Errorf("restore: open snapshot %s: %w", path, err)
		}
	}
	if err := checkNotEmpty(rd, path); err != nil {
		return nil, err
	}
	size := int64(rd.TotalSize())
	if cfg.backing != BackingShmem {
		size = roundUp(size, int64(max(rd.ChunkSize(), int(uffd.DefaultHugePageSize()))))
	}
	b, err := newBacking(cfg.backing, size, cfg.hugetlbfsDir)
	if err != nil {
		return nil, err
	}
	r := &Restore{cfg: cfg, b: b, start: t0}
	defer func() {
		if err != nil {
			r.release()
		}
	}()
	r.layout = layoutOf(rd, b, filepath.Base(path))

	want := uffd.FeatureMinorShmem | uffd.FeatureMissingShmem
	if b.kind.hugetlb() {
		want = uffd.FeatureMinorHugetlbfs | uffd.FeatureMissingHugetlbfs
	}
	uo := viewUffd
	have, _, err := uffd.Supported(uo)
	if err != nil {
		return nil, fmt.Errorf("restore: %w (see `uffdrestore doctor`)", err)
	}
	if have&uffd.FeaturePoison != 0 {
		want |= uffd.FeaturePoison
	}
	if r.u, err = uffd.Open(uo, want); err != nil {
		return nil, fmt.Errorf("restore: open userfaultfd: %w (see `uffdrestore doctor`)", err)
	}
	if r.view, err = uffd.Mmap(0, int(b.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, b.fd.Fd(), 0); err != nil {
		if errors.Is(err, unix.ENOMEM) && b.kind.hugetlb() {
			return nil, fmt.Errorf("%w: mapping %d MiB of huge pages: %v", ErrNoHugePages, b.size>>20, err)
		}
		return nil, fmt.Errorf("restore: map view: %w", err)
	}
	if _, err = r.u.Register(r.view.Addr(), uintptr(b.size), uffd.ModeMinor|uffd.ModeMissing); err != nil {
		return nil, fmt.Errorf("restore: register view: %w", err)
	}
	if rem != nil {
		r.remoteURL, r.remoteValidator = path, rem.Validator()
	}
	if r.snap, err = dupFile(int(f.Fd()), "snapshot"); err != nil {
		return nil, err
	}
	// The helpers keep a fill journal, so that a new helper knows which
	// units the one that died was in the middle of.
	if r.journal, err = newJournalFile(); err != nil {
		return nil, err
	}
	r.helper = &helperSet{r: r, changed: make(chan struct{})}
	// Under the lock: a helper that dies at once is replaced only once
	// it is the current one.
	r.helper.mu.Lock()
	r.helper.cur, err = r.startHelper(ctx, false, spawned)
	spawned = nil // startHelper owns it
	var ready <-chan struct{}
	if err == nil {
		ready = r.helper.cur.Ready()
	}
	r.helper.mu.Unlock()
	if tookPrestarted {
		replenish(cfg.helperExe(), ready)
	}
	if err != nil {
		return nil, err
	}
	r.ready = time.Since(t0)
	return r, nil
}

// indexBuffer is the memory Open reads a local snapshot's index into, kept
// from one Open to the next (format.NewReaderBuffer): a 4 GiB snapshot's
// index written into fresh memory cost Open 0.1-0.3 ms more than at 256 MiB
// on a VM whose free pages go back to the host. One Open at a time uses
// it; others, meanwhile, allocate.
var indexBuffer struct {
	sync.Mutex
	b    []byte
	busy bool
}

// maxKeptIndex bounds the index buffer kept between Opens (an index of
// 32k chunks; a larger one is read into memory of its own each time).
const maxKeptIndex = 1 << 20

// takeIndexBuffer returns the kept buffer and true, or nil and false while
// another Open has it.
func takeIndexBuffer() ([]byte, bool) {
	indexBuffer.Lock()
	defer indexBuffer.Unlock()
	if indexBuffer.busy {
		return nil, false
	}
	indexBuffer.busy = true
	return indexBuffer.b, true
}

// putIndexBuffer gives back the buffer takeIndexBuffer gave (b is the one
// NewReaderBuffer returned: the same, or a larger one, kept if not too
// large).
func putIndexBuffer(b []byte) {
	indexBuffer.Lock()
	defer indexBuffer.Unlock()
	indexBuffer.busy = false
	if cap(b) <= maxKeptIndex && cap(b) > cap(indexBuffer.b) {
		indexBuffer.b = b
	}
}

// Bytes returns the whole backing as one slice: every region at its Offset
// in Layout. It is invalid after Close.
func (r *Restore) Bytes() []byte { return r.view.Bytes() }

// Layout returns where each region is in Bytes.
func (r *Restore) Layout() Layout { return r.layout }

// Region returns the bytes (its true length) of the one region named name.
// It returns nil when no region has that name, and also when several do
// (names need not be unique: a process snapshot has many "anon" regions):
// use Layout().Lookup, which says which, or Layout().Find and RegionAt.
func (r *Restore) Region(name string) []byte {
	i, err := r.layout.Lookup(name)
	if err != nil {
		return nil
	}
	return r.RegionAt(i)
}

// RegionAt returns the bytes (its true length) of region i, in snapshot
// order (the index of Layout().Regions). It panics if i is out of range.
func (r *Restore) RegionAt(i int) []byte {
	reg := r.layout.Regions[i]
	return r.view.Bytes()[reg.Offset : reg.Offset+reg.Length]
}

// Regions returns every region's bytes, in snapshot order.
func (r *Restore) Regions() [][]byte {
	out := make([][]byte, len(r.layout.Regions))
	for i, reg := range r.layout.Regions {
		out[i] = r.view.Bytes()[reg.Offset : reg.Offset+reg.Length]
	}
	return out
}

// TimeToReady is how long Open took.
func (r *Restore) TimeToReady() time.Duration { return r.ready }

// UserModeOnly reports whether the view's userfaultfd was opened with
// UFFD_USER_MODE_ONLY, because this user may not handle kernel-mode faults
// (not root, no access to /dev/userfaultfd). Then only touches from user
// code wait for a fill: a system call that reads or writes an unfilled page
// of the view (read(2) into it, write(2) from it) fails with EFAULT. Touch
// such pages first, or Wait before handing the view to the kernel.
func (r *Restore) UserModeOnly() bool { return r.u != nil && r.u.Via() == uffd.ViaUserModeOnly }

// Backing is the backing in use (auto resolved).
func (r *Restore) Backing() BackingKind { return r.b.kind }

// Stats returns the restore's figures.
func (r *Restore) Stats(ctx context.Context) (Stats, error) {
	if r.eager != nil {
		s := r.eager.Stats()
		s.TimeToReady, s.TimeToFirstByte = r.ready, r.ready
		return s, nil
	}
	var raw json.RawMessage
	pid, respawns, err := r.helper.do(ctx, func(s helperlink.Session) (err error) {
		raw, err = s.Stats(ctx)
		return err
	})
	if err != nil {
		return Stats{}, err
	}
	var s Stats
	if err := json.Unmarshal(raw, &s); err != nil {
		return Stats{}, fmt.Errorf("restore: stats from the fault-handler helper: %w", err)
	}
	s.TimeToReady = r.ready
	if !s.FirstFaultAt.IsZero() {
		s.TimeToFirstByte = max(r.ready, s.FirstFaultAt.Sub(r.start))
		s.FirstByte = firstByteTrace(r.start, r.ready, s.FirstByteMarks)
	}
	s.HelperPID, s.HelperRespawns = pid, respawns
	return s, nil
}

// Profile returns the working-set profile recorded so far (WithRecord).
func (r *Restore) Profile(ctx context.Context) (format.Profile, error) {
	if r.eager != nil {
		return r.eager.Profile()
	}
	var p format.Profile
	_, _, err := r.helper.do(ctx, func(s helperlink.Session) (err error) {
		p, err = s.Profile(ctx)
		return err
	})
	return p, err
}

// Wait fills every unit not filled yet and returns when all are present
// (at once in eager mode). It returns the engine's last fill error, if
// any: errors.Is matches its cause (format.ErrChecksum for a corrupt
// chunk), also when the helper process reported it. When the helper
// failed (it refused the view, or broke the protocol) Wait returns why.
// A helper that dies is replaced (see ErrHelperDied): Wait then waits for
// the new one.
func (r *Restore) Wait(ctx context.Context) error {
	if r.eager != nil {
		return r.eager.Wait(ctx)
	}
	_, _, err := r.helper.do(ctx, func(s helperlink.Session) error { return s.Wait(ctx) })
	return err
}

// Close unmaps the view, stops the helper and frees the backing. The view's
// bytes must not be used after. Close is idempotent: later calls return
// os.ErrClosed.
func (r *Restore) Close() error {
	err := os.ErrClosed
	r.closeOnce.Do(func() {
		err = r.release()
	})
	return err
}

func (r *Restore) release() error {
	var errs []error
	if r.eager != nil {
		return r.eager.Close()
	}
	if r.view != nil {
		// Unmap first: no new faults can arise.
		errs = append(errs, r.view.Close())
	}
	if r.helper != nil {
		// The helper's session ends when this side hangs up; its exit
		// status says nothing the session did not.
		r.helper.close()
	}
	if r.snap != nil {
		r.snap.Close()
	}
	if r.journal != nil {
		r.journal.Close()
	}
	if r.u != nil {
		r.u.Close()
	}
	if r.b != nil {
		errs = append(errs, r.b.close())
	}
	return errors.Join(errs...)
}

// The helper process.

// ErrNoHelper: a lazy, prefetch or working-set Open in a program that did
// not opt in to the fault-handler helper (see the package documentation).
var ErrNoHelper = errors.New("restore: this program has no fault-handler helper: import _ \"github.com/uffdrestore/uffdrestore/restore/helper\" in its main package (or use WithMode(ModeEager), which needs none)")

// helperConfig is the helper's Loader configuration (helperlink.Request.Config).
type helperConfig struct {
	Mode     Mode          `json:"mode"`
	Workers  int           `json:"workers"`
	Spin     time.Duration `json:"spin"`
	Premap   bool          `json:"premap"`
	Backing  BackingKind   `json:"backing"`
	Size     int64         `json:"size"`
	PageSize int           `json:"page_size"`
	Name     string        `json:"name"`
	Record   string        `json:"record,omitempty"`
	Profile  ProfileSource `json:"profile"`
	Rest     bool          `json:"prefetch_rest,omitempty"`
	// A remote snapshot (the inherited snapshot fd is then /dev/null): its
	// URL and the validator pinned by the parent.
	URL    string         `json:"url,omitempty"`
	Remote remote.Options `json:"remote"`
	// Whether this helper replaces one that died: it adopts the backing
	// (AdoptLoader's rules, with the fill journal it inherits).
	Adopt bool `json:"adopt,omitempty"`
}

// helperExe is the executable run as the helper.
func (c *config) helperExe() string {
	if c.helperPath != "" {
		return c.helperPath
	}
	return "/proc/self/exe"
}

// startHelper starts a helper (or hands the job to spawned, a helper
// started ahead, which it owns from here on).
func (r *Restore) startHelper(ctx context.Context, adopt bool, spawned helperlink.Spawned) (helperlink.Session, error) {
	// The helper gets duplicates (an *os.File's finalizer would close the
	// fd); they are closed once it has its copies.
	backing, err := dupFile(r.b.fd.Fd(), "backing")
	if err != nil {
		if spawned != nil {
			spawned.Abandon()
		}
		return nil, err
	}
	defer backing.Close()
	hc := helperConfig{Mode: r.cfg.mode, Workers: r.cfg.workers, Spin: r.cfg.spin, Premap: r.cfg.premap,
		Backing: r.b.kind, Size: r.b.size, PageSize: r.b.pageSize, Name: r.layout.Snapshot,
		Record: r.cfg.record, Profile: r.cfg.profile, Rest: r.cfg.prefetchRest,
		URL: r.remoteURL, Remote: r.cfg.remote, Adopt: adopt}
	hc.Remote.Validator = r.remoteValidator
	js, err := json.Marshal(hc)
	if err != nil {
		if spawned != nil {
			spawned.Abandon()
		}
		return nil, fmt.Errorf("restore: helper configuration: %w", err)
	}
	return helperlink.Start(ctx, helperlink.Request{
		Exe: r.cfg.helperExe(), Config: js, Spawned: spawned, Workers: r.cfg.workers, Snapshot: r.snap, Backing: backing, Journal: r.journal,
		Uffd: r.u.Fd(), Features: uint64(r.u.Features()), ViewAddr: r.view.Addr(), ViewSize: uint64(r.b.size), PageSize: uint64(r.b.pageSize),
		Reattach: adopt, OnGone: r.helper.gone,
	})
}

// ErrHelperDied ends a lazy, prefetch or working-set restore (from Wait,
// Stats and Profile) whose fault-handler helper process died more than
// MaxHelperRespawns times, or could not be replaced. A thread that touches
// a page of the view not filled yet then stays blocked in its fault:
// nothing else can serve it without risking wrong bytes. Close the restore
// (no fault is pending once the view is unmapped) and Open it again.
//
// Replacing a helper runs Go code in this process, so it needs a P: a
// goroutine blocked in a fault keeps its P unless Go can preempt it there
// (not in assembly such as copy or bytes.Equal). With GOMAXPROCS=1 and the
// only P held so, the replacement waits, as the faults do.
var ErrHelperDied = errors.New("restore: the fault-handler helper died")

// MaxHelperRespawns bounds how many times a restore replaces a helper that
// died.
const MaxHelperRespawns = 3

// helperSet is the helper serving the view now. When one dies (its socket
// closes before Close), a new one is started on the same backing and
// userfaultfd: it adopts the backing (the units present kept, those the
// dead one was filling punched, per the fill journal) and re-attaches the
// view, waking every thread waiting in it, whose faults then come to it.
type helperSet struct {
	r *Restore

	mu       sync.Mutex
	cur      helperlink.Session // nil once closed or dead
	respawns int
	changed  chan struct{} // closed (and replaced) when cur changes
	dead     error         // ErrHelperDied
	closed   bool
}

// do runs f on the current helper; when that helper died meanwhile, it
// runs f again on its successor.
func (h *helperSet) do(ctx context.Context, f func(helperlink.Session) error) (pid, respawns int, err error) {
	for {
		h.mu.Lock()
		s, n, dead, closed := h.cur, h.respawns, h.dead, h.closed
		h.mu.Unlock()
		switch {
		case dead != nil:
			return 0, n, dead
		case closed || s == nil:
			return 0, n, os.ErrClosed
		}
		err := f(s)
		if err == nil || !errors.Is(err, helperlink.ErrGone) {
			return s.Pid(), n, err
		}
		h.mu.Lock()
		ch, replaced := h.changed, h.cur != s || h.dead != nil || h.closed
		h.mu.Unlock()
		if !replaced {
			select {
			case <-ch:
			case <-ctx.Done():
				return 0, n, ctx.Err()
			}
		}
	}
}

// gone replaces s, whose process went away (helperlink.Request.OnGone).
func (h *helperSet) gone(s helperlink.Session, cause error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || h.cur != s {
		return
	}
	s.Close() // reaps it
	defer func() {
		close(h.changed)
		h.changed = make(chan struct{})
	}()
	if h.respawns >= MaxHelperRespawns {
		h.cur = nil
		h.dead = fmt.Errorf("%w %d times (the last: %w); threads touching unfilled pages of the view stay blocked: Close the restore and Open it again", ErrHelperDied, h.respawns+1, cause)
		return
	}
	h.respawns++
	ns, err := h.r.startHelper(context.Background(), true, nil)
	if err != nil {
		h.cur = nil
		h.dead = fmt.Errorf("%w (%w) and a new one could not be started: %w; threads touching unfilled pages of the view stay blocked: Close the restore and Open it again", ErrHelperDied, cause, err)
		return
	}
	h.cur = ns
}

func (h *helperSet) close() {
	h.mu.Lock()
	s := h.cur
	h.closed, h.cur = true, nil
	h.mu.Unlock()
	if s != nil {
		s.Close()
	}
}

func dupFile(fd int, name string) (*os.File, error) {
	n, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return os.NewFile(uintptr(n), name), nil
}

// The helper process's side: restore/helper builds its Loader with this.
func init() { helperlink.NewLoader = newHelperLoader }

// newHelperLoader is the Loader of a helper process: on the backing and
// snapshot its parent created and opened (inherited), configured as the
// parent's Open was.
func newHelperLoader(js []byte, snap, backing, journal *os.File) (any, error) {
	var hc helperConfig
	if err := json.Unmarshal(js, &hc); err != nil {
		return nil, fmt.Errorf("restore: helper configuration: %w", err)
	}
	var f *format.File
	var err error
	if hc.URL != "" {
		f, err = format.OpenRemote(hc.URL, hc.Remote)
	} else {
		// Through /proc/self/fd: the very file the parent opened.
		f, err = format.Open(fmt.Sprintf("/proc/self/fd/%d", snap.Fd()))
	}
	if err != nil {
		return nil, fmt.Errorf("restore: open snapshot: %w", err)
	}
	fd, err := unix.FcntlInt(backing.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		f.Close()
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	b := backingFromFD(uffd.NewFile(fd), hc.Backing, hc.Size, hc.PageSize)
	cfg := defaultConfig()
	cfg.mode, cfg.workers, cfg.spin, cfg.premap = hc.Mode, hc.Workers, hc.Spin, hc.Premap
	cfg.record, cfg.profile, cfg.prefetchRest = hc.Record, hc.Profile, hc.Rest
	cfg.journalFile = journal
	if hc.Adopt {
		// The helper that died may have filled units, and the program may
		// have written them: keep what is present, fill the rest.
		cfg.adopt = &AdoptInfo{}
	}
	l, err := newLoader(context.Background(), f, b, cfg, hc.Name)
	if err != nil {
		b.close()
		f.Close()
		return nil, err
	}
	return l, nil
}
