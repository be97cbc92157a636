package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// threadMinorFaults is the calling OS thread's minor page faults so far.
func threadMinorFaults(t *testing.T) int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		t.Fatal(err)
	}
	return ru.Minflt
}

// TestShmemFillTakesNoPageFaults: filling a 2 MiB unit of a shmem backing
// must not fault its 512 pages in one by one through the alias mapping (in
// a VM each of those faults, and the first access to each new mapping, is
// what made a shmem fault 10-20x slower than a hugetlb one). The fill is
// run on one locked thread and its minor faults counted; the old way
// (decoding straight into the alias, forced by a hook) is counted too, so
// the test shows it can tell the two apart. The filled bytes must equal the
// image.
func TestShmemFillTakesNoPageFaults(t *testing.T) {
	const units = 4
	img := testImage(units<<21-5000, 31) // the last unit is short
	clear(img[4<<20 : 6<<20])            // unit 2 is a zero chunk
	regions := []testRegion{{"a", 0, img}}
	path := writeSnap(t, regions, format.CodecZstd, 2<<20)
	for _, direct := range []bool{false, true} {
		l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingShmem, 0), WithWorkers(1))...)
		if err != nil {
			t.Fatal(err)
		}
		e := l.e
		if direct {
			e.hooks = &engineHooks{direct: true}
		}
		if e.unitSize != 2<<20 || e.nUnits != units {
			t.Fatalf("unit size %d, %d units", e.unitSize, e.nUnits)
		}
		runtime.LockOSThread()
		w := &workerState{dec: e.r.NewDecoder()}
		for u := 0; u < e.nUnits; u++ {
			if !e.state[u].CompareAndSwap(stAbsent, stFilling) {
				t.Fatalf("unit %d already claimed", u)
			}
		}
		// Warm the decoder on every chunk (its buffers grow to what the
		// largest needs: faults that are not the fill's), and the fill's
		// buffer on unit 0.
		scratch := make([]byte, e.chunkSize)
		for c := 0; c < e.r.NumChunks(); c++ {
			if e.r.Chunk(c).Codec != format.CodecZero {
				if err := w.dec.DecodeChunk(c, scratch); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := e.fillUnit(w, 0, false); err != nil {
			t.Fatal(err)
		}
		f0 := threadMinorFaults(t)
		for u := 1; u < e.nUnits; u++ {
			if err := e.fillUnit(w, uint32(u), false); err != nil {
				t.Fatal(err)
			}
		}
		faults := threadMinorFaults(t) - f0
		runtime.UnlockOSThread()
		w.dec.Close()
		pages := int64(e.nUnits-1) * int64(e.unitSize) / 4096
		mem := e.alias.Bytes()
		got := bytes.Equal(mem[:len(img)], img) && !bytes.ContainsFunc(mem[len(img):e.nUnits*e.unitSize], func(r rune) bool { return r != 0 })
		l.Close()
		if !got {
			t.Fatalf("direct=%v: filled bytes differ from the image", direct)
		}
		t.Logf("direct=%v: %d minor faults filling %d pages", direct, faults, pages)
		if !direct && faults > pages/16 {
			t.Errorf("filling %d shmem pages took %d page faults: the fill faults pages in one by one", pages, faults)
		}
		if direct && faults < pages/2 {
			t.Errorf("the direct fill took only %d faults for %d pages: the fault count does not show the difference", faults, pages)
		}
	}
}

