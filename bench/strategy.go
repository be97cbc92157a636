package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Env is what every strategy restores from.
type Env struct {
	Snap    string              // the snapshot
	Image   string              // its raw image in Layout form (raw-read reads it; verification compares with it)
	Layout  Layout              // where the bytes are
	Backing restore.BackingKind // for eager, lazy, prefetch and working-set
	// HugetlbfsDir is the hugetlbfs mount of a hugetlbfs backing.
	HugetlbfsDir string
	Workers      int // decoding workers (0: every CPU)
	// Profile is the working set the working-set strategy replays: recorded
	// by Run, per pattern, from an untimed lazy run of the same workload.
	Profile *format.Profile
}

// restoreOptions are the options every restore.Open and NewLoader of the
// bench takes: the backing and the workers.
func (e *Env) restoreOptions(more ...restore.Option) []restore.Option {
	opts := []restore.Option{restore.WithBacking(e.Backing), restore.WithWorkers(e.Workers)}
	if e.HugetlbfsDir != "" {
		opts = append(opts, restore.WithHugetlbfsDir(e.HugetlbfsDir))
	}
	return append(opts, more...)
}

func (e *Env) workers() int {
	if e.Workers > 0 {
		return e.Workers
	}
	return runtime.NumCPU()
}

// Figures are what a strategy knows about its own work.
type Figures struct {
	Faults       int64   // userfaultfd faults served
	FaultLatency Latency // handler-side service time
	BytesDecoded int64
}

// Instance is restored memory, usable from Start's return on.
type Instance interface {
	// Base is the address of Layout offset 0.
	Base() uintptr
	// Bytes is the memory as a slice (Layout.Size bytes or more).
	Bytes() []byte
	// Figures are the strategy's counters, read after the workload.
	Figures(ctx context.Context) (Figures, error)
	// HelperPID is the process serving faults, if not this one (0: none).
	HelperPID() int
	// Settle makes every region page readable from Go code: a strategy
	// whose fault handler is a goroutine of this process has the pages
	// touched from C first (see restore/doc.go, "The in-process trap").
	Settle()
	Close() error
}

// Strategy is one way to restore a snapshot.
type Strategy struct {
	Name  string
	Doc   string
	Start func(ctx context.Context, env *Env) (Instance, error)
}

// Strategies are every strategy, in the default order.
var Strategies = []Strategy{
	{"eager", "restore.Open, ModeEager: decompress every chunk into the backing, then hand over the view", startRestore(restore.ModeEager)},
	{"lazy", "restore.Open, ModeLazy: MINOR faults, a chunk decompressed on its first touch (helper process)", startRestore(restore.ModeLazy)},
	{"prefetch", "restore.Open, ModePrefetch: lazy plus idle workers filling the rest, faults first", startRestore(restore.ModePrefetch)},
	{"working-set", "restore.Open, ModeWorkingSet: lazy plus the working set recorded from an untimed run of the same workload, filled first in recorded order", startWorkingSet},
	{"raw-read", "read(2) the uncompressed image (warm page cache) into anonymous memory, every CPU", startRawRead},
	{"decompress-anon", "decompress every chunk into anonymous memory on every CPU, then use", startDecompressAnon},
	{"uffd-copy", "anonymous 4 KiB pages, MISSING faults, a Go handler decompresses the chunk and UFFDIO_COPYs it", startUffdCopy},
}

// StrategyNames lists the strategy names.
func StrategyNames() []string {
	var out []string
	for _, s := range Strategies {
		out = append(out, s.Name)
	}
	return out
}

// ParseStrategies parses a comma-separated list of strategy names ("all":
// every one).
func ParseStrategies(s string) ([]Strategy, error) {
	var out []Strategy
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if f == "all" {
			out = append(out, Strategies...)
			continue
		}
		i := slices.IndexFunc(Strategies, func(st Strategy) bool { return st.Name == f })
		if i < 0 {
			return nil, fmt.Errorf("bench: unknown mode %q (want %s)", f, strings.Join(StrategyNames(), ", "))
		}
		out = append(out, Strategies[i])
	}
	if len(out) == 0 {
		return nil, errors.New("bench: no mode given")
	}
	return out, nil
}

