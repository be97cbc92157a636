package format

import (
	"bytes"
	"testing"

	"github.com/uffdrestore/uffdrestore/internal/memgen"
)

// TestPrewarm: decoders of a snapshot with the prewarmed chunk size take
// the decoders and buffers Prewarm made (one each per Decoder), decode
// correctly with them, and a snapshot of another chunk size takes none.
func TestPrewarm(t *testing.T) {
	const chunk = 64 << 10
	img := memgen.Image(4*chunk, 7)
	snap := buildSnap(t, WriterOptions{Codec: CodecZstd, ChunkSize: chunk}, []testRegion{{"r", 0x10000, 3, img}})
	r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	// The frame each prewarmed decoder decodes once is a chunk.
	zd, err := newZstdDecoder(chunk)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := zd.DecodeAll(warmFrame(chunk), make([]byte, 0, chunk)); err != nil || len(out) != chunk {
		t.Fatalf("the warm-up frame decodes to %d bytes (%v), want %d", len(out), err, chunk)
	}
	zd.Close()
	pool := func() (int, int) {
		warm.Lock()
		defer warm.Unlock()
		return len(warm.zds), len(warm.bufs)
	}
	Prewarm(2*chunk, 1) // another size: replaced by the next call
	Prewarm(chunk, 2)
	if z, b := pool(); z != 2 || b != 2 {
		t.Fatalf("after Prewarm: %d decoders, %d buffers", z, b)
	}
	for k := 0; k < 2; k++ {
		d := r.NewDecoder()
		got := make([]byte, chunk)
		for c := 0; c < 4; c++ {
			if err := d.DecodeChunk(c, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, img[c*chunk:(c+1)*chunk]) {
				t.Fatalf("decoder %d, chunk %d differs", k, c)
			}
		}
		d.Close()
		if z, b := pool(); z != 1-k || b != 1-k {
			t.Fatalf("decoder %d took nothing from the pool: %d decoders, %d buffers left", k, z, b)
		}
	}
	Prewarm(2*chunk, 1)
	d := r.NewDecoder()
	defer d.Close()
	if err := d.DecodeChunk(0, make([]byte, chunk)); err != nil {
		t.Fatal(err)
	}
	if z, b := pool(); z != 1 || b != 1 {
		t.Fatalf("a %d-byte-chunk decoder took the %d-byte pool: %d, %d left", chunk, 2*chunk, z, b)
	}
}

// TestPrewarmUntil: PrewarmUntil stops between decoders once stop says so
// (and makes none when it says so from the start).
func TestPrewarmUntil(t *testing.T) {
	const chunk = 64 << 10
	pool := func() (int, int) {
		warm.Lock()
		defer warm.Unlock()
		return warm.size, len(warm.zds)
	}
	Prewarm(3*chunk, 1) // another size: the pool holds just this one
	PrewarmUntil(chunk, 3, func() bool { return true })
	if size, n := pool(); size != 3*chunk || n != 1 {
		t.Fatalf("PrewarmUntil stopped from the start changed the pool: %d decoders of %d bytes", n, size)
	}
	calls := 0
	PrewarmUntil(chunk, 3, func() bool { calls++; return calls > 2 }) // the first check, then one decoder
	if size, n := pool(); size != chunk || n != 1 {
		t.Fatalf("PrewarmUntil stopped after one decoder: %d decoders of %d bytes", n, size)
	}
}
