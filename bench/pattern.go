package bench

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
)

// PatternKind is how the workload walks the restored memory.
type PatternKind int

// Access patterns.
const (
	// Sequential touches every 4 KiB page in address order.
	Sequential PatternKind = iota
	// Random touches every 4 KiB page in a random order.
	Random
	// Sparse touches every 4 KiB page of a random Fraction of the 2 MiB
	// blocks, blocks in random order, pages in order within a block: the
	// locality of a real working set, and what a fraction of huge pages
	// means to a chunked restore (a random 10% of 4 KiB pages would hit
	// nearly every 2 MiB chunk).
	Sparse
)

// BlockPages is the number of 4 KiB pages in a Sparse block (2 MiB).
const BlockPages = 512

// Pattern is a parsed --pattern value.
type Pattern struct {
	Kind     PatternKind
	Fraction float64 // Sparse: (0, 1]
}

// ParsePattern parses sequential, random and sparse:FRACTION (a fraction in
// (0, 1], or a percentage such as sparse:10%).
func ParsePattern(s string) (Pattern, error) {
	switch t := strings.TrimSpace(strings.ToLower(s)); {
	case t == "sequential" || t == "seq":
		return Pattern{Kind: Sequential, Fraction: 1}, nil
	case t == "random":
		return Pattern{Kind: Random, Fraction: 1}, nil
	case strings.HasPrefix(t, "sparse:"):
		v := strings.TrimPrefix(t, "sparse:")
		scale := 1.0
		if strings.HasSuffix(v, "%") {
			v, scale = strings.TrimSuffix(v, "%"), 0.01
		}
		f, err := strconv.ParseFloat(v, 64)
		f *= scale
		if err != nil || math.IsNaN(f) || f <= 0 || f > 1 {
			return Pattern{}, fmt.Errorf("bench: pattern %q: the fraction must be in (0, 1], e.g. sparse:0.1", s)
		}
		return Pattern{Kind: Sparse, Fraction: f}, nil
	}
	return Pattern{}, fmt.Errorf("bench: unknown pattern %q (want sequential, random or sparse:FRACTION)", s)
}

// ParsePatterns parses a comma-separated list of patterns.
func ParsePatterns(s string) ([]Pattern, error) {
	var out []Pattern
	for _, f := range strings.Split(s, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		p, err := ParsePattern(f)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("bench: no pattern given")
	}
	return out, nil
}

func (p Pattern) String() string {
	switch p.Kind {
	case Random:
		return "random"
	case Sparse:
		return "sparse:" + strconv.FormatFloat(p.Fraction, 'g', -1, 64)
	}
	return "sequential"
}

// TargetArg is the pattern as bin/uffdrestore-target spells it (which counts
// its own pages: 2 MiB ones on a hugetlb backing).
func (p Pattern) TargetArg() string {
	if p.Kind == Sparse {
		return "fraction:" + strconv.FormatFloat(p.Fraction, 'g', -1, 64)
	}
	return p.String()
}

// Order returns the 4 KiB page indexes (relative to the start of the
// memory) to touch, in touch order. pages are the indexes that hold data
// (every page of every region), ascending; seed fixes the random choices, so
// every strategy of one run touches the same pages in the same order.
func (p Pattern) Order(pages []uint32, seed uint64) []uint32 {
	rng := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	switch p.Kind {
	case Random:
		out := append([]uint32(nil), pages...)
		rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
		return out
	case Sparse:
		// Group the pages by 2 MiB block.
		var blocks [][]uint32
		for i := 0; i < len(pages); {
			j := i
			b := pages[i] / BlockPages
			for j < len(pages) && pages[j]/BlockPages == b {
				j++
			}
			blocks = append(blocks, pages[i:j])
			i = j
		}
		rng.Shuffle(len(blocks), func(i, j int) { blocks[i], blocks[j] = blocks[j], blocks[i] })
		n := int(math.Ceil(p.Fraction * float64(len(blocks))))
		n = min(max(n, 1), len(blocks))
		var out []uint32
		for _, b := range blocks[:n] {
			out = append(out, b...)
		}
		return out
	}
	return append([]uint32(nil), pages...)
}
