package engine

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
)

func prestartedPid() int {
	prestart.mu.Lock()
	defer prestart.mu.Unlock()
	return prestart.pid
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s: %s", what)
		}
	}
}

// gone reports whether process pid has exited and was reaped.
func gone(pid int) bool {
	_, err := os.Stat("/proc/" + strconv.Itoa(pid))
	return os.IsNotExist(err)
}

// TestPrestartHelper: a lazy Open after PrestartHelper hands its job to
// the helper started ahead (the one serving its view, per Stats) instead
// of starting one, serves the right bytes, and a successor is started for
// the next Open; StopPrestartedHelper reaps the successor. A prestarted
// helper killed while it waited is replaced by a fresh one.
func TestPrestartHelper(t *testing.T) {
	regions := []testRegion{{"a", 0, testImage(4<<20, 31)}}
	path := writeSnap(t, regions, format.CodecZstd, 2<<20)
	opts := append(kernelOpts(t, BackingShmem, 4<<20), WithMode(ModeLazy))
	t.Cleanup(StopPrestartedHelper)
	if err := PrestartHelper(opts...); err != nil {
		t.Fatal(err)
	}
	first := prestartedPid()
	if first == 0 {
		t.Fatal("no helper prestarted")
	}
	r := openT(t, path, opts...)
	if !bytes.Equal(r.Bytes()[:len(regions[0].data)], regions[0].data) {
		t.Fatal("the view differs from the image")
	}
	s, err := r.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s.HelperPID != first {
		t.Errorf("the view is served by helper %d, not by the prestarted %d", s.HelperPID, first)
	}
	waitFor(t, "no successor prestarted", func() bool { p := prestartedPid(); return p != 0 && p != first })
	next := prestartedPid()
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	// The successor, killed while it waits: the next Open starts another.
	if err := syscall.Kill(next, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r2 := openT(t, path, opts...)
	if !bytes.Equal(r2.Bytes()[:len(regions[0].data)], regions[0].data) {
		t.Fatal("after a killed prestarted helper: the view differs from the image")
	}
	s, err = r2.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s.HelperPID == next || s.HelperPID == 0 {
		t.Errorf("the view is served by helper %d (the killed one: %d)", s.HelperPID, next)
	}
	waitFor(t, "the killed helper was not reaped", func() bool { return gone(next) })
	waitFor(t, "no successor prestarted", func() bool { p := prestartedPid(); return p != 0 && p != next })
	last := prestartedPid()
	StopPrestartedHelper()
	waitFor(t, "StopPrestartedHelper left the prestarted helper running", func() bool { return gone(last) })
}
