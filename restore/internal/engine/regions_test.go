package engine

import (
	"bytes"
	"context"
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

// TestLoaderMisalignedRegions: targets map each region from its backing
// offset, so a snapshot whose regions do not start on huge-page boundaries
// (chunks smaller than a huge page) is loaded into shmem by auto, and
// refused with the fix for an explicit huge-page backing (ForTargets).
func TestLoaderMisalignedRegions(t *testing.T) {
	regions := []testRegion{{"a", 0, testImage(70<<10, 1)}, {"b", 0, testImage(5000, 2)}}
	path := writeSnap(t, regions, format.CodecS2, 64<<10)
	_, err := NewLoader(context.Background(), path, WithBacking(BackingMemfdHugetlb), ForTargets())
	if err == nil || !strings.Contains(err.Error(), `region 1 "b" starts at backing offset 131072, not a multiple of the 2048 KiB huge page`) ||
		!strings.Contains(err.Error(), "use --backing shmem, or re-create the snapshot with --chunk-size 2M") {
		t.Errorf("hugetlb: %v", err)
	}
	l, err := NewLoader(context.Background(), path, ForTargets())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if b := l.Layout().Backing; b != "shmem" {
		t.Errorf("auto chose %s for regions off huge-page boundaries, want shmem", b)
	}
}
