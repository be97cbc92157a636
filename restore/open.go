package restore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/trace"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/remote"
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

	b    *backing
	view *uffd.Mapping
	u    *uffd.FD

	// eager: the loader that filled the backing in this process.
	eager *Loader

	// lazy/prefetch: the helper process and its control socket.
	helper  *exec.Cmd
	ctl     *os.File
	ctlMu   sync.Mutex
	nextID  atomic.Uint64
	pending sync.Map // id -> chan ctlMsg
	ctlDone chan struct{}
	ctlErr  atomic.Pointer[error]

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
		r := &Restore{cfg: cfg, layout: l.Layout(), eager: l, b: l.b, ctlDone: make(chan struct{})}
		r.view = l.e.alias
		r.ready = time.Since(t0)
		return r, nil
	}
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
		if rd, err = format.NewReader(f, snapSize); err == nil {
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
	r := &Restore{cfg: cfg, b: b, ctlDone: make(chan struct{})}
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
	if r.view, err = uffd.Mmap(0, int(b.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, b.fd, 0); err != nil {
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
	if err = r.startHelper(f, snapSize); err != nil {
		return nil, err
	}
	r.ready = time.Since(t0)
	return r, nil
}

func layoutOf(rd *format.Reader, b *backing, name string) Layout {
	lay := Layout{Backing: b.layoutName(), PageSize: b.pageSize, ChunkSize: rd.ChunkSize(), FileSize: uint64(b.size), Snapshot: name}
	for _, reg := range rd.Regions() {
		lay.Regions = append(lay.Regions, LayoutRegion{
			Name: reg.Name, Offset: uint64(reg.FirstChunk) * uint64(rd.ChunkSize()),
			Size: uint64(roundUp(int64(reg.Length), int64(b.pageSize))), Length: reg.Length, Addr: reg.Addr, Prot: reg.Prot,
		})
	}
	return lay
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
		s.TimeToReady = r.ready
		return s, nil
	}
	m, err := r.call(ctx, ctlMsg{Op: "stats"})
	if err != nil {
		return Stats{}, err
	}
	s := *m.Stats
	s.TimeToReady = r.ready
	return s, nil
}

// Profile returns the working-set profile recorded so far (WithRecord).
func (r *Restore) Profile(ctx context.Context) (format.Profile, error) {
	if r.eager != nil {
		return r.eager.Profile()
	}
	f, err := os.CreateTemp("", "uffdrestore-profile-*.json")
	if err != nil {
		return format.Profile{}, err
	}
	f.Close()
	defer os.Remove(f.Name())
	if _, err := r.call(ctx, ctlMsg{Op: "profile", Path: f.Name()}); err != nil {
		return format.Profile{}, err
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		return format.Profile{}, err
	}
	var p format.Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return format.Profile{}, fmt.Errorf("restore: profile from the helper: %w", err)
	}
	return p, nil
}

