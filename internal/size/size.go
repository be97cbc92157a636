// Package size parses and prints byte sizes as the uffdrestore command line
// spells them: 4096, 64K, 64KiB, 64KB, 2M, 2MiB, 1G, 100TiB. Every unit is
// binary (K = 1024). It is the one parser of sizes: every flag and probe that
// reads a size goes through Parse.
package size

import (
	"fmt"
	"strconv"
	"strings"
)

var units = []struct {
	suf string
	m   int64
}{
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40}, {"pib", 1 << 50},
	{"kb", 1 << 10}, {"mb", 1 << 20}, {"gb", 1 << 30}, {"tb", 1 << 40}, {"pb", 1 << 50},
	{"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"t", 1 << 40}, {"p", 1 << 50},
	{"b", 1},
}

// Parse parses a non-negative whole number of bytes with an optional unit
// suffix (K, M, G, T, P, each optionally followed by B or iB; any case).
func Parse(s string) (int64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suf)), u.m
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q: want a whole number of bytes, optionally with K, KiB, M, MiB, G, GiB, T or TiB", s)
	}
	return n * mult, nil
}
