package engine

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/benchcache"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
	"github.com/uffdrestore/uffdrestore/internal/size"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Benchmark inputs are generated once and cached in this user's benchmark
// cache (internal/benchcache: ~/.cache/uffdrestore/bench).
// UFFDRESTORE_BENCH_SIZE sets the big size (default 256MiB so that a CI run
// with -benchtime=1x stays quick; `make bench` uses 2GiB);
// UFFDRESTORE_BENCH_BACKING forces a backing (shmem, memfd, hugetlbfs).

func benchSize(b *testing.B) int64 {
	if s := os.Getenv("UFFDRESTORE_BENCH_SIZE"); s != "" {
		n, err := size.Parse(s)
		if err != nil {
			b.Fatal(err)
		}
		return n
	}
	return 256 << 20
}

var benchMu sync.Mutex

// benchSnapshot returns a cached snapshot (and its raw image when raw) of
// size bytes of content ("mem" or "sparse").
func benchSnapshot(b *testing.B, size int64, content string, codec format.Codec, chunk int, raw bool) (snap, image string) {
	benchMu.Lock()
	defer benchMu.Unlock()
	dir, err := benchcache.Dir()
	if err != nil {
		b.Fatal(err)
	}
	name := fmt.Sprintf("%s-%dM-%v-%dK", content, size>>20, codec, chunk>>10)
	snap = filepath.Join(dir, name+".snap")
	image = filepath.Join(dir, fmt.Sprintf("%s-%dM.raw", content, size>>20))
	_, serr := os.Stat(snap)
	_, ierr := os.Stat(image)
	if serr == nil && (!raw || ierr == nil) {
		return snap, image
	}
	f, err := os.Create(snap + ".tmp")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	w, err := format.NewWriter(bw, format.WriterOptions{ChunkSize: chunk, Codec: codec})
	if err != nil {
		b.Fatal(err)
	}
	var img io.Writer = io.Discard
	if raw {
		fi, err := os.Create(image)
		if err != nil {
			b.Fatal(err)
		}
		defer fi.Close()
		img = fi
	}
	w.BeginRegion("heap", 0x7f3a00000000, 3)
	buf := make([]byte, 8<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		part := buf[:n]
		if content == "sparse" {
			clear(part)
			for i := int64(0); i < n; i += 1 << 20 {
				binary.LittleEndian.PutUint64(part[i:], uint64(off+i)|1)
			}
		} else {
			memgen.Fill(part, off/memgen.PageSize)
		}
		if _, err := w.Write(part); err != nil {
			b.Fatal(err)
		}
		img.Write(part)
	}
	w.EndRegion()
	if err := w.Close(); err != nil {
		b.Fatal(err)
	}
	bw.Flush()
	f.Close()
	os.Rename(snap+".tmp", snap)
	return snap, image
}

func benchBacking(b *testing.B, size int64) []Option {
	if os.Geteuid() != 0 {
		b.Skip("restore benchmarks need root (userfaultfd, huge pages)")
	}
	if k := os.Getenv("UFFDRESTORE_BENCH_BACKING"); k != "" {
		kind, err := ParseBacking(k)
		if err != nil {
			b.Fatal(err)
		}
		return []Option{WithBacking(kind)}
	}
	if testutil.FreeHugePages() >= size>>21+8 {
		return []Option{WithBacking(BackingMemfdHugetlb)}
	}
	b.Logf("only %d huge pages free: using shmem", testutil.FreeHugePages())
	return []Option{WithBacking(BackingShmem)}
}

// BenchmarkTimeToReady: lazy Open → view usable, for a small and a large
// snapshot. It must be flat in the size.
func BenchmarkTimeToReady(b *testing.B) {
	for _, size := range []int64{256 << 20, 4 << 30} {
		if size > benchSize(b) && size > 256<<20 && os.Getenv("UFFDRESTORE_BENCH_SIZE") == "" {
			continue
		}
		b.Run(fmt.Sprintf("size=%dMiB", size>>20), func(b *testing.B) {
			snap, _ := benchSnapshot(b, size, "sparse", format.CodecZstd, 2<<20, false)
			opts := benchBacking(b, size)
			var total time.Duration
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				r, err := Open(context.Background(), snap, opts...)
				d := time.Since(t0)
				if err != nil {
					b.Fatal(err)
				}
				total += d
				r.Close()
			}
			b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms/ready")
		})
	}
}

