package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// TestBoundarySizes: regions of sizes around page and chunk boundaries come
// back byte for byte, with sequential first touch from C.
func TestBoundarySizes(t *testing.T) {
	const chunk = 64 << 10
	sizes := []int{1, 4095, 4096, 4097, chunk - 1, chunk, chunk + 1, 2<<20 - 1, 2 << 20, 2<<20 + 1, 3*chunk + 7}
	for _, kind := range []BackingKind{BackingMemfdHugetlb, BackingShmem} {
		t.Run(kind.String(), func(t *testing.T) {
			var regions []testRegion
			for i, n := range sizes {
				regions = append(regions, testRegion{fmt.Sprintf("r%d", i), 0, testImage(n, uint64(i+40))})
			}
			regions = append(regions, testRegion{"zero", 0, make([]byte, 3*chunk)})
			path := writeSnap(t, regions, format.CodecZstd, chunk)
			l, err := NewLoader(context.Background(), path, kernelOpts(t, kind, 16<<20)...)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			m, _ := attachLocal(t, l, false)
			touch.Touch(m.Addr(), m.Len(), 4096, true, nil, nil)
			checkRegions(t, m.Bytes(), l.Layout(), regions)
			if s := l.Stats(); s.ZeroChunks == 0 {
				t.Errorf("no zero chunks seen: %+v", s)
			}
		})
	}
}

// TestEmptySnapshot: a snapshot with no bytes at all restores to nothing.
// TestEmptySnapshot: a snapshot that holds no memory (here one empty
// region) is refused by Open and NewLoader, naming the cause, instead of
// serving 0 bytes.
func TestEmptySnapshot(t *testing.T) {
	path := writeSnap(t, []testRegion{{"empty", 0, nil}}, format.CodecZstd, 64<<10)
	for _, mode := range []Mode{ModeLazy, ModeEager} {
		if _, err := Open(context.Background(), path, WithBacking(BackingShmem), WithMode(mode)); !errors.Is(err, ErrEmptySnapshot) || !strings.Contains(err.Error(), "holds 0 bytes in 1 region(s)") {
			t.Errorf("Open %v: %v, want ErrEmptySnapshot", mode, err)
		}
	}
	if _, err := NewLoader(context.Background(), path, WithBacking(BackingShmem)); !errors.Is(err, ErrEmptySnapshot) {
		t.Errorf("NewLoader: %v, want ErrEmptySnapshot", err)
	}
}

