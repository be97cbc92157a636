package bench

import (
	"context"
	"os"
	"runtime"
	"sync"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/size"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
)

// Benchmark sizes: 64 MiB by default so that CI's -benchtime=1x stays quick;
// UFFDRESTORE_BENCH_SIZE (e.g. 1GiB) for real figures.
func benchEnvSize(b *testing.B) int64 {
	if s := os.Getenv("UFFDRESTORE_BENCH_SIZE"); s != "" {
		n, err := size.Parse(s)
		if err != nil {
			b.Fatal(err)
		}
		return n
	}
	return 64 << 20
}

var (
	benchEnvMu    sync.Mutex
	benchEnvCache = map[int64]*Env{}
)

func benchEnv(b *testing.B) *Env {
	testutil.RequireRoot(b)
	size := benchEnvSize(b)
	testutil.RequireHugePages(b, size>>21+8)
	benchEnvMu.Lock()
	defer benchEnvMu.Unlock()
	if e, ok := benchEnvCache[size]; ok {
		return e
	}
	dir, err := CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	snap, image, err := Generate(context.Background(), dir, size, "realistic", format.CodecZstd, 2<<20)
	if err != nil {
		b.Fatal(err)
	}
	f, err := format.Open(snap)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	e := &Env{Snap: snap, Image: image, Layout: LayoutOf(f.Reader), Backing: restore.BackingAuto}
	benchEnvCache[size] = e
	return e
}

// BenchmarkStrategy restores with every strategy and touches the memory with
// each pattern; the timer covers restore + access pattern (not the
// verification after it). ns/op is the time to complete; ready-ms and
// complete-ms are reported per op.
func BenchmarkStrategy(b *testing.B) {
	for _, pat := range []Pattern{{Sparse, 0.1}, {Sequential, 1}} {
		for _, s := range Strategies {
			b.Run(s.Name+"/"+pat.String(), func(b *testing.B) {
				env := *benchEnv(b) // a copy: the profile is per pattern
				order := pat.Order(env.Layout.Pages(), 1)
				if s.Name == "working-set" {
					prof, err := recordProfile(context.Background(), &env, order, 1)
					if err != nil {
						b.Fatal(err)
					}
					env.Profile = prof
				}
				b.SetBytes(env.Layout.RawBytes)
				// Warm-up: the first touch of memory the VM never used is slow.
				if r := runInProcess(context.Background(), &env, s, order, 1, nil); r.Error != "" {
					b.Fatal(r.Error)
				}
				var ready, complete float64
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					r := runInProcess(context.Background(), &env, s, order, runtime.NumCPU(), b.StopTimer)
					if r.Error != "" {
						b.Fatal(r.Error)
					}
					ready += r.Metrics[MReady]
					complete += r.Metrics[MComplete]
					b.StartTimer()
				}
				b.ReportMetric(ready/float64(b.N), "ready-ms")
				b.ReportMetric(complete/float64(b.N), "complete-ms")
			})
		}
	}
}

// Generate writes its cache files through temporaries of their own: a
// leftover at the old fixed name (path.tmp, here a directory) is no obstacle
// and a failed run leaves nothing behind.
func TestGenerateTemporaries(t *testing.T) {
	dir := t.TempDir()
	snap, image, err := Generate(context.Background(), dir, 4<<20, "zeros", format.CodecS2, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(snap)
	os.Remove(image)
	for _, p := range []string{snap, image} {
		if err := os.Mkdir(p+".tmp", 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := Generate(context.Background(), dir, 4<<20, "zeros", format.CodecS2, 2<<20); err != nil {
		t.Fatalf("with leftovers at the fixed temporary names: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	other := t.TempDir()
	if _, _, err := Generate(ctx, other, 4<<20, "zeros", format.CodecS2, 2<<20); err == nil {
		t.Fatal("cancelled Generate succeeded")
	}
	if ents, _ := os.ReadDir(other); len(ents) != 0 {
		t.Fatalf("a cancelled Generate left %v", ents)
	}
}
