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

// TestImage: Image is deterministic, differs by seed, zeroes [4 MiB, 6 MiB)
// from 8 MiB on, and has whole zero 64 KiB chunks as well as chunks that
// are neither zero nor incompressible.
func TestImage(t *testing.T) {
	a, b := Image(16<<20, 1), Image(16<<20, 1)
	if !bytes.Equal(a, b) {
		t.Fatal("Image(n, seed) is not deterministic")
	}
	if bytes.Equal(a[:1<<20], Image(1<<20, 2)) {
		t.Fatal("Image ignores the seed")
	}
	if !allZero(a[4<<20 : 6<<20]) {
		t.Fatal("Image(16 MiB) is not zero in [4 MiB, 6 MiB)")
	}
	for seed := uint64(1); seed <= 4; seed++ {
		img := Image(4<<20, seed)
		zero, other := 0, 0
		for off := 0; off < len(img); off += 64 << 10 {
			if allZero(img[off : off+64<<10]) {
				zero++
			} else {
				other++
			}
		}
		if zero == 0 || other == 0 {
			t.Errorf("seed %d: %d zero and %d other 64 KiB chunks in 4 MiB: want both", seed, zero, other)
		}
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