// BenchmarkEager: the whole snapshot decompressed into the backing, with 1
// and 2 workers.
func BenchmarkEager(b *testing.B) {
	size := benchSize(b)
	for _, codec := range []format.Codec{format.CodecZstd, format.CodecS2} {
		for _, workers := range []int{1, 2} {
			b.Run(fmt.Sprintf("codec=%v/workers=%d", codec, workers), func(b *testing.B) {
				snap, _ := benchSnapshot(b, size, "mem", codec, 2<<20, false)
				opts := append(benchBacking(b, size), WithMode(ModeEager), WithWorkers(workers))
				// Warm the huge page pool (the VM's first touch is slow).
				if l, err := NewLoader(context.Background(), snap, opts...); err == nil {
					l.Close()
				}
				b.SetBytes(size)
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					l, err := NewLoader(context.Background(), snap, opts...)
					if err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					l.Close()
					b.StartTimer()
				}
			})
		}
	}
}

// BenchmarkBaselineZstdCLI is what users do today: `zstd -d -T0` of the
// image into a tmpfs file, then read it back into memory.
func BenchmarkBaselineZstdCLI(b *testing.B) {
	if _, err := exec.LookPath("zstd"); err != nil {
		b.Skip("zstd not installed (apt-get install zstd)")
	}
	size := benchSize(b)
	_, image := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, true)
	zst := image + ".zst"
	if _, err := os.Stat(zst); err != nil {
		if out, err := exec.Command("zstd", "-q", "-f", "-T0", "-3", image, "-o", zst).CombinedOutput(); err != nil {
			b.Fatalf("zstd: %v %s", err, out)
		}
	}
	dst := filepath.Join("/dev/shm", fmt.Sprintf("uffdrestore-bench-%d", os.Getpid()))
	defer os.Remove(dst)
	mem := make([]byte, size)
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = 0 // fault the buffer in before timing
	}
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if out, err := exec.Command("zstd", "-q", "-f", "-d", "-T0", zst, "-o", dst).CombinedOutput(); err != nil {
			b.Fatalf("zstd -d: %v %s", err, out)
		}
		f, err := os.Open(dst)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(f, mem); err != nil {
			b.Fatal(err)
		}
		f.Close()
		b.StopTimer()
		os.Remove(dst)
		b.StartTimer()
	}
}

