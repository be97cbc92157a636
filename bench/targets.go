package bench

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
	"golang.org/x/sys/unix"
)

// The performance targets (issue 13): every row of its table measured in
// one run, each as a ratio of two figures measured side by side in
// interleaved runs (medians), next to its target.

// TargetSizes are the snapshot sizes the target rows use.
type TargetSizes struct {
	Fault      int64 // fault p50 per backing; first touch split (256 KiB chunks)
	Targets    int64 // what each of the concurrent targets touches
	NTargets   int   // how many targets
	FirstSmall int64 // first byte, small and large
	FirstLarge int64
	Full       int64 // lazy/eager, eager/decode-only, eager/zstd CLI
	WorkingSet int64 // working set/lazy
	// FirstRuns multiplies --runs for the first-byte rows (cheap runs:
	// more of them make a steadier median).
	FirstRuns int
}

// IssueSizes are the issue's sizes (its 1.1 GiB heap is 1 GiB here).
var IssueSizes = TargetSizes{Fault: 256 << 20, Targets: 128 << 20, NTargets: 32, FirstSmall: 256 << 20, FirstLarge: 4 << 30,
	Full: 1 << 30, WorkingSet: 512 << 20, FirstRuns: 3}

// SmallSizes check the machinery in seconds (the figures mean little).
var SmallSizes = TargetSizes{Fault: 8 << 20, Targets: 4 << 20, NTargets: 2, FirstSmall: 4 << 20, FirstLarge: 16 << 20,
	Full: 16 << 20, WorkingSet: 8 << 20, FirstRuns: 1}

// TargetsConfig is a run of every target row.
type TargetsConfig struct {
	CacheDir string // generated snapshots (Generate)
	Sizes    TargetSizes
	Runs     int    // timed runs per side (after one untimed warm-up)
	Workers  int    // 0: every CPU
	Target   string // the example C target, for the concurrent-targets row ("" skips it)
	// HugetlbfsDir is the mount for the hugetlbfs column of the fault row
	// ("": that column is left out).
	HugetlbfsDir string
	Log          func(format string, args ...any)
}

// TargetRow is one row of the issue's table, measured.
type TargetRow struct {
	What     string  `json:"what"`
	Measured string  `json:"measured"` // the figures, as "a / b"
	Value    float64 `json:"value"`    // what the target judges
	Target   string  `json:"target"`
	Met      bool    `json:"met"`
	How      string  `json:"how"`             // what ran
	Error    string  `json:"error,omitempty"` // not measured: why
}

// TargetsReport is the result of RunTargets.
type TargetsReport struct {
	Command string      `json:"command,omitempty"`
	Machine Machine     `json:"machine"`
	Runs    int         `json:"runs"`
	Rows    []TargetRow `json:"rows"`
	// Reports are the interleaved benchmarks the rows come from.
	Reports []*Report `json:"reports"`
}

// RunTargets measures every row. A row that cannot be measured here (no
// zstd CLI, no example target) says why and is not met; an error of the
// machinery (a run whose memory is wrong) ends the run.
func RunTargets(ctx context.Context, cfg TargetsConfig) (*TargetsReport, error) {
	if cfg.Runs <= 0 {
		cfg.Runs = 5
	}
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	tr := &TargetsReport{Machine: ThisMachine(), Runs: cfg.Runs}
	steps := []func(context.Context, *TargetsConfig, *TargetsReport) error{
		targetFaultBackings, targetManyTargets, targetFirstByte, targetLazyVsEager,
		targetSplitFirstTouch, targetEagerVsDecode, targetWorkingSet, targetZstdCLI,
	}
	for _, step := range steps {
		if err := ctx.Err(); err != nil {
			return tr, err
		}
		if err := step(ctx, &cfg, tr); err != nil {
			return tr, err
		}
	}
	tr.Machine = ThisMachine() // the load average after the runs
	return tr, nil
}

func (cfg *TargetsConfig) env(ctx context.Context, size int64, chunk int) (*Env, error) {
	snap, image, err := Generate(ctx, cfg.CacheDir, size, "realistic", format.CodecZstd, chunk)
	if err != nil {
		return nil, err
	}
	f, err := format.Open(snap)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return &Env{Snap: snap, Image: image, Layout: LayoutOf(f.Reader), Workers: cfg.Workers, HugetlbfsDir: cfg.HugetlbfsDir}, nil
}

func (cfg *TargetsConfig) run(ctx context.Context, tr *TargetsReport, env *Env, modes string, patterns string, backings []restore.BackingKind) (*Report, error) {
	st, err := ParseStrategies(modes)
	if err != nil {
		return nil, err
	}
	ps, err := ParsePatterns(patterns)
	if err != nil {
		return nil, err
	}
	rep, err := Run(ctx, Config{Env: env, Strategies: st, Patterns: ps, Runs: cfg.Runs, Seed: 1, Log: cfg.Log, Backings: backings})
	if rep != nil {
		if f, err := os.Stat(env.Snap); err == nil {
			rep.Command = fmt.Sprintf("(--check-targets) %s, %s, --backing %s on %s", modes, patterns, backingList(backings), f.Name())
		}
		tr.Reports = append(tr.Reports, rep)
	}
	return rep, err
}

func backingList(bs []restore.BackingKind) string {
	if len(bs) == 0 {
		return "auto"
	}
	var s []string
	for _, b := range bs {
		s = append(s, b.String())
	}
	return strings.Join(s, ",")
}

// summary finds the case of strategy, pattern (and backing, "" for none)
// in rep.
func summary(rep *Report, strategy, pattern, backing string) (CaseSummary, bool) {
	for _, s := range rep.Summary {
		if s.Strategy == strategy && s.Pattern == pattern && s.Backing == backing {
			return s, true
		}
	}
	return CaseSummary{}, false
}

