package size

import "testing"

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "65536": 65536, "64K": 64 << 10, "64k": 64 << 10, "256KiB": 256 << 10, "64kb": 64 << 10,
		"2M": 2 << 20, "2m": 2 << 20, "2MiB": 2 << 20, "2MB": 2 << 20, "1G": 1 << 30, "1GiB": 1 << 30,
		"100TiB": 100 << 40, "2048kB": 2 << 20, "3T": 3 << 40, " 5 MiB ": 5 << 20, "10B": 10,
	} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1", "1.5M", "M", "9999999999999999999G", "5000P", "2 X"} {
		if n, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %d, accepted", in, n)
		}
	}
}
