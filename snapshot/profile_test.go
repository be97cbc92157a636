package snapshot

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
)

// profSnap is a 64 KiB-chunk snapshot of 80 chunks (2.5 units of 2 MiB),
// every 5th chunk zero.
func profSnap(t *testing.T) ([]byte, []byte, *format.Reader) {
	t.Helper()
	img := make([]byte, 80*format.MinChunkSize-1000)
	for i := range img {
		if (i/format.MinChunkSize)%5 != 4 {
			img[i] = byte(i*31) ^ byte(i>>11)
		}
	}
	var buf bytes.Buffer
	opts := Options{WriterOptions: format.WriterOptions{ChunkSize: format.MinChunkSize, Codec: format.CodecS2, Workers: 2}}
	if _, err := CreateFromReader(context.Background(), bytes.NewReader(img), &buf, opts); err != nil {
		t.Fatal(err)
	}
	snap := buf.Bytes()
	r, err := format.NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	return snap, img, r
}

func prof(name string, chunks ...uint32) format.Profile {
	p := format.Profile{Name: name}
	for i, c := range chunks {
		p.Entries = append(p.Entries, format.ProfileEntry{Chunk: c, Rank: uint32(i), TimeNS: uint64(1000 * (i + 1))})
	}
	return p
}

func seq(a, b uint32) []uint32 {
	var s []uint32
	for c := a; c < b; c++ {
		s = append(s, c)
	}
	return s
}

func TestWorkingSetOrder(t *testing.T) {
	_, _, r := profSnap(t)
	// Ranks out of entry order: sorted by rank. 99 is out of range.
	p := format.Profile{Name: "p", Entries: []format.ProfileEntry{
		{Chunk: 70, Rank: 2}, {Chunk: 5, Rank: 0}, {Chunk: 99, Rank: 1}, {Chunk: 33, Rank: 3}, {Chunk: 5, Rank: 4},
	}}
	// One entry beyond the snapshot: the whole profile is refused.
	if order, err := WorkingSetOrder(r, p, format.MinChunkSize); !errors.Is(err, ErrProfileRange) || order != nil ||
		!strings.Contains(err.Error(), "1 of 5 entries") || !strings.Contains(err.Error(), "entry 2: chunk 99") {
		t.Fatalf("out-of-range entry: order %v, %v; want ErrProfileRange naming the entry", order, err)
	}
	in := format.Profile{Name: "p", Entries: slices.DeleteFunc(slices.Clone(p.Entries), func(e format.ProfileEntry) bool { return e.Chunk == 99 })}
	order, err := WorkingSetOrder(r, in, format.MinChunkSize)
	if err != nil || !slices.Equal(order, []uint32{5, 70, 33}) {
		t.Fatalf("chunk units: order %v, %v", order, err)
	}
	// 2 MiB units = 32 chunks: units 0, 2 (short: chunks 64..79), 1.
	order, _ = WorkingSetOrder(r, in, 0)
	want := append(append(seq(0, 32), seq(64, 80)...), seq(32, 64)...)
	if !slices.Equal(order, want) {
		t.Fatalf("2 MiB units: order %v", order)
	}
	pi := SummarizeProfile(r, p, 0)
	if pi.Entries != 5 || pi.Chunks != 3 || pi.Units != 3 || pi.UnitSize != 2<<20 || pi.OutOfRange != 1 ||
		pi.CoveredBytes != 3*format.MinChunkSize {
		t.Fatalf("summary %+v", pi)
	}
	pi = SummarizeProfile(r, prof("q", 1, 2, 40), 1)
	if pi.Units != 3 || pi.UnitSize != format.MinChunkSize || pi.FirstNS != 1000 || pi.LastNS != 3000 {
		t.Fatalf("summary %+v", pi)
	}
	if !strings.Contains(pi.Text(), "q: 3 entries, 3 chunks (192.0 KiB), 3 units of 64.0 KiB, first touch at 1µs, last at 3µs") {
		t.Errorf("text %q", pi.Text())
	}
}

func TestReorder(t *testing.T) {
	_, img, r := profSnap(t)
	if !InChunkOrder(r) {
		t.Fatal("a fresh snapshot is not in chunk order")
	}
	p := prof("boot", 41, 3, 4, 77, 12) // 4 is a zero chunk
	var buf bytes.Buffer
	st, err := Reorder(context.Background(), r, &buf, p, ReorderOptions{UnitSize: 1, Profiles: []format.Profile{p}})
	if err != nil {
		t.Fatal(err)
	}
	out := buf.Bytes()
	r2, err := format.NewReader(bytes.NewReader(out), int64(len(out)))
	if err != nil {
		t.Fatal(err)
	}
	if InChunkOrder(r2) {
		t.Error("reordered snapshot reported in chunk order")
	}
	// The working set's stored bytes are contiguous at the start.
	at := uint64(format.HeaderSize)
	for _, c := range []int{41, 3, 77, 12} {
		if ch := r2.Chunk(c); ch.Offset != at {
			t.Fatalf("chunk %d at %#x, want %#x", c, ch.Offset, at)
		} else {
			at += uint64(ch.StoredLen)
		}
	}
	if st.Leading != 4 || st.WorkingSetBytes != at-format.HeaderSize {
		t.Errorf("stats %+v", st)
	}
	var back bytes.Buffer
	if err := Extract(context.Background(), r2, &back, ""); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back.Bytes(), img) {
		t.Fatal("reordered snapshot extracts to different bytes")
	}
	if errs := Verify(context.Background(), r2, 2); len(errs) != 0 {
		t.Fatal(errs)
	}
	if ps := r2.Profiles(); len(ps) != 1 || ps[0].Name != "boot" {
		t.Errorf("profiles %v", ps)
	}
	if rep := Info(r2); rep.ChunkOrder || len(rep.Profiles) != 1 || rep.Profiles[0].Chunks != 5 {
		t.Errorf("info %+v", rep)
	}
	// A profile of another snapshot (all entries beyond it) is an error.
	if _, err := Reorder(context.Background(), r, &bytes.Buffer{}, prof("x", 500, 600), ReorderOptions{}); !errors.Is(err, ErrProfileRange) || !strings.Contains(err.Error(), "another snapshot") {
		t.Errorf("foreign profile: %v", err)
	}
	// So is one with a single entry beyond it (it used to be trimmed).
	var part bytes.Buffer
	if _, err := Reorder(context.Background(), r, &part, prof("x", 1, 600), ReorderOptions{}); !errors.Is(err, ErrProfileRange) || part.Len() != 0 {
		t.Errorf("partly foreign profile: %v, %d bytes written", err, part.Len())
	}
}