func pct(v []uint64, q float64) time.Duration {
	if len(v) == 0 {
		return 0
	}
	s := append([]uint64(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return time.Duration(s[min(len(s)-1, int(q*float64(len(s))))])
}

// BenchmarkFaultLatency: the first touch of each 2 MiB unit as the touching
// thread sees it, beside what it ideally costs here: decoding that chunk
// into a warm buffer plus allocating one huge page, measured in the same run.
// Then the same pages through a second view (present: CONTINUE only).
func BenchmarkFaultLatency(b *testing.B) {
	size := min(benchSize(b), 512<<20)
	for _, codec := range []format.Codec{format.CodecS2, format.CodecZstd} {
		for _, spin := range []time.Duration{0, 50 * time.Microsecond} {
			b.Run(fmt.Sprintf("codec=%v/spin=%v", codec, spin), func(b *testing.B) {
				snap, _ := benchSnapshot(b, size, "mem", codec, 2<<20, false)
				opts := append(benchBacking(b, size), WithSpin(spin), WithPremap(false))
				var first, second []uint64
				var ideal []time.Duration
				for i := 0; i < b.N; i++ {
					l, err := NewLoader(context.Background(), snap, opts...)
					if err != nil {
						b.Fatal(err)
					}
					// Units in order: readahead would fill them first.
					l.e.hooks = &engineHooks{noReadahead: true}
					m1, u1 := benchView(b, l)
					m2, u2 := benchView(b, l)
					units := int(l.Layout().FileSize) / l.e.unitSize
					lat := make([]uint64, units)
					touch.Touch(m1.Addr(), m1.Len(), l.e.unitSize, false, nil, lat)
					first = append(first, lat...)
					touch.Touch(m2.Addr(), m2.Len(), l.e.unitSize, false, nil, lat)
					second = append(second, lat...)
					ideal = append(ideal, idealFault(b, l, units)...)
					u1.Close()
					u2.Close()
					m1.Close()
					m2.Close()
					l.Close()
				}
				sort.Slice(ideal, func(i, j int) bool { return ideal[i] < ideal[j] })
				idealP50 := ideal[len(ideal)/2]
				p50 := pct(first, 0.5)
				b.ReportMetric(float64(p50.Microseconds()), "first-p50-µs")
				b.ReportMetric(float64(pct(first, 0.99).Microseconds()), "first-p99-µs")
				b.ReportMetric(float64(idealP50.Microseconds()), "ideal-p50-µs")
				b.ReportMetric(float64(p50)/float64(idealP50), "first/ideal")
				b.ReportMetric(float64(pct(second, 0.5).Nanoseconds())/1000, "present-p50-µs")
				b.ReportMetric(float64(pct(second, 0.99).Nanoseconds())/1000, "present-p99-µs")
			})
		}
	}
}

// benchView maps l's backing and attaches it as a view.
func benchView(b *testing.B, l *Loader) (*uffd.Mapping, *View) {
	lay := l.Layout()
	want := uffd.FeatureMinorShmem | uffd.FeatureMissingShmem
	if lay.Backing == "hugetlb" {
		want = uffd.FeatureMinorHugetlbfs | uffd.FeatureMissingHugetlbfs
	}
	u, err := uffd.Open(uffd.OpenOptions{NonBlock: true}, want)
	if err != nil {
		b.Fatal(err)
	}
	m, err := uffd.Mmap(0, int(lay.FileSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, l.BackingFile().Fd(), 0)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := u.Register(m.Addr(), uintptr(lay.FileSize), uffd.ModeMinor|uffd.ModeMissing); err != nil {
		b.Fatal(err)
	}
	v, err := l.AttachView(u, []ViewRange{{Base: m.Addr(), Size: lay.FileSize}}, "bench")
	if err != nil {
		b.Fatal(err)
	}
	return m, v
}

// idealFault measures, per unit, decoding its chunk into a warm buffer plus
// allocating (and zeroing) one fresh page of the backing's kind.
func idealFault(b *testing.B, l *Loader, units int) []time.Duration {
	dec := l.e.r.NewDecoder()
	defer dec.Close()
	buf := make([]byte, l.e.unitSize)
	hugetlb := l.b.kind.hugetlb()
	f, err := uffd.MemfdCreate("uffdrestore-bench-ideal", hugetlb, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fd := f.Fd()
	uffd.Ftruncate(fd, int64(l.e.unitSize))
	var out []time.Duration
	for u := 0; u < units && u < 64; u++ {
		c := u * l.e.chunksPerUnit
		dec.DecodeChunk(c, buf) // warm
		t0 := time.Now()
		if l.e.r.Chunk(c).Codec != format.CodecZero {
			if err := dec.DecodeChunk(c, buf); err != nil {
				b.Fatal(err)
			}
		}
		if err := uffd.Fallocate(fd, 0, 0, int64(l.e.unitSize)); err != nil {
			b.Fatal(err)
		}
		out = append(out, time.Since(t0))
		uffd.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, int64(l.e.unitSize))
	}
	return out
}

// BenchmarkLoaderRSS: the restorer's own memory for an eager fill, which
// must not grow with the snapshot. Runs the fill in a child process and
// reports its peak anonymous RSS (the backing's pages are not the
// restorer's).
func BenchmarkLoaderRSS(b *testing.B) {
	size := benchSize(b)
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, false)
	opts := benchBacking(b, size)
	backing := "shmem"
	if len(opts) > 0 && testutil.FreeHugePages() >= size>>21+8 {
		backing = "memfd-hugetlb"
	}
	for i := 0; i < b.N; i++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestRSSChild$")
		cmd.Env = append(os.Environ(), "UFFDRESTORE_RSS_CHILD="+snap, "UFFDRESTORE_RSS_BACKING="+backing)
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("%v\n%s", err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if v, ok := strings.CutPrefix(l, "rss-anon-peak-kb="); ok {
				kb, _ := strconv.Atoi(v)
				b.ReportMetric(float64(kb)/1024, "MiB-rss-anon")
			}
		}
	}
	b.ReportMetric(float64(size>>20), "MiB-snapshot")
}

// TestRSSChild is BenchmarkLoaderRSS's child; it does nothing otherwise.
func TestRSSChild(t *testing.T) {
	snap := os.Getenv("UFFDRESTORE_RSS_CHILD")
	if snap == "" {
		return
	}
	kind, _ := ParseBacking(os.Getenv("UFFDRESTORE_RSS_BACKING"))
	var peak int
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if kb := rssAnonKB(); kb > peak {
				peak = kb
			}
		}
	}()
	l, err := NewLoader(context.Background(), snap, WithBacking(kind), WithMode(ModeEager))
	if err != nil {
		t.Fatal(err)
	}
	close(done)
	if kb := rssAnonKB(); kb > peak {
		peak = kb
	}
	l.Close()
	fmt.Printf("rss-anon-peak-kb=%d\n", peak)
}

