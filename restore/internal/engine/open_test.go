package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

var (
	sinkMu   sync.Mutex
	sinkByte byte // keeps the compiler from dropping test loads
)

func openT(t *testing.T, path string, opts ...Option) *Restore {
	t.Helper()
	r, err := Open(context.Background(), path, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestOpenGoTouch: Go code in this process touches the lazily restored view
// from many goroutines at once, reads and writes.
func TestOpenGoTouch(t *testing.T) {
	for _, kind := range []BackingKind{BackingMemfdHugetlb, BackingShmem} {
		for _, mode := range []Mode{ModeLazy, ModePrefetch, ModeEager} {
			t.Run(fmt.Sprintf("%v/%v", kind, mode), func(t *testing.T) {
				regions := []testRegion{{"a", 0, testImage(6<<20+123, 11)}, {"b", 0, testImage(2<<20, 12)}}
				path := writeSnap(t, regions, format.CodecZstd, 256<<10)
				opts := append(kernelOpts(t, kind, 12<<20), WithMode(mode))
				r := openT(t, path, opts...)
				var wg sync.WaitGroup
				for g := 0; g < 8; g++ {
					wg.Add(1)
					go func(g int) {
						defer wg.Done()
						rng := rand.New(rand.NewPCG(uint64(g), 1))
						mem := r.Bytes()
						var sum byte
						for i := 0; i < 200; i++ {
							sum += mem[rng.IntN(len(mem))]
						}
						sinkMu.Lock()
						sinkByte += sum
						sinkMu.Unlock()
					}(g)
				}
				wg.Wait()
				for i, reg := range r.Regions() {
					if !bytes.Equal(reg, regions[i].data) {
						t.Fatalf("region %d differs from the original", i)
					}
				}
				// Writes land in the shared view.
				r.Region("b")[0] ^= 0xff
				if r.Region("b")[0] != regions[1].data[0]^0xff {
					t.Fatal("write to the view lost")
				}
				if err := r.Wait(context.Background()); err != nil {
					t.Fatal(err)
				}
				s, err := r.Stats(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if s.UnitsPresent != int64(s.Units) {
					t.Errorf("after Wait: %d of %d units present", s.UnitsPresent, s.Units)
				}
				if mode == ModeLazy && s.FilledByFault == 0 {
					t.Errorf("lazy restore filled nothing by fault: %+v", s)
				}
			})
		}
	}
}

// TestOpenGOMAXPROCS1 runs a lazy restore touched by Go code in a process
// with GOMAXPROCS=1, where an in-process Go fault handler would deadlock.
func TestOpenGOMAXPROCS1(t *testing.T) {
	testutil.RequireRoot(t)
	if os.Getenv("UFFDRESTORE_GOMAXPROCS_CHILD") == "1" {
		if runtime.GOMAXPROCS(0) != 1 {
			t.Fatalf("GOMAXPROCS = %d", runtime.GOMAXPROCS(0))
		}
		regions := []testRegion{{"a", 0, testImage(8<<20, 5)}}
		path := writeSnap(t, regions, format.CodecS2, 2<<20)
		// The helper forks only after Open returned and the goroutines
		// below hold the only P, waiting in faults: its start must need
		// nothing of this process's Go runtime.
		uffd.SetSpawnDelay(200 * time.Millisecond)
		defer uffd.SetSpawnDelay(0)
		r := openT(t, path, WithBacking(BackingShmem))
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() { defer wg.Done(); _ = bytes.Equal(r.Bytes()[:len(regions[0].data)], regions[0].data) }()
		}
		wg.Wait()
		if !bytes.Equal(r.Region("a"), regions[0].data) {
			t.Fatal("content differs")
		}
		runtime.GC()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestOpenGOMAXPROCS1$", "-test.timeout=60s", "-test.v")
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1", "UFFDRESTORE_GOMAXPROCS_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child with GOMAXPROCS=1 failed: %v\n%s", err, out)
	}
}

func TestOpenErrors(t *testing.T) {
	for _, mode := range []Mode{ModeLazy, ModeEager} {
		if _, err := Open(context.Background(), "/nonexistent/x.snap", WithMode(mode)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%v: missing snapshot: %v, want fs.ErrNotExist", mode, err)
		}
		bad := writeSnap(t, []testRegion{{"a", 0, testImage(1<<20, 1)}}, format.CodecZstd, 64<<10)
		b, _ := os.ReadFile(bad)
		os.WriteFile(bad, b[:len(b)-10], 0o600)
		if _, err := Open(context.Background(), bad, WithMode(mode)); !errors.Is(err, format.ErrTruncated) {
			t.Fatalf("%v: truncated snapshot: %v, want format.ErrTruncated", mode, err)
		}
	}
}

func TestCloseIdempotent(t *testing.T) {
	testutil.RequireRoot(t)
	path := writeSnap(t, []testRegion{{"a", 0, testImage(1<<20, 1)}}, format.CodecZstd, 64<<10)
	r, err := Open(context.Background(), path, WithBacking(BackingShmem))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != os.ErrClosed {
		t.Fatalf("second Close = %v, want os.ErrClosed", err)
	}
}

// TestStatsTimeToFirstByte: Stats says how long a user waited for the
// first byte: from Open's start to the first fault answered (after the
// helper came up), never before Open returned and never after the touch
// returned; eager: the time to ready. Before any fault: 0.
func TestStatsTimeToFirstByte(t *testing.T) {
	for _, mode := range []Mode{ModeLazy, ModeEager} {
		t.Run(mode.String(), func(t *testing.T) {
			regions := []testRegion{{"a", 0, testImage(4<<20, 21)}}
			path := writeSnap(t, regions, format.CodecZstd, 2<<20)
			opts := append(kernelOpts(t, BackingShmem, 4<<20), WithMode(mode))
			t0 := time.Now()
			r := openT(t, path, opts...)
			if mode == ModeLazy {
				s, err := r.Stats(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if s.TimeToFirstByte != 0 || !s.FirstFaultAt.IsZero() {
					t.Errorf("before any touch: first byte %v at %v, want none", s.TimeToFirstByte, s.FirstFaultAt)
				}
				t0 = time.Now()
				r2, err := Open(context.Background(), path, opts...)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { r2.Close() })
				r = r2
			}
			b := r.Bytes()[0] // the first touch, from Go (the helper serves it)
			felt := time.Since(t0)
			if b != regions[0].data[0] {
				t.Fatalf("first byte %#x, want %#x", b, regions[0].data[0])
			}
			s, err := r.Stats(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if s.TimeToFirstByte < s.TimeToReady || s.TimeToFirstByte > felt || s.TimeToFirstByte <= 0 {
				t.Errorf("time to first byte %v: want between the time to ready %v and the touch's return %v", s.TimeToFirstByte, s.TimeToReady, felt)
			}
			if mode == ModeEager && s.TimeToFirstByte != s.TimeToReady {
				t.Errorf("eager: first byte %v, ready %v", s.TimeToFirstByte, s.TimeToReady)
			}
			// Where the wait went: each step of the helper's start and of
			// the first fault, in order, ending at the answer.
			fb := s.FirstByte
			if mode == ModeEager {
				if fb != nil {
					t.Errorf("eager: a first-byte trace %+v, want none (nothing waits)", fb)
				}
				return
			}
			if fb == nil {
				t.Fatalf("lazy: no first-byte trace in %s", s.JSON())
			}
			steps := []time.Duration{fb.Loader, fb.Serving, fb.FaultRead, fb.FillStart, fb.Filled, fb.Answered}
			for i := 1; i < len(steps); i++ {
				if steps[i] < steps[i-1] || steps[i-1] <= 0 {
					t.Errorf("first-byte steps out of order at %d: %+v", i, fb)
				}
			}
			if fb.Ready != s.TimeToReady || fb.Answered > s.TimeToFirstByte {
				t.Errorf("first-byte trace %+v: want Ready %v and Answered at most %v", fb, s.TimeToReady, s.TimeToFirstByte)
			}
		})
	}
}

// TestOpenIndexBuffer: Open reads a snapshot's index into the buffer the
// last Open used (kept between Opens), and Opens running at once never
// share it: each restores its own snapshot, byte for byte.
func TestOpenIndexBuffer(t *testing.T) {
	opts := kernelOpts(t, BackingShmem, 0)
	var snaps [4]string
	var want [4][]testRegion
	for i := range snaps {
		// Different region counts and chunk sizes: different indexes.
		for j := 0; j <= i; j++ {
			want[i] = append(want[i], testRegion{fmt.Sprintf("r%d", j), 0, testImage(1<<20+j*4096, uint64(10*i+j))})
		}
		snaps[i] = writeSnap(t, want[i], format.CodecZstd, 64<<10<<(i%2))
	}
	r := openT(t, snaps[3], opts...)
	r.Close()
	indexBuffer.Lock()
	kept, busy := cap(indexBuffer.b), indexBuffer.busy
	indexBuffer.Unlock()
	if kept == 0 || busy {
		t.Fatalf("after an Open: a kept buffer of %d bytes, busy %v; want one, free", kept, busy)
	}
	for round := 0; round < 3; round++ {
		var wg sync.WaitGroup
		errs := make(chan error, len(snaps))
		for i := range snaps {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := Open(context.Background(), snaps[i], opts...) // lazy: the eager path reads through a Loader
				if err != nil {
					errs <- err
					return
				}
				defer r.Close()
				lay := r.Layout()
				if len(lay.Regions) != len(want[i]) {
					errs <- fmt.Errorf("snapshot %d: %d regions, want %d", i, len(lay.Regions), len(want[i]))
					return
				}
				for k, reg := range r.Regions() {
					if !bytes.Equal(reg, want[i][k].data) {
						errs <- fmt.Errorf("snapshot %d: region %d differs", i, k)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
}

// TestOpenDoesNotWaitForHelper: Open returns without waiting for its
// helper process's fork and exec (0.5-3.5 ms on a 2-vCPU VM, more than the
// rest of Open); a touch of the view meanwhile waits for the helper, and
// reads the snapshot's bytes.
func TestOpenDoesNotWaitForHelper(t *testing.T) {
	opts := kernelOpts(t, BackingShmem, 0)
	regions := []testRegion{{"a", 0, testImage(4<<20, 21)}}
	path := writeSnap(t, regions, format.CodecZstd, 256<<10)
	const delay = 500 * time.Millisecond
	uffd.SetSpawnDelay(delay)
	defer uffd.SetSpawnDelay(0)
	t0 := time.Now()
	r := openT(t, path, opts...)
	if d := time.Since(t0); d >= delay {
		t.Fatalf("Open took %v: it waited for the helper's start (delayed %v)", d, delay)
	}
	if !bytes.Equal(r.Region("a"), regions[0].data) {
		t.Fatal("the view differs from the snapshot")
	}
	if d := time.Since(t0); d < delay {
		t.Fatalf("the view was read %v after Open's start, before its helper could be started (%v): who served it?", d, delay)
	}
	if err := r.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestOpenHelperCannotStart: a helper that cannot be run fails Open at once
// when that can be known without running it (missing, not executable);
// one whose exec fails (not a program) fails the restore's requests with
// the exec's error, once the respawns are spent, instead of hanging them.
func TestOpenHelperCannotStart(t *testing.T) {
	opts := kernelOpts(t, BackingShmem, 0)
	path := writeSnap(t, []testRegion{{"a", 0, testImage(1<<20, 22)}}, format.CodecZstd, 256<<10)
	dir := t.TempDir()
	noX := dir + "/not-executable"
	os.WriteFile(noX, []byte("#!/bin/sh\n"), 0o644)
	for _, exe := range []string{dir + "/missing", noX, dir} {
		if _, err := Open(context.Background(), path, append(opts, WithHelper(exe))...); err == nil || !strings.Contains(err.Error(), exe) {
			t.Errorf("helper %s: Open = %v, want an error naming it", exe, err)
		}
	}
	garbage := dir + "/garbage"
	os.WriteFile(garbage, []byte("\x00\x01 not a program"), 0o755)
	r, err := Open(context.Background(), path, append(opts, WithHelper(garbage))...)
	if err != nil {
		if !errors.Is(err, syscall.ENOEXEC) {
			t.Fatalf("Open = %v, want success or ENOEXEC", err)
		}
		return
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = r.Wait(ctx)
	if !errors.Is(err, ErrHelperDied) || !errors.Is(err, syscall.ENOEXEC) || !strings.Contains(err.Error(), garbage) {
		t.Fatalf("Wait = %v, want ErrHelperDied with the exec's ENOEXEC", err)
	}
	if _, err := r.Stats(ctx); !errors.Is(err, ErrHelperDied) {
		t.Fatalf("Stats = %v, want ErrHelperDied", err)
	}
}

// TestOpenPrestartedCannotStart: a prestarted helper whose exec failed is
// reported by the Open that takes it, with the exec's error (not the
// broken pipe of sending it its job), and not started again.
func TestOpenPrestartedCannotStart(t *testing.T) {
	opts := kernelOpts(t, BackingShmem, 0)
	path := writeSnap(t, []testRegion{{"a", 0, testImage(1<<20, 23)}}, format.CodecZstd, 256<<10)
	garbage := t.TempDir() + "/garbage"
	os.WriteFile(garbage, []byte("\x00\x01 not a program"), 0o755)
	opts = append(opts, WithHelper(garbage))
	// PrestartHelper waits for the spawn (for its pid): it has failed by now.
	if err := PrestartHelper(opts...); err != nil {
		t.Fatal(err)
	}
	defer StopPrestartedHelper()
	r, err := Open(context.Background(), path, opts...)
	if err == nil {
		r.Close()
		t.Fatal("Open took a prestarted helper that never ran, and succeeded")
	}
	if !errors.Is(err, syscall.ENOEXEC) || !strings.Contains(err.Error(), garbage) {
		t.Fatalf("Open = %v, want the exec's ENOEXEC naming %s", err, garbage)
	}
}
