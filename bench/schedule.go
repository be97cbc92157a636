package bench

// Slot is one entry of the run schedule: which case (strategy × pattern)
// runs, which timed run it is (-1 for the untimed warm-up).
type Slot struct {
	Case int
	Run  int // 0-based; -1: warm-up
}

// Warmup reports whether the slot is the untimed warm-up.
func (s Slot) Warmup() bool { return s.Run < 0 }

// Schedule interleaves cases over runs — A B C A B C ... — so that a drift
// of the machine (another job, thermal state, page cache) spreads over every
// case instead of landing on one. With warmup, one untimed pass of every
// case comes first: the VM's first touch of memory it has never used is
// several times slower than any later touch.
func Schedule(cases, runs int, warmup bool) []Slot {
	var out []Slot
	if cases <= 0 {
		return nil
	}
	if warmup {
		for c := 0; c < cases; c++ {
			out = append(out, Slot{Case: c, Run: -1})
		}
	}
	for r := 0; r < runs; r++ {
		for c := 0; c < cases; c++ {
			out = append(out, Slot{Case: c, Run: r})
		}
	}
	return out
}
