package restore

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
)

// TestRegionIdentity: regions are identified by index; a name several
// regions share (as in every snapshot of a process) is never resolved to
// the first of them.
func TestRegionIdentity(t *testing.T) {
	regions := []testRegion{
		{"anon", 0, testImage(70<<10, 1)},
		{"/usr/lib/libx.so", 0, testImage(5000, 2)},
		{"anon", 0, testImage(130<<10, 3)},
		{"[heap]", 0, testImage(64<<10, 4)},
	}
	path := writeSnap(t, regions, format.CodecS2, 64<<10)
	r := openT(t, path, kernelOpts(t, BackingShmem, 1<<20)...)
	for i, want := range regions {
		if !bytes.Equal(r.RegionAt(i), want.data) {
			t.Errorf("RegionAt(%d) differs", i)
		}
	}
	lay := r.Layout()
	if got := lay.Find("anon"); !reflect.DeepEqual(got, []int{0, 2}) {
		t.Errorf(`Find("anon") = %v, want [0 2]`, got)
	}
	if _, err := lay.Lookup("anon"); !errors.Is(err, ErrAmbiguousRegion) || !strings.Contains(err.Error(), `2 regions are named "anon" (#0, #2)`) {
		t.Errorf(`Lookup("anon") = %v, want an ambiguity error`, err)
	}
	if r.Region("anon") != nil {
		t.Error(`Region("anon") returned one of two regions named so`)
	}
	if i, err := lay.Lookup("[heap]"); err != nil || i != 3 {
		t.Errorf(`Lookup("[heap]") = %d, %v`, i, err)
	}
	if !bytes.Equal(r.Region("[heap]"), regions[3].data) {
		t.Error(`Region("[heap]") differs`)
	}
	if _, err := lay.Lookup("[stack]"); !errors.Is(err, ErrNoRegion) {
		t.Errorf(`Lookup("[stack]") = %v, want ErrNoRegion`, err)
	}
}