func med(c CaseSummary, k string) float64 { return c.Metrics[k].Median }

func ratioRow(what, target string, value float64, met bool, measured, how string) TargetRow {
	return TargetRow{What: what, Target: target, Value: value, Met: met, Measured: measured, How: how}
}

func notMeasured(what, target, how string, err error) TargetRow {
	return TargetRow{What: what, Target: target, How: how, Error: err.Error()}
}

func mibName(n int64) string {
	if n >= 1<<30 && n%(1<<30) == 0 {
		return fmt.Sprintf("%d GiB", n>>30)
	}
	return fmt.Sprintf("%d MiB", n>>20)
}

// Row 1: a 2 MiB unit's fault on shmem against a hugetlb memfd (and a
// hugetlbfs file), lazy, faults on absent units in random order.
func targetFaultBackings(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	const what, target = "2 MiB-chunk fault p50, shmem / hugetlb memfd", "≤ 2x"
	env, err := cfg.env(ctx, cfg.Sizes.Fault, 2<<20)
	if err != nil {
		return err
	}
	backings := []restore.BackingKind{restore.BackingMemfdHugetlb, restore.BackingShmem}
	if cfg.HugetlbfsDir != "" {
		backings = []restore.BackingKind{restore.BackingMemfdHugetlb, restore.BackingHugetlbfs, restore.BackingShmem}
	}
	rep, err := cfg.run(ctx, tr, env, "lazy", "sparse:0.2", backings)
	if err != nil {
		return err
	}
	mem, ok1 := summary(rep, "lazy", "sparse:0.2", restore.BackingMemfdHugetlb.String())
	sh, ok2 := summary(rep, "lazy", "sparse:0.2", restore.BackingShmem.String())
	if !ok1 || !ok2 || med(mem, MFaultP50) <= 0 {
		return fmt.Errorf("bench: fault row: no lazy faults measured")
	}
	var per []string
	for _, b := range backings {
		if s, ok := summary(rep, "lazy", "sparse:0.2", b.String()); ok {
			per = append(per, fmt.Sprintf("%s %s/%s", b, fmtNum(med(s, MFaultP50)/1e3), fmtNum(med(s, MFaultP99)/1e3)))
		}
	}
	v := med(sh, MFaultP50) / med(mem, MFaultP50)
	tr.Rows = append(tr.Rows, ratioRow(what, target, v, v <= 2,
		fmt.Sprintf("%.2fx (fault p50/p99 ms: %s)", v, strings.Join(per, ", ")),
		fmt.Sprintf("lazy, %s, 2 MiB chunks, sparse:0.2 (first touches of absent units, random order)", mibName(cfg.Sizes.Fault))))
	return nil
}

// Row 2: many targets (separate C processes attached to one loader) each
// touching the whole snapshot, shmem against a hugetlb memfd. Side by side
// (interleaved), the floor: as many processes of the same target with
// --map-file, each mapping an already filled memfd of the same size
// MAP_SHARED (no loader, no userfaultfd) and touching every page the same
// way, on shmem and on a hugetlb memfd. Its ratio shows how much of
// shmem / memfd the platform's per-page mapping cost is, ours / floor what
// the restore adds on each backing, and floor shmem / our memfd what
// shmem / memfd would be if the restore cost nothing on shmem beyond the
// kernel mapping its pages.
func targetManyTargets(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	what := fmt.Sprintf("%d targets, median time to touch %s: shmem / memfd", cfg.Sizes.NTargets, mibName(cfg.Sizes.Targets))
	const target = "≤ 2x"
	how := fmt.Sprintf("%d example targets (bin/uffdrestore-target) attached at once to one lazy loader, each touching every page; "+
		"floor: %d uffdrestore-target --map-file processes started at once, each mapping an already filled shmem / hugetlb memfd "+
		"of the same size MAP_SHARED (no loader, no userfaultfd; the kernel's fault-around applies, which a userfaultfd minor "+
		"registration turns off) and touching every page, checksums checked; the 4 cases interleaved; floor shmem / uffdrestore memfd "+
		"is what shmem / memfd would be if the restore cost nothing on shmem beyond the kernel mapping its pages", cfg.Sizes.NTargets, cfg.Sizes.NTargets)
	if cfg.Target == "" {
		tr.Rows = append(tr.Rows, notMeasured(what, target, how, errors.New("no example target: run `make build` or pass --target")))
		return nil
	}
	env, err := cfg.env(ctx, cfg.Sizes.Targets, 2<<20)
	if err != nil {
		return err
	}
	backings := []restore.BackingKind{restore.BackingMemfdHugetlb, restore.BackingShmem}
	var floors []*floorFile
	defer func() {
		for _, f := range floors {
			f.Close()
		}
	}()
	for _, b := range backings {
		f, err := newFloorFile(env, b == restore.BackingMemfdHugetlb)
		if err != nil {
			return fmt.Errorf("bench: %d targets, the floor on %s: %w", cfg.Sizes.NTargets, b, err)
		}
		floors = append(floors, f)
	}
	// Cases: uffdrestore on each backing, then the floor on each.
	nb := len(backings)
	times := make([][]float64, 2*nb)
	for _, sl := range Schedule(2*nb, cfg.Runs, true) {
		b := backings[sl.Case%nb]
		var t float64
		var err error
		name := b.String()
		if sl.Case < nb {
			e := *env
			e.Backing = b
			t, err = runManyTargets(ctx, &e, cfg.Target, cfg.Sizes.NTargets)
		} else {
			name = "floor " + name
			t, err = floors[sl.Case%nb].run(ctx, cfg.Target, cfg.Sizes.NTargets)
		}
		if err != nil {
			return fmt.Errorf("bench: %d targets on %s: %w", cfg.Sizes.NTargets, name, err)
		}
		cfg.Log("%-26s %-20s run %d  median touch %.1f ms", fmt.Sprintf("%d targets", cfg.Sizes.NTargets), name, sl.Run+1, t)
		if !sl.Warmup() {
			times[sl.Case] = append(times[sl.Case], t)
		}
	}
	m, s := Median(times[0]), Median(times[1])
	fm, fs := Median(times[nb]), Median(times[nb+1])
	v := s / m
	tr.Rows = append(tr.Rows, ratioRow(what, target, v, v <= 2,
		fmt.Sprintf("%.2fx (%s / %s ms); floor, no userfaultfd: %.2fx (%s / %s ms); uffdrestore / floor: shmem %.2fx, memfd %.2fx; "+
			"floor shmem / uffdrestore memfd %.2fx",
			v, fmtNum(s), fmtNum(m), fs/fm, fmtNum(fs), fmtNum(fm), s/fs, m/fm, fs/m), how))
	return nil
}