func rssAnonKB() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "RssAnon:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

// BenchmarkWorkingSet: a workload touches 20% of the snapshot's units, every
// 4 KiB page of each, in a fixed random order. Time from Open to the last
// touch, for lazy, a replayed working set (recorded by a first lazy run),
// eager, and the same touches on memory that is already there.
func BenchmarkWorkingSet(b *testing.B) {
	size := benchSize(b)
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, false)
	opts := benchBacking(b, size)
	unit := 2 << 20
	units := int(size) / unit
	rng := rand.New(rand.NewPCG(2026, 11))
	pick := rng.Perm(units)[:max(1, units/5)]
	var order []uint32
	for _, u := range pick {
		for p := 0; p < unit/4096; p++ {
			order = append(order, uint32(u*unit/4096+p))
		}
	}
	run := func(extra ...Option) (time.Duration, Stats) {
		t0 := time.Now()
		r, err := Open(context.Background(), snap, append(append([]Option{}, opts...), extra...)...)
		if err != nil {
			b.Fatal(err)
		}
		touch.Touch(uintptr(unsafe.Pointer(&r.Bytes()[0])), len(r.Bytes()), 4096, false, order, nil)
		d := time.Since(t0)
		s, _ := r.Stats(context.Background())
		r.Close()
		return d, s
	}
	// Record once (and warm the pool).
	r, err := Open(context.Background(), snap, append(append([]Option{}, opts...), WithRecord("bench"))...)
	if err != nil {
		b.Fatal(err)
	}
	touch.Touch(uintptr(unsafe.Pointer(&r.Bytes()[0])), len(r.Bytes()), 4096, false, order, nil)
	prof, err := r.Profile(context.Background())
	r.Close()
	if err != nil {
		b.Fatal(err)
	}
	warm := make([]byte, size)
	for i := 0; i < len(warm); i += 4096 {
		warm[i] = 1
	}
	var lazy, ws, eager, hot []time.Duration
	var wsStats Stats
	for i := 0; i < b.N; i++ {
		d, _ := run()
		lazy = append(lazy, d)
		d, wsStats = run(WithProfile(ProfileSource{Profile: &prof}))
		ws = append(ws, d)
		d, _ = run(WithMode(ModeEager))
		eager = append(eager, d)
		t0 := time.Now()
		touch.Touch(uintptr(unsafe.Pointer(&warm[0])), len(warm), 4096, false, order, nil)
		hot = append(hot, time.Since(t0))
	}
	med := func(v []time.Duration) float64 {
		s := append([]time.Duration(nil), v...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return float64(s[len(s)/2].Microseconds()) / 1000
	}
	b.ReportMetric(med(lazy), "lazy-ms")
	b.ReportMetric(med(ws), "workingset-ms")
	b.ReportMetric(med(eager), "eager-ms")
	b.ReportMetric(med(hot), "warm-ms")
	b.ReportMetric(med(lazy)/med(ws), "lazy/ws")
	if w := wsStats.WorkingSet; w != nil {
		b.ReportMetric(float64(w.Prefilled), "ws-prefilled")
		b.ReportMetric(float64(w.Late), "ws-late")
	}
}

