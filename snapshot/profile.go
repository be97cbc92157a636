package snapshot

import (
	"context"
	"errors"
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

// ErrProfileRange means a working-set profile names chunks the snapshot
// does not have.
var ErrProfileRange = errors.New("working-set profile names chunks beyond the snapshot")

// CheckProfile applies the one policy for profile entries naming chunks
// beyond r: the profile is rejected (an error wrapping ErrProfileRange), not
// trimmed. The snapshot format refuses such entries in stored profiles and a
// sidecar carries the identity of its snapshot (and so its chunk count), so
// an out-of-range entry means the profile belongs to another snapshot or is
// damaged; its other entries are not to be trusted either, and a restore or
// reorder guided by it would quietly do worse. Every user of profiles (the
// restore, Reorder, the CLI) goes through here.
func CheckProfile(r *format.Reader, p format.Profile) error {
	n := r.NumChunks()
	bad, first := 0, -1
	for j, e := range p.Entries {
		if int64(e.Chunk) >= int64(n) {
			bad++
			if first < 0 {
				first = j
			}
		}
	}
	if bad == 0 {
		return nil
	}
	return fmt.Errorf("%w: profile %q: %d of %d entries name chunks beyond the snapshot's %d (entry %d: chunk %d); it was recorded on another snapshot or is damaged: record a new one",
		ErrProfileRange, p.Name, bad, len(p.Entries), n, first, p.Entries[first].Chunk)
}

// WorkingSetOrder returns the chunk order that lays p's working set out
// first: the fill units (of unitSize bytes; 0 = DefaultUnitSize) p touches,
// by first-touch rank, each unit's chunks in chunk order. A restore fills
// whole units, so their chunks are placed together; the rest of the
// snapshot follows in chunk order (format.Rewrite adds it). A profile with
// entries beyond the snapshot is refused (CheckProfile).
func WorkingSetOrder(r *format.Reader, p format.Profile, unitSize int) ([]uint32, error) {
	if err := CheckProfile(r, p); err != nil {
		return nil, err
	}
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
	var order []uint32
	seen := make(map[int]struct{}, len(entries))
	for _, e := range entries {
		u := int(e.Chunk) / cpu
		if _, ok := seen[u]; ok {
			continue
		}
		seen[u] = struct{}{}
		for c := u * cpu; c < min((u+1)*cpu, n); c++ {
			order = append(order, uint32(c))
		}
	}
	return order, nil
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
}

// Reorder copies r to w with the chunk data of p's working set first (see
// WorkingSetOrder), then the rest in chunk order. Stored bytes are copied,
// not recompressed; the result decodes to exactly the same bytes. A profile
// naming chunks beyond the snapshot is an error wrapping ErrProfileRange.
func Reorder(ctx context.Context, r *format.Reader, w io.Writer, p format.Profile, opts ReorderOptions) (ReorderStats, error) {
	order, err := WorkingSetOrder(r, p, opts.UnitSize)
	if err != nil {
		return ReorderStats{}, fmt.Errorf("snapshot: reorder: %w", err)
	}
	var st ReorderStats
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
