package format

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// rewriteSnap is a snapshot of 3 regions, 64 KiB chunks, with zero chunks
// (10 and 11, region "zeros": the others all hold data), short last chunks
// and one profile.
func rewriteSnap(t testing.TB, codec Codec) ([]byte, []testRegion) {
	regions := []testRegion{
		{name: "heap", addr: 0x7f0000000000, prot: ProtRead | ProtWrite, data: testImage(9*MinChunkSize+4097, 7)},
		{name: "zeros", prot: ProtRead, data: make([]byte, 2*MinChunkSize)},
		{name: "stack", addr: 0x7ffd00000000, prot: ProtRead | ProtWrite, data: testImage(3*MinChunkSize, 8)},
	}
	for _, rg := range []testRegion{regions[0], regions[2]} {
		for off := 0; off < len(rg.data); off += MinChunkSize {
			rg.data[off] = 0xa5 // no zero chunk here
		}
	}
	opts := WriterOptions{ChunkSize: MinChunkSize, Codec: codec, Workers: 2,
		Metadata: Metadata{Source: "rewrite test", Extra: map[string]string{"k": "v"}}}
	return buildSnap(t, opts, regions, Profile{Name: "boot", Entries: []ProfileEntry{{Chunk: 14, Rank: 0, TimeNS: 10}, {Chunk: 3, Rank: 1, TimeNS: 20}}}), regions
}

func rewriteBytes(t testing.TB, snap []byte, opts RewriteOptions) ([]byte, RewriteStats, error) {
	t.Helper()
	r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	st, err := Rewrite(context.Background(), &buf, r, opts)
	return buf.Bytes(), st, err
}

func TestRewriteReorder(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			snap, regions := rewriteSnap(t, codec)
			// 10 and 11 are zero chunks (skipped), 3 is repeated.
			order := []uint32{14, 3, 10, 7, 3, 11, 0}
			out, st, err := rewriteBytes(t, snap, RewriteOptions{Order: order})
			if err != nil {
				t.Fatal(err)
			}
			if len(out) != len(snap) || st.FileBytes != uint64(len(out)) {
				t.Fatalf("rewritten file is %d bytes (stats %d), original %d: same chunks, same index size expected", len(out), st.FileBytes, len(snap))
			}
			got, err := readAll(out)
			if err != nil {
				t.Fatal(err)
			}
			for i, rg := range regions {
				if !bytes.Equal(got[i], rg.data) {
					t.Fatalf("region %q differs after the rewrite", rg.name)
				}
			}
			orig, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
			r, _ := NewReader(bytes.NewReader(out), int64(len(out)))
			// The ordered chunks come first, back to back, stored bytes
			// verbatim.
			at := uint64(HeaderSize)
			for _, c := range []uint32{14, 3, 7, 0} {
				ch, och := r.Chunk(int(c)), orig.Chunk(int(c))
				if ch.Offset != at {
					t.Fatalf("chunk %d at %#x, want %#x", c, ch.Offset, at)
				}
				if !bytes.Equal(out[ch.Offset:ch.Offset+uint64(ch.StoredLen)], snap[och.Offset:och.Offset+uint64(och.StoredLen)]) {
					t.Fatalf("chunk %d: stored bytes changed", c)
				}
				at += uint64(ch.StoredLen)
			}
			do := r.DataOrder()
			if !slices.Equal(do[:4], []uint32{14, 3, 7, 0}) || !slices.IsSorted(do[4:]) {
				t.Fatalf("data order %v: want 14 3 7 0, then the rest in chunk order", do)
			}
			if st.Leading != 4 || st.Chunks != len(do) || st.StoredBytes != orig.StoredSize() {
				t.Errorf("stats %+v", st)
			}
			if !slices.EqualFunc(r.Profiles(), orig.Profiles(), func(a, b Profile) bool {
				return a.Name == b.Name && slices.Equal(a.Entries, b.Entries)
			}) || r.Metadata().Extra["k"] != "v" || !slices.Equal(r.Regions(), orig.Regions()) {
				t.Error("profiles, metadata or regions not kept")
			}
			// Rewriting back to chunk order gives the original, byte for byte.
			back, _, err := rewriteBytes(t, out, RewriteOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, snap) {
				t.Fatal("rewriting the reordered snapshot in chunk order does not give the original back")
			}
		})
	}
}