// Wait fills every unit not filled yet and returns when all are present
// (at once in eager mode). It returns the first fill error, if any.
func (r *Restore) Wait(ctx context.Context) error {
	if r.eager != nil {
		return r.eager.Wait(ctx)
	}
	_, err := r.call(ctx, ctlMsg{Op: "wait"})
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
	if r.ctl != nil {
		// shutdown, not just close: the reader goroutine blocked in
		// recvmsg holds the socket open, so only shutdown sends the helper
		// its EOF (and wakes the reader).
		unix.Shutdown(int(r.ctl.Fd()), unix.SHUT_RDWR)
	}
	if r.helper != nil {
		done := make(chan error, 1)
		go func() { done <- r.helper.Wait() }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			r.helper.Process.Kill()
			<-done
		}
		<-r.ctlDone
		r.ctl.Close()
	} else if r.ctl != nil {
		r.ctl.Close()
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

const helperEnv = "_UFFDRESTORE_HELPER"

type helperConfig struct {
	Mode        Mode          `json:"mode"`
	Workers     int           `json:"workers"`
	Spin        time.Duration `json:"spin"`
	Premap      bool          `json:"premap"`
	Backing     BackingKind   `json:"backing"`
	Size        int64         `json:"size"`
	PageSize    int           `json:"page_size"`
	SnapSize    int64         `json:"snap_size"`
	ViewBase    uintptr       `json:"view_base"`
	UffdFeature uint64        `json:"uffd_features"`
	Name        string        `json:"name"`
	Record      string        `json:"record,omitempty"`
	Profile     ProfileSource `json:"profile"`
	Rest        bool          `json:"prefetch_rest,omitempty"`
	// A remote snapshot (fd 3 is then closed): its URL and the validator
	// pinned by the parent.
	URL    string         `json:"url,omitempty"`
	Remote remote.Options `json:"remote"`
}

// ctlMsg is a message on the control socket between a Restore and its
// helper: a request ({id, op}) or its reply ({id, ok, error, stats}).
type ctlMsg struct {
	ID    uint64 `json:"id"`
	Op    string `json:"op,omitempty"` // stats, wait, prefetch; "ready" from the helper
	Error string `json:"error,omitempty"`
	Stats *Stats `json:"stats,omitempty"`
	Path  string `json:"path,omitempty"` // profile: where the helper writes it
}

func (r *Restore) startHelper(snap *os.File, snapSize int64) error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("socketpair", err)
	}
	r.ctl = os.NewFile(uintptr(fds[0]), "uffdrestore-ctl")
	child := os.NewFile(uintptr(fds[1]), "uffdrestore-ctl-helper")
	defer child.Close()
	// ExtraFiles wants *os.File, whose finalizer would close the fd: hand
	// it duplicates and close those once the helper has its copies.
	backing, err := dupFile(r.b.fd, "backing")
	if err != nil {
		return err
	}
	defer backing.Close()
	uf, err := dupFile(r.u.Fd(), "uffd")
	if err != nil {
		return err
	}
	defer uf.Close()
	hc := helperConfig{Mode: r.cfg.mode, Workers: r.cfg.workers, Spin: r.cfg.spin, Premap: r.cfg.premap,
		Backing: r.b.kind, Size: r.b.size, PageSize: r.b.pageSize, SnapSize: snapSize,
		ViewBase: r.view.Addr(), UffdFeature: uint64(r.u.Features()), Name: r.layout.Snapshot,
		Record: r.cfg.record, Profile: r.cfg.profile, Rest: r.cfg.prefetchRest,
		URL: r.remoteURL, Remote: r.cfg.remote}
	hc.Remote.Validator = r.remoteValidator
	js, _ := json.Marshal(hc)
	exe := r.cfg.helperPath
	if exe == "" {
		exe = "/proc/self/exe"
	}
	cmd := exec.Command(exe)
	cmd.Args = []string{"uffdrestore-helper"}
	env := []string{helperEnv + "=" + string(js)}
	for _, kv := range os.Environ() {
		// The helper sizes its own runtime: the caller's GOMAXPROCS (1 in a
		// test, say) must not starve the fillers.
		if !strings.HasPrefix(kv, "GOMAXPROCS=") && !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{snap, backing, uf, child} // fds 3 (nil: a remote snapshot), 4, 5, 6
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("restore: start fault-handler helper %s: %w", exe, err)
	}
	r.helper = cmd
	go r.readCtl()
	return nil
}

func dupFile(fd int, name string) (*os.File, error) {
	n, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return os.NewFile(uintptr(n), name), nil
}

func (r *Restore) readCtl() {
	defer close(r.ctlDone)
	buf := make([]byte, 64<<10)
	for {
		n, _, _, _, err := unix.Recvmsg(int(r.ctl.Fd()), buf, nil, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			e := errors.New("restore: the fault-handler helper exited; touching unfilled pages will block (Close the restore and Open it again)")
			if err != nil && !errors.Is(err, unix.EBADF) {
				e = fmt.Errorf("%w: %v", e, err)
			}
			r.ctlErr.Store(&e)
			r.pending.Range(func(k, v any) bool {
				v.(chan ctlMsg) <- ctlMsg{Error: e.Error()}
				r.pending.Delete(k)
				return true
			})
			return
		}
		var m ctlMsg
		if json.Unmarshal(buf[:n], &m) != nil {
			continue
		}
		if ch, ok := r.pending.LoadAndDelete(m.ID); ok {
			ch.(chan ctlMsg) <- m
		}
	}
}

func (r *Restore) call(ctx context.Context, req ctlMsg) (ctlMsg, error) {
	if p := r.ctlErr.Load(); p != nil {
		return ctlMsg{}, *p
	}
	req.ID = r.nextID.Add(1)
	ch := make(chan ctlMsg, 1)
	r.pending.Store(req.ID, ch)
	b, _ := json.Marshal(req)
	r.ctlMu.Lock()
	_, err := r.ctl.Write(b)
	r.ctlMu.Unlock()
	if err != nil {
		r.pending.Delete(req.ID)
		return ctlMsg{}, fmt.Errorf("restore: talk to the fault-handler helper: %w", err)
	}
	select {
	case m := <-ch:
		if m.Error != "" {
			return m, errors.New(m.Error)
		}
		return m, nil
	case <-ctx.Done():
		r.pending.Delete(req.ID)
		return ctlMsg{}, ctx.Err()
	}
}

func init() {
	if js, ok := os.LookupEnv(helperEnv); ok && len(os.Args) > 0 && os.Args[0] == "uffdrestore-helper" {
		os.Exit(helperMain(js))
	}
}

