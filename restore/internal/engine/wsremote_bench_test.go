package engine

import (
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
)

// BenchmarkRemoteWorkingSet: time from Open to having read every 4 KiB page
// of a 20% working set (runs of 4 neighbouring units at random places,
// touched with the runs interleaved, as a recorded profile lists them) of a
// snapshot served by nginx on loopback (net/http's file server without
// nginx) behind a proxy that adds 1 ms or 20 ms before each response: a
// lazy restore (faults and readahead fetch it) against a working-set restore
// given that profile (prefetch fetches it). Reports the median over the
// iterations (run with -benchtime=5x or more). Size: UFFDRESTORE_BENCH_SIZE
// (default 256MiB).
func BenchmarkRemoteWorkingSet(b *testing.B) {
	size := benchSize(b)
	const chunk = 2 << 20
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, chunk, false)
	opts := benchBacking(b, size)
	origin := benchServe(b, filepath.Dir(snap))
	// The working set: 20% of the units in runs of 4, runs interleaved.
	units := int(size / chunk)
	rng := rand.New(rand.NewPCG(20, 4))
	if units < 8 {
		b.Skip("UFFDRESTORE_BENCH_SIZE below 16 MiB: no room for a working set of runs of 4 units")
	}
	runs := rng.Perm(units / 4)[:max(1, units/20)]
	var ws []uint32
	for k := 0; k < 4; k++ {
		for _, r := range runs {
			ws = append(ws, uint32(r*4+k))
		}
	}
	prof := format.Profile{Name: "ws"}
	for i, u := range ws {
		prof.Entries = append(prof.Entries, format.ProfileEntry{Chunk: u, Rank: uint32(i)})
	}
	target, _ := url.Parse(origin)
	for _, delay := range []time.Duration{time.Millisecond, 20 * time.Millisecond} {
		proxy := httputil.NewSingleHostReverseProxy(target)
		proxy.Transport = &http.Transport{DialContext: (&net.Dialer{}).DialContext, MaxIdleConnsPerHost: 64}
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			time.Sleep(delay)
			proxy.ServeHTTP(w, r)
		}))
		snapURL := srv.URL + "/" + filepath.Base(snap)
		for _, mode := range []string{"lazy", "workingset"} {
			b.Run("delay="+delay.String()+"/"+mode, func(b *testing.B) {
				o := slices.Clone(opts)
				if mode == "workingset" {
					o = append(o, WithProfile(ProfileSource{Profile: &prof}))
				}
				var times []time.Duration
				var fetched, requests int64
				for i := 0; i < b.N; i++ {
					t0 := time.Now()
					r, err := Open(context.Background(), snapURL, o...)
					if err != nil {
						b.Fatal(err)
					}
					mem := r.Bytes()
					var sum byte
					for _, u := range ws {
						for off := int(u) * chunk; off < int(u+1)*chunk; off += 4096 {
							sum += mem[off]
						}
					}
					times = append(times, time.Since(t0))
					st := sinkAndClose(b, r, sum)
					fetched, requests = st.Remote.BytesFetched, st.Remote.Requests
				}
				slices.Sort(times)
				b.ReportMetric(float64(times[len(times)/2])/float64(time.Millisecond), "median_ms")
				b.ReportMetric(float64(fetched)/(1<<20), "fetched_MiB")
				b.ReportMetric(float64(requests), "requests")
			})
		}
		srv.Close()
	}
}
