package format

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/internal/memgen"
)

var update = flag.Bool("update", false, "rewrite golden and broken files in ../testdata")

type testRegion struct {
	name string
	addr uint64
	prot uint32
	data []byte
}

var fixedTime = time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)

func buildSnap(t testing.TB, opts WriterOptions, regions []testRegion, profiles ...Profile) []byte {
	t.Helper()
	var buf bytes.Buffer
	if opts.Metadata.Created.IsZero() {
		opts.Metadata.Created = fixedTime
	}
	w, err := NewWriter(&buf, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range regions {
		if err := w.BeginRegion(r.name, r.addr, r.prot); err != nil {
			t.Fatal(err)
		}
		// Odd-sized writes exercise the chunk buffering.
		for p := r.data; len(p) > 0; {
			n := min(len(p), 12345)
			if _, err := w.Write(p[:n]); err != nil {
				t.Fatal(err)
			}
			p = p[n:]
		}
		if err := w.EndRegion(); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range profiles {
		if err := w.AddProfile(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got := w.Stats().FileBytes; got != uint64(buf.Len()) {
		t.Fatalf("Stats().FileBytes = %d, wrote %d", got, buf.Len())
	}
	return buf.Bytes()
}

// readAll decodes every region back, checking each region's bytes.
func readAll(snap []byte) ([][]byte, error) {
	r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		return nil, err
	}
	d := r.NewDecoder()
	defer d.Close()
	buf := make([]byte, r.ChunkSize())
	var out [][]byte
	for _, rg := range r.Regions() {
		var b []byte
		for j := 0; j < rg.NumChunks(r.ChunkSize()); j++ {
			ci := int(rg.FirstChunk) + j
			if err := d.DecodeChunk(ci, buf); err != nil {
				return nil, err
			}
			b = append(b, buf[:r.Chunk(ci).RawLen]...)
		}
		out = append(out, b)
	}
	return out, nil
}

// testImage is the test image of n bytes for seed (memgen.Image).
func testImage(n int, seed uint64) []byte { return memgen.Image(n, seed) }

var codecs = []Codec{CodecZstd, CodecS2, CodecRaw}

func TestRoundTrip(t *testing.T) {
	const cs = MinChunkSize
	sizes := []int{0, 1, 4095, 4096, 4097, cs - 1, cs, cs + 1, 3*cs + 17, 5 << 20}
	for _, codec := range codecs {
		for _, n := range sizes {
			t.Run(fmt.Sprintf("%s/%d", codec, n), func(t *testing.T) {
				img := testImage(n, uint64(n))
				if n >= 2*cs {
					clear(img[cs : 2*cs]) // a zero chunk
				}
				regions := []testRegion{
					{name: "a", addr: 0x7f0000000000, prot: ProtRead | ProtWrite, data: img},
					{name: "empty", data: nil},
					{name: "b", prot: ProtRead, data: img[:n/3]},
				}
				snap := buildSnap(t, WriterOptions{ChunkSize: cs, Codec: codec, Workers: 2}, regions)
				got, err := readAll(snap)
				if err != nil {
					t.Fatal(err)
				}
				for i, r := range regions {
					if !bytes.Equal(got[i], r.data) {
						t.Fatalf("region %d: bytes differ after round trip", i)
					}
				}
				r, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
				rs := r.Regions()
				if rs[0].Addr != 0x7f0000000000 || rs[0].Prot != 3 || rs[1].Length != 0 || rs[2].Name != "b" {
					t.Fatalf("regions = %+v", rs)
				}
				if n >= 2*cs && r.Chunk(1).Codec != CodecZero {
					t.Errorf("chunk 1 codec = %s, want zero", r.Chunk(1).Codec)
				}
			})
		}
	}
}

func TestRoundTripChunkSizes(t *testing.T) {
	img := testImage(5<<20+12345, 7)
	for _, cs := range []int{64 << 10, 256 << 10, 2 << 20} {
		for _, codec := range codecs {
			snap := buildSnap(t, WriterOptions{ChunkSize: cs, Codec: codec}, []testRegion{{name: "x", data: img}})
			got, err := readAll(snap)
			if err != nil {
				t.Fatalf("%s/%d: %v", codec, cs, err)
			}
			if !bytes.Equal(got[0], img) {
				t.Fatalf("%s/%d: bytes differ", codec, cs)
			}
		}
	}
}

func TestRandomFallsBackToRaw(t *testing.T) {
	img := make([]byte, 3*MinChunkSize)
	for i := range img {
		img[i] = byte(rand.Uint32())
	}
	for _, codec := range []Codec{CodecZstd, CodecS2} {
		snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Codec: codec}, []testRegion{{name: "r", data: img}})
		r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < r.NumChunks(); i++ {
			if c := r.Chunk(i); c.Codec != CodecRaw {
				t.Errorf("%s: chunk %d stored as %s, want raw", codec, i, c.Codec)
			}
		}
	}
}

func TestWorkersIdentical(t *testing.T) {
	img := testImage(9<<20+5, 3)
	clear(img[1<<20 : 3<<20])
	regions := []testRegion{{name: "a", data: img}, {name: "b", data: img[:777777]}}
	for _, codec := range codecs {
		for _, cs := range []int{64 << 10, 2 << 20} {
			one := buildSnap(t, WriterOptions{ChunkSize: cs, Codec: codec, Workers: 1}, regions)
			four := buildSnap(t, WriterOptions{ChunkSize: cs, Codec: codec, Workers: 4}, regions)
			if !bytes.Equal(one, four) {
				t.Errorf("%s/%d: Workers=1 and Workers=4 output differ", codec, cs)
			}
		}
	}
}

func TestDecodeNoAlloc(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful under the race detector; `make test` also runs this test without -race")
	}
	img := testImage(2<<20, 9)
	for _, codec := range codecs {
		snap := buildSnap(t, WriterOptions{Codec: codec}, []testRegion{{name: "x", data: img}})
		r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Chunk(0).Codec; got != codec {
			t.Fatalf("chunk codec %s, want %s", got, codec)
		}
		d := r.NewDecoder()
		dst := make([]byte, 2<<20)
		if err := d.DecodeChunk(0, dst); err != nil { // warm up
			t.Fatal(err)
		}
		allocs := testing.AllocsPerRun(20, func() {
			if err := d.DecodeChunk(0, dst); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: DecodeChunk allocates %.1f times per call", codec, allocs)
		}
		if !bytes.Equal(dst, img) {
			t.Errorf("%s: wrong bytes", codec)
		}
		c := r.Chunk(0)
		stored := snap[c.Offset : c.Offset+uint64(c.StoredLen)]
		allocs = testing.AllocsPerRun(20, func() {
			if err := d.DecodeStored(0, stored, dst); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: DecodeStored allocates %.1f times per call", codec, allocs)
		}
		d.Close()
	}
}

// TestDecodeIntoSubslice checks decoding writes only dst[:RawLen] even when
// dst is a window into a bigger buffer (like the restore alias mapping).
func TestDecodeIntoSubslice(t *testing.T) {
	img := testImage(MinChunkSize+100, 5)
	for _, codec := range codecs {
		snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Codec: codec}, []testRegion{{name: "x", data: img}})
		r, _ := NewReader(bytes.NewReader(snap), int64(len(snap)))
		d := r.NewDecoder()
		big := bytes.Repeat([]byte{0xAA}, 3*MinChunkSize)
		if err := d.DecodeChunk(1, big[MinChunkSize:]); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(big[MinChunkSize:MinChunkSize+100], img[MinChunkSize:]) {
			t.Fatalf("%s: wrong bytes", codec)
		}
		for i, b := range big {
			if (i < MinChunkSize || i >= MinChunkSize+100) && b != 0xAA {
				t.Fatalf("%s: byte %d outside dst[:RawLen] written", codec, i)
			}
		}
		if err := d.DecodeChunk(0, big[:100]); !errors.Is(err, ErrInvalid) {
			t.Errorf("short dst: err = %v, want ErrInvalid", err)
		}
		if err := d.DecodeChunk(2, big); !errors.Is(err, ErrInvalid) {
			t.Errorf("chunk out of range: err = %v, want ErrInvalid", err)
		}
		d.Close()
	}
}

