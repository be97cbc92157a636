package format

import (
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
	ix.chunks = make([]Chunk, n)
	for i := range ix.chunks {
		c := Chunk{Offset: HeaderSize + uint64(i)*100, StoredLen: 100, RawLen: MinChunkSize, Codec: CodecZstd, CRC: uint32(i * 7), StoredCRC: uint32(i * 13)}
		if i%5 == 0 {
			c = Chunk{RawLen: MinChunkSize, Codec: CodecZero, CRC: zeroChecksum(MinChunkSize)}
		}
		ix.chunks[i] = c
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
	for i, want := range ix.chunks {
		if c := got.chunk(i); c != want {
			t.Fatalf("chunk %d = %+v, want %+v", i, c, want)
		}
	}
	if list := got.chunkList(); len(list) != n || list[n-1] != ix.chunks[n-1] {
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
