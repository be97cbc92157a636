package memgen

import (
	"bytes"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"
)

func TestFillIsPositional(t *testing.T) {
	whole := make([]byte, 64*PageSize)
	Fill(whole, 0)
	part := make([]byte, 10*PageSize+100)
	Fill(part, 7)
	if !bytes.Equal(part, whole[7*PageSize:17*PageSize+100]) {
		t.Fatal("Fill of a range differs from the same range of a larger Fill")
	}
}

func TestReaderMatchesFill(t *testing.T) {
	const n = 1<<20 + 123
	want := make([]byte, n)
	Fill(want, 0)
	r := NewReader(n)
	var got bytes.Buffer
	buf := make([]byte, 7777) // odd sizes cross page boundaries
	if _, err := io.CopyBuffer(&got, r, buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatal("Reader differs from Fill")
	}
}

// TestCompressesLikeMemory: the content must be neither trivial nor random.
func TestCompressesLikeMemory(t *testing.T) {
	b := make([]byte, 8<<20)
	Fill(b, 0)
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	ratio := float64(len(b)) / float64(len(enc.EncodeAll(b, nil)))
	if ratio < 2 || ratio > 50 {
		t.Fatalf("compression ratio %.1f, want a heap-like 2..50", ratio)
	}
	t.Logf("zstd ratio %.1fx", ratio)
}
