package format

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

const testdataDir = "../testdata"

// The golden image: region "text" (a full 64 KiB chunk that is all zero,
// then a short chunk of text) and region "data" (one short chunk). Chunk 0
// is a zero chunk; chunks 1 and 2 are short last chunks.
const (
	goldenTextLen = MinChunkSize + 3000
	goldenDataLen = 2000
)

func goldenImage() []byte {
	img := make([]byte, goldenTextLen+goldenDataLen)
	copy(img[MinChunkSize:], bytes.Repeat([]byte("uffdrestore golden text. "), 200)[:3000])
	copy(img[goldenTextLen:], testImage(goldenDataLen, 42))
	return img
}

func goldenRegions(img []byte) []testRegion {
	return []testRegion{
		{name: "text", addr: 0x400000, prot: ProtRead | ProtExec, data: img[:goldenTextLen]},
		{name: "data", addr: 0x7ffff7a00000, prot: ProtRead | ProtWrite, data: img[goldenTextLen:]},
	}
}

func goldenSnap(t testing.TB, img []byte, codec Codec) []byte {
	opts := WriterOptions{ChunkSize: MinChunkSize, Codec: codec, Workers: 2, Metadata: Metadata{
		Created: fixedTime, Source: "golden test image", ToolVersion: "golden",
		Extra: map[string]string{"purpose": "format drift check"},
	}}
	return buildSnap(t, opts, goldenRegions(img),
		Profile{Name: "boot", Entries: []ProfileEntry{{Chunk: 2, Rank: 0, TimeNS: 1000}, {Chunk: 1, Rank: 1, TimeNS: 5000}}})
}

func writeTestdata(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(testdataDir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testdataDir, name))
	if err != nil {
		t.Fatalf("%v (run go test ./format/ -run Golden -update to create it)", err)
	}
	return b
}

// TestGolden checks that the committed golden files decode to the committed
// source image, and that the writer still produces their container: byte
// for byte where no compressor is involved (raw), and for zstd and s2 the
// same header, index (regions, chunks' codecs, lengths and CRCs, metadata,
// profiles) and placement of the chunks, index and footer. The compressed
// bytes themselves are klauspost/compress's to choose: a new version of it
// may encode differently without the format drifting.
func TestGolden(t *testing.T) {
	if *update {
		writeTestdata(t, "golden-image.raw", goldenImage())
	}
	img := readTestdata(t, "golden-image.raw")
	for _, codec := range codecs {
		name := "golden-" + codec.String() + ".snap"
		snap := goldenSnap(t, img, codec)
		if *update {
			writeTestdata(t, name, snap)
		}
		want := readTestdata(t, name)
		if codec == CodecRaw && !bytes.Equal(snap, want) {
			t.Errorf("%s: writer output differs from the golden file: the format drifted. "+
				"If intended, bump the version or document it in SPEC.md, then run with -update", name)
		}
		checkSameContainer(t, name, snap, want)
		if got, err := readAll(snap); err != nil || !bytes.Equal(append(got[0], got[1]...), img) {
			t.Errorf("%s: the writer's output does not decode to golden-image.raw (%v)", name, err)
		}
		got, err := readAll(want)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(append(got[0], got[1]...), img) {
			t.Errorf("%s: decodes to different bytes than golden-image.raw", name)
		}
		r, _ := NewReader(bytes.NewReader(want), int64(len(want)))
		if r.NumChunks() != 3 || r.Chunk(0).Codec != CodecZero || r.Chunk(1).RawLen != 3000 || r.Chunk(2).RawLen != goldenDataLen {
			t.Errorf("%s: unexpected chunk layout", name)
		}
		if len(r.Profiles()) != 1 || r.Metadata().Extra["purpose"] == "" {
			t.Errorf("%s: profiles or metadata missing", name)
		}
	}
}

