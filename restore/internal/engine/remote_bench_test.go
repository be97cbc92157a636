package engine

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

// BenchmarkRemoteSparse: a lazy Open of a snapshot served over HTTP (nginx
// on loopback when installed, else net/http's file server), then one touch
// in each of 10% of the units, at random. Reports the bytes fetched as a
// fraction of the snapshot file (fetched_pct) and in MiB. Size:
// UFFDRESTORE_BENCH_SIZE (e.g. 1GiB; default 256MiB).
func BenchmarkRemoteSparse(b *testing.B) {
	size := benchSize(b)
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, false)
	opts := benchBacking(b, size)
	url := benchServe(b, filepath.Dir(snap)) + "/" + filepath.Base(snap)
	var fetched, fileSize, requests, filled int64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r, err := Open(context.Background(), url, opts...)
		if err != nil {
			b.Fatal(err)
		}
		mem := r.Bytes()
		unit := r.Layout().ChunkSize
		if ps := r.Layout().PageSize; ps > unit {
			unit = ps
		}
		units := int(size) / unit
		rng := rand.New(rand.NewPCG(uint64(i), 10))
		var sum byte
		for _, u := range rng.Perm(units)[:units/10] {
			sum += mem[u*unit+rng.IntN(unit)]
		}
		st := sinkAndClose(b, r, sum)
		fetched, fileSize, requests, filled = st.Remote.BytesFetched, st.Remote.Size, st.Remote.Requests, st.FilledByFault
	}
	b.ReportMetric(100*float64(fetched)/float64(fileSize), "fetched_pct")
	b.ReportMetric(float64(fetched)/(1<<20), "fetched_MiB")
	b.ReportMetric(float64(fileSize)/(1<<20), "file_MiB")
	b.ReportMetric(float64(requests), "requests")
	b.ReportMetric(float64(filled), "units_filled")
}

// benchServe serves dir over HTTP on loopback until the benchmark ends: with
// nginx when installed, else with net/http's file server. It returns the
// base URL.
func benchServe(b *testing.B, dir string) string {
	if _, err := exec.LookPath("nginx"); err == nil {
		return testutil.StartNginx(b, dir).URL
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(dir)))
	b.Cleanup(srv.Close)
	b.Logf("no nginx: serving with net/http")
	return srv.URL
}

// sinkAndClose keeps sum (bytes a benchmark read) alive, and returns the
// restore's stats after closing it.
func sinkAndClose(b *testing.B, r *Restore, sum byte) Stats {
	sinkMu.Lock()
	sinkByte += sum
	sinkMu.Unlock()
	st, err := r.Stats(context.Background())
	r.Close()
	if err != nil {
		b.Fatal(err)
	}
	return st
}

// BenchmarkRemoteLatency: time to ready (Open), to the first byte (Open and
// one touch) and to a full restore (Open and Wait) of a snapshot read from
// the local file and over HTTP on loopback with 0, 1 ms and 20 ms added
// before each response (a delaying handler in front of net/http's file
// server: added round-trip time, not a bandwidth limit). Size:
// UFFDRESTORE_BENCH_SIZE (default 256MiB).
func BenchmarkRemoteLatency(b *testing.B) {
	size := benchSize(b)
	snap, _ := benchSnapshot(b, size, "mem", format.CodecZstd, 2<<20, false)
	opts := benchBacking(b, size)
	for _, delay := range []time.Duration{-1, 0, time.Millisecond, 20 * time.Millisecond} {
		name := "local"
		if delay >= 0 {
			name = "http/delay=" + delay.String()
		}
		b.Run(name, func(b *testing.B) {
			path := snap
			if delay >= 0 {
				fs := http.FileServer(http.Dir(filepath.Dir(snap)))
				srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					time.Sleep(delay)
					fs.ServeHTTP(w, r)
				}))
				defer srv.Close()
				path = srv.URL + "/" + filepath.Base(snap)
			}
			var ready, first, full time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				r, err := Open(context.Background(), path, opts...)
				if err != nil {
					b.Fatal(err)
				}
				ready += time.Since(t0)
				sinkMu.Lock()
				sinkByte += r.Bytes()[len(r.Bytes())/2]
				sinkMu.Unlock()
				first += time.Since(t0)
				if err := r.Wait(context.Background()); err != nil {
					b.Fatal(err)
				}
				full += time.Since(t0)
				r.Close()
			}
			n := float64(b.N) * float64(time.Millisecond)
			b.ReportMetric(float64(ready)/n, "ready_ms")
			b.ReportMetric(float64(first)/n, "first_byte_ms")
			b.ReportMetric(float64(full)/n, "full_ms")
		})
	}
}
