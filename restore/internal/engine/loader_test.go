package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	os.Exit(testutil.Main(m))
}

// attachLocal maps the loader's backing in this process, registers it on a
// new uffd and attaches it as a view. Touch it only from C (touch.Touch): a
// Go goroutine faulting on it would hold its P while the handler, in this
// same process, needs one.
func attachLocal(t *testing.T, l *Loader, private bool) (*uffd.Mapping, *View) {
	t.Helper()
	lay := l.Layout()
	hugetlb := lay.Backing == "hugetlb"
	want := uffd.FeatureMinorShmem | uffd.FeatureMissingShmem | uffd.FeaturePoison
	if hugetlb {
		want = uffd.FeatureMinorHugetlbfs | uffd.FeatureMissingHugetlbfs | uffd.FeaturePoison
	}
	u, err := uffd.Open(uffd.OpenOptions{NonBlock: true}, want)
	if errors.Is(err, uffd.ErrNotSupported) {
		testutil.Skip(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	flags := unix.MAP_SHARED
	if private {
		flags = unix.MAP_PRIVATE | unix.MAP_NORESERVE
	}
	m, err := uffd.Mmap(0, int(lay.FileSize), unix.PROT_READ|unix.PROT_WRITE, flags, l.BackingFile().Fd(), 0)
	if err != nil {
		u.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if _, err := u.Register(m.Addr(), uintptr(lay.FileSize), uffd.ModeMinor|uffd.ModeMissing); err != nil {
		u.Close()
		t.Fatal(err)
	}
	v, err := l.AttachView(u, []ViewRange{{Base: m.Addr(), Size: lay.FileSize, Private: private}}, "local")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return m, v
}

func kernelOpts(t *testing.T, kind BackingKind, size int) []Option {
	testutil.RequireRoot(t)
	if kind.hugetlb() {
		testutil.RequireHugePages(t, int64(size>>21)+4)
	}
	return []Option{WithBacking(kind)}
}

func TestLoaderLazyRoundTrip(t *testing.T) {
	for _, kind := range []BackingKind{BackingMemfdHugetlb, BackingShmem} {
		for _, codec := range []format.Codec{format.CodecZstd, format.CodecS2, format.CodecRaw} {
			for _, chunk := range []int{64 << 10, 2 << 20} {
				t.Run(fmt.Sprintf("%v/%v/%dK", kind, codec, chunk>>10), func(t *testing.T) {
					regions := []testRegion{
						{"heap", 0x7f0000000000, testImage(9<<20+4097, 1)},
						{"small", 0, testImage(4095, 2)},
						{"empty", 0, nil},
						{"stack", 0x7ffd00000000, testImage(3<<20, 3)},
					}
					path := writeSnap(t, regions, codec, chunk)
					l, err := NewLoader(context.Background(), path, kernelOpts(t, kind, 16<<20)...)
					if err != nil {
						t.Fatal(err)
					}
					defer l.Close()
					m, _ := attachLocal(t, l, false)
					// Random first touch, from C.
					lay := l.Layout()
					page := lay.PageSize
					stride := 4096
					n := int(lay.FileSize) / stride
					order := make([]uint32, n)
					for i := range order {
						order[i] = uint32((i * 7919) % n)
					}
					touch.Touch(m.Addr(), int(lay.FileSize), stride, false, order, nil)
					checkRegions(t, m.Bytes(), lay, regions)
					s := l.Stats()
					if s.FaultsMinor+s.FaultsMissing == 0 {
						t.Errorf("no faults served: %+v", s)
					}
					if s.UnitsPresent != int64(s.Units) {
						t.Errorf("after touching everything %d of %d units present", s.UnitsPresent, s.Units)
					}
					// Lazy fills a unit because a fault asked, or ahead of
					// faults that walked units in order (readahead).
					if s.FilledByFault+s.Readahead != int64(s.Units) || s.FilledByPrefill != s.Readahead {
						t.Errorf("lazy: filled by fault %d, by readahead %d, by prefill %d; want %d by fault or readahead", s.FilledByFault, s.Readahead, s.FilledByPrefill, s.Units)
					}
					_ = page
				})
			}
		}
	}
}

// threadCount is this process's number of threads.
func threadCount(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads: line in /proc/self/status")
	return 0
}

// TestIdleViewsHoldNoThreads: a view's fault loop waits for faults parked
// in Go's poller, holding no OS thread (and no P in a system call, which
// the runtime's monitor would keep taking back every 20 µs, preempting the
// fillers): 48 idle views add a handful of threads, not 48; each still
// serves its faults, and Close wakes every one out of its wait.
func TestIdleViewsHoldNoThreads(t *testing.T) {
	regions := []testRegion{{"a", 0, testImage(2<<20, 41)}}
	path := writeSnap(t, regions, format.CodecZstd, 2<<20)
	l, err := NewLoader(context.Background(), path, kernelOpts(t, BackingShmem, 2<<20)...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const n = 48
	maps := make([]*uffd.Mapping, n)
	views := make([]*View, n)
	before := threadCount(t)
	for i := range n {
		maps[i], views[i] = attachLocal(t, l, i%2 == 1)
	}
	time.Sleep(50 * time.Millisecond) // every loop has reached its wait
	if grown := threadCount(t) - before; grown > 8 {
		t.Errorf("%d idle views added %d threads: their fault loops hold threads while they wait", n, grown)
	}
	for i, m := range maps {
		touch.Touch(m.Addr()+uintptr(i)*4096, 4096, 4096, false, nil, nil)
		if got, want := m.Bytes()[i*4096], regions[0].data[i*4096]; got != want {
			t.Fatalf("view %d: byte %#x, want %#x", i, got, want)
		}
	}
	done := make(chan struct{})
	go func() {
		for _, v := range views {
			v.Close()
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("closing idle views did not wake their fault loops")
	}
}