// IsRestoreMode reports whether name is one of restore's own modes (which
// also run out of process).
func IsRestoreMode(name string) bool { return name == "eager" || name == "lazy" || name == "prefetch" }

// --- restore.Open ---

func startWorkingSet(ctx context.Context, env *Env) (Instance, error) {
	if env.Profile == nil {
		return nil, errors.New("working-set: no profile recorded")
	}
	r, err := restore.Open(ctx, env.Snap, env.restoreOptions(restore.WithProfile(restore.ProfileSource{Profile: env.Profile}))...)
	if err != nil {
		return nil, err
	}
	return &restoreInst{r: r, helper: -1}, nil
}

type restoreInst struct {
	r      *restore.Restore
	helper int
}

func startRestore(mode restore.Mode) func(context.Context, *Env) (Instance, error) {
	return func(ctx context.Context, env *Env) (Instance, error) {
		r, err := restore.Open(ctx, env.Snap, env.restoreOptions(restore.WithMode(mode))...)
		if err != nil {
			return nil, err
		}
		return &restoreInst{r: r, helper: -1}, nil
	}
}

func (ri *restoreInst) Base() uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(ri.r.Bytes()))) }
func (ri *restoreInst) Bytes() []byte { return ri.r.Bytes() }
func (ri *restoreInst) Settle()       {}
func (ri *restoreInst) Close() error  { return ri.r.Close() }
func (ri *restoreInst) HelperPID() int {
	if ri.helper < 0 {
		ri.helper = 0
		if pids := childrenNamed("uffdrestore-helper"); len(pids) == 1 {
			ri.helper = pids[0]
		}
	}
	return ri.helper
}

func (ri *restoreInst) Figures(ctx context.Context) (Figures, error) {
	s, err := ri.r.Stats(ctx)
	if err != nil {
		return Figures{}, err
	}
	return figuresOf(s), nil
}

func figuresOf(s restore.Stats) Figures {
	return Figures{
		Faults: s.FaultsMinor + s.FaultsMissing,
		FaultLatency: Latency{Count: s.FaultLatency.Count, P50: float64(s.FaultLatency.P50), P90: float64(s.FaultLatency.P90),
			P99: float64(s.FaultLatency.P99), Max: float64(s.FaultLatency.Max)},
		BytesDecoded: s.BytesDecoded,
	}
}

// --- anonymous memory ---

type anonMem struct {
	b []byte
}

func mapAnon(size int64) (*anonMem, error) {
	b, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, os.NewSyscallError("mmap anonymous", err)
	}
	return &anonMem{b: b}, nil
}

func (m *anonMem) Base() uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(m.b))) }
func (m *anonMem) Bytes() []byte { return m.b }
func (m *anonMem) HelperPID() int {
	return 0
}
func (m *anonMem) Settle() {}
func (m *anonMem) Close() error {
	if m.b == nil {
		return os.ErrClosed
	}
	err := unix.Munmap(m.b)
	m.b = nil
	return err
}