// TestShmemPartlyMappedUnits: on shmem, units whose pages are partly
// zapped (MADV_DONTNEED: still in the page cache, unmapped in the view) and
// partly punched out (MADV_REMOVE: gone from the backing), in runs that
// start and end anywhere in the unit, come back byte for byte: the snapshot's
// bytes where they were punched, the target's writes where they were kept.
func TestShmemPartlyMappedUnits(t *testing.T) {
	const size = 6 << 20
	img := testImage(size, 41)
	regions := []testRegion{{"a", 0, img}}
	path := writeSnap(t, regions, format.CodecZstd, 2<<20)
	l, err := NewLoader(context.Background(), path, kernelOpts(t, BackingShmem, 0)...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	m, _ := attachLocal(t, l, false)
	touch.Touch(m.Addr(), m.Len(), 4096, false, nil, nil)
	mem := m.Bytes()
	want := bytes.Clone(img)
	// The target's writes, in every unit.
	for off := 4096 + 17; off < size; off += 300 << 10 {
		mem[off] ^= 0x5a
		want[off] ^= 0x5a
	}
	type op struct{ off, n, advice int }
	ops := []op{
		{0, 4096, unix.MADV_REMOVE},                // first page of unit 0
		{8192, 3 * 4096, unix.MADV_DONTNEED},       // a zapped run
		{64 << 10, 100 << 10, unix.MADV_REMOVE},    // a punched run mid-unit
		{(2 << 20) - 4096, 8192, unix.MADV_REMOVE}, // across units 0 and 1
		{(2 << 20) + 4096, 1 << 20, unix.MADV_DONTNEED},
		{(4 << 20) + 8192, (2 << 20) - 8192, unix.MADV_REMOVE}, // unit 2 to its end
		{(4 << 20), 4096, unix.MADV_DONTNEED},
	}
	for _, o := range ops {
		if err := m.Madvise(o.off, o.n, o.advice); err != nil {
			t.Fatal(err)
		}
		if o.advice == unix.MADV_REMOVE {
			// Punched pages lose the target's writes: the snapshot's
			// bytes come back.
			copy(want[o.off:o.off+o.n], img[o.off:o.off+o.n])
		}
	}
	// Touch in an order that hits units part-way first.
	touch.Touch(m.Addr()+uintptr(5<<20), 1<<20, 4096, false, nil, nil)
	touch.Touch(m.Addr(), m.Len(), 4096, false, nil, nil)
	if i := firstDiff(mem[:size], want); i >= 0 {
		t.Fatalf("restored memory differs at byte %#x (unit %d): got %#x, want %#x", i, i>>21, mem[i], want[i])
	}
	if s := l.Stats(); s.Refills != 3 || s.LastError != "" {
		t.Fatalf("refills = %d (want 3, one per unit punched), last error %q", s.Refills, s.LastError)
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// touchUnits touches every page of each unit in order, from C.
func touchUnits(m *uffd.Mapping, unit int, units ...int) {
	for _, u := range units {
		touch.Touch(m.Addr()+uintptr(u*unit), unit, 4096, false, nil, nil)
	}
}

// TestReadaheadSequential: faults that walk units in order make the engine
// fill the units ahead of them, so most units are never faulted on; a
// pattern that breaks (jumps, backwards, random) stops it, and the bytes
// are the image's whatever the order.
func TestReadaheadSequential(t *testing.T) {
	const units, unit = 24, 2 << 20
	img := testImage(units*unit-3000, 51)
	regions := []testRegion{{"a", 0, img}}
	path := writeSnap(t, regions, format.CodecZstd, unit)
	open := func(t *testing.T) (*Loader, *uffd.Mapping) {
		l, err := NewLoader(context.Background(), path, kernelOpts(t, BackingShmem, 0)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		m, _ := attachLocal(t, l, false)
		return l, m
	}
	t.Run("sequential", func(t *testing.T) {
		l, m := open(t)
		touch.Touch(m.Addr(), m.Len(), 4096, false, nil, nil)
		checkRegions(t, m.Bytes(), l.Layout(), regions)
		s := l.Stats()
		t.Logf("%d faults, %d units filled by readahead, %d by faults", s.FaultsMinor+s.FaultsMissing, s.Readahead, s.FilledByFault)
		if s.Readahead < units/2 || s.FilledByFault > units/2 {
			t.Fatalf("a sequential walk of %d units: %d filled by readahead, %d by faults; want most by readahead", units, s.Readahead, s.FilledByFault)
		}
	})
	t.Run("stops", func(t *testing.T) {
		l, m := open(t)
		// Three in a row start a window after unit 2; the jump to 12 and
		// on to 16 and 9 breaks the pattern: nothing past the first
		// window may be filled.
		touchUnits(m, unit, 0, 1, 2, 12, 16, 9)
		time.Sleep(100 * time.Millisecond)
		win := l.e.raInitUnits()
		for u := 3 + win; u < units; u++ {
			if st := l.e.state[u].Load(); st != stAbsent && u != 12 && u != 16 && u != 9 {
				t.Errorf("unit %d was filled (state %d) after the pattern broke", u, st)
			}
		}
		touchUnits(m, unit, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23)
		checkRegions(t, m.Bytes(), l.Layout(), regions)
	})
	t.Run("patterns", func(t *testing.T) {
		l, m := open(t)
		// Runs that start readahead, break it, go backwards, restart it
		// and run off the end, with readahead and faults racing.
		touchUnits(m, unit, 0, 1, 2, 3, 4, 15, 16, 17, 18, 8, 7, 6, 5, 9, 10, 11, 20, 21, 22, 23, 12, 13, 14, 19)
		checkRegions(t, m.Bytes(), l.Layout(), regions)
		if s := l.Stats(); s.LastError != "" {
			t.Fatal(s.LastError)
		}
	})
}

// TestSplitFirstTouch: the first touch of a unit made of several chunks is
// decoded by idle workers too (the parts they took are counted), and the
// bytes are the image's for every chunk size under the 2 MiB unit, with
// zero, stored-raw and short chunks inside units; a corrupt part fails its
// unit whichever worker decoded it.
func TestSplitFirstTouch(t *testing.T) {
	const size = 16<<20 - 5000 // a short last chunk
	img := testImage(size, 61)
	for i := 3 << 20; i < 3<<20+(512<<10); i++ {
		img[i] = byte(i * 2654435761 >> 13) // incompressible: stored raw
	}
	regions := []testRegion{{"a", 0, img}}
	// The headroom the package documentation asks of a program that embeds
	// a Loader: a P for each of the 2 workers and one more. The toucher
	// here is this process's own cgo call, which holds a P while it waits
	// in the fault; without the extra one, a worker woken to help waited
	// for that P (until the runtime took it back, up to 10 ms) in about
	// one run in four, and helped with nothing.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(3, runtime.GOMAXPROCS(0))))
	for _, chunk := range []int{64 << 10, 256 << 10, 1 << 20} {
		t.Run(fmt.Sprintf("chunk=%dK", chunk>>10), func(t *testing.T) {
			path := writeSnap(t, regions, format.CodecZstd, chunk)
			// A helping worker that gets no CPU while the owner decodes
			// takes no part (the owner decodes them all): with 2 parts a
			// unit and other test binaries busy on every CPU, that
			// happened to all 8 units of a run. A few rounds, each on a
			// new Loader; split must show in one.
			for round := 1; ; round++ {
				l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingMemfdHugetlb, 16<<20), WithWorkers(2))...)
				if err != nil {
					t.Fatal(err)
				}
				m, _ := attachLocal(t, l, false)
				units := m.Len() / (2 << 20)
				order := make([]uint32, units) // not in order: no readahead
				for i := range order {
					order[i] = uint32((i * 5 % units) * 512)
				}
				touch.Touch(m.Addr(), m.Len(), 4096, false, order, nil)
				touch.Touch(m.Addr(), m.Len(), 4096, false, nil, nil)
				checkRegions(t, m.Bytes(), l.Layout(), regions)
				s := l.Stats()
				l.Close()
				t.Logf("round %d: %d units, %d filled by faults, %d chunks decoded by a helping worker", round, s.Units, s.FilledByFault, s.SplitParts)
				if s.FilledByFault != int64(units) {
					t.Fatalf("%d of %d units filled by faults", s.FilledByFault, units)
				}
				if s.SplitParts > 0 {
					break
				}
				if round == 5 {
					t.Fatalf("in %d rounds of %d units filled by faults, no chunk was decoded by another worker: the first touch was not split", round, units)
				}
			}
		})
	}
	t.Run("corrupt-part", func(t *testing.T) {
		path := writeSnap(t, regions, format.CodecZstd, 256<<10)
		l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingMemfdHugetlb, 16<<20), WithWorkers(2))...)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		e := l.e
		const u = 1
		c0, c1, _ := e.unitChunks(u)
		bad := c1 - 1 // the last part: the owner or a helper, whoever claims it
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		ch := e.r.Chunk(bad)
		var b [1]byte
		f.ReadAt(b[:], int64(ch.Offset+uint64(ch.StoredLen)/2))
		b[0] ^= 0xff
		f.WriteAt(b[:], int64(ch.Offset+uint64(ch.StoredLen)/2))
		f.Close()
		if !e.state[u].CompareAndSwap(stAbsent, stFilling) {
			t.Fatal("unit already claimed")
		}
		w := &workerState{dec: e.r.NewDecoder()}
		defer w.dec.Close()
		err = e.fillUnit(w, u, true)
		if !errors.Is(err, format.ErrChecksum) {
			t.Fatalf("fill of a unit with a corrupt chunk %d (of %d..%d) returned %v, want a checksum error", bad, c0, c1-1, err)
		}
		// The job is reusable after the failure.
		if !e.state[u+1].CompareAndSwap(stAbsent, stFilling) {
			t.Fatal("unit already claimed")
		}
		if err := e.fillUnit(w, u+1, true); err != nil {
			t.Fatal(err)
		}
		if off := (u + 1) << 21; !bytes.Equal(e.alias.Bytes()[off:off+2<<20], img[off:off+2<<20]) {
			t.Fatal("the unit after the failed one differs from the image")
		}
	})
}