// TestManyViewsOneFill: a shared and a private view of one backing share
// every fill; the private view's writes stay private.
func TestManyViewsOneFill(t *testing.T) {
	regions := []testRegion{{"heap", 0, testImage(8<<20, 7)}}
	path := writeSnap(t, regions, format.CodecS2, 2<<20)
	for _, premap := range []bool{false, true} {
		t.Run(fmt.Sprintf("premap=%v", premap), func(t *testing.T) {
			opts := append(kernelOpts(t, BackingMemfdHugetlb, 8<<20), WithPremap(premap))
			l, err := NewLoader(context.Background(), path, opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			m1, v1 := attachLocal(t, l, false)
			m2, v2 := attachLocal(t, l, true)
			touch.Touch(m1.Addr(), m1.Len(), 4096, false, nil, nil)
			// Wait returns once the last fill has been published, premap
			// into the second view included.
			if err := l.Wait(context.Background()); err != nil {
				t.Fatal(err)
			}
			touch.Touch(m2.Addr(), m2.Len(), 4096, false, nil, nil)
			checkRegions(t, m1.Bytes(), l.Layout(), regions)
			checkRegions(t, m2.Bytes(), l.Layout(), regions)
			s := l.Stats()
			if s.FilledByFault+s.Readahead != int64(s.Units) || s.BytesDecoded > int64(len(regions[0].data)) {
				t.Errorf("units filled %d+%d (fault+readahead) times for %d units (%d bytes decoded): not one fill", s.FilledByFault, s.Readahead, s.Units, s.BytesDecoded)
			}
			s2 := v2.Stats()
			if premap && s2.FaultsMinor+s2.FaultsMissing != 0 {
				t.Errorf("premapped second view still faulted %d times", s2.FaultsMinor+s2.FaultsMissing)
			}
			if !premap && s2.FaultsMinor != int64(s.Units) {
				t.Errorf("second view: %d minor faults, want %d", s2.FaultsMinor, s.Units)
			}
			_ = v1
			// A write to the private view stays private.
			touch.Touch(m2.Addr(), m2.Len(), 1<<20, true, nil, nil)
			m2.Bytes()[5] ^= 0xff
			if m1.Bytes()[5] != regions[0].data[5] {
				t.Fatal("a private view's write reached the shared view")
			}
		})
	}
}

// TestCorruptChunkPoisons: a chunk that fails its checksum during a lazy
// fill is poisoned: the toucher gets SIGBUS, never wrong bytes, and the
// error is reported.
func TestCorruptChunkPoisons(t *testing.T) {
	if p := os.Getenv("UFFDRESTORE_POISON_CHILD"); p != "" {
		r, err := Open(context.Background(), p, WithBacking(BackingMemfdHugetlb))
		if err != nil {
			fmt.Fprintln(os.Stderr, "open:", err)
			os.Exit(3)
		}
		// Chunk 0 is good (it reads as the image's first 2 MiB); chunk 1
		// (the second 2 MiB) is corrupt.
		if bytes.Equal(r.Bytes()[:2<<20], testImage(6<<20, 3)[:2<<20]) {
			fmt.Fprintln(os.Stderr, "good-page-read")
		} else {
			fmt.Fprintln(os.Stderr, "good-page-wrong")
		}
		s, _ := r.Stats(context.Background())
		fmt.Fprintf(os.Stderr, "poisoned-before=%d\n", s.Poisoned)
		v := r.Bytes()[2<<20+100] // SIGBUS
		fmt.Fprintf(os.Stderr, "read-returned %d\n", v)
		os.Exit(0)
	}
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 8)
	if !uffd.Probe().FeatureOK(uffd.FeaturePoison) {
		testutil.Skip(t, "UFFDIO_POISON needs Linux >= 6.6")
	}
	img := testImage(6<<20, 3)
	path := writeSnap(t, []testRegion{{"a", 0, img}}, format.CodecRaw, 2<<20)
	// Flip a byte inside chunk 1's stored bytes (raw codec: at a known place).
	f, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	off := f.Chunk(1).Offset + 1000
	f.Close()
	b, _ := os.ReadFile(path)
	b[off] ^= 0x55
	os.WriteFile(path, b, 0o600)

	cmd := exec.Command(os.Args[0], "-test.run=^TestCorruptChunkPoisons$")
	cmd.Env = append(os.Environ(), "UFFDRESTORE_POISON_CHILD="+path)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || !strings.Contains(string(out), "signal SIGBUS") {
		t.Fatalf("toucher of a corrupt chunk did not get SIGBUS (err %v):\n%s", err, out)
	}
	if !strings.Contains(string(out), "good-page-read") || strings.Contains(string(out), "read-returned") {
		t.Fatalf("unexpected child output:\n%s", out)
	}

	// Without POISON (Linux < 6.6, forced here): the helper ends the view
	// and says why; the toucher waits (never the chunk's bytes) until it
	// is killed.
	cmd = exec.Command(os.Args[0], "-test.run=^TestCorruptChunkPoisons$")
	cmd.Env = append(os.Environ(), "UFFDRESTORE_POISON_CHILD="+path, DisablePoisonEnv+"=1")
	var stderr lockedBuf
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), "uffdrestore-helper:") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()
	if got := stderr.String(); !strings.Contains(got, "uffdrestore-helper: restore: view") || !strings.Contains(got, "UFFDIO_POISON") ||
		!strings.Contains(got, "unit 1") || strings.Contains(got, "read-returned") {
		t.Fatalf("without POISON: want the helper to say why the fault is not answered and the toucher to wait; child stderr:\n%s", got)
	}

	// In this process: the Loader reports the error and the stats count it.
	l, err := NewLoader(context.Background(), path, WithBacking(BackingMemfdHugetlb))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Wait(context.Background()); !errors.Is(err, format.ErrChecksum) {
		t.Fatalf("Wait = %v, want a checksum error", err)
	}
	if s := l.Stats(); s.Poisoned != 1 || !strings.Contains(s.LastError, "unit 1") {
		t.Fatalf("stats after a corrupt chunk: poisoned %d, last error %q", s.Poisoned, s.LastError)
	}
	// Eager mode refuses the snapshot outright, naming the chunk.
	if _, err := NewLoader(context.Background(), path, WithBacking(BackingMemfdHugetlb), WithMode(ModeEager)); !errors.Is(err, format.ErrChecksum) {
		t.Fatalf("eager load of a corrupt snapshot = %v, want a checksum error", err)
	}
}

// TestNoHugePagesError: asking for more huge pages than are free fails up
// front with the numbers and the fix.
func TestNoHugePagesError(t *testing.T) {
	testutil.RequireRoot(t)
	free := testutil.FreeHugePages()
	_, err := newBacking(BackingMemfdHugetlb, (free+10)<<21, "")
	if !errors.Is(err, ErrNoHugePages) || !strings.Contains(err.Error(), "/proc/sys/vm/nr_hugepages") || !strings.Contains(err.Error(), "--backing shmem") {
		t.Fatalf("newBacking beyond the pool: %v", err)
	}
	// auto falls back to shmem.
	b, err := newBacking(BackingAuto, (free+10)<<21, "")
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	if b.kind != BackingShmem {
		t.Fatalf("auto with no room picked %v", b.kind)
	}
}

