package uffd

import "testing"

// TestHugePoolOf: the pool of one page size is what HugePools lists for it,
// and a size with no pool is reported as none.
func TestHugePoolOf(t *testing.T) {
	for _, p := range HugePools() {
		got, ok := HugePoolOf(p.PageSize)
		if !ok || got.PageSize != p.PageSize || got.Total != p.Total {
			t.Errorf("HugePoolOf(%d) = %+v, %v; HugePools lists %+v", p.PageSize, got, ok, p)
		}
	}
	if p, ok := HugePoolOf(3 << 10); ok {
		t.Errorf("HugePoolOf(3 KiB) = %+v, true; there is no such pool", p)
	}
}