// helperMain serves the faults of the parent's view until the parent closes
// the control socket.
func helperMain(js string) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "uffdrestore-helper:", err)
		return 1
	}
	var hc helperConfig
	if err := json.Unmarshal([]byte(js), &hc); err != nil {
		return fail(err)
	}
	// UFFDRESTORE_HELPER_TRACE=FILE writes a Go execution trace of the
	// helper (go tool trace), for looking into where a restore waits.
	if p := os.Getenv("UFFDRESTORE_HELPER_TRACE"); p != "" {
		if f, err := os.Create(fmt.Sprintf("%s.%d", p, os.Getpid())); err == nil {
			if trace.Start(f) == nil {
				defer func() { trace.Stop(); f.Close() }()
			}
		}
	}
	// One more P than filler workers: a fault loop that wakes up must not
	// wait for a P while every P decodes a chunk (Go preempts those only
	// every 10 ms). Measured with a trace of the helper: without it, fault
	// loops and fillers spent 260 ms runnable without a P in a 320 ms
	// working-set restore.
	workers := hc.Workers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	runtime.GOMAXPROCS(workers + 1)
	ctl := os.NewFile(6, "ctl")
	var rd *format.Reader
	var rem *remote.Reader
	if hc.URL != "" {
		rf, err := format.OpenRemote(hc.URL, hc.Remote)
		if err != nil {
			return fail(err)
		}
		defer rf.Close()
		rd, rem = rf.Reader, rf.Remote()
	} else {
		snap := os.NewFile(3, "snapshot")
		var err error
		if rd, err = format.NewReader(snap, hc.SnapSize); err == nil {
			err = format.AuthenticateFromEnv(rd)
		}
		if err != nil {
			return fail(err)
		}
	}
	b := backingFromFD(4, hc.Backing, hc.Size, hc.PageSize)
	cfg := defaultConfig()
	cfg.mode, cfg.workers, cfg.spin, cfg.premap = hc.Mode, hc.Workers, hc.Spin, hc.Premap
	cfg.record, cfg.profile, cfg.prefetchRest = hc.Record, hc.Profile, hc.Rest
	if rem != nil {
		cfg.fetchParallel = rem.Parallel()
	}
	e, err := newEngine(rd, b, cfg)
	if err != nil {
		return fail(err)
	}
	switch cfg.mode {
	case ModePrefetch:
		e.extendPrefetch()
		e.startPrefetch()
	case ModeWorkingSet:
		e.startPrefetch()
	}
	u := uffd.FromFD(5, uffd.Features(hc.UffdFeature))
	v, err := e.newView(u, []ViewRange{{Base: hc.ViewBase, Size: uint64(hc.Size)}}, hc.Name)
	if err != nil {
		return fail(err)
	}
	go func() {
		// A fault it could not answer ended the view: say why (the
		// faulting thread waits; Wait and Stats return the error too).
		<-v.Done()
		if err := v.Err(); err != nil {
			fmt.Fprintln(os.Stderr, "uffdrestore-helper:", err)
		}
	}()
	reply := func(m ctlMsg) {
		b, _ := json.Marshal(m)
		ctl.Write(b)
	}
	var wg sync.WaitGroup
	buf := make([]byte, 4096)
	for {
		n, err := ctl.Read(buf)
		if err != nil || n == 0 {
			break
		}
		var m ctlMsg
		if json.Unmarshal(buf[:n], &m) != nil {
			continue
		}
		switch m.Op {
		case "stats":
			s := e.stats()
			if rem != nil {
				rs := rem.Stats()
				s.Remote = &rs
			}
			reply(ctlMsg{ID: m.ID, Stats: &s})
		case "wait":
			e.extendPrefetch()
			e.startPrefetch()
			wg.Add(1)
			go func(id uint64) {
				defer wg.Done()
				<-e.allPresent
				rep := ctlMsg{ID: id}
				if e.c.poisoned.Load() > 0 {
					rep.Error = e.err().Error()
				}
				reply(rep)
			}(m.ID)
		case "prefetch":
			e.extendPrefetch()
			e.startPrefetch()
			reply(ctlMsg{ID: m.ID})
		case "profile":
			if e.rec == nil {
				reply(ctlMsg{ID: m.ID, Error: "restore: not recording (WithRecord)"})
				break
			}
			// Profiles can be larger than a SEQPACKET message: the
			// helper writes it to the file the parent named.
			p := e.rec.profile(cfg.record)
			rep := ctlMsg{ID: m.ID}
			if b, err := json.Marshal(p); err != nil {
				rep.Error = err.Error()
			} else if err := os.WriteFile(m.Path, b, 0o600); err != nil {
				rep.Error = fmt.Sprintf("restore: write profile: %v", err)
			}
			reply(rep)
		default:
			reply(ctlMsg{ID: m.ID, Error: "unknown op " + m.Op})
		}
	}
	v.Close()
	e.close()
	return 0
}
