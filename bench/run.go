package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sync"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore"
	"golang.org/x/sys/unix"
)

// Metric names, in table order. Every run reports every one of them (0
// where a metric does not apply, e.g. fault latency without faults).
const (
	MReady      = "ready_ms"       // t0 "start restore" → "memory usable"
	MFirstByte  = "first_byte_ms"  // t0 → the first touch returned: what a user waits for the first byte
	MFirstTouch = "first_touch_ms" // ready → the first touch returned
	MComplete   = "complete_ms"    // t0 → the access pattern is done
	MLoaded     = "loaded_ms"      // t0 → the restorer is ready to serve (out of process: loader + socket; in process: = ready)
	MTouches    = "touches"        // pages touched
	MFaults     = "faults"         // userfaultfd faults served
	MFaultP50   = "fault_p50_us"   // handler-side fault service time
	MFaultP90   = "fault_p90_us"   //
	MFaultP99   = "fault_p99_us"   //
	MFaultMax   = "fault_max_us"   //
	MTouchP50   = "touch_p50_us"   // latency of one touch as the toucher saw it
	MTouchP90   = "touch_p90_us"   //
	MTouchP99   = "touch_p99_us"   //
	MTouchMax   = "touch_max_us"   //
	MDecoded    = "decoded_mib"    // bytes decompressed
	MCPU        = "cpu_ms"         // user+system CPU of the restorer, helper and target processes
	MCPUUser    = "cpu_user_ms"    // of which user (this process and reaped children)
	MCPUSys     = "cpu_sys_ms"     // of which system (this process and reaped children)
	MHelperCPU  = "helper_cpu_ms"  // of which the in-process restore's helper process
	MMinflt     = "minflt"         // kernel minor page faults (rusage, self + reaped children)
	MRSSPeak    = "rss_peak_mib"   // VmHWM of this process (reset before each run)
	MHelperRSS  = "helper_rss_mib" // VmHWM of the helper process
	MHugetlb    = "hugetlb_mib"    // huge pages taken from the pool during the run
	MMemPeak    = "mem_peak_mib"   // rss_peak + helper_rss + hugetlb
	MVerifiedOK = "verified"       // 1: the memory equalled the image byte for byte
)

// Metrics lists every metric name in table order.
var Metrics = []string{MReady, MFirstByte, MFirstTouch, MComplete, MLoaded, MTouches, MFaults, MFaultP50, MFaultP90, MFaultP99, MFaultMax,
	MTouchP50, MTouchP90, MTouchP99, MTouchMax, MDecoded, MCPU, MCPUUser, MCPUSys, MHelperCPU, MMinflt,
	MRSSPeak, MHelperRSS, MHugetlb, MMemPeak, MVerifiedOK}

// RunResult is one run of one case.
type RunResult struct {
	Strategy     string             `json:"strategy"`
	Pattern      string             `json:"pattern"`
	Backing      string             `json:"backing,omitempty"` // a --backing matrix's backing
	OutOfProcess bool               `json:"out_of_process,omitempty"`
	Run          int                `json:"run"` // -1: warm-up (not in the summary)
	Metrics      map[string]float64 `json:"metrics"`
	TouchCDF     []CDFPoint         `json:"touch_cdf,omitempty"`
	Error        string             `json:"error,omitempty"`
}

// Config is a benchmark to run.
type Config struct {
	Env          *Env
	Strategies   []Strategy
	Patterns     []Pattern
	Threads      int  // touching threads (default 1)
	Runs         int  // timed runs of every case (default 5)
	NoWarmup     bool // skip the untimed warm-up pass
	OutOfProcess bool // eager/lazy/prefetch through Target over the attach protocol
	// Backings, when more than one, runs every restore strategy (eager,
	// lazy, prefetch, working-set) on each of them (a --backing matrix);
	// the others run once. Empty or one: Env.Backing.
	Backings []restore.BackingKind
	Target   string // bin/uffdrestore-target
	Seed     uint64
	// Cold drops the snapshot file (and the raw image) from the page cache
	// before every run, as a restore from disk after a reboot would find it.
	Cold bool
	// ProfileOut, with the working-set strategy, saves the recorded working
	// set (of the first pattern) as a sidecar profile file, e.g. for
	// `uffdrestore snapshot reorder --profile-file`.
	ProfileOut string
	// Log receives one line per run (may be nil).
	Log func(format string, args ...any)
}

// Case is one strategy under one pattern (on one backing of a matrix).
type Case struct {
	Strategy     Strategy
	Pattern      Pattern
	OutOfProcess bool
	// Backing is set in a --backing matrix, for the strategies that
	// restore into a backing.
	Backing    restore.BackingKind
	HasBacking bool
}