// checkSameContainer fails unless snapshot b has golden file want's
// container: version, header length, chunk size, regions, metadata,
// profiles and unknown sections; each chunk's codec, raw length and raw CRC
// (the stored bytes may differ: see TestGolden); the chunks' data order,
// back to back after the header; the index right after them and the footer
// at the end.
func checkSameContainer(t *testing.T, name string, b, want []byte) {
	t.Helper()
	rb, err := NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("%s: the writer's output: %v", name, err)
	}
	rw, err := NewReader(bytes.NewReader(want), int64(len(want)))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	drift := func(what string, got, exp any) {
		t.Errorf("%s: %s is %v, the golden file's %v: the format drifted. "+
			"If intended, bump the version or document it in SPEC.md, then run with -update", name, what, got, exp)
	}
	if rb.version != rw.version || rb.headerLen != rw.headerLen || rb.ix.chunkSize != rw.ix.chunkSize {
		drift("version/header length/chunk size", []int{rb.version, rb.headerLen, rb.ix.chunkSize}, []int{rw.version, rw.headerLen, rw.ix.chunkSize})
	}
	for _, f := range []struct {
		what     string
		got, exp any
	}{
		{"regions", rb.ix.regions, rw.ix.regions},
		{"metadata", rb.ix.meta, rw.ix.meta},
		{"profiles", rb.ix.profiles, rw.ix.profiles},
		{"unknown sections", rb.ix.unknown, rw.ix.unknown},
		{"data order", rb.DataOrder(), rw.DataOrder()},
	} {
		if !reflect.DeepEqual(f.got, f.exp) {
			drift(f.what, f.got, f.exp)
		}
	}
	if rb.ix.numChunks() != rw.ix.numChunks() {
		drift("chunk count", rb.ix.numChunks(), rw.ix.numChunks())
		return
	}
	for i := range rb.ix.numChunks() {
		c, w := rb.ix.chunk(i), rw.ix.chunk(i)
		if c.Codec != w.Codec || c.RawLen != w.RawLen || c.CRC != w.CRC {
			drift(fmt.Sprintf("chunk %d (codec, raw length, CRC)", i), []any{c.Codec, c.RawLen, c.CRC}, []any{w.Codec, w.RawLen, w.CRC})
		}
	}
	for _, r := range []*Reader{rb, rw} {
		at := uint64(r.headerLen)
		for _, c := range r.DataOrder() {
			if ch := r.ix.chunk(int(c)); ch.Offset != at {
				t.Errorf("%s: chunk %d at %#x, want %#x (back to back in data order)", name, c, ch.Offset, at)
			} else {
				at += uint64(ch.StoredLen)
			}
		}
		if r.indexOff != at || int64(r.indexOff+r.indexLen+FooterSize) != r.size {
			t.Errorf("%s: index at %#x+%#x in a %d-byte file, want it at %#x, then the footer", name, r.indexOff, r.indexLen, r.size, at)
		}
	}
}