// floorFile is a memfd (shmem or hugetlb) holding the snapshot's regions
// one after the other, every page of it in memory: what the floor's
// processes map.
type floorFile struct {
	f        *os.File
	pageSize int64
	pages    int64
	checksum uint64 // what uffdrestore-target --map-file prints after a sequential touch on one thread
}

// newFloorFile creates and fills the floor's memfd for env's image.
func newFloorFile(env *Env, hugetlb bool) (*floorFile, error) {
	flags, ps := unix.MFD_CLOEXEC, int64(os.Getpagesize())
	if hugetlb {
		flags, ps = flags|unix.MFD_HUGETLB, 2<<20
	}
	size := (env.Layout.RawBytes + (2<<20 - 1)) &^ (2<<20 - 1)
	if size == 0 {
		return nil, errors.New("the snapshot has no bytes")
	}
	fd, err := unix.MemfdCreate("uffdrestore-bench-floor", flags)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	ff := &floorFile{f: os.NewFile(uintptr(fd), "floor-memfd"), pageSize: ps, pages: size / ps}
	if err := ff.fill(env, size); err != nil {
		ff.Close()
		return nil, err
	}
	return ff, nil
}

func (ff *floorFile) fill(env *Env, size int64) error {
	if err := unix.Ftruncate(int(ff.f.Fd()), size); err != nil {
		return fmt.Errorf("ftruncate the floor's memfd to %d bytes: %w", size, err)
	}
	m, err := unix.Mmap(int(ff.f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap the floor's memfd (%d bytes; with hugetlb: free huge pages?): %w", size, err)
	}
	defer unix.Munmap(m)
	img, err := os.Open(env.Image)
	if err != nil {
		return err
	}
	defer img.Close()
	var pos int64
	for _, r := range env.Layout.Regions {
		if _, err := img.ReadAt(m[pos:pos+r.Length], r.Offset); err != nil {
			return fmt.Errorf("fill the floor's memfd from %s: %w", env.Image, err)
		}
		pos += r.Length
	}
	clear(m[pos:])
	for off := int64(0); off < size; off += ff.pageSize {
		ff.checksum = ff.checksum*31 + uint64(m[off])
	}
	return nil
}

func (ff *floorFile) Close() error { return ff.f.Close() }

// run starts n processes of target --map-file at once on the floor's
// memfd, each touching every page sequentially, checks each touched every
// page (its page count and checksum), and returns the median over them of
// their start -> touch done time (ms).
func (ff *floorFile) run(ctx context.Context, target string, n int) (float64, error) {
	return startTargets(ctx, n, func(int) *exec.Cmd {
		cmd := exec.CommandContext(ctx, target, "--map-file", "/proc/self/fd/3", "--pattern", "sequential", "--threads", "1")
		cmd.ExtraFiles = []*os.File{ff.f}
		return cmd
	}, func(stdout []byte) (float64, error) {
		var out struct {
			targetOutput
			Checksum uint64 `json:"checksum"`
		}
		if err := json.Unmarshal(stdout, &out); err != nil {
			return 0, err
		}
		if out.Pages != ff.pages || out.PageSize != ff.pageSize || out.Checksum != ff.checksum {
			return 0, fmt.Errorf("touched %d pages of %d bytes (checksum %d), want %d of %d (checksum %d)",
				out.Pages, out.PageSize, out.Checksum, ff.pages, ff.pageSize, ff.checksum)
		}
		return out.ReadyMS + out.TouchMS, nil
	})
}

// startTargets runs the n commands cmd(i) makes at once and returns the
// median of the times (ms) parse reads from their outputs; a command that
// fails or whose output parse refuses fails the whole run.
func startTargets(ctx context.Context, n int, cmd func(i int) *exec.Cmd, parse func(stdout []byte) (float64, error)) (float64, error) {
	times := make([]float64, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var stdout, stderr bytes.Buffer
			c := cmd(i)
			c.Stdout, c.Stderr = &stdout, &stderr
			if err := c.Run(); err != nil {
				errs[i] = fmt.Errorf("%s: %w: %s", strings.Join(c.Args, " "), err, bytes.TrimSpace(stderr.Bytes()))
				return
			}
			t, err := parse(bytes.TrimSpace(stdout.Bytes()))
			if err != nil {
				errs[i] = fmt.Errorf("%s: output %q: %w", strings.Join(c.Args, " "), stdout.String(), err)
				return
			}
			times[i] = t
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return Median(times), nil
}

// runManyTargets serves one lazy loader to n targets started at once,
// each touching every page sequentially, and returns the median over the
// targets of their attach + touch time (ms). Every target checks nothing;
// one more dumps the memory, which is compared with the image.
func runManyTargets(ctx context.Context, env *Env, target string, n int) (float64, error) {
	dir, err := os.MkdirTemp("", "uffdrestore-bench-targets")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "sock")
	l, err := restore.NewLoader(ctx, env.Snap, env.restoreOptions(restore.WithMode(restore.ModeLazy), restore.ForTargets())...)
	if err != nil {
		return 0, err
	}
	defer l.Close()
	srv, err := attach.Listen(sock, attach.FromLoader(l), attach.Options{})
	if err != nil {
		return 0, err
	}
	defer srv.Close()
	med, err := startTargets(ctx, n, func(i int) *exec.Cmd {
		return exec.CommandContext(ctx, target, "--socket", sock, "--pattern", "sequential", "--threads", "1", "--seed", strconv.Itoa(i+1))
	}, func(stdout []byte) (float64, error) {
		var out targetOutput
		if err := json.Unmarshal(stdout, &out); err != nil {
			return 0, err
		}
		return out.ReadyMS + out.TouchMS, nil
	})
	if err != nil {
		return 0, err
	}
	dump := filepath.Join(dir, "dump")
	var stderr bytes.Buffer
	vc := exec.CommandContext(ctx, target, "--socket", sock, "--dump", dump)
	vc.Stderr = &stderr
	if err := vc.Run(); err != nil {
		return 0, fmt.Errorf("verify: %s --dump: %w: %s", target, err, bytes.TrimSpace(stderr.Bytes()))
	}
	if err := verifyDump(env.Image, env.Layout, dump); err != nil {
		return 0, err
	}
	return med, nil
}

// Row 3: the first byte of an in-process lazy restore as a user waits for
// it: restore.Open's start -> the first touch (from C) returned, at two
// sizes, interleaved; and Open's own time (time to ready), which must stay
// flat.
func targetFirstByte(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	what := fmt.Sprintf("in-process lazy first byte readable (%s; %s)", mibName(cfg.Sizes.FirstSmall), mibName(cfg.Sizes.FirstLarge))
	sizes := []int64{cfg.Sizes.FirstSmall, cfg.Sizes.FirstLarge}
	var envs []*Env
	for _, sz := range sizes {
		env, err := cfg.env(ctx, sz, 2<<20)
		if err != nil {
			return err
		}
		envs = append(envs, env)
	}
	// Cases: each size cold (the helper process starts in Open), then each
	// with a helper started ahead (restore.PrestartHelper).
	n := len(sizes)
	open := make([][]float64, 2*n)
	first := make([][]float64, 2*n)
	traces := make([][]*restore.FirstByteTrace, 2*n)
	runs := max(1, cfg.Sizes.FirstRuns) * cfg.Runs
	for _, sl := range Schedule(2*n, runs, true) {
		o, f, tr, err := firstByteOnce(ctx, envs[sl.Case%n], sl.Case >= n)
		if err != nil {
			return fmt.Errorf("bench: first byte, %s: %w", mibName(sizes[sl.Case%n]), err)
		}
		if !sl.Warmup() {
			open[sl.Case] = append(open[sl.Case], o)
			first[sl.Case] = append(first[sl.Case], f)
			traces[sl.Case] = append(traces[sl.Case], tr)
		}
	}
	for _, pre := range []bool{false, true} {
		k := 0
		w, how := what+", cold", fmt.Sprintf("restore.Open (lazy, default backing; its helper process starts in Open) -> the first 4 KiB page touched from C returned; %d interleaved runs per size", runs)
		if pre {
			k = n
			w, how = what+", helper prestarted", "the same, after restore.PrestartHelper (a helper process started ahead, as a program that restores again and again keeps one)"
		}
		fs, fl := Median(first[k]), Median(first[k+1])
		flat := fl / fs
		tr.Rows = append(tr.Rows, ratioRow(w, "≤ 5 ms, flat in size (large ≤ 1.25x small)", max(fs, fl), max(fs, fl) <= 5 && flat <= 1.25,
			fmt.Sprintf("%s; %s ms (%.2fx); where the %s wait went: %s", fmtNum(fs), fmtNum(fl), flat, mibName(sizes[0]), firstByteSteps(traces[k])), how))
	}
	opS, opL := Median(open[0]), Median(open[1])
	v := opL / opS
	tr.Rows = append(tr.Rows, ratioRow(fmt.Sprintf("in-process lazy Open returns (%s; %s)", mibName(cfg.Sizes.FirstSmall), mibName(cfg.Sizes.FirstLarge)),
		"flat in size (large ≤ 1.5x small)", v, v <= 1.5, fmt.Sprintf("%s; %s ms (%.2fx)", fmtNum(opS), fmtNum(opL), v), "the cold runs above: time to ready"))
	return nil
}

// firstByteSteps is the median of each step of traces (Stats.FirstByte),
// as the time each took.
func firstByteSteps(traces []*restore.FirstByteTrace) string {
	steps := []struct {
		name string
		at   func(*restore.FirstByteTrace) time.Duration
	}{
		{"Open", func(t *restore.FirstByteTrace) time.Duration { return t.Ready }},
		{"helper up with its loader (index, backing, fillers)", func(t *restore.FirstByteTrace) time.Duration { return t.Loader }},
		{"attaches the view", func(t *restore.FirstByteTrace) time.Duration { return t.Serving }},
		{"reads the fault", func(t *restore.FirstByteTrace) time.Duration { return t.FaultRead }},
		{"hands it to a filler", func(t *restore.FirstByteTrace) time.Duration { return t.FillStart }},
		{"reads, decompresses and checks its 2 MiB", func(t *restore.FirstByteTrace) time.Duration { return t.Filled }},
		{"answers it", func(t *restore.FirstByteTrace) time.Duration { return t.Answered }},
	}
	var out []string
	prev := make([]float64, 0, len(traces))
	for _, t := range traces {
		if t == nil {
			return "(no trace)"
		}
		prev = append(prev, 0)
	}
	for i, s := range steps {
		d := make([]float64, len(traces))
		for j, t := range traces {
			at := ms(s.at(t))
			if i == 0 {
				d[j] = at
			} else {
				d[j] = max(0, at-prev[j])
			}
			prev[j] = max(prev[j], at)
		}
		out = append(out, fmt.Sprintf("%s %s", s.name, fmtNum(Median(d))))
	}
	return strings.Join(out, ", ") + " ms (medians)"
}

// firstByteOnce opens the snapshot lazily, touches its first page from C
// and checks that page against the image; it returns Open's time and the
// time to the first byte (ms, both from Open's start), and where that wait
// went. prestarted: with a helper started ahead (untimed, and given time
// to start).
func firstByteOnce(ctx context.Context, env *Env, prestarted bool) (openMS, firstMS float64, fb *restore.FirstByteTrace, err error) {
	if prestarted {
		if err := restore.PrestartHelper(env.restoreOptions()...); err != nil {
			return 0, 0, nil, err
		}
		defer restore.StopPrestartedHelper()
		time.Sleep(100 * time.Millisecond)
	}
	runtime.GC()
	t0 := time.Now()
	r, err := restore.Open(ctx, env.Snap, env.restoreOptions(restore.WithMode(restore.ModeLazy))...)
	if err != nil {
		return 0, 0, nil, err
	}
	defer r.Close()
	opened := time.Since(t0)
	b := r.Bytes()
	off := env.Layout.Regions[0].Offset
	touch.Touch(uintptr(unsafe.Pointer(unsafe.SliceData(b)))+uintptr(off), 4096, 4096, false, nil, nil)
	first := time.Since(t0)
	want := make([]byte, 4096)
	f, err := os.Open(env.Image)
	if err != nil {
		return 0, 0, nil, err
	}
	defer f.Close()
	if _, err := f.ReadAt(want, off); err != nil && !errors.Is(err, io.EOF) {
		return 0, 0, nil, err
	}
	if !bytes.Equal(b[off:off+4096], want) {
		return 0, 0, nil, errors.New("verify: the first page differs from the image")
	}
	st, err := r.Stats(ctx)
	if err != nil {
		return 0, 0, nil, err
	}
	return ms(opened), ms(first), st.FirstByte, r.Close()
}

// Row 4: lazy, full sequential touch against eager; and sparse:0.1.
func targetLazyVsEager(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	env, err := cfg.env(ctx, cfg.Sizes.Full, 2<<20)
	if err != nil {
		return err
	}
	rep, err := cfg.run(ctx, tr, env, "eager,lazy", "sequential,sparse:0.1", nil)
	if err != nil {
		return err
	}
	how := fmt.Sprintf("complete time (restore start -> pattern done), %s, 2 MiB chunks, default backing", mibName(cfg.Sizes.Full))
	for _, p := range []struct {
		pat, what, target string
		limit             float64
	}{
		{"sequential", "lazy, full sequential touch / eager", "≤ 1.25x", 1.25},
		{"sparse:0.1", "lazy, sparse:0.1 / eager (no regression)", "≤ 0.3x", 0.3},
	} {
		e, ok1 := summary(rep, "eager", p.pat, "")
		l, ok2 := summary(rep, "lazy", p.pat, "")
		if !ok1 || !ok2 {
			return fmt.Errorf("bench: lazy/eager row: %s not measured", p.pat)
		}
		v := med(l, MComplete) / med(e, MComplete)
		tr.Rows = append(tr.Rows, ratioRow(p.what, p.target, v, v <= p.limit,
			fmt.Sprintf("%.2fx (%s / %s ms)", v, fmtNum(med(l, MComplete)), fmtNum(med(e, MComplete))), how))
	}
	return nil
}

// Row 5: the fault on an absent 2 MiB unit of a snapshot with 256 KiB
// chunks (its parts decoded on every idle core) against decoding those
// parts on one core into a warm buffer.
func targetSplitFirstTouch(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	const what, target = "first touch of an absent 2 MiB unit / single-core decode of it", "≤ 0.6x"
	env, err := cfg.env(ctx, cfg.Sizes.Fault, 256<<10)
	if err != nil {
		return err
	}
	var dec, par, zero []float64
	// At most one goroutine per P: a spinning one must not wait for Go's
	// preemption to let another run.
	workers := min(env.workers(), runtime.GOMAXPROCS(0))
	measureFloor := func() error {
		d, err := decodeUnitsOneCore(env.Snap, 2<<20, 64)
		if err != nil {
			return err
		}
		dec = append(dec, d...)
		p, err := decodeUnitsParallel(env.Snap, 2<<20, 64, workers)
		if err != nil {
			return err
		}
		par = append(par, p...)
		z, err := hugePageFirstTouch(32)
		if err != nil {
			return err
		}
		zero = append(zero, z...)
		return nil
	}
	if err := measureFloor(); err != nil {
		return err
	}
	rep, err := cfg.run(ctx, tr, env, "lazy", "sparse:0.2", []restore.BackingKind{restore.BackingMemfdHugetlb})
	if err != nil {
		return err
	}
	if err := measureFloor(); err != nil {
		return err
	}
	l, ok := summary(rep, "lazy", "sparse:0.2", "")
	if !ok || med(l, MFaultP50) <= 0 {
		return errors.New("bench: split row: no lazy faults measured")
	}
	f, dm, pm, zm := med(l, MFaultP50)/1e3, Median(dec), Median(par), Median(zero)
	v := f / dm
	// The floor of the cores: the unit's huge page allocated and zeroed
	// (the kernel does it on the first write, one core, before any part
	// can land), then its parts decoded on every core at once with no
	// wake-up (decodeUnitsParallel), which is what the cores of this
	// machine give: half the one-core decode only where they scale.
	floor := zm + pm
	tr.Rows = append(tr.Rows, ratioRow(what, target, v, v <= 0.6,
		fmt.Sprintf("%.2fx (%s / %s ms, p50); floor on %d cores: a fresh huge page's first write %s ms + its 8 chunks decoded by %d spinning goroutines %s ms (%.2fx of one core: half would be 0.50x) = %s ms (%.2fx); ours / floor %.2fx",
			v, fmtNum(f), fmtNum(dm), workers, fmtNum(zm), workers, fmtNum(pm), pm/dm, fmtNum(floor), floor/dm, f/floor),
		fmt.Sprintf("lazy fault p50, %s, 256 KiB chunks on a hugetlb memfd, sparse:0.2 / its 8 chunks decoded one after another on one core (before and after)", mibName(cfg.Sizes.Fault))))
	return nil
}

// hugePageFirstTouch returns n times (ms) of the first write to a fresh
// 2 MiB page of a hugetlb memfd: the page allocated and zeroed by the
// kernel, as the first part decoded into an absent unit pays. The n pages
// are distinct and all held until the end (a page freed and taken again
// would come back from the pool's free list warm in the cache).
func hugePageFirstTouch(n int) ([]float64, error) {
	const page = 2 << 20
	fd, err := unix.MemfdCreate("uffdrestore-bench-zero", unix.MFD_CLOEXEC|unix.MFD_HUGETLB)
	if err != nil {
		return nil, fmt.Errorf("bench: hugetlb memfd: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(n)*page); err != nil {
		return nil, fmt.Errorf("bench: hugetlb memfd of %d pages: %w", n, err)
	}
	m, err := unix.Mmap(fd, 0, n*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("bench: map %d huge pages: %w", n, err)
	}
	defer unix.Munmap(m)
	out := make([]float64, 0, n)
	for i := range n {
		t := time.Now()
		m[i*page] = 1
		out = append(out, ms(time.Since(t)))
	}
	return out, nil
}

// decodeUnitsParallel is decodeUnitsOneCore with each unit's chunks shared
// among workers goroutines (chunk i of the unit by goroutine i%workers,
// this one among them) into warm buffers; the others spin until the unit
// starts, so no wake-up is in the time: the best the cores of this machine
// do for one unit. It returns the time of each unit (ms).
func decodeUnitsParallel(snap string, unit, n, workers int) ([]float64, error) {
	if workers < 2 {
		return decodeUnitsOneCore(snap, unit, n)
	}
	f, err := format.Open(snap)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cs := f.ChunkSize()
	per := max(1, unit/cs)
	units := f.NumChunks() / per
	step := max(1, units/n)
	var (
		start atomic.Int64 // the unit to decode + 1; -1: stop
		done  atomic.Int32
		errMu sync.Mutex
		first error
	)
	decodeShare := func(d *format.Decoder, buf []byte, u, k int) {
		for i := u*per + k; i < (u+1)*per && i < f.NumChunks(); i += workers {
			c := f.Chunk(i)
			if c.Codec == format.CodecZero {
				continue
			}
			if err := d.DecodeChunk(i, buf[(i-u*per)*cs:][:c.RawLen]); err != nil {
				errMu.Lock()
				first = cmp.Or(first, err)
				errMu.Unlock()
			}
		}
	}
	var wg sync.WaitGroup
	for k := 1; k < workers; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := f.NewDecoder()
			defer d.Close()
			buf := make([]byte, unit)
			last := int64(0)
			for {
				s := start.Load()
				if s < 0 {
					return
				}
				if s == last {
					continue // spin: no wake-up in the time
				}
				last = s
				decodeShare(d, buf, int(s-1), k)
				done.Add(1)
			}
		}()
	}
	d := f.NewDecoder()
	defer d.Close()
	buf := make([]byte, unit)
	var out []float64
	for u := 0; u < units && len(out) < n; u += step {
		done.Store(0)
		t := time.Now()
		start.Store(int64(u + 1))
		decodeShare(d, buf, u, 0)
		for done.Load() < int32(workers-1) {
		}
		if u > 0 { // the first one warms the decoders and buffers
			out = append(out, ms(time.Since(t)))
		}
	}
	start.Store(-1)
	wg.Wait()
	return out, first
}

