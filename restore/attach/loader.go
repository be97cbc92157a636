package attach

import (
	"slices"

	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

// FromLoader serves a restore.Loader: its layout is the hello, its backing
// file is the fd the hello carries, and each attached target becomes one of
// its views.
func FromLoader(l *engine.Loader) Backend {
	return loaderBackend{l, HelloOf(l.Layout(), engine.SnapshotID(l.Reader()))}
}

type loaderBackend struct {
	l *engine.Loader
	h Hello
}

// HelloOf is the hello of a layout; id is the snapshot's restore.SnapshotID.
func HelloOf(lay engine.Layout, id string) Hello {
	h := Hello{
		Backing: lay.Backing, PageSize: uint64(lay.PageSize), ChunkSize: uint64(lay.ChunkSize),
		FileSize: lay.FileSize, Snapshot: lay.Snapshot, SnapshotID: id,
	}
	h.Regions = slices.Clone(lay.Regions)
	return h
}

func (b loaderBackend) Hello() Hello {
	h := b.h
	h.Regions = append([]Region(nil), b.h.Regions...)
	return h
}

// Close closes the loader (an AdoptBackend closes what it adopted).
func (b loaderBackend) Close() error { return b.l.Close() }

func (b loaderBackend) BackingFile() *uffd.File { return b.l.BackingFile() }

func (b loaderBackend) AttachView(u *uffd.FD, ranges []Range, name string) (View, error) {
	v, err := b.l.AttachView(u, ranges, name)
	if err != nil {
		return nil, err
	}
	return loaderView{v}, nil
}

type loaderView struct{ *engine.View }

func (v loaderView) Stats() engine.Stats { return v.View.Stats() }