// goldenReordered is golden-zstd.snap rewritten with its working set (the
// "boot" profile: chunk 2, then chunk 1) first in the data area.
func goldenReordered(t testing.TB, zstdSnap []byte) []byte {
	r, err := NewReader(bytes.NewReader(zstdSnap), int64(len(zstdSnap)))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := Rewrite(context.Background(), &buf, r, RewriteOptions{Order: []uint32{2, 1}}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestGoldenReordered pins a snapshot whose chunk data is not in chunk
// order (chunk 2's stored bytes come before chunk 1's).
func TestGoldenReordered(t *testing.T) {
	const name = "golden-reordered.snap"
	snap := goldenReordered(t, readTestdata(t, "golden-zstd.snap"))
	if *update {
		writeTestdata(t, name, snap)
	}
	want := readTestdata(t, name)
	if !bytes.Equal(snap, want) {
		t.Errorf("%s: Rewrite output differs from the golden file: the format or Rewrite drifted; if intended, run with -update", name)
	}
	got, err := readAll(want)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if !bytes.Equal(append(got[0], got[1]...), readTestdata(t, "golden-image.raw")) {
		t.Errorf("%s: decodes to different bytes than golden-image.raw", name)
	}
	r, _ := NewReader(bytes.NewReader(want), int64(len(want)))
	c1, c2 := r.Chunk(1), r.Chunk(2)
	if c2.Offset != HeaderSize || c1.Offset != c2.Offset+uint64(c2.StoredLen) {
		t.Errorf("%s: chunk 2 at %#x, chunk 1 at %#x: want chunk 2 first, then chunk 1", name, c2.Offset, c1.Offset)
	}
	if !slices.Equal(r.DataOrder(), []uint32{2, 1}) {
		t.Errorf("DataOrder = %v, want [2 1]", r.DataOrder())
	}
}

// fixIndexCRC recomputes the footer's index CRC and footer CRC after the
// index was edited, so that the reader's field validation is exercised.
func fixIndexCRC(b []byte) []byte {
	fo := len(b) - FooterSize
	ioff := le.Uint64(b[fo:])
	le.PutUint32(b[fo+16:], Checksum(b[ioff:fo]))
	le.PutUint32(b[fo+20:], Checksum(b[fo:fo+20]))
	return b
}

// chunkEntry returns the offset of chunk i's table entry in snapshot b.
func chunkEntry(t testing.TB, b []byte, i int) int {
	r, err := NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	// Regions section: header 24, section header 8, regions, then the chunk
	// section header 8.
	off := int(r.indexOff) + indexFixedSize + sectionHeaderSize
	for _, rg := range r.ix.regions {
		off += regionFixedSize + len(rg.Name)
	}
	return off + sectionHeaderSize + i*chunkEntrySize
}

type brokenCase struct {
	file    string
	make    func(t *testing.T, raw []byte) []byte
	err     error
	inField string // substring expected in the error text
	atOpen  bool   // fails in NewReader (else in DecodeChunk)
}

var brokenCases = []brokenCase{
	{"broken-truncated.snap", func(t *testing.T, b []byte) []byte { return b[:len(b)/2] }, ErrTruncated, "footer", true},
	{"broken-short.snap", func(t *testing.T, b []byte) []byte { return b[:20] }, ErrTruncated, "header", true},
	{"broken-badmagic.snap", func(t *testing.T, b []byte) []byte { b[0] = 'P'; return b }, ErrNotSnapshot, "header.magic", true},
	{"broken-headercrc.snap", func(t *testing.T, b []byte) []byte { b[20] ^= 1; return b }, ErrChecksum, "header.crc", true},
	{"broken-version.snap", func(t *testing.T, b []byte) []byte {
		le.PutUint16(b[8:], 2)
		le.PutUint32(b[28:], Checksum(b[:28]))
		return b
	}, ErrVersion, "header.version", true},
	{"broken-footercrc.snap", func(t *testing.T, b []byte) []byte { b[len(b)-FooterSize+3] ^= 0x10; return b }, ErrChecksum, "footer.crc", true},
	{"broken-badindex.snap", func(t *testing.T, b []byte) []byte { b[chunkEntry(t, b, 1)+12] ^= 1; return b }, ErrChecksum, "index", true},
	{"broken-rawlen.snap", func(t *testing.T, b []byte) []byte {
		le.PutUint32(b[chunkEntry(t, b, 1)+12:], 3001)
		return fixIndexCRC(b)
	}, ErrCorrupt, "index.chunks[1].raw_len", true},
	{"broken-offset.snap", func(t *testing.T, b []byte) []byte {
		le.PutUint64(b[chunkEntry(t, b, 2):], uint64(len(b)))
		return fixIndexCRC(b)
	}, ErrCorrupt, "index.chunks[2].offset", true},
	{"broken-codec.snap", func(t *testing.T, b []byte) []byte {
		b[chunkEntry(t, b, 1)+16] = 7
		return fixIndexCRC(b)
	}, ErrCorrupt, "index.chunks[1].codec", true},
	{"broken-chunkcount.snap", func(t *testing.T, b []byte) []byte {
		e := chunkEntry(t, b, 0)
		_ = e
		r, _ := NewReader(bytes.NewReader(b), int64(len(b)))
		le.PutUint32(b[r.indexOff+16:], 0xFFFFFFFF)
		return fixIndexCRC(b)
	}, ErrTooLarge, "index.chunk_count", true},
	{"broken-overlap.snap", func(t *testing.T, b []byte) []byte {
		// Out of order and overlapping: chunk 2 (2000 bytes) at the start of
		// the data area, chunk 1 (3000 bytes) 1500 bytes in.
		e1, e2 := chunkEntry(t, b, 1), chunkEntry(t, b, 2)
		le.PutUint64(b[e2:], HeaderSize)
		le.PutUint64(b[e1:], HeaderSize+1500)
		return fixIndexCRC(b)
	}, ErrCorrupt, "index.chunks[1].offset) at offset", true},
	{"broken-badcrc.snap", func(t *testing.T, b []byte) []byte {
		b[le.Uint64(b[chunkEntry(t, b, 1):])+100] ^= 0x40 // a byte of chunk 1's raw data
		return b
	}, ErrChecksum, "chunk 1 at offset", false},
}

// TestBroken checks each committed broken file fails with its specific error.
func TestBroken(t *testing.T) {
	for _, c := range brokenCases {
		t.Run(c.file, func(t *testing.T) {
			if *update {
				writeTestdata(t, c.file, c.make(t, bytes.Clone(readTestdata(t, "golden-raw.snap"))))
			}
			b := readTestdata(t, c.file)
			r, err := NewReader(bytes.NewReader(b), int64(len(b)))
			if !c.atOpen {
				if err != nil {
					t.Fatalf("NewReader: %v", err)
				}
				d := r.NewDecoder()
				defer d.Close()
				dst := make([]byte, r.ChunkSize())
				for i := 0; i < r.NumChunks() && err == nil; i++ {
					err = d.DecodeChunk(i, dst)
				}
			}
			if !errors.Is(err, c.err) {
				t.Fatalf("err = %v, want %v", err, c.err)
			}
			var ce *CorruptError
			if !errors.As(err, &ce) {
				t.Fatalf("err %v is not a *CorruptError", err)
			}
			if !strings.Contains(err.Error(), c.inField) {
				t.Errorf("err %q does not name %q", err, c.inField)
			}
		})
	}
}

// TestFlipEveryByte flips one bit (low, then high) of every byte of each
// golden file: opening or decoding must fail. Wrong data must never come
// back, and thanks to the stored-bytes CRC no flip goes unnoticed.
func TestFlipEveryByte(t *testing.T) {
	img := goldenImage()
	for _, codec := range codecs {
		snap := goldenSnap(t, img, codec)
		for i := range snap {
			for _, mask := range []byte{0x01, 0x80} {
				b := bytes.Clone(snap)
				b[i] ^= mask
				_, err := readAll(b)
				// Every byte is under a checksum (the header's, a chunk's
				// stored CRC, the index's, the footer's): no flip is
				// harmless, each must be reported as a format error.
				if err == nil {
					t.Fatalf("%s: flipping byte %d of %d with %#x went undetected", codec, i, len(snap), mask)
				}
				if !isFormatError(err) {
					t.Fatalf("%s: flipping byte %d with %#x: %v, not a format error (ErrChecksum, ErrCorrupt...)", codec, i, mask, err)
				}
			}
		}
	}
}

// isFormatError reports whether err matches one of the format's sentinels.
func isFormatError(err error) bool {
	for _, s := range []error{ErrNotSnapshot, ErrVersion, ErrTruncated, ErrCorrupt, ErrChecksum, ErrTooLarge} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// TestHostileRandomEdits applies random multi-byte edits with a repaired
// index CRC, to exercise field validation beyond the checksums.
func TestHostileRandomEdits(t *testing.T) {
	snap := goldenSnap(t, goldenImage(), CodecZstd)
	r, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
	ioff, fo := int(r.indexOff), len(snap)-FooterSize
	for i := ioff; i < fo; i++ {
		for _, v := range []byte{0x00, 0xFF, 0x7F, 0x80, 0x01} {
			b := bytes.Clone(snap)
			if b[i] == v {
				continue
			}
			b[i] = v
			fixIndexCRC(b)
			readAll(b) // must not panic, hang or allocate wildly
		}
	}
}