func TestMetadataAndProfiles(t *testing.T) {
	md := Metadata{Created: fixedTime, Source: "pid 42", ToolVersion: "1.2.3", Extra: map[string]string{"k": "v", "host": "h"}}
	img := testImage(3*MinChunkSize, 1)
	p := Profile{Name: "boot", Entries: []ProfileEntry{{Chunk: 2, Rank: 0, TimeNS: 10}, {Chunk: 0, Rank: 1, TimeNS: 99}}}
	snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Metadata: md}, []testRegion{{name: "x", data: img}}, p)
	r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	got := r.Metadata()
	if !got.Created.Equal(fixedTime) || got.Source != md.Source || got.ToolVersion != md.ToolVersion || len(got.Extra) != 2 || got.Extra["host"] != "h" {
		t.Errorf("metadata = %+v", got)
	}
	ps := r.Profiles()
	if len(ps) != 1 || ps[0].Name != "boot" || len(ps[0].Entries) != 2 || ps[0].Entries[1] != p.Entries[1] {
		t.Errorf("profiles = %+v", ps)
	}

	// AppendProfile rewrites only index + footer.
	path := filepath.Join(t.TempDir(), "s.snap")
	if err := os.WriteFile(path, snap, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := AppendProfile(path, Profile{Name: "second", Entries: []ProfileEntry{{Chunk: 1}}}); err != nil {
		t.Fatal(err)
	}
	if err := AppendProfile(path, Profile{Name: "bad", Entries: []ProfileEntry{{Chunk: 3}}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("out-of-range profile: err = %v, want ErrInvalid", err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ps = f.Profiles()
	if len(ps) != 2 || ps[1].Name != "second" {
		t.Errorf("after append: profiles = %+v", ps)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(after[:f.indexOff], snap[:f.indexOff]) {
		t.Error("AppendProfile changed bytes before the index")
	}
	got2, err := readAll(after)
	if err != nil || !bytes.Equal(got2[0], img) {
		t.Errorf("after append: data differs or %v", err)
	}
	if err := f.Close(); err != os.ErrClosed {
		// first Close is deferred; this is the second
		_ = err
	}
}

func TestWriterMisuse(t *testing.T) {
	var buf bytes.Buffer
	if _, err := NewWriter(&buf, WriterOptions{ChunkSize: 100000}); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad chunk size: %v", err)
	}
	if _, err := NewWriter(&buf, WriterOptions{Codec: Codec(9)}); !errors.Is(err, ErrInvalid) {
		t.Errorf("codec 9: %v", err)
	}
	w, err := NewWriter(&buf, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("x")); !errors.Is(err, ErrInvalid) {
		t.Errorf("write outside region: %v", err)
	}
	w.BeginRegion("a", 0, 1)
	if err := w.BeginRegion("b", 0, 1); !errors.Is(err, ErrInvalid) {
		t.Errorf("nested region: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second close: %v", err)
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.n < len(p) {
		return 0, errors.New("disk full")
	}
	f.n -= len(p)
	return len(p), nil
}

func TestWriterError(t *testing.T) {
	w, err := NewWriter(&failWriter{n: 100000}, WriterOptions{ChunkSize: MinChunkSize, Codec: CodecRaw, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	w.BeginRegion("a", 0, 1)
	img := testImage(2<<20, 1)
	var werr error
	for i := 0; i < 4 && werr == nil; i++ {
		_, werr = w.Write(img)
	}
	cerr := w.Close()
	if werr == nil && cerr == nil || !strings.Contains(fmt.Sprint(werr, cerr), "disk full") {
		t.Errorf("write err %v, close err %v: want disk full", werr, cerr)
	}
}

func TestCodecNames(t *testing.T) {
	for _, c := range []Codec{CodecZero, CodecRaw, CodecZstd, CodecS2} {
		if c == CodecZero {
			continue
		}
		p, err := ParseCodec(c.String())
		if err != nil || p != c {
			t.Errorf("ParseCodec(%q) = %v, %v", c, p, err)
		}
	}
	if c, _ := ParseCodec("none"); c != CodecRaw {
		t.Error("none != raw")
	}
	if _, err := ParseCodec("lz4"); err == nil {
		t.Error("lz4 accepted")
	}
}

func TestCorruptErrorText(t *testing.T) {
	e := &CorruptError{Offset: 0x4000, Chunk: 17, Err: ErrChecksum, Msg: "want 0x1, got 0x2"}
	want := "format: chunk 17 at offset 0x4000: checksum mismatch (want 0x1, got 0x2)"
	if e.Error() != want {
		t.Errorf("got  %q\nwant %q", e.Error(), want)
	}
	if !errors.Is(e, ErrChecksum) {
		t.Error("errors.Is(ErrChecksum) false")
	}
	tr := &CorruptError{Offset: 1, Chunk: -1, Err: ErrTruncated}
	if !errors.Is(tr, io.ErrUnexpectedEOF) {
		t.Error("truncated does not match io.ErrUnexpectedEOF")
	}
}

func TestReadStoredCoalesced(t *testing.T) {
	img := testImage(4*MinChunkSize+5, 8)
	snap := buildSnap(t, WriterOptions{ChunkSize: MinChunkSize, Codec: CodecS2}, []testRegion{{name: "x", data: img}})
	r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	first := r.Chunk(0)
	var end uint64
	for i := 0; i < r.NumChunks(); i++ {
		if c := r.Chunk(i); c.StoredLen > 0 {
			end = c.Offset + uint64(c.StoredLen)
		}
	}
	buf := make([]byte, end-first.Offset)
	if err := r.ReadStored(buf, int64(first.Offset)); err != nil {
		t.Fatal(err)
	}
	d := r.NewDecoder()
	defer d.Close()
	out := make([]byte, r.TotalSize())
	for i := 0; i < r.NumChunks(); i++ {
		c := r.Chunk(i)
		var stored []byte
		if c.StoredLen > 0 {
			lo := c.Offset - first.Offset
			stored = buf[lo : lo+uint64(c.StoredLen)]
		}
		if err := d.DecodeStored(i, stored, out[r.ChunkOffset(i):]); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(out[:len(img)], img) {
		t.Error("coalesced decode differs")
	}
	if err := r.ReadStored(make([]byte, 10), int64(r.indexOff)-5); !errors.Is(err, ErrInvalid) {
		t.Errorf("read past the data area: %v", err)
	}
	if err := r.ReadStored(make([]byte, 10), 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("read of the header: %v", err)
	}
	if err := d.DecodeStored(0, buf[:3], out); !errors.Is(err, ErrInvalid) {
		t.Errorf("wrong stored length: %v", err)
	}
}

// TestZeroChecksum: the CRC of n zero bytes and the zero test, computed on
// a small block, agree with the plain ones at and around its size and at a
// chunk's.
func TestZeroChecksum(t *testing.T) {
	for _, n := range []int{0, 1, 4095, len(zeroBlock) - 1, len(zeroBlock), len(zeroBlock) + 1, 3*len(zeroBlock) + 7, MaxChunkSize} {
		b := make([]byte, n)
		if got, want := zeroChecksum(n), Checksum(b); got != want {
			t.Errorf("zeroChecksum(%d) = %#08x, want %#08x", n, got, want)
		}
		if !isZero(b) {
			t.Errorf("isZero(%d zero bytes) = false", n)
		}
		if n > 0 {
			b[n-1] = 1
			if isZero(b) {
				t.Errorf("isZero(%d bytes, the last 1) = true", n)
			}
			b[n-1], b[0] = 0, 1
			if isZero(b) {
				t.Errorf("isZero(%d bytes, the first 1) = true", n)
			}
		}
	}
}