// decodeUnitsOneCore decodes the chunks of up to n units of unit bytes, a
// unit at a time, on this goroutine into one warm buffer, and returns the
// time of each unit (ms).
func decodeUnitsOneCore(snap string, unit, n int) ([]float64, error) {
	f, err := format.Open(snap)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d := f.NewDecoder()
	defer d.Close()
	cs := f.ChunkSize()
	per := max(1, unit/cs)
	buf := make([]byte, unit)
	var out []float64
	units := f.NumChunks() / per
	step := max(1, units/n)
	// One untimed unit: the decoder's tables and the buffer warm.
	for u := 0; u < units && len(out) < n; u += step {
		t := time.Now()
		for i := u * per; i < (u+1)*per && i < f.NumChunks(); i++ {
			c := f.Chunk(i)
			if c.Codec == format.CodecZero {
				continue
			}
			if err := d.DecodeChunk(i, buf[(i-u*per)*cs:][:c.RawLen]); err != nil {
				return nil, err
			}
		}
		if u > 0 {
			out = append(out, ms(time.Since(t)))
		}
	}
	return out, nil
}

// Row 6: eager against decoding the same chunks into warm buffers on every
// core (the decoder's own ceiling), interleaved.
func targetEagerVsDecode(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	const what, target = "eager / decode-only of the same chunks on all workers (throughput)", "≥ 0.85"
	env, err := cfg.env(ctx, cfg.Sizes.Full, 2<<20)
	if err != nil {
		return err
	}
	var eager, dec []float64
	for _, sl := range Schedule(2, cfg.Runs, true) {
		var t float64
		if sl.Case == 0 {
			runtime.GC()
			t0 := time.Now()
			r, err := restore.Open(ctx, env.Snap, env.restoreOptions(restore.WithMode(restore.ModeEager))...)
			if err != nil {
				return err
			}
			t = ms(time.Since(t0))
			if sl.Run == 0 {
				if err := VerifyMemory(env.Image, env.Layout, r.Bytes()); err != nil {
					r.Close()
					return err
				}
			}
			if err := r.Close(); err != nil {
				return err
			}
		} else if t, err = decodeOnly(env); err != nil {
			return err
		}
		if !sl.Warmup() {
			if sl.Case == 0 {
				eager = append(eager, t)
			} else {
				dec = append(dec, t)
			}
		}
	}
	e, d := Median(eager), Median(dec)
	v := d / e
	tr.Rows = append(tr.Rows, ratioRow(what, target, v, v >= 0.85, fmt.Sprintf("%.2f (%s MB/s / %s MB/s)", v,
		fmtNum(float64(env.Layout.RawBytes)/1e3/e), fmtNum(float64(env.Layout.RawBytes)/1e3/d)),
		fmt.Sprintf("restore.Open eager (time to ready), %s, default backing / every chunk decoded into a per-worker warm buffer, %d workers", mibName(cfg.Sizes.Full), env.workers())))
	return nil
}

