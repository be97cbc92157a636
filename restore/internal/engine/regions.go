package engine

import (
	"errors"
	"fmt"
	"strings"

	"github.com/uffdrestore/uffdrestore/format"
)

// layoutOf places the snapshot's regions in backing b. A format.Region
// (the file's: its first chunk and true length) and a LayoutRegion (the
// backing's: a byte offset and a page-rounded size, what a view maps and
// the attach hello sends) are two types because the file format knows
// nothing of backings and pages; this is the one conversion between them.
func layoutOf(rd *format.Reader, b *backing, name string) Layout {
	lay := Layout{Backing: b.layoutName(), PageSize: b.pageSize, ChunkSize: rd.ChunkSize(), FileSize: uint64(b.size), Snapshot: name}
	for _, reg := range rd.Regions() {
		lay.Regions = append(lay.Regions, LayoutRegion{
			Name: reg.Name, Offset: uint64(reg.FirstChunk) * uint64(rd.ChunkSize()),
			Size: uint64(roundUp(int64(reg.Length), int64(b.pageSize))), Length: reg.Length, Addr: reg.Addr, Prot: reg.Prot,
		})
	}
	return lay
}

// Region identity. A snapshot's regions are identified by their index in
// snapshot order; names need not be unique (a snapshot of a process has
// many "anon" regions, and a shared library mapped several times under one
// path). Name lookups therefore either return every match (Layout.Find) or
// fail when the name is ambiguous (Layout.Lookup).

// ErrNoRegion: no region has the name asked for.
var ErrNoRegion = errors.New("restore: no region named")

// ErrAmbiguousRegion matches an *AmbiguousRegionError with errors.Is.
var ErrAmbiguousRegion = errors.New("restore: region name is ambiguous")

// AmbiguousRegionError: several regions have the name asked for.
type AmbiguousRegionError struct {
	Name    string
	Indexes []int // every region with that name, in snapshot order
}

func (e *AmbiguousRegionError) Error() string {
	idx := make([]string, len(e.Indexes))
	for i, x := range e.Indexes {
		idx[i] = fmt.Sprintf("#%d", x)
	}
	if len(idx) > 20 {
		idx = append(idx[:20], fmt.Sprintf("... (%d in all)", len(e.Indexes)))
	}
	return fmt.Sprintf("restore: %d regions are named %q (%s): choose one by its index", len(e.Indexes), e.Name, strings.Join(idx, ", "))
}

// Is makes errors.Is(err, ErrAmbiguousRegion) true.
func (e *AmbiguousRegionError) Is(target error) bool { return target == ErrAmbiguousRegion }

// Find returns the indexes of every region named name, in snapshot order.
func (l Layout) Find(name string) []int {
	var idx []int
	for i, r := range l.Regions {
		if r.Name == name {
			idx = append(idx, i)
		}
	}
	return idx
}

// Lookup returns the index of the one region named name; it fails with
// ErrNoRegion when none is, and with an *AmbiguousRegionError (listing
// their indexes) when several are.
func (l Layout) Lookup(name string) (int, error) {
	idx := l.Find(name)
	switch len(idx) {
	case 0:
		return -1, fmt.Errorf("%w %q", ErrNoRegion, name)
	case 1:
		return idx[0], nil
	}
	return -1, &AmbiguousRegionError{Name: name, Indexes: idx}
}