// BenchmarkSecondViewPremapped: with premap (the default), a view attached
// after its units are present has them mapped at attach: its first touch of
// each is a plain memory access, no fault.
func BenchmarkSecondViewPremapped(b *testing.B) {
	size := min(benchSize(b), 512<<20)
	snap, _ := benchSnapshot(b, size, "mem", format.CodecS2, 2<<20, false)
	opts := benchBacking(b, size)
	var lat []uint64
	var faults int64
	for i := 0; i < b.N; i++ {
		l, err := NewLoader(context.Background(), snap, opts...)
		if err != nil {
			b.Fatal(err)
		}
		m1, v1 := benchView(b, l)
		touch.Touch(m1.Addr(), m1.Len(), l.e.unitSize, false, nil, nil)
		m2, v2 := benchView(b, l)
		l2 := make([]uint64, m2.Len()/l.e.unitSize)
		touch.Touch(m2.Addr(), m2.Len(), l.e.unitSize, false, nil, l2)
		lat = append(lat, l2...)
		s := v2.Stats()
		faults += s.FaultsMinor + s.FaultsMissing
		v1.Close()
		v2.Close()
		m1.Close()
		m2.Close()
		l.Close()
	}
	b.ReportMetric(float64(pct(lat, 0.5).Nanoseconds())/1000, "touch-p50-µs")
	b.ReportMetric(float64(pct(lat, 0.99).Nanoseconds())/1000, "touch-p99-µs")
	b.ReportMetric(float64(faults)/float64(b.N), "faults/view")
}

// BenchmarkReadahead: a full sequential touch of a lazy restore (faults
// served in this process) with and without readahead, and a sparse touch
// (10% of the units, random order), each beside an eager restore of the
// same snapshot run in the same round: medians of the ratios.
func BenchmarkReadahead(b *testing.B) {
	size := min(benchSize(b), 512<<20)
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, false)
	opts := benchBacking(b, size)
	run := func(mode string, order []uint32) time.Duration {
		o := opts
		if mode == "eager" {
			o = append(o, WithMode(ModeEager))
		}
		t0 := time.Now()
		l, err := NewLoader(context.Background(), snap, o...)
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		if mode == "no-readahead" {
			l.e.hooks = &engineHooks{noReadahead: true}
		}
		m, v := benchView(b, l)
		defer m.Close()
		defer v.Close()
		if mode == "eager" {
			l.Wait(context.Background())
		}
		touch.Touch(m.Addr(), m.Len(), 4096, false, order, nil)
		return time.Since(t0)
	}
	// sparse: every page of 10% of the units, units in random order.
	units := int(size >> 21)
	var sparse []uint32
	for _, u := range rand.Perm(units)[:max(1, units/10)] {
		for p := 0; p < 512; p++ {
			sparse = append(sparse, uint32(u*512+p))
		}
	}
	ratios := map[string][]float64{}
	for i := 0; i < b.N; i++ {
		eager := run("eager", nil)
		for _, mode := range []string{"lazy", "no-readahead"} {
			ratios[mode+"/eager"] = append(ratios[mode+"/eager"], float64(run(mode, nil))/float64(eager))
		}
		ratios["sparse0.1/eager"] = append(ratios["sparse0.1/eager"], float64(run("lazy", sparse))/float64(eager))
	}
	for k, v := range ratios {
		sort.Float64s(v)
		b.ReportMetric(v[len(v)/2], k)
	}
}

