package engine

import (
	"math/rand/v2"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

type testRegion struct {
	name string
	addr uint64
	data []byte
}

// testImage makes n bytes that look like memory: runs of zeros (whole zero
// chunks included), text-like compressible runs and random runs.
func testImage(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 99))
	b := make([]byte, n)
	for off := 0; off < n; {
		run := min(n-off, 1+rng.IntN(192<<10))
		switch rng.IntN(4) {
		case 0: // zeros
		case 1:
			for i := 0; i < run; i++ {
				b[off+i] = byte(rng.Uint32())
			}
		default:
			word := []byte("the quick brown fox jumps over the lazy dog 0123456789 ")
			for i := 0; i < run; i++ {
				b[off+i] = word[(i+off/7)%len(word)] ^ byte(i>>12)
			}
		}
		off += run
	}
	// A guaranteed all-zero 2 MiB stretch if there is room.
	if n >= 8<<20 {
		clear(b[4<<20 : 6<<20])
	}
	return b
}

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
