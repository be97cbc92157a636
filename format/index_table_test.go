package format

import (
	"bytes"
	"errors"
	"os"
	"reflect"
	"runtime"
	"testing"
	"unsafe"
)

// TestParseIndexKeepsTable: a parsed index decodes its chunk entries where
// they are in the index bytes instead of copying them into a []Chunk (for a
// 4 GiB snapshot that copy was 64 KiB of fresh pages and a third of
// restore.Open's time). Every entry must still read back as written, and
// parsing must allocate far less than a copy of the table.
func TestParseIndexKeepsTable(t *testing.T) {
	const n = 4096
	ix := &index{chunkSize: MinChunkSize, regions: []Region{{Name: "r", Length: n * MinChunkSize}}}
	want := make([]Chunk, n)
	for i := range want {
		c := Chunk{Offset: HeaderSize + uint64(i)*100, StoredLen: 100, RawLen: MinChunkSize, Codec: CodecZstd, CRC: uint32(i * 7), StoredCRC: uint32(i * 13)}
		if i%5 == 0 {
			c = Chunk{RawLen: MinChunkSize, Codec: CodecZero, CRC: zeroChecksum(MinChunkSize)}
		}
		want[i] = c
		ix.table = appendChunk(ix.table, c)
	}
	ib, err := encodeIndex(ix)
	if err != nil {
		t.Fatal(err)
	}
	lay := layout{dataStart: HeaderSize, dataEnd: HeaderSize + n*100}
	if _, err := parseIndex(ib, HeaderSize+n*100, lay); err != nil { // warm (the zero CRC, fmt)
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	got, err := parseIndex(ib, HeaderSize+n*100, lay)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if got.numChunks() != n {
		t.Fatalf("numChunks = %d, want %d", got.numChunks(), n)
	}
	for i, w := range want {
		if c := got.chunk(i); c != w {
			t.Fatalf("chunk %d = %+v, want %+v", i, c, w)
		}
	}
	if list := got.chunkList(); len(list) != n || list[n-1] != want[n-1] {
		t.Fatalf("chunkList: %d entries, last %+v", len(list), list[len(list)-1])
	}
	copyBytes := uint64(n) * uint64(unsafe.Sizeof(Chunk{}))
	if a := after.TotalAlloc - before.TotalAlloc; a > copyBytes/4 {
		t.Errorf("parsing a %d-chunk index allocated %d bytes; a copy of its chunk table is %d: the table must be read in place", n, a, copyBytes)
	}
	// And an index built from the parsed one encodes to the same bytes.
	again, err := encodeIndex(got)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(ib) {
		t.Error("re-encoding the parsed index changed its bytes")
	}
}

// TestNewReaderBuffer: the index is read into the buffer given when it
// fits (the Reader reading its chunks there), into a new one returned
// otherwise; either way the Reader reads as NewReader's does.
func TestNewReaderBuffer(t *testing.T) {
	snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Codec: CodecZstd}, []testRegion{{name: "a", data: testImage(3<<20, 3)}, {name: "b", data: testImage(1<<20, 4)}})
	f := bytes.NewReader(snap)
	want, err := NewReader(f, int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	same := func(rd *Reader) {
		t.Helper()
		if rd.NumChunks() != want.NumChunks() || !reflect.DeepEqual(rd.Regions(), want.Regions()) {
			t.Fatalf("%d chunks, regions %v; want %d, %v", rd.NumChunks(), rd.Regions(), want.NumChunks(), want.Regions())
		}
		for i := range rd.NumChunks() {
			if rd.Chunk(i) != want.Chunk(i) {
				t.Fatalf("chunk %d = %+v, want %+v", i, rd.Chunk(i), want.Chunk(i))
			}
		}
	}
	small := make([]byte, 16)
	rd, buf, err := NewReaderBuffer(f, int64(len(snap)), small)
	if err != nil {
		t.Fatal(err)
	}
	same(rd)
	if uint64(len(buf)) != want.indexLen || &buf[0] == &small[0] {
		t.Fatalf("a buffer too small: got %d bytes back (same memory: %v), want a new one of %d", len(buf), &buf[0] == &small[0], want.indexLen)
	}
	big := make([]byte, 0, 1<<20)
	rd, buf, err = NewReaderBuffer(f, int64(len(snap)), big)
	if err != nil {
		t.Fatal(err)
	}
	same(rd)
	if &buf[0] != &big[:1][0] {
		t.Fatal("a buffer large enough was not used")
	}
	// The Reader reads its chunks from that memory.
	clear(big[:cap(big)])
	if rd.Chunk(1) == want.Chunk(1) {
		t.Fatal("the Reader does not read its chunk table from the buffer it was given")
	}
}

// TestEditParsedIndex: the in-place edits of a snapshot's index (set and
// append profiles) see its chunk table: a profile naming its last chunk is
// taken, one past it refused, and the chunks read back unchanged.
func TestEditParsedIndex(t *testing.T) {
	snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Codec: CodecZstd}, []testRegion{{name: "a", data: testImage(1<<20, 5)}})
	path := t.TempDir() + "/s.snap"
	if err := os.WriteFile(path, snap, 0o600); err != nil {
		t.Fatal(err)
	}
	before, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	n := uint32(before.NumChunks())
	last := Profile{Name: "p", Entries: []ProfileEntry{{Chunk: n - 1}}}
	if err := SetProfiles(path, []Profile{last}); err != nil {
		t.Fatalf("SetProfiles naming the last of %d chunks: %v", n, err)
	}
	if err := AppendProfile(path, Profile{Name: "q", Entries: []ProfileEntry{{Chunk: n - 1}}}); err != nil {
		t.Fatalf("AppendProfile naming the last chunk: %v", err)
	}
	if err := SetProfiles(path, []Profile{{Name: "r", Entries: []ProfileEntry{{Chunk: n}}}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("SetProfiles naming chunk %d of %d: %v, want ErrInvalid", n, n, err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if len(f.Profiles()) != 2 || f.NumChunks() != int(n) {
		t.Fatalf("%d profiles, %d chunks; want 2, %d", len(f.Profiles()), f.NumChunks(), n)
	}
	for i := range int(n) {
		if f.Chunk(i) != before.Chunk(i) {
			t.Fatalf("chunk %d changed: %+v, was %+v", i, f.Chunk(i), before.Chunk(i))
		}
	}
}