// Name is "strategy", "strategy (out-of-process)", with " [backing]" in a
// matrix.
func (c Case) Name() string {
	n := c.Strategy.Name
	if c.OutOfProcess {
		n += " (out-of-process)"
	}
	if c.HasBacking {
		n += " [" + c.Backing.String() + "]"
	}
	return n
}

func (c Case) backingName() string {
	if c.HasBacking {
		return c.Backing.String()
	}
	return ""
}

// usesBacking reports whether strategy name restores into a restore
// backing (and so runs once per backing of a matrix).
func usesBacking(name string) bool { return IsRestoreMode(name) || name == "working-set" }

// Cases returns the cases of cfg, pattern-major, and notes on what was
// left out.
func (cfg *Config) Cases() ([]Case, []string) {
	var out []Case
	var notes []string
	matrix := len(cfg.Backings) > 1
	for _, p := range cfg.Patterns {
		for _, s := range cfg.Strategies {
			c := Case{Strategy: s, Pattern: p, OutOfProcess: cfg.OutOfProcess}
			if cfg.OutOfProcess && !IsRestoreMode(s.Name) {
				if p == cfg.Patterns[0] {
					notes = append(notes, fmt.Sprintf("%s has no out-of-process form: run in-process", s.Name))
				}
				c.OutOfProcess = false
			}
			if !matrix || !usesBacking(s.Name) {
				out = append(out, c)
				continue
			}
			for _, b := range cfg.Backings {
				c.Backing, c.HasBacking = b, true
				out = append(out, c)
			}
		}
	}
	return out, notes
}

// Run runs the benchmark: every case interleaved over cfg.Runs runs after one
// untimed warm-up pass. A run whose memory is not the image byte for byte is
// an error.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Threads <= 0 {
		cfg.Threads = 1
	}
	if cfg.Runs <= 0 {
		cfg.Runs = 5
	}
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	if cfg.OutOfProcess && cfg.Target == "" {
		return nil, errors.New("bench: --out-of-process needs the example target (bin/uffdrestore-target)")
	}
	cases, notes := cfg.Cases()
	rep := &Report{Machine: ThisMachine(), Threads: cfg.Threads, RunsPerCase: cfg.Runs, Notes: notes, Layout: cfg.Env.Layout}
	if f, err := format.Open(cfg.Env.Snap); err == nil {
		rep.Snapshot = SnapshotInfo{Path: cfg.Env.Snap, RawBytes: int64(f.RawSize()), StoredBytes: int64(f.StoredSize()),
			FileBytes: f.FileSize(), Chunks: f.NumChunks(), ChunkSize: f.ChunkSize()}
		counts := map[string]int{}
		for i := 0; i < f.NumChunks(); i++ {
			counts[f.Chunk(i).Codec.String()]++
		}
		rep.Snapshot.Codecs = counts
		f.Close()
	} else {
		return nil, err
	}
	pages := cfg.Env.Layout.Pages()
	// A working set is a property of a stable workload: with the
	// working-set strategy every run touches the same order (the seed does
	// not change between runs), and the profile is recorded first, per
	// pattern, by an untimed lazy restore running that very workload.
	stable := slices.ContainsFunc(cfg.Strategies, func(s Strategy) bool { return s.Name == "working-set" })
	profiles := map[string]*format.Profile{}
	if stable {
		rep.Notes = append(rep.Notes, "working-set: every run touches the same order (a stable working set); the profile was recorded by an untimed lazy run of that workload")
		for _, p := range cfg.Patterns {
			prof, err := recordProfile(ctx, cfg.Env, p.Order(pages, cfg.Seed+1000003), cfg.Threads)
			if err != nil {
				return rep, fmt.Errorf("bench: record the working set for %s: %w", p, err)
			}
			cfg.Log("%-26s %-14s recorded a working set of %d chunks", "working-set", p, len(prof.Entries))
			profiles[p.String()] = prof
			if cfg.ProfileOut != "" && p == cfg.Patterns[0] {
				if err := saveSidecar(cfg.ProfileOut, cfg.Env.Snap, *prof); err != nil {
					return rep, fmt.Errorf("bench: --profile-out: %w", err)
				}
			}
		}
	}
	for _, sl := range Schedule(len(cases), cfg.Runs, !cfg.NoWarmup) {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		c := cases[sl.Case]
		env := *cfg.Env
		if c.HasBacking {
			env.Backing = c.Backing
		}
		seed := cfg.Seed + uint64(sl.Run+1)*1000003
		if stable {
			seed = cfg.Seed + 1000003
			env.Profile = profiles[c.Pattern.String()]
		}
		if cfg.Cold {
			if err := DropFromPageCache(cfg.Env.Snap, cfg.Env.Image); err != nil {
				return rep, fmt.Errorf("bench: --cold: %w", err)
			}
		}
		var r RunResult
		if c.OutOfProcess {
			r = runOutOfProcess(ctx, &env, c.Strategy.Name, c.Pattern, cfg.Threads, cfg.Target, seed)
		} else {
			r = runInProcess(ctx, &env, c.Strategy, c.Pattern.Order(pages, seed), cfg.Threads, nil)
		}
		r.Strategy, r.Pattern, r.Backing, r.OutOfProcess, r.Run = c.Strategy.Name, c.Pattern.String(), c.backingName(), c.OutOfProcess, sl.Run
		what := fmt.Sprintf("run %d", sl.Run+1)
		if sl.Warmup() {
			what = "warm-up"
		}
		if r.Error != "" {
			cfg.Log("%-26s %-14s %-7s FAILED: %s", c.Name(), c.Pattern, what, r.Error)
			rep.Runs = append(rep.Runs, r)
			return rep, fmt.Errorf("bench: %s, %s, %s: %s", c.Name(), c.Pattern, what, r.Error)
		}
		cfg.Log("%-26s %-14s %-7s ready %9.2f ms  complete %9.2f ms  faults %6.0f  verified",
			c.Name(), c.Pattern, what, r.Metrics[MReady], r.Metrics[MComplete], r.Metrics[MFaults])
		rep.Runs = append(rep.Runs, r)
	}
	rep.summarize(cases)
	return rep, nil
}

