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
