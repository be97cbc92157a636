package engine

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"golang.org/x/sys/unix"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
)

// helperPID returns the pid of the helper serving r now, waiting (until
// the deadline) for one other than old.
func helperPID(t *testing.T, r *Restore, old int) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := r.Stats(ctx)
		cancel()
		if err != nil {
			t.Fatalf("stats: %v", err)
		}
		if s.HelperPID != 0 && s.HelperPID != old {
			return s.HelperPID
		}
		if time.Now().After(deadline) {
			t.Fatalf("the helper is still pid %d", old)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOpenHelperRespawn: a lazy Open's helper is SIGKILLed after part of
// the view was touched (and written); a new helper adopts the backing and
// every later touch gets the image's bytes, the program's writes kept.
func TestOpenHelperRespawn(t *testing.T) {
	// The respawn is Go code of this process: it needs a P that no
	// goroutine blocked in a fault holds (bytes.Equal's assembly is no
	// async preemption point), see ErrHelperDied.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(2, runtime.GOMAXPROCS(0))))
	for _, kind := range []BackingKind{BackingMemfdHugetlb, BackingShmem} {
		t.Run(kind.String(), func(t *testing.T) {
			img := testImage(6<<20, 21)
			path := writeSnap(t, []testRegion{{"a", 0, img}}, format.CodecZstd, 256<<10)
			r := openT(t, path, append(kernelOpts(t, kind, 8<<20), WithMode(ModeLazy))...)
			mem := r.Region("a")
			want := bytes.Clone(img)
			// Touch the first 2 MiB and write into it and into a page of
			// the third MiB (filled by that write's fault).
			var sum byte
			for i := 0; i < 2<<20; i += 4096 {
				sum += mem[i]
			}
			for _, off := range []int{100, 1<<20 + 5, 2<<20 + 77} {
				mem[off] ^= 0x5a
				want[off] ^= 0x5a
			}
			sinkMu.Lock()
			sinkByte += sum
			sinkMu.Unlock()
			pid := helperPID(t, r, 0)
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			done := make(chan bool, 1)
			go func() { done <- bytes.Equal(mem, want) }()
			select {
			case ok := <-done:
				t.Logf("kill to every byte of the view read: %v", time.Since(t0))
				if !ok {
					checkRegions(t, r.Bytes(), r.Layout(), []testRegion{{"a", 0, want}})
				}
			case <-time.After(30 * time.Second):
				t.Fatal("touching the view after the helper was killed: still blocked after 30 s")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := r.Wait(ctx); err != nil {
				t.Fatal(err)
			}
			s, err := r.Stats(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if s.HelperRespawns != 1 || s.HelperPID == pid || s.UnitsPresent != int64(s.Units) {
				t.Errorf("after the respawn: %d respawns, helper pid %d (killed %d), %d of %d units present", s.HelperRespawns, s.HelperPID, pid, s.UnitsPresent, s.Units)
			}
			if !bytes.Equal(mem, want) {
				t.Fatal("the view differs from the image (with the program's writes) after Wait")
			}
		})
	}
}

// TestOpenHelperDiesTooOften: after MaxHelperRespawns replacements, the
// next death of the helper ends the restore: Wait returns ErrHelperDied
// instead of hanging.
func TestOpenHelperDiesTooOften(t *testing.T) {
	img := testImage(2<<20, 22)
	path := writeSnap(t, []testRegion{{"a", 0, img}}, format.CodecZstd, 256<<10)
	r := openT(t, path, append(kernelOpts(t, BackingShmem, 2<<20), WithMode(ModeLazy))...)
	pid := 0
	for i := 0; i <= MaxHelperRespawns; i++ {
		pid = helperPID(t, r, pid)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := r.Wait(ctx)
	if !errors.Is(err, ErrHelperDied) {
		t.Fatalf("Wait after the helper died %d times: %v, want ErrHelperDied", MaxHelperRespawns+1, err)
	}
	if _, err := r.Stats(ctx); !errors.Is(err, ErrHelperDied) {
		t.Fatalf("Stats: %v, want ErrHelperDied", err)
	}
	// The helpers were reaped: none is left.
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("the last helper (pid %d): kill 0: %v, want ESRCH (reaped)", pid, err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	// The fill journal (a memfd) is not left open.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.Contains(l, "uffdrestore-fill-journal") {
			t.Errorf("fd %s is still the fill journal (%s) after Close", e.Name(), l)
		}
	}
}

// TestOpenHelperRespawnJournal: a new helper inherits the fill journal its
// Open keeps: a unit the dead helper was in the middle of (marked in the
// journal, its pages present but holding garbage, as a half-written unit
// does) is punched and filled again, not served as it is.
func TestOpenHelperRespawnJournal(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(2, runtime.GOMAXPROCS(0))))
	img := testImage(1<<20, 23)
	path := writeSnap(t, []testRegion{{"a", 0, img}}, format.CodecZstd, 256<<10)
	r := openT(t, path, append(kernelOpts(t, BackingShmem, 1<<20), WithMode(ModeLazy))...)
	mem := r.Region("a")
	if !bytes.Equal(mem, img) {
		t.Fatal("the view differs from the image")
	}
	// Unit 1 (256 KiB), half written: garbage in the backing, marked.
	garbage := bytes.Repeat([]byte{0xee}, 128<<10)
	if _, err := unix.Pwrite(int(r.b.fd.Fd()), garbage, 256<<10); err != nil {
		t.Fatal(err)
	}
	if mem[256<<10] != 0xee {
		t.Fatal("the garbage written to the backing is not in the view")
	}
	if _, err := unix.Pwrite(int(r.journal.Fd()), binary.LittleEndian.AppendUint32(nil, jFill), 4); err != nil {
		t.Fatal(err)
	}
	pid := helperPID(t, r, 0)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	helperPID(t, r, pid)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := r.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mem, img) {
		checkRegions(t, r.Bytes(), r.Layout(), []testRegion{{"a", 0, img}})
		t.Fatal("after the respawn the half-written unit was served as it was")
	}
}