// parallel runs f(i) for i in [0, n) on workers goroutines and returns the
// first error.
func parallel(n, workers int, f func(w, i int) error) error {
	var next atomic.Int64
	var first atomic.Pointer[error]
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for first.Load() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(w, i); err != nil {
					first.CompareAndSwap(nil, &err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if p := first.Load(); p != nil {
		return *p
	}
	return nil
}

// --- raw-read ---

type rawRead struct{ anonMem }

func (*rawRead) Figures(context.Context) (Figures, error) { return Figures{}, nil }

func startRawRead(ctx context.Context, env *Env) (Instance, error) {
	f, err := os.Open(env.Image)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m, err := mapAnon(env.Layout.Size)
	if err != nil {
		return nil, err
	}
	const block = 8 << 20
	n := int((env.Layout.Size + block - 1) / block)
	fd := int(f.Fd())
	err = parallel(n, env.workers(), func(_, i int) error {
		off := int64(i) * block
		p := m.b[off:min(off+block, env.Layout.Size)]
		for len(p) > 0 {
			k, err := unix.Pread(fd, p, off)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return os.NewSyscallError("pread", err)
			}
			if k == 0 {
				return fmt.Errorf("bench: %s is shorter than the snapshot's layout", env.Image)
			}
			p, off = p[k:], off+int64(k)
		}
		return nil
	})
	runtime.KeepAlive(f)
	if err != nil {
		m.Close()
		return nil, err
	}
	return &rawRead{*m}, nil
}

// --- decompress-anon ---

type decompAnon struct {
	anonMem
	decoded int64
}

func (d *decompAnon) Figures(context.Context) (Figures, error) {
	return Figures{BytesDecoded: d.decoded}, nil
}

func startDecompressAnon(ctx context.Context, env *Env) (Instance, error) {
	f, err := format.Open(env.Snap)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m, err := mapAnon(env.Layout.Size)
	if err != nil {
		return nil, err
	}
	workers := env.workers()
	decs := make([]*format.Decoder, workers)
	for i := range decs {
		decs[i] = f.NewDecoder()
		defer decs[i].Close()
	}
	var decoded atomic.Int64
	err = parallel(f.NumChunks(), workers, func(w, i int) error {
		c := f.Chunk(i)
		if c.Codec == format.CodecZero {
			return nil // fresh anonymous memory is zero already
		}
		off := int64(f.ChunkOffset(i))
		if err := decs[w].DecodeChunk(i, m.b[off:off+int64(c.RawLen)]); err != nil {
			return err
		}
		decoded.Add(int64(c.RawLen))
		return nil
	})
	if err != nil {
		m.Close()
		return nil, err
	}
	return &decompAnon{anonMem: *m, decoded: decoded.Load()}, nil
}

// --- uffd-copy ---

// uffdCopy is the handler most userfaultfd users write today (Firecracker's
// example page-fault handler, most Go handlers): anonymous memory registered
// MISSING, a handler that decompresses the faulting chunk into a buffer and
// resolves it with UFFDIO_COPY. The handler is a goroutine locked to its
// thread, blocking in poll(2); the workload touches from C (touch.Touch), so
// the handler always finds a P.
type uffdCopy struct {
	anonMem
	f      *format.File
	u      *uffd.FD
	wakefd int
	done   chan struct{}
	err    error

	// Written by the handler only; read after it stopped or under mu.
	mu      sync.Mutex
	faults  int64
	decoded int64
	lat     []uint64
	env     *Env
}

func startUffdCopy(ctx context.Context, env *Env) (_ Instance, err error) {
	f, err := format.Open(env.Snap)
	if err != nil {
		return nil, err
	}
	m, err := mapAnon(env.Layout.Size)
	if err != nil {
		f.Close()
		return nil, err
	}
	uc := &uffdCopy{anonMem: *m, f: f, wakefd: -1, done: make(chan struct{}), env: env}
	defer func() {
		if err != nil {
			uc.Close()
		}
	}()
	// 4 KiB pages, as in most handlers (and THP would not survive
	// UFFDIO_COPY anyway).
	if err := unix.Madvise(uc.b, unix.MADV_NOHUGEPAGE); err != nil {
		return nil, os.NewSyscallError("madvise", err)
	}
	if uc.u, err = uffd.Open(uffd.OpenOptions{NonBlock: true, FallbackUserModeOnly: true}, 0); err != nil {
		return nil, fmt.Errorf("bench: uffd-copy: open userfaultfd: %w", err)
	}
	if _, err = uc.u.Register(uc.Base(), uintptr(len(uc.b)), uffd.ModeMissing); err != nil {
		return nil, fmt.Errorf("bench: uffd-copy: register: %w", err)
	}
	if uc.wakefd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("eventfd", err)
	}
	uc.lat = make([]uint64, 0, 2*f.NumChunks())
	go uc.handle()
	return uc, nil
}