func saveSidecar(path, snap string, p format.Profile) error {
	f, err := format.Open(snap)
	if err != nil {
		return err
	}
	defer f.Close()
	return restore.SaveProfile(path, f.Reader, p)
}

// DropFromPageCache evicts files' clean pages from the page cache
// (posix_fadvise DONTNEED after fdatasync), so the next read comes from the
// disk.
func DropFromPageCache(paths ...string) error {
	for _, p := range paths {
		if p == "" {
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		unix.Fdatasync(int(f.Fd()))
		err = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		f.Close()
		if err != nil {
			return os.NewSyscallError("posix_fadvise", err)
		}
	}
	return nil
}

// recordProfile runs the workload once on a lazy restore that records its
// first-touch order.
func recordProfile(ctx context.Context, env *Env, order []uint32, threads int) (*format.Profile, error) {
	r, err := restore.Open(ctx, env.Snap, env.restoreOptions(restore.WithRecord("bench"))...)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	base := uintptr(unsafe.Pointer(unsafe.SliceData(r.Bytes())))
	touchSplit(base, len(r.Bytes()), order, nil, threads)
	p, err := r.Profile(ctx)
	if err != nil {
		return nil, err
	}
	return &p, nil
}

// touchSplit touches order from threads goroutines, each in touch.Touch.
func touchSplit(base uintptr, size int, order []uint32, lat []uint64, threads int) {
	var wg sync.WaitGroup
	for t := 0; t < threads; t++ {
		lo, hi := len(order)*t/threads, len(order)*(t+1)/threads
		var l []uint64
		if lat != nil {
			l = lat[lo:hi]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			touch.Touch(base, size, 4096, false, order[lo:hi], l)
		}()
	}
	wg.Wait()
}

// runInProcess restores with s and touches order (4 KiB page indexes) from
// threads goroutines, each in touch.Touch (C, with its P released).
// timedDone, if set, is called when the timed part ends (b.StopTimer).
func runInProcess(ctx context.Context, env *Env, s Strategy, order []uint32, threads int, timedDone func()) RunResult {
	res := RunResult{Metrics: map[string]float64{}}
	fail := func(err error) RunResult { res.Error = err.Error(); return res }
	if len(order) == 0 {
		return fail(errors.New("no pages to touch"))
	}
	lat := make([]uint64, len(order))
	threads = max(1, min(threads, len(order)-1))
	size := int(env.Layout.Size)

	runtime.GC()
	resetPeakRSS()
	mi0 := Meminfo()
	su0, ss0, sf0 := rusage(unix.RUSAGE_SELF)
	cu0, cs0, cf0 := rusage(unix.RUSAGE_CHILDREN)

	t0 := time.Now()
	inst, err := s.Start(ctx, env)
	if err != nil {
		return fail(err)
	}
	defer inst.Close()
	ready := time.Since(t0)
	base := inst.Base()
	touch.Touch(base, size, 4096, false, order[:1], lat[:1])
	firstByte := time.Since(t0) - ready
	touchSplit(base, size, order[1:], lat[1:], threads)
	complete := time.Since(t0)
	if timedDone != nil {
		timedDone()
	}

	su1, ss1, sf1 := rusage(unix.RUSAGE_SELF)
	cu1, cs1, cf1 := rusage(unix.RUSAGE_CHILDREN)
	var helperCPU, helperRSS int64
	if pid := inst.HelperPID(); pid > 0 {
		helperCPU = cpuNS(pid)
		helperRSS = procStatusKiB(pid, "VmHWM") << 10
	}
	selfRSS := procStatusKiB(0, "VmHWM") << 10
	mi1 := Meminfo()
	hugetlb := max(0, mi0["HugePages_Free"]-mi1["HugePages_Free"]) * mi1["Hugepagesize"] << 10
	figs, err := inst.Figures(ctx)
	if err != nil {
		return fail(fmt.Errorf("stats: %w", err))
	}

	m := res.Metrics
	m[MReady] = ms(ready)
	m[MFirstByte] = ms(ready + firstByte)
	m[MFirstTouch] = ms(firstByte)
	m[MComplete] = ms(complete)
	m[MLoaded] = ms(ready)
	m[MTouches] = float64(len(order))
	setFaults(m, figs)
	tl := LatencyOf(lat)
	setTouch(m, tl)
	res.TouchCDF = CDF(lat, 120)
	user := (su1 - su0) + (cu1 - cu0)
	sys := (ss1 - ss0) + (cs1 - cs0)
	m[MCPUUser], m[MCPUSys] = nsToMS(user), nsToMS(sys)
	m[MHelperCPU] = nsToMS(helperCPU)
	m[MCPU] = nsToMS(user + sys + helperCPU)
	m[MMinflt] = float64((sf1 - sf0) + (cf1 - cf0))
	m[MRSSPeak] = mib(selfRSS)
	m[MHelperRSS] = mib(helperRSS)
	m[MHugetlb] = mib(hugetlb)
	m[MMemPeak] = mib(selfRSS + helperRSS + hugetlb)

	// The timed part is over: check the memory is the image.
	inst.Settle()
	if err := VerifyMemory(env.Image, env.Layout, inst.Bytes()); err != nil {
		return fail(err)
	}
	m[MVerifiedOK] = 1
	if err := inst.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return fail(fmt.Errorf("close: %w", err))
	}
	return res
}