// BenchmarkFirstTouch: the first touch of an absent 2 MiB unit (units in a
// random order, so no readahead), for a snapshot of 2 MiB chunks and one of
// 256 KiB chunks with and without splitting the unit's decode across idle
// workers, beside one core decoding the whole unit into a warm buffer
// (decode-p50). Variants run interleaved, medians over every unit.
func BenchmarkFirstTouch(b *testing.B) {
	size := min(benchSize(b), 128<<20)
	opts := benchBacking(b, size)
	type variant struct {
		name  string
		chunk int
		split bool
	}
	vs := []variant{{"2M", 2 << 20, false}, {"256K", 256 << 10, false}, {"256K-split", 256 << 10, true}}
	lat := map[string][]uint64{}
	dec := map[string][]time.Duration{}
	helped := map[string]float64{}
	for i := 0; i < b.N; i++ {
		for _, v := range vs {
			snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, v.chunk, false)
			l, err := NewLoader(context.Background(), snap, opts...)
			if err != nil {
				b.Fatal(err)
			}
			l.e.hooks = &engineHooks{noReadahead: true, noSplit: !v.split}
			m, view := benchView(b, l)
			units := int(l.Layout().FileSize) / l.e.unitSize
			order := make([]uint32, units)
			for k, u := range rand.Perm(units) {
				order[k] = uint32(u * l.e.unitSize / 4096)
			}
			ls := make([]uint64, units)
			touch.Touch(m.Addr(), m.Len(), 4096, false, order, ls)
			lat[v.name] = append(lat[v.name], ls...)
			helped[v.name] += float64(l.Stats().SplitParts) / float64(units)
			// One core decoding each unit's chunks into a warm buffer.
			d := l.e.r.NewDecoder()
			buf := make([]byte, l.e.unitSize)
			for u := 0; u < min(units, 32); u++ {
				c0, c1, _ := l.e.unitChunks(uint32(u))
				t0 := time.Now()
				for c := c0; c < c1; c++ {
					k := c - c0
					d.DecodeChunk(c, buf[k*l.e.chunkSize:(k+1)*l.e.chunkSize])
				}
				dec[fmt.Sprintf("%dK", v.chunk>>10)] = append(dec[fmt.Sprintf("%dK", v.chunk>>10)], time.Since(t0))
			}
			d.Close()
			view.Close()
			m.Close()
			l.Close()
		}
	}
	for _, v := range vs {
		p50 := pct(lat[v.name], 0.5)
		ds := dec[fmt.Sprintf("%dK", v.chunk>>10)]
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		b.ReportMetric(float64(p50.Microseconds()), v.name+"-first-p50-µs")
		b.ReportMetric(float64(pct(lat[v.name], 0.99).Microseconds()), v.name+"-first-p99-µs")
		b.ReportMetric(float64(p50)/float64(ds[len(ds)/2]), v.name+"-first/decode")
		if v.split {
			b.ReportMetric(helped[v.name]/float64(b.N), v.name+"-parts-helped/unit")
		}
	}
	for k, ds := range dec {
		b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), k+"-decode-p50-µs")
	}
}

// BenchmarkShmemFirstTouch: the first touch of an absent 2 MiB unit (2 MiB
// chunks, units in random order) on shmem, filled through the worker's
// buffer and pwrite (shmem) or decoded straight into the alias as before
// (shmem-direct), beside a hugetlb memfd; interleaved, medians, and the
// ratios to hugetlb.
func BenchmarkShmemFirstTouch(b *testing.B) {
	size := min(benchSize(b), 128<<20)
	benchBacking(b, size) // root
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, false)
	type variant struct {
		name   string
		kind   BackingKind
		direct bool
	}
	vs := []variant{{"hugetlb", BackingMemfdHugetlb, false}, {"shmem", BackingShmem, false}, {"shmem-direct", BackingShmem, true}}
	lat := map[string][]uint64{}
	for i := 0; i < b.N; i++ {
		for _, v := range vs {
			l, err := NewLoader(context.Background(), snap, WithBacking(v.kind))
			if err != nil {
				b.Fatal(err)
			}
			l.e.hooks = &engineHooks{noReadahead: true, direct: v.direct}
			m, view := benchView(b, l)
			units := int(l.Layout().FileSize) / l.e.unitSize
			order := make([]uint32, units)
			for k, u := range rand.Perm(units) {
				order[k] = uint32(u * l.e.unitSize / 4096)
			}
			ls := make([]uint64, units)
			touch.Touch(m.Addr(), m.Len(), 4096, false, order, ls)
			lat[v.name] = append(lat[v.name], ls...)
			view.Close()
			m.Close()
			l.Close()
		}
	}
	h := pct(lat["hugetlb"], 0.5)
	for _, v := range vs {
		p50 := pct(lat[v.name], 0.5)
		b.ReportMetric(float64(p50.Microseconds()), v.name+"-p50-µs")
		b.ReportMetric(float64(pct(lat[v.name], 0.99).Microseconds()), v.name+"-p99-µs")
		if v.name != "hugetlb" {
			b.ReportMetric(float64(p50)/float64(h), v.name+"/hugetlb")
		}
	}
}