// decodeOnly decodes every chunk of env's snapshot on every worker into
// per-worker buffers allocated (and touched) before the clock starts; it
// returns the time (ms).
func decodeOnly(env *Env) (float64, error) {
	f, err := format.Open(env.Snap)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	w := env.workers()
	bufs := make([][]byte, w)
	decs := make([]*format.Decoder, w)
	for i := range bufs {
		bufs[i] = make([]byte, f.ChunkSize())
		for j := range bufs[i] {
			bufs[i][j] = 1
		}
		decs[i] = f.NewDecoder()
		defer decs[i].Close()
	}
	t0 := time.Now()
	err = parallel(f.NumChunks(), w, func(wk, i int) error {
		c := f.Chunk(i)
		if c.Codec == format.CodecZero {
			return nil
		}
		return decs[wk].DecodeChunk(i, bufs[wk][:c.RawLen])
	})
	return ms(time.Since(t0)), err
}

// Row 7: a stable working set replayed against lazy.
func targetWorkingSet(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	const what, target = "working set / lazy, sparse:0.2 (speed-up)", "≥ 1.5x"
	env, err := cfg.env(ctx, cfg.Sizes.WorkingSet, 2<<20)
	if err != nil {
		return err
	}
	rep, err := cfg.run(ctx, tr, env, "lazy,working-set", "sparse:0.2", nil)
	if err != nil {
		return err
	}
	l, ok1 := summary(rep, "lazy", "sparse:0.2", "")
	w, ok2 := summary(rep, "working-set", "sparse:0.2", "")
	if !ok1 || !ok2 {
		return errors.New("bench: working-set row: not measured")
	}
	v := med(l, MComplete) / med(w, MComplete)
	tr.Rows = append(tr.Rows, ratioRow(what+", "+mibName(cfg.Sizes.WorkingSet), target, v, v >= 1.5,
		fmt.Sprintf("%.2fx (%s / %s ms)", v, fmtNum(med(l, MComplete)), fmtNum(med(w, MComplete))),
		"complete time, the same random order every run (the profile recorded by an untimed lazy run)"))
	return nil
}