func setFaults(m map[string]float64, f Figures) {
	m[MFaults] = float64(f.Faults)
	m[MFaultP50] = f.FaultLatency.P50 / 1e3
	m[MFaultP90] = f.FaultLatency.P90 / 1e3
	m[MFaultP99] = f.FaultLatency.P99 / 1e3
	m[MFaultMax] = f.FaultLatency.Max / 1e3
	m[MDecoded] = mib(f.BytesDecoded)
}

func setTouch(m map[string]float64, l Latency) {
	m[MTouchP50] = l.P50 / 1e3
	m[MTouchP90] = l.P90 / 1e3
	m[MTouchP99] = l.P99 / 1e3
	m[MTouchMax] = l.Max / 1e3
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }
func nsToMS(ns int64) float64    { return float64(ns) / 1e6 }
func mib(b int64) float64        { return float64(b) / (1 << 20) }

// VerifyMemory compares every region of mem with the image file, byte for
// byte, and names the first difference.
func VerifyMemory(image string, l Layout, mem []byte) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 8<<20)
	for _, r := range l.Regions {
		if r.Offset+r.Length > int64(len(mem)) {
			return fmt.Errorf("verify: region %s [%d, %d) beyond the %d restored bytes", r.Name, r.Offset, r.Offset+r.Length, len(mem))
		}
		for off := r.Offset; off < r.Offset+r.Length; off += int64(len(buf)) {
			p := buf[:min(int64(len(buf)), r.Offset+r.Length-off)]
			if _, err := f.ReadAt(p, off); err != nil {
				return fmt.Errorf("verify: read image: %w", err)
			}
			got := mem[off : off+int64(len(p))]
			if !bytes.Equal(got, p) {
				i := 0
				for i < len(p) && got[i] == p[i] {
					i++
				}
				return fmt.Errorf("verify: region %s differs from the image at offset %d (got %#02x, want %#02x)", r.Name, off+int64(i), got[i], p[i])
			}
		}
	}
	return nil
}