func TestBackingSealed(t *testing.T) {
	testutil.RequireRoot(t)
	b, err := newBacking(BackingShmem, 1<<20, "")
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	if err := unix.Ftruncate(b.fd.Fd(), 4096); !errors.Is(err, unix.EPERM) {
		t.Fatalf("shrinking a sealed backing: %v, want EPERM", err)
	}
	if _, err := newBacking(BackingHugetlbfs, 1<<20, t.TempDir()); err == nil || !strings.Contains(err.Error(), "not a hugetlbfs mount") {
		t.Fatalf("hugetlbfs backing on a plain dir: %v", err)
	}
}

// TestHugetlbfsBacking restores into a file of a hugetlbfs mount.
func TestHugetlbfsBacking(t *testing.T) {
	testutil.RequireHugePages(t, 8)
	dir := testutil.MountHugetlbfs(t)
	regions := []testRegion{{"a", 0, testImage(5<<20, 9)}}
	path := writeSnap(t, regions, format.CodecZstd, 2<<20)
	r := openT(t, path, WithHugetlbfsDir(dir))
	if r.Backing() != BackingHugetlbfs {
		t.Fatalf("backing %v", r.Backing())
	}
	if !bytes.Equal(r.Region("a"), regions[0].data) {
		t.Fatal("content differs")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Fatalf("backing file left visible in the mount: %v", ents)
	}
}

// TestFaultPathAllocations: serving faults allocates nothing per fault.
func TestFaultPathAllocations(t *testing.T) {
	regions := []testRegion{{"a", 0, testImage(32<<20, 4)}}
	path := writeSnap(t, regions, format.CodecS2, 64<<10)
	l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingShmem, 0), WithWorkers(1))...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	m, _ := attachLocal(t, l, false)
	// Warm up: the first faults size the per-worker buffers.
	touch.Touch(m.Addr(), 1<<20, 64<<10, false, []uint32{15, 13, 11, 9, 7, 5, 3, 1}, nil)
	runtime.GC()
	var before, after runtime.MemStats
	// Not in order: a sequential walk would be filled by readahead, with
	// few faults left to count.
	n := m.Len() / (64 << 10)
	order := make([]uint32, n)
	for i := range order {
		order[i] = uint32((i*7 + 16) % n)
	}
	runtime.ReadMemStats(&before)
	touch.Touch(m.Addr(), m.Len(), 64<<10, false, order, nil)
	runtime.ReadMemStats(&after)
	faults := l.Stats().FaultsMissing + l.Stats().FaultsMinor
	allocs := after.Mallocs - before.Mallocs
	if faults < 400 {
		t.Fatalf("only %d faults", faults)
	}
	if allocs > 32 { // a few from the runtime and the race detector; none per fault
		t.Fatalf("%d allocations while serving %d faults: the fault path allocates", allocs, faults)
	}
	t.Logf("%d allocations for %d faults", allocs, faults)
}

// TestPunchedPageComesBackFilled: a target that MADV_REMOVEs part of its
// shared view punches the page out of the backing; touching it again
// fills it again with the snapshot's bytes (not zeros), and the unit's other
// pages keep what the target wrote into them.
func TestPunchedPageComesBackFilled(t *testing.T) {
	for _, kind := range []BackingKind{BackingShmem, BackingMemfdHugetlb} {
		t.Run(kind.String(), func(t *testing.T) {
			regions := []testRegion{{"a", 0, testImage(4<<20, 17)}}
			path := writeSnap(t, regions, format.CodecZstd, 2<<20)
			l, err := NewLoader(context.Background(), path, kernelOpts(t, kind, 4<<20)...)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			m, _ := attachLocal(t, l, false)
			touch.Touch(m.Addr(), m.Len(), 4096, false, nil, nil)
			mem := m.Bytes()
			page := l.Layout().PageSize
			mem[0] ^= 0xff // the target's own write, in unit 0
			punch := 5 * page
			if kind.hugetlb() {
				punch = 2 << 20 // unit 1, a whole huge page
			}
			if err := m.Madvise(punch, page, unix.MADV_REMOVE); err != nil {
				t.Fatal(err)
			}
			touch.Touch(m.Addr()+uintptr(punch), page, page, false, nil, nil)
			if !bytes.Equal(mem[punch:punch+page], regions[0].data[punch:punch+page]) {
				t.Fatal("punched page did not come back with the snapshot's bytes")
			}
			if mem[0] != regions[0].data[0]^0xff {
				t.Fatal("refill overwrote the target's write to another page of the unit")
			}
			if s := l.Stats(); s.Refills != 1 {
				t.Fatalf("refills = %d, want 1", s.Refills)
			}
		})
	}
}

