package bench

import (
	"math"
	"slices"
)

// Spread summarises one metric over the timed runs: the median with the
// extremes and the interquartile range.
type Spread struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	Q1     float64 `json:"q1"`
	Q3     float64 `json:"q3"`
}

// Summarize returns the spread of xs (NaNs are ignored). An empty input
// gives N = 0 and NaN everywhere.
func Summarize(xs []float64) Spread {
	v := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		nan := math.NaN()
		return Spread{Median: nan, Min: nan, Max: nan, Q1: nan, Q3: nan}
	}
	slices.Sort(v)
	return Spread{
		N: len(v), Median: Quantile(v, 0.5), Min: v[0], Max: v[len(v)-1],
		Q1: Quantile(v, 0.25), Q3: Quantile(v, 0.75),
	}
}

// Quantile returns the q-quantile (0 ≤ q ≤ 1) of sorted, interpolating
// linearly between the two nearest ranks (the R-7 / NumPy default), so the
// median of an even count is the mean of the middle two.
func Quantile(sorted []float64, q float64) float64 {
	n := len(sorted)
	if n == 0 {
		return math.NaN()
	}
	if q <= 0 {
		return sorted[0]
	}
	if q >= 1 {
		return sorted[n-1]
	}
	h := q * float64(n-1)
	lo := int(h)
	if lo+1 >= n {
		return sorted[n-1]
	}
	return sorted[lo] + (h-float64(lo))*(sorted[lo+1]-sorted[lo])
}

// Median is Quantile(sorted copy of xs, 0.5).
func Median(xs []float64) float64 { return Summarize(xs).Median }

// Latency is a latency distribution in nanoseconds: nearest-rank
// percentiles (a value that was observed, as latency tools report them).
type Latency struct {
	Count int64   `json:"count"`
	P50   float64 `json:"p50_ns"`
	P90   float64 `json:"p90_ns"`
	P99   float64 `json:"p99_ns"`
	Max   float64 `json:"max_ns"`
}

// RankPercentile is the nearest-rank q-percentile (0 < q ≤ 1) of sorted:
// the smallest value with at least q of the samples at or below it.
func RankPercentile(sorted []uint64, q float64) uint64 {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	r := int(math.Ceil(q*float64(n))) - 1
	r = max(0, min(r, n-1))
	return sorted[r]
}

// LatencyOf sorts lat in place and summarises it.
func LatencyOf(lat []uint64) Latency {
	slices.Sort(lat)
	if len(lat) == 0 {
		return Latency{}
	}
	return Latency{
		Count: int64(len(lat)),
		P50:   float64(RankPercentile(lat, 0.50)),
		P90:   float64(RankPercentile(lat, 0.90)),
		P99:   float64(RankPercentile(lat, 0.99)),
		Max:   float64(lat[len(lat)-1]),
	}
}

// CDFPoint is one point of an empirical CDF: Frac of the samples are ≤ NS.
type CDFPoint struct {
	NS   float64 `json:"ns"`
	Frac float64 `json:"frac"`
}

// CDF condenses sorted latencies into at most about points points, denser
// in the tail (the last 1%, 0.1% ... are kept), always ending at the max.
func CDF(sorted []uint64, points int) []CDFPoint {
	n := len(sorted)
	if n == 0 || points < 2 {
		return nil
	}
	var qs []float64
	body := points * 3 / 4
	for i := 1; i <= body; i++ {
		qs = append(qs, 0.99*float64(i)/float64(body))
	}
	tail := points - body
	for i := 1; i <= tail; i++ {
		// 0.99 → 1 on a log scale of the remaining fraction.
		rest := 0.01 * math.Pow(1e-4, float64(i)/float64(tail))
		qs = append(qs, 1-rest)
	}
	qs = append(qs, 1)
	out := make([]CDFPoint, 0, len(qs)+1)
	out = append(out, CDFPoint{NS: float64(sorted[0]), Frac: 1 / float64(n)})
	for _, q := range qs {
		v := float64(RankPercentile(sorted, q))
		f := q
		if q == 1 {
			v = float64(sorted[n-1])
		}
		if last := out[len(out)-1]; v == last.NS {
			out[len(out)-1].Frac = max(last.Frac, f)
			continue
		}
		out = append(out, CDFPoint{NS: v, Frac: f})
	}
	return out
}
