package engine

import (
	"testing"
	"time"
)

func TestHistogramBuckets(t *testing.T) {
	prev := -1
	for _, ns := range []int64{0, 1, 31, 32, 33, 63, 64, 1000, 1 << 20, 1e9, 60e9} {
		b := bucketOf(ns)
		if b < prev {
			t.Fatalf("bucketOf not monotonic at %d", ns)
		}
		prev = b
		if lo := bucketLow(b); lo > ns || float64(ns-lo) > 0.04*float64(ns)+1 {
			t.Fatalf("bucketLow(bucketOf(%d)) = %d: off by more than 4%%", ns, lo)
		}
	}
}

func TestHistogramPercentiles(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	p := h.percentiles()
	near := func(got, want time.Duration) bool {
		return got >= want*96/100 && got <= want*104/100
	}
	if p.Count != 1000 || !near(p.P50, 500*time.Microsecond) || !near(p.P90, 900*time.Microsecond) ||
		!near(p.P99, 990*time.Microsecond) || p.Max != 1000*time.Microsecond {
		t.Fatalf("percentiles = %+v", p)
	}
	var g histogram
	g.merge(&h)
	if g.percentiles() != p {
		t.Fatalf("merge changed the percentiles")
	}
	if (&histogram{}).percentiles().Count != 0 {
		t.Fatal("empty histogram has a count")
	}
}

// TestFirstByteTraceOrder: a trace is made only from marks in order, each
// step from the start; a missing or out-of-order mark (another unit's fault
// answered before the first fault's own fill) gives none.
func TestFirstByteTraceOrder(t *testing.T) {
	start := time.Unix(100, 0)
	at := func(ms ...int64) []int64 {
		var out []int64
		for _, m := range ms {
			out = append(out, start.Add(time.Duration(m)*time.Millisecond).UnixNano())
		}
		return out
	}
	fb := firstByteTrace(start, time.Millisecond, at(2, 3, 4, 5, 7, 8))
	if fb == nil || fb.Ready != time.Millisecond || fb.Loader != 2*time.Millisecond || fb.FillStart != 5*time.Millisecond || fb.Answered != 8*time.Millisecond {
		t.Fatalf("trace %+v", fb)
	}
	if fb := firstByteTrace(start, 0, at(2, 3, 4, 5, 9, 8)); fb != nil {
		t.Errorf("answered before filled: trace %+v, want none", fb)
	}
	missing := at(2, 3, 4, 5, 7, 8)
	missing[3] = 0
	if fb := firstByteTrace(start, 0, missing); fb != nil {
		t.Errorf("no fill mark: trace %+v, want none", fb)
	}
	if fb := firstByteTrace(time.Time{}, 0, at(2, 3, 4, 5, 7, 8)); fb != nil {
		t.Errorf("no start: trace %+v, want none", fb)
	}
}
