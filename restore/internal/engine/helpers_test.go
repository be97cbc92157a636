package engine

import (
	"testing"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
)

type testRegion struct {
	name string
	addr uint64
	data []byte
}

// testImage is the test image of n bytes for seed (memgen.Image).
func testImage(n int, seed uint64) []byte { return memgen.Image(n, seed) }

// writeSnap writes a snapshot of regions and returns its path.
func writeSnap(t testing.TB, regions []testRegion, codec format.Codec, chunk int) string {
	t.Helper()
	rs := make([]testutil.Region, len(regions))
	for i, r := range regions {
		rs[i] = testutil.Region{Name: r.name, Addr: r.addr, Data: r.data}
	}
	return testutil.WriteSnapshot(t, rs, codec, chunk)
}

// regionBytes returns each region of a restored layout from mem.
func checkRegions(t testing.TB, mem []byte, layout Layout, regions []testRegion) {
	t.Helper()
	if len(layout.Regions) != len(regions) {
		t.Fatalf("layout has %d regions, want %d", len(layout.Regions), len(regions))
	}
	for i, r := range regions {
		lr := layout.Regions[i]
		got := mem[lr.Offset : lr.Offset+uint64(len(r.data))]
		// Touched from C first: a goroutine waiting in a fault that this
		// process serves cannot be stopped, so a GC starting meanwhile
		// would wait for it while the fillers wait for the GC (a hang
		// seen once in about ten loaded runs of this package). In a cgo
		// call the goroutine is not in Go code, and the GC goes on.
		if len(got) > 0 {
			touch.Touch(uintptr(unsafe.Pointer(unsafe.SliceData(got))), len(got), 4096, false, nil, nil)
		}
		if string(got) != string(r.data) {
			first := -1
			for j := range got {
				if got[j] != r.data[j] {
					first = j
					break
				}
			}
			t.Fatalf("region %q differs from the original image (first difference at byte %d of %d)", r.name, first, len(r.data))
		}
	}
}
