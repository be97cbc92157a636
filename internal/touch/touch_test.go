package touch

import (
	"testing"
	"unsafe"
)

// checksum is what Touch computes over the bytes it reads, in Go.
func checksum(b []byte, stride int, order []uint32) uint64 {
	var sum uint64
	idx := order
	if idx == nil {
		for i := 0; i*stride < len(b); i++ {
			idx = append(idx, uint32(i))
		}
	}
	for _, i := range idx {
		if off := int(i) * stride; off < len(b) {
			sum = sum*31 + uint64(b[off])
		}
	}
	return sum
}

func TestTouch(t *testing.T) {
	b := make([]byte, 10000)
	for i := range b {
		b[i] = byte(i*7 + i/256)
	}
	addr := uintptr(unsafe.Pointer(&b[0]))
	if got, want := Touch(addr, len(b), 4096, false, nil, nil), checksum(b, 4096, nil); got != want {
		t.Errorf("sequential: %#x, want %#x", got, want)
	}
	order := []uint32{2, 0, 9, 1} // 9 is beyond the buffer: skipped
	lat := make([]uint64, len(order))
	if got, want := Touch(addr, len(b), 4096, true, order, lat), checksum(b, 4096, order); got != want {
		t.Errorf("ordered: %#x, want %#x", got, want)
	}
	if lat[0] == 0 && lat[1] == 0 && lat[3] == 0 {
		t.Errorf("no latency recorded: %v", lat)
	}
	defer func() {
		if recover() == nil {
			t.Error("a short latency slice did not panic")
		}
	}()
	Touch(addr, len(b), 4096, false, nil, make([]uint64, 1))
}