// Row 8: eager (restore + touch every page) against the zstd CLI
// decompressing the same image into tmpfs with every thread, then reading
// it back into memory.
func targetZstdCLI(ctx context.Context, cfg *TargetsConfig, tr *TargetsReport) error {
	const what, target = "eager vs `zstd -d -T0` into tmpfs + read back (speed-up)", "≥ 2x"
	how := fmt.Sprintf("eager complete, sequential touch / zstd -d -T0 of the raw image (compressed by zstd -3 -T0) into /dev/shm, then read(2) into memory, %s", mibName(cfg.Sizes.Full))
	zstd, err := exec.LookPath("zstd")
	if err != nil {
		tr.Rows = append(tr.Rows, notMeasured(what, target, how, errors.New("no zstd CLI (apt-get install zstd)")))
		return nil
	}
	env, err := cfg.env(ctx, cfg.Sizes.Full, 2<<20)
	if err != nil {
		return err
	}
	zst := strings.TrimSuffix(env.Image, ".raw") + ".raw.zst"
	if _, err := os.Stat(zst); err != nil {
		af, err := atomicfile.Create(zst, 0o644)
		if err != nil {
			return err
		}
		var stderr bytes.Buffer
		c := exec.CommandContext(ctx, zstd, "-3", "-T0", "-q", "-c", env.Image)
		c.Stdout, c.Stderr = af, &stderr
		if err := c.Run(); err != nil {
			af.Abort()
			return fmt.Errorf("bench: zstd -3 -T0 %s: %w: %s", env.Image, err, bytes.TrimSpace(stderr.Bytes()))
		}
		if err := af.Commit(); err != nil {
			return err
		}
	}
	st, err := ParseStrategies("eager")
	if err != nil {
		return err
	}
	seq, _ := ParsePatterns("sequential")
	var eager, cli []float64
	for _, sl := range Schedule(2, cfg.Runs, true) {
		var t float64
		if sl.Case == 0 {
			r := runInProcess(ctx, env, st[0], seq[0].Order(env.Layout.Pages(), 1), 1, nil)
			if r.Error != "" {
				return fmt.Errorf("bench: eager: %s", r.Error)
			}
			t = r.Metrics[MComplete]
		} else if t, err = zstdReadBack(ctx, zstd, zst, env); err != nil {
			return err
		}
		if !sl.Warmup() {
			if sl.Case == 0 {
				eager = append(eager, t)
			} else {
				cli = append(cli, t)
			}
		}
	}
	e, z := Median(eager), Median(cli)
	v := z / e
	tr.Rows = append(tr.Rows, ratioRow(what, target, v, v >= 2, fmt.Sprintf("%.2fx (%s / %s ms)", v, fmtNum(z), fmtNum(e)), how))
	return nil
}

