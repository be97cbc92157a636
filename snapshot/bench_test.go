package snapshot

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
)

const benchImageMax = 128 << 20

var (
	benchOnce   sync.Once
	benchImages map[string][]byte
	benchSrc    string
)

// captureImage snapshots a live process's memory and extracts it back: a
// python3 process holding a large dict and list of strings, or, without
// python3, this test process itself.
func captureImage(b *testing.B) ([]byte, string) {
	pid, src := os.Getpid(), "self (test binary)"
	if py, err := exec.LookPath("python3"); err == nil {
		cmd := exec.Command(py, "-c", `
import sys
d = {("key%d" % i): ("value-%d-%s" % (i, "x" * (i % 50))) for i in range(500000)}
l = [str(i) * 3 for i in range(700000)]
print("ready", flush=True)
sys.stdin.read()
`)
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err == nil {
			defer func() { stdin.Close(); cmd.Wait() }()
			if line, _ := bufio.NewReader(stdout).ReadString('\n'); strings.TrimSpace(line) == "ready" {
				pid, src = cmd.Process.Pid, "python3 dict+list of strings"
			}
		}
	}
	var snap bytes.Buffer
	_, err := CreateFromPID(context.Background(), pid, &snap, Options{WriterOptions: format.WriterOptions{Codec: format.CodecRaw}})
	if err != nil {
		b.Fatal(err)
	}
	r, err := format.NewReader(bytes.NewReader(snap.Bytes()), int64(snap.Len()))
	if err != nil {
		b.Fatal(err)
	}
	var img bytes.Buffer
	if err := Extract(context.Background(), r, &img, ""); err != nil {
		b.Fatal(err)
	}
	out := img.Bytes()
	if len(out) > benchImageMax {
		out = out[:benchImageMax]
	}
	return out, src
}

func loadBenchImages(b *testing.B) {
	benchOnce.Do(func() {
		img, src := captureImage(b)
		benchSrc = src
		n := len(img)
		// Zeros-heavy: 85% zero pages, the rest text.
		zeros := make([]byte, n)
		rng := rand.New(rand.NewPCG(1, 2))
		for p := 0; p+4096 <= n; p += 4096 {
			if rng.IntN(100) < 15 {
				copy(zeros[p:p+4096], img[p:p+4096])
			}
		}
		random := make([]byte, n)
		for i := 0; i+8 <= n; i += 8 {
			v := rng.Uint64()
			for k := 0; k < 8; k++ {
				random[i+k] = byte(v >> (8 * k))
			}
		}
		benchImages = map[string][]byte{"image": img, "zeros": zeros, "random": random}
	})
	b.Logf("image: %s, %d MiB", benchSrc, len(benchImages["image"])>>20)
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

var benchCodecs = []format.Codec{format.CodecZstd, format.CodecS2, format.CodecRaw}
var benchChunks = []int{64 << 10, 256 << 10, 2 << 20}

func benchSnap(b *testing.B, img []byte, codec format.Codec, cs, workers int) []byte {
	var buf bytes.Buffer
	buf.Grow(len(img)/2 + 1<<20)
	_, err := CreateFromReader(context.Background(), bytes.NewReader(img), &buf,
		Options{WriterOptions: format.WriterOptions{Codec: codec, ChunkSize: cs, Workers: workers}})
	if err != nil {
		b.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkCompress: single-worker compression throughput (raw bytes/s).
func BenchmarkCompress(b *testing.B) {
	loadBenchImages(b)
	for _, data := range []string{"image", "zeros", "random"} {
		img := benchImages[data]
		for _, codec := range benchCodecs {
			for _, cs := range benchChunks {
				b.Run(fmt.Sprintf("%s/%s/%dK", data, codec, cs>>10), func(b *testing.B) {
					b.SetBytes(int64(len(img)))
					b.ReportAllocs()
					var cw countWriter
					for i := 0; i < b.N; i++ {
						cw.n = 0
						_, err := CreateFromReader(context.Background(), bytes.NewReader(img), &cw,
							Options{WriterOptions: format.WriterOptions{Codec: codec, ChunkSize: cs, Workers: 1}})
						if err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64(len(img))/float64(cw.n), "ratio")
				})
			}
		}
	}
}

// BenchmarkDecompress: one Decoder decoding every chunk, in order, into a
// preallocated full-size destination (like a restore into the alias).
func BenchmarkDecompress(b *testing.B) {
	loadBenchImages(b)
	for _, data := range []string{"image", "zeros", "random"} {
		img := benchImages[data]
		dst := make([]byte, len(img)+2<<20)
		for i := range dst {
			dst[i] = 1 // pre-fault
		}
		for _, codec := range benchCodecs {
			for _, cs := range benchChunks {
				snap := benchSnap(b, img, codec, cs, 2)
				b.Run(fmt.Sprintf("%s/%s/%dK", data, codec, cs>>10), func(b *testing.B) {
					r, err := format.NewReader(bytes.NewReader(snap), int64(len(snap)))
					if err != nil {
						b.Fatal(err)
					}
					d := r.NewDecoder()
					defer d.Close()
					b.SetBytes(int64(len(img)))
					b.ReportAllocs()
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						for c := 0; c < r.NumChunks(); c++ {
							if err := d.DecodeChunk(c, dst[r.ChunkOffset(c):]); err != nil {
								b.Fatal(err)
							}
						}
					}
					b.ReportMetric(float64(len(img))/float64(len(snap)), "ratio")
				})
			}
		}
	}
}

func benchCreateWorkers(b *testing.B, workers int) {
	loadBenchImages(b)
	img := benchImages["image"]
	b.SetBytes(int64(len(img)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_, err := CreateFromReader(context.Background(), bytes.NewReader(img), io.Discard,
			Options{WriterOptions: format.WriterOptions{Codec: format.CodecZstd, Workers: workers}})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCreateWorkers1/2: the same image with 1 and 2 compression
// workers (zstd default, 2 MiB chunks); their ratio is the parallel speed-up.
func BenchmarkCreateWorkers1(b *testing.B) { benchCreateWorkers(b, 1) }
func BenchmarkCreateWorkers2(b *testing.B) { benchCreateWorkers(b, 2) }