// TestRefillRaceKeepsWrites: a fault that finds a unit absent while a
// refill is taking it from present to absent must refill only its missing
// pages: a shared target's write to another page of the unit survives. The
// hook runs the racing fault (another shared view touching the unit) inside
// refill's window, every time, for every unit.
func TestRefillRaceKeepsWrites(t *testing.T) {
	const chunk, page = 64 << 10, 4096
	regions := []testRegion{{"a", 0, testImage(1<<20, 23)}}
	path := writeSnap(t, regions, format.CodecZstd, chunk)
	l, err := NewLoader(context.Background(), path, kernelOpts(t, BackingShmem, 0)...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	m1, _ := attachLocal(t, l, false)
	m2, _ := attachLocal(t, l, false)
	touch.Touch(m1.Addr(), m1.Len(), page, false, nil, nil)
	img, mem1, mem2 := regions[0].data, m1.Bytes(), m2.Bytes()
	var raced atomic.Int32
	l.e.hooks = &engineHooks{refillAbsent: func(u uint32) {
		// The second view's first touch of page 2 of the unit, now.
		touch.Touch(m2.Addr()+uintptr(int(u)*chunk+2*page), page, page, false, nil, nil)
		raced.Add(1)
	}}
	units := len(img) / chunk
	for round := 0; round < 4; round++ {
		for u := 0; u < units; u++ {
			base := u * chunk
			mem1[base] = img[base] ^ byte(0x5a+round) // the target's write, page 0
			if err := m1.Madvise(base+page, page, unix.MADV_REMOVE); err != nil {
				t.Fatal(err)
			}
			if err := m2.Madvise(0, m2.Len(), unix.MADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
			touch.Touch(m1.Addr()+uintptr(base+page), page, page, false, nil, nil)
			if mem1[base] != img[base]^byte(0x5a+round) {
				t.Fatalf("round %d unit %d: a fault racing the refill decoded the whole unit over the target's write", round, u)
			}
			if !bytes.Equal(mem1[base+page:base+2*page], img[base+page:base+2*page]) ||
				!bytes.Equal(mem2[base+2*page:base+3*page], img[base+2*page:base+3*page]) {
				t.Fatalf("round %d unit %d: the refilled or the racing page is not the snapshot's", round, u)
			}
			mem1[base] = img[base]
		}
	}
	if want := int32(4 * units); raced.Load() != want {
		t.Fatalf("the racing touch ran %d times, want %d", raced.Load(), want)
	}
	if s := l.Stats(); s.Errors != 0 {
		t.Fatalf("errors: %s", s.LastError)
	}
}

// TestFailedPunchClearsUnit: when punching a unit that failed to fill out of
// the backing fails too, the unit's unverified bytes are overwritten, never
// left in the page cache, and the error says what happened.
func TestFailedPunchClearsUnit(t *testing.T) {
	const chunk = 64 << 10
	img := make([]byte, 8*chunk)
	for i := range img {
		img[i] = byte(i*13 + i>>10 + 1)
	}
	path := writeSnap(t, []testRegion{{"a", 0, img}}, format.CodecRaw, chunk)
	f, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	off := f.Chunk(2).Offset + 100
	f.Close()
	b, _ := os.ReadFile(path)
	b[off] ^= 0x55
	os.WriteFile(path, b, 0o600)
	l, err := NewLoader(context.Background(), path, kernelOpts(t, BackingShmem, 0)...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var punches atomic.Int32
	l.e.hooks = &engineHooks{punch: func(u uint32) error { punches.Add(1); return unix.EIO }}
	if err := l.Wait(context.Background()); !errors.Is(err, format.ErrChecksum) {
		t.Fatalf("Wait = %v, want a checksum error", err)
	}
	if punches.Load() != 1 {
		t.Fatalf("%d punches, want 1", punches.Load())
	}
	got := make([]byte, chunk)
	if _, err := unix.Pread(l.BackingFile().Fd(), got, 2*chunk); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, chunk)) {
		t.Fatal("the failed unit's unverified bytes stayed in the backing after its punch failed")
	}
	if s := l.Stats(); !strings.Contains(s.LastError, "punching it out of the backing failed too") {
		t.Fatalf("last error: %q", s.LastError)
	}
}

// lockedBuf is a bytes.Buffer safe for a child's output and the test.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