// zstdReadBack runs zstd -d -T0 of zst into /dev/shm and reads the result
// into anonymous memory on every CPU; it returns the time (ms) and checks
// the bytes read equal the image.
func zstdReadBack(ctx context.Context, zstd, zst string, env *Env) (float64, error) {
	out := filepath.Join("/dev/shm", fmt.Sprintf("uffdrestore-bench-%d.raw", os.Getpid()))
	defer os.Remove(out)
	runtime.GC()
	t0 := time.Now()
	if b, err := exec.CommandContext(ctx, zstd, "-d", "-T0", "-q", "-f", zst, "-o", out).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("bench: zstd -d: %w: %s", err, b)
	}
	e := *env
	e.Image = out
	inst, err := startRawRead(ctx, &e)
	if err != nil {
		return 0, err
	}
	defer inst.Close()
	t := ms(time.Since(t0))
	return t, VerifyMemory(env.Image, env.Layout, inst.Bytes())
}

// Met counts the rows met.
func (tr *TargetsReport) Met() (met, rows int) {
	for _, r := range tr.Rows {
		if r.Met {
			met++
		}
	}
	return met, len(tr.Rows)
}

func (r TargetRow) status() string {
	switch {
	case r.Error != "":
		return "not measured: " + r.Error
	case r.Met:
		return "met"
	}
	return "NOT MET"
}