func (uc *uffdCopy) handle() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(uc.done)
	cs := uc.f.ChunkSize()
	dec := uc.f.NewDecoder()
	defer dec.Close()
	buf := make([]byte, cs)
	filled := make([]int64, uc.f.NumChunks()) // bytes resolved per chunk, 0: not yet
	msgs := make([]uffd.Msg, 64)
	mb := uffd.NewMsgBuf(len(msgs))
	base := uc.Base()
	size := uintptr(len(uc.b))
	for {
		_, woken, hangup, err := uffd.Poll(uc.u.Fd(), uc.wakefd, -1)
		if err != nil {
			uc.err = err
			return
		}
		if woken || hangup {
			return
		}
		n, err := uc.u.ReadMsgs(mb, msgs)
		if err != nil {
			uc.err = err
			return
		}
		for _, msg := range msgs[:n] {
			if msg.Event != uffd.EventPagefault {
				continue
			}
			t0 := time.Now()
			addr := uintptr(msg.Address)
			if addr < base || addr >= base+size {
				continue
			}
			i := int((addr - base) / uintptr(cs))
			start := base + uintptr(i*cs)
			if filled[i] > 0 {
				if addr < start+uintptr(filled[i]) {
					uc.u.Wake(start, uintptr(filled[i])) // raced with the copy that resolved it
				} else {
					uc.u.ZeroPage(addr&^4095, 4096, false) // past the chunk's bytes
				}
				continue
			}
			span := min(uintptr(cs), base+size-start)
			c := uc.f.Chunk(i)
			var out uffd.Outcome
			if c.Codec == format.CodecZero || c.RawLen == 0 {
				out, err = uc.u.ZeroPage(start, span, false)
			} else {
				if err = dec.DecodeChunk(i, buf); err == nil {
					n := (uintptr(c.RawLen) + 4095) &^ 4095
					clear(buf[c.RawLen:n])
					span = n
					out, err = uc.u.Copy(start, uintptr(unsafe.Pointer(&buf[0])), span, false)
					uc.mu.Lock()
					uc.decoded += int64(c.RawLen)
					uc.mu.Unlock()
				}
			}
			_ = out
			if err != nil {
				uc.err = fmt.Errorf("bench: uffd-copy: chunk %d: %w", i, err)
				return
			}
			filled[i] = int64(span)
			uc.mu.Lock()
			uc.faults++
			uc.lat = append(uc.lat, uint64(time.Since(t0)))
			uc.mu.Unlock()
		}
	}
}

func (uc *uffdCopy) Figures(context.Context) (Figures, error) {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	lat := slices.Clone(uc.lat)
	return Figures{Faults: uc.faults, FaultLatency: LatencyOf(lat), BytesDecoded: uc.decoded}, uc.err
}

// Settle touches every region page from C, so that Go code reading the
// memory afterwards never faults into this process's own handler.
func (uc *uffdCopy) Settle() {
	for _, r := range uc.env.Layout.Regions {
		start := r.Offset &^ 4095
		touch.Touch(uc.Base()+uintptr(start), int(r.Offset+r.Length-start), 4096, false, nil, nil)
	}
}

func (uc *uffdCopy) Close() error {
	if uc.wakefd >= 0 {
		var one = [8]byte{1}
		unix.Write(uc.wakefd, one[:])
		if uc.u != nil {
			<-uc.done
		}
		unix.Close(uc.wakefd)
		uc.wakefd = -1
	}
	var errs []error
	if uc.u != nil {
		errs = append(errs, uc.u.Close())
		uc.u = nil
	}
	if uc.b != nil {
		errs = append(errs, uc.anonMem.Close())
	}
	if uc.f != nil {
		errs = append(errs, uc.f.Close())
		uc.f = nil
	}
	return errors.Join(errs...)
}