func TestRewriteProfiles(t *testing.T) {
	snap, _ := rewriteSnap(t, CodecS2)
	ps := []Profile{{Name: "a", Entries: []ProfileEntry{{Chunk: 1}}}, {Name: "b"}}
	out, _, err := rewriteBytes(t, snap, RewriteOptions{Profiles: ps})
	if err != nil {
		t.Fatal(err)
	}
	r, _ := NewReader(bytes.NewReader(out), int64(len(out)))
	if got := r.Profiles(); len(got) != 2 || got[0].Name != "a" || got[1].Name != "b" {
		t.Fatalf("profiles %v", got)
	}
	out, _, err = rewriteBytes(t, snap, RewriteOptions{Profiles: []Profile{}})
	if err != nil {
		t.Fatal(err)
	}
	r, _ = NewReader(bytes.NewReader(out), int64(len(out)))
	if len(r.Profiles()) != 0 {
		t.Fatal("empty Profiles did not remove them")
	}
	if _, _, err := rewriteBytes(t, snap, RewriteOptions{Profiles: []Profile{{Name: "x", Entries: []ProfileEntry{{Chunk: 99}}}}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("out-of-range profile: %v", err)
	}
	if _, _, err := rewriteBytes(t, snap, RewriteOptions{Order: []uint32{1, 15}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("out-of-range order: %v", err)
	}
}

// TestRewriteChecksStoredCRC: a flipped stored byte stops the copy with
// ErrChecksum naming the chunk (the copy never launders corruption).
func TestRewriteChecksStoredCRC(t *testing.T) {
	snap, _ := rewriteSnap(t, CodecZstd)
	r, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
	c := r.Chunk(5)
	snap[c.Offset+uint64(c.StoredLen)/2] ^= 0x04
	_, _, err := rewriteBytes(t, snap, RewriteOptions{Order: []uint32{5}})
	var ce *CorruptError
	if !errors.Is(err, ErrChecksum) || !errors.As(err, &ce) || ce.Chunk != 5 {
		t.Fatalf("err = %v, want ErrChecksum on chunk 5", err)
	}
}

func TestRewriteCancelAndWriteError(t *testing.T) {
	snap, _ := rewriteSnap(t, CodecRaw)
	r, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Rewrite(ctx, &bytes.Buffer{}, r, RewriteOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	if _, err := Rewrite(context.Background(), &failWriter{n: 100000}, r, RewriteOptions{}); err == nil || !strings.Contains(err.Error(), "rewrite: write") {
		t.Fatalf("write error: %v", err)
	}
}

// TestRewriteBoundedMemory: Rewrite streams: a 32 MiB snapshot is copied
// with about one chunk of buffer plus the index, not the data.
func TestRewriteBoundedMemory(t *testing.T) {
	img := testImage(32<<20, 3)
	snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Codec: CodecRaw, Workers: 2}, []testRegion{{name: "big", data: img}})
	r, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
	order := make([]uint32, 0, r.NumChunks())
	for i := r.NumChunks() - 1; i >= 0; i-- {
		order = append(order, uint32(i))
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	st, err := Rewrite(context.Background(), discard{}, r, RewriteOptions{Order: order})
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("rewrote %d bytes (%d chunks) allocating %d bytes", st.FileBytes, st.Chunks, alloc)
	if alloc > 1<<20 {
		t.Errorf("Rewrite allocated %d bytes for a %d-byte snapshot: it should stream", alloc, len(snap))
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// TestChunkDataAnyOrder: the reader accepts stored ranges in any order and
// with gaps, and rejects overlaps naming both chunks.
func TestChunkDataAnyOrder(t *testing.T) {
	snap := readTestdata(t, "golden-raw.snap")
	// golden-raw: chunk 1 (3000 bytes) at 32, chunk 2 (2000 bytes) at 3032.
	edit := func(off1, off2 uint64) error {
		b := bytes.Clone(snap)
		e1, e2 := chunkEntry(t, b, 1), chunkEntry(t, b, 2)
		le.PutUint64(b[e1:], off1)
		le.PutUint64(b[e2:], off2)
		_, err := NewReader(bytes.NewReader(fixIndexCRC(b)), int64(len(b)))
		return err
	}
	for _, ok := range [][2]uint64{{32, 3032}, {2032, 32}} {
		if err := edit(ok[0], ok[1]); err != nil {
			t.Errorf("chunk 1 at %d, chunk 2 at %d: %v", ok[0], ok[1], err)
		}
	}
	for _, bad := range []struct {
		off1, off2 uint64
		want       string
	}{
		{32, 32, "chunk 2 (index.chunks[2].offset)"}, // same start: the later chunk is named
		{32, 3031, "chunk 2 (index.chunks[2].offset) at offset 0x1444: snapshot corrupt (stored range [0xbd7, 0x13a7) overlaps chunk 1's stored range [0x20, 0xbd8))"},
		{1532, 32, "chunk 1 (index.chunks[1].offset)"},
		{2032, 33, "overlaps chunk 2's stored range [0x21, 0x7f1)"},
		{32, 3033, "outside the data area"},
	} {
		err := edit(bad.off1, bad.off2)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("chunk 1 at %d, chunk 2 at %d: err = %v, want ErrCorrupt containing %q", bad.off1, bad.off2, err, bad.want)
		}
	}

	// Synthetic indexes: gaps are fine, in any order; zero chunks never
	// overlap anything.
	mk := func(offs ...uint64) error {
		ix := &index{chunkSize: MinChunkSize, regions: []Region{{Name: "r", Length: uint64(len(offs)) * MinChunkSize}}}
		for _, o := range offs {
			c := Chunk{Offset: o, StoredLen: 100, RawLen: MinChunkSize, Codec: CodecZstd}
			if o == 0 {
				c = Chunk{RawLen: MinChunkSize, CRC: Checksum(make([]byte, MinChunkSize))}
			}
			ix.table = appendChunk(ix.table, c)
		}
		ib, err := encodeIndex(ix)
		if err != nil {
			t.Fatal(err)
		}
		_, err = parseIndex(ib, 10000, layout{dataStart: HeaderSize, dataEnd: 10000})
		return err
	}
	for _, offs := range [][]uint64{{32, 132, 232}, {232, 132, 32}, {5000, 0, 32, 0, 900}, {9900, 32, 0, 4000, 132}} {
		if err := mk(offs...); err != nil {
			t.Errorf("offsets %v: %v", offs, err)
		}
	}
	for _, offs := range [][]uint64{{232, 132, 33}, {5000, 0, 32, 0, 4901}, {9901}, {31}, {400, 32, 350}} {
		if err := mk(offs...); !errors.Is(err, ErrCorrupt) {
			t.Errorf("offsets %v: err = %v, want ErrCorrupt", offs, err)
		}
	}
}

func TestSetProfiles(t *testing.T) {
	snap, _ := rewriteSnap(t, CodecS2)
	path := filepath.Join(t.TempDir(), "s.snap")
	if err := os.WriteFile(path, snap, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := AppendProfile(path, Profile{Name: "two", Entries: []ProfileEntry{{Chunk: 2}}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if ps := f.Profiles(); len(ps) != 2 || ps[1].Name != "two" {
		t.Fatalf("after append: %v", ps)
	}
	f.Close()
	if err := SetProfiles(path, []Profile{{Name: "only"}}); err != nil {
		t.Fatal(err)
	}
	if err := SetProfiles(path, []Profile{{Name: "bad", Entries: []ProfileEntry{{Chunk: 1 << 30}}}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("out of range: %v", err)
	}
	f, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if ps := f.Profiles(); len(ps) != 1 || ps[0].Name != "only" {
		t.Fatalf("after set: %v", ps)
	}
	f.Close()
	if err := SetProfiles(path, nil); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	// No profiles: the file is the original minus its profile section.
	got, _, err := rewriteBytes(t, snap, RewriteOptions{Profiles: []Profile{}})
	if err != nil || !bytes.Equal(b, got) {
		t.Fatalf("SetProfiles(nil) and Rewrite without profiles differ (%v)", err)
	}
}

// BenchmarkParseIndexReordered measures opening a 1M-chunk snapshot whose
// chunk data is in reverse order (the sort path of the overlap check).
func BenchmarkParseIndexReordered(b *testing.B) {
	const n = 1 << 20
	ix := &index{chunkSize: MinChunkSize, regions: []Region{{Name: "r", Length: n * MinChunkSize}}}
	for i := range n {
		ix.table = appendChunk(ix.table, Chunk{Offset: HeaderSize + uint64(n-1-i)*100, StoredLen: 100, RawLen: MinChunkSize, Codec: CodecZstd})
	}
	ib, err := encodeIndex(ix)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(ib)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseIndex(ib, HeaderSize+n*100, layout{dataStart: HeaderSize, dataEnd: HeaderSize + n*100}); err != nil {
			b.Fatal(err)
		}
	}
}