// WriteMarkdown writes the rows as a Markdown table, with the command and
// machine above it.
func (tr *TargetsReport) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	if tr.Command != "" {
		fmt.Fprintf(&b, "- command: `%s`\n", tr.Command)
	}
	fmt.Fprintf(&b, "- machine: %s\n", tr.Machine)
	met, n := tr.Met()
	fmt.Fprintf(&b, "- %d timed runs per side, interleaved, after one untimed warm-up; medians; %d of %d targets met\n\n", tr.Runs, met, n)
	b.WriteString("| what | measured | target | status | how |\n|---|---:|---|---|---|\n")
	for _, r := range tr.Rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.What, r.Measured, r.Target, r.status(), r.How)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteTable writes the rows aligned, for a terminal.
func (tr *TargetsReport) WriteTable(w io.Writer) error {
	var b strings.Builder
	if tr.Command != "" {
		b.WriteString("command: " + tr.Command + "\n")
	}
	b.WriteString("machine: " + tr.Machine.String() + "\n")
	met, n := tr.Met()
	fmt.Fprintf(&b, "%d timed runs per side, interleaved, after one untimed warm-up; medians; %d of %d targets met\n\n", tr.Runs, met, n)
	rows := [][]string{{"what", "measured", "target", "status"}}
	for _, r := range tr.Rows {
		rows = append(rows, []string{r.What, r.Measured, r.Target, r.status()})
	}
	width := make([]int, 4)
	for _, row := range rows {
		for i, c := range row {
			width[i] = max(width[i], len([]rune(c)))
		}
	}
	for _, row := range rows {
		for i, c := range row {
			if i > 0 {
				b.WriteString("  ")
			}
			b.WriteString(c)
			if i < len(row)-1 {
				b.WriteString(strings.Repeat(" ", width[i]-len([]rune(c))))
			}
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// The README block the targets table is kept in.
const (
	ReadmeBegin = "<!-- bench-targets:begin -->"
	ReadmeEnd   = "<!-- bench-targets:end -->"
)

// UpdateReadme replaces what is between ReadmeBegin and ReadmeEnd in the
// file at path with the Markdown table (atomically).
func (tr *TargetsReport) UpdateReadme(path string) error {
	old, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	pre, rest, ok1 := bytes.Cut(old, []byte(ReadmeBegin))
	_, post, ok2 := bytes.Cut(rest, []byte(ReadmeEnd))
	if !ok1 || !ok2 {
		return fmt.Errorf("bench: %s has no %s ... %s block to replace", path, ReadmeBegin, ReadmeEnd)
	}
	var md bytes.Buffer
	if err := tr.WriteMarkdown(&md); err != nil {
		return err
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, st.Mode().Perm(), func(w io.Writer) error {
		_, err := w.Write(slices.Concat(pre, []byte(ReadmeBegin+"\n"), md.Bytes(), []byte(ReadmeEnd), post))
		return err
	})
}
