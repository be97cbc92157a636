package snapshot

import (
	"context"
	"fmt"
	"io"
	"slices"

	"github.com/uffdrestore/uffdrestore/format"
)

// DefaultUnitSize is the fill unit a restore into huge pages uses (one
// 2 MiB huge page, or one chunk if chunks are larger): the granularity at
// which working sets are counted and reordered unless told otherwise.
const DefaultUnitSize = 2 << 20

// ProfileInfo describes one working-set profile.
type ProfileInfo struct {
	Name         string `json:"name"`
	Entries      int    `json:"entries"`       // entries stored
	Chunks       int    `json:"chunks"`        // distinct chunks named
	Units        int    `json:"units"`         // distinct fill units covered (see unit_size)
	UnitSize     int    `json:"unit_size"`     // bytes: max(chunk size, DefaultUnitSize)
	CoveredBytes uint64 `json:"covered_bytes"` // raw bytes of the chunks named
	FirstNS      uint64 `json:"first_ns"`      // earliest first-touch time, ns since recording start
	LastNS       uint64 `json:"last_ns"`       // latest first-touch time
	OutOfRange   int    `json:"out_of_range,omitempty"`
}

// unitChunks is the number of chunks per fill unit of unitSize bytes (at
// least one).
func unitChunks(chunkSize, unitSize int) int {
	if unitSize <= chunkSize || chunkSize <= 0 {
		return 1
	}
	return unitSize / chunkSize
}

// SummarizeProfile counts what p covers in r, with fill units of unitSize
// bytes (0: DefaultUnitSize; never smaller than a chunk).
func SummarizeProfile(r *format.Reader, p format.Profile, unitSize int) ProfileInfo {
	if unitSize <= 0 {
		unitSize = DefaultUnitSize
	}
	cpu := unitChunks(r.ChunkSize(), unitSize)
	pi := ProfileInfo{Name: p.Name, Entries: len(p.Entries), UnitSize: cpu * r.ChunkSize()}
	n := r.NumChunks()
	seen := make(map[uint32]struct{}, len(p.Entries))
	units := make(map[uint32]struct{}, len(p.Entries))
	for i, e := range p.Entries {
		if i == 0 || e.TimeNS < pi.FirstNS {
			pi.FirstNS = e.TimeNS
		}
		pi.LastNS = max(pi.LastNS, e.TimeNS)
		if int64(e.Chunk) >= int64(n) {
			pi.OutOfRange++
			continue
		}
		if _, dup := seen[e.Chunk]; dup {
			continue
		}
		seen[e.Chunk] = struct{}{}
		units[e.Chunk/uint32(cpu)] = struct{}{}
		pi.CoveredBytes += uint64(r.Chunk(int(e.Chunk)).RawLen)
	}
	pi.Chunks, pi.Units = len(seen), len(units)
	return pi
}

// WorkingSetOrder returns the chunk order that lays p's working set out
// first: the fill units (of unitSize bytes; 0 = DefaultUnitSize) p touches,
// by first-touch rank, each unit's chunks in chunk order. A restore fills
// whole units, so their chunks are placed together; the rest of the
// snapshot follows in chunk order (format.Rewrite adds it). Entries naming
// chunks beyond the snapshot are skipped and counted in dropped.
func WorkingSetOrder(r *format.Reader, p format.Profile, unitSize int) (order []uint32, dropped int) {
	if unitSize <= 0 {
		unitSize = DefaultUnitSize
	}
	cpu := unitChunks(r.ChunkSize(), unitSize)
	n := r.NumChunks()
	entries := slices.Clone(p.Entries)
	slices.SortStableFunc(entries, func(a, b format.ProfileEntry) int {
		switch {
		case a.Rank < b.Rank:
			return -1
		case a.Rank > b.Rank:
			return 1
		}
		return 0
	})
	seen := make(map[int]struct{}, len(entries))
	for _, e := range entries {
		if int64(e.Chunk) >= int64(n) {
			dropped++
			continue
		}
		u := int(e.Chunk) / cpu
		if _, ok := seen[u]; ok {
			continue
		}
		seen[u] = struct{}{}
		for c := u * cpu; c < min((u+1)*cpu, n); c++ {
			order = append(order, uint32(c))
		}
	}
	return order, dropped
}

// ReorderOptions configure Reorder.
type ReorderOptions struct {
	// UnitSize is the fill unit the working set is laid out in (0:
	// DefaultUnitSize). Use the chunk size for restores into 4 KiB shmem
	// pages, which fill chunk by chunk.
	UnitSize int
	// Profiles, if not nil, replaces the output's profiles (nil keeps r's).
	Profiles []format.Profile
	// Progress, if set, gets stored bytes copied so far and the total.
	Progress func(done, total uint64)
}

// ReorderStats summarises a Reorder.
type ReorderStats struct {
	format.RewriteStats
	WorkingSetBytes uint64 // stored bytes of the working set, at the start of the data area
	Dropped         int    // profile entries naming chunks beyond the snapshot
}

// Reorder copies r to w with the chunk data of p's working set first (see
// WorkingSetOrder), then the rest in chunk order. Stored bytes are copied,
// not recompressed; the result decodes to exactly the same bytes. A profile
// whose entries all lie beyond the snapshot is an error: it belongs to
// another snapshot.
func Reorder(ctx context.Context, r *format.Reader, w io.Writer, p format.Profile, opts ReorderOptions) (ReorderStats, error) {
	order, dropped := WorkingSetOrder(r, p, opts.UnitSize)
	if dropped > 0 && dropped == len(p.Entries) {
		return ReorderStats{Dropped: dropped}, fmt.Errorf("snapshot: profile %q names only chunks beyond the snapshot's %d: it belongs to another snapshot", p.Name, r.NumChunks())
	}
	st := ReorderStats{Dropped: dropped}
	for _, c := range order {
		st.WorkingSetBytes += uint64(r.Chunk(int(c)).StoredLen)
	}
	rs, err := format.Rewrite(ctx, w, r, format.RewriteOptions{Order: order, Profiles: opts.Profiles, Progress: opts.Progress})
	st.RewriteStats = rs
	return st, err
}

// InChunkOrder reports whether r's chunk data lies in chunk order (as the
// writer lays it out) rather than reordered.
func InChunkOrder(r *format.Reader) bool {
	var prev uint64
	for i := 0; i < r.NumChunks(); i++ {
		c := r.Chunk(i)
		if c.Codec == format.CodecZero {
			continue
		}
		if c.Offset < prev {
			return false
		}
		prev = c.Offset
	}
	return true
}
