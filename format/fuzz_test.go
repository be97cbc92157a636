package format

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
)

func addSeeds(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(testdataDir, "*"))
	if len(files) == 0 {
		f.Fatal("no seed files in ../testdata")
	}
	for _, p := range files {
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() || st.Size() > 1<<20 {
			continue // others' directories or big files
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzReader opens arbitrary bytes and decodes every chunk. It must never
// panic, hang or allocate more than the input justifies.
func FuzzReader(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		_ = r.Regions()
		_ = r.Metadata()
		_ = r.Profiles()
		_ = r.Attachments()
		d := r.NewDecoder()
		defer d.Close()
		dst := make([]byte, r.ChunkSize())
		for i := 0; i < r.NumChunks(); i++ {
			if r.RegionOf(i) < 0 {
				t.Fatalf("chunk %d in no region", i)
			}
			if err := d.DecodeChunk(i, dst); err == nil {
				c := r.Chunk(i)
				if Checksum(dst[:c.RawLen]) != c.CRC {
					t.Fatalf("chunk %d decoded without error but CRC differs", i)
				}
			}
		}
	})
}

// FuzzDecodeChunk feeds arbitrary stored bytes to every codec's decoder.
func FuzzDecodeChunk(f *testing.F) {
	addSeeds(f)
	golden, err := os.ReadFile(filepath.Join(testdataDir, "golden-zstd.snap"))
	if err != nil {
		f.Fatal(err)
	}
	base, err := NewReader(bytes.NewReader(golden), int64(len(golden)))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, stored []byte) {
		// A one-chunk reader whose chunk is stored, with the right stored CRC
		// so the codec itself is exercised.
		if len(stored) == 0 || len(stored) >= MinChunkSize {
			return
		}
		for _, codec := range []Codec{CodecZstd, CodecS2, CodecRaw} {
			c := Chunk{Offset: HeaderSize, StoredLen: uint32(len(stored)), RawLen: MinChunkSize, Codec: codec, StoredCRC: Checksum(stored)}
			if codec == CodecRaw {
				c.RawLen = uint32(len(stored))
			}
			ix := &index{chunkSize: MinChunkSize, table: appendChunk(nil, c),
				regions: []Region{{Name: "f", Length: uint64(c.RawLen)}}, meta: base.ix.meta}
			r := &Reader{ra: bytes.NewReader(append(make([]byte, HeaderSize), stored...)), size: int64(HeaderSize + len(stored)), ix: ix}
			d := r.NewDecoder()
			dst := make([]byte, MinChunkSize+16)
			for i := MinChunkSize; i < len(dst); i++ {
				dst[i] = 0xEE
			}
			_ = d.DecodeChunk(0, dst[:MinChunkSize])
			_ = d.DecodeStored(0, stored, dst[:MinChunkSize])
			for i := MinChunkSize; i < len(dst); i++ {
				if dst[i] != 0xEE {
					t.Fatalf("%s: wrote past dst", codec)
				}
			}
			d.Close()
		}
	})
}

// FuzzParseIndex fuzzes the index decoder directly, past the CRCs that make
// whole-file mutations bail out early, then re-encodes what it accepted.
func FuzzParseIndex(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(testdataDir, "golden-*.snap"))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		r, err := NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[r.indexOff : r.indexOff+r.indexLen])
	}
	// An index with attachments (section 6).
	b, _ := attachSnap(f, WriterOptions{}, Attachment{Kind: AttachQEMUDeviceState, Data: []byte("device state")}, Attachment{Kind: "k", Data: nil})
	r, err := NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b[r.indexOff : r.indexOff+r.indexLen])
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := parseIndex(b, 0, layout{dataStart: HeaderSize, dataEnd: 1 << 20})
		if err != nil {
			return
		}
		enc, err := encodeIndex(ix)
		if err != nil {
			return
		}
		ix2, err := parseIndex(enc, 0, layout{dataStart: HeaderSize, dataEnd: 1 << 20})
		if err != nil {
			t.Fatalf("re-encoded index does not parse: %v", err)
		}
		// Every field survives the round trip (chunks, regions, metadata,
		// profiles, unknown sections kept verbatim), and encoding is
		// deterministic. The one exception is by design: a signature
		// (section 5) is dropped, since it covered the index as it was.
		want := *ix
		want.unknown = slices.DeleteFunc(slices.Clone(ix.unknown), func(s rawSection) bool { return s.tag == secAuth })
		if len(want.unknown) == 0 { // nil and empty alike
			want.unknown = nil
		}
		if len(ix2.unknown) == 0 {
			ix2.unknown = nil
		}
		if !reflect.DeepEqual(ix2, &want) {
			t.Fatalf("re-encoded index differs:\n got %+v\nwant %+v", ix2, &want)
		}
		if enc2, err := encodeIndex(ix2); err != nil || !bytes.Equal(enc2, enc) {
			t.Fatalf("encoding the re-parsed index: %v, or other bytes", err)
		}
	})
}

// FuzzRewrite rewrites whatever opens, with its chunk data reversed: the
// copy must open, and every chunk must decode to the same bytes (or fail)
// as in the input; a rewrite error is only ever a stored-CRC mismatch.
func FuzzRewrite(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		order := make([]uint32, r.NumChunks())
		for i := range order {
			order[i] = uint32(len(order) - 1 - i)
		}
		var buf bytes.Buffer
		if _, err := Rewrite(context.Background(), &buf, r, RewriteOptions{Order: order}); err != nil {
			if !errors.Is(err, ErrChecksum) {
				t.Fatalf("rewrite: %v", err)
			}
			return
		}
		out := buf.Bytes()
		r2, err := NewReader(bytes.NewReader(out), int64(len(out)))
		if err != nil {
			t.Fatalf("rewritten snapshot does not open: %v", err)
		}
		d1, d2 := r.NewDecoder(), r2.NewDecoder()
		defer d1.Close()
		defer d2.Close()
		b1, b2 := make([]byte, r.ChunkSize()), make([]byte, r.ChunkSize())
		for i := 0; i < r.NumChunks(); i++ {
			e1, e2 := d1.DecodeChunk(i, b1), d2.DecodeChunk(i, b2)
			if (e1 == nil) != (e2 == nil) || (e1 == nil && !bytes.Equal(b1[:r.Chunk(i).RawLen], b2[:r.Chunk(i).RawLen])) {
				t.Fatalf("chunk %d decodes differently after the rewrite: %v / %v", i, e1, e2)
			}
		}
	})
}
