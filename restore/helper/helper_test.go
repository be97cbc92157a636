package helper

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

func image(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>12)
	}
	return b
}

// corruptSnapshot writes a 6 MiB raw-codec snapshot of 2 MiB chunks and
// flips a byte of chunk 1's stored bytes.
func corruptSnapshot(t *testing.T) string {
	path := testutil.WriteSnapshot(t, []testutil.Region{{Name: "a", Data: image(6 << 20)}}, format.CodecRaw, 2<<20)
	f, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	off := f.Chunk(1).Offset + 1000
	f.Close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[off] ^= 0x55
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestLazyWaitChecksum: a lazy Restore's Wait on a snapshot with a corrupt
// chunk returns an error matching format.ErrChecksum, which the helper
// process found: the error's kind crosses the process boundary (with
// UFFDIO_POISON in the wait reply; without it in the error that ends the
// session).
func TestLazyWaitChecksum(t *testing.T) {
	testutil.RequireRoot(t)
	path := corruptSnapshot(t)
	for _, poison := range []bool{true, false} {
		t.Run(map[bool]string{true: "poison", false: "no-poison"}[poison], func(t *testing.T) {
			if !poison {
				t.Setenv(restore.DisablePoisonEnv, "1")
			}
			r, err := restore.Open(context.Background(), path, restore.WithBacking(restore.BackingShmem))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err = r.Wait(ctx)
			if !errors.Is(err, format.ErrChecksum) || ctx.Err() != nil {
				t.Fatalf("lazy Wait on a corrupt chunk = %v, want an error matching format.ErrChecksum", err)
			}
			if !strings.Contains(err.Error(), "unit 1") {
				t.Errorf("the error does not name the unit: %v", err)
			}
			// Chunk 0 is good: the restore goes on serving it.
			if got := r.Bytes()[10]; got != image(16)[10] {
				t.Errorf("byte 10 = %d, want %d", got, image(16)[10])
			}
		})
	}
}

// TestBadHelper: a helper that sends garbage, refuses, or dies ends Wait
// and Stats with a named error, long before the caller's deadline, instead
// of leaving a caller on a context without deadline hanging.
func TestBadHelper(t *testing.T) {
	testutil.RequireRoot(t)
	path := testutil.WriteSnapshot(t, []testutil.Region{{Name: "a", Data: image(1 << 20)}}, format.CodecZstd, 64<<10)
	// The script finds its socket where the environment says it is.
	const findFD = `fd=$(printf '%s' "$_UFFDRESTORE_HELPER" | sed 's/.*"socket":\([0-9]*\).*/\1/')` + "\n"
	for _, tc := range []struct {
		name   string
		script string
		want   []error
		text   string
	}{
		{"garbage", findFD + `eval "printf 'not json' >&$fd"; exec sleep 20`, []error{ErrHelper, attach.ErrInvalid}, "malformed JSON"},
		{"bad-hello", findFD + `eval "printf '{\"type\":\"hello\",\"version\":2}' >&$fd"; exec sleep 20`, []error{ErrHelper, attach.ErrInvalid}, "backing"},
		{"unknown-type", findFD + `eval "printf '{\"type\":\"hi\"}' >&$fd"; exec sleep 20`, []error{ErrHelper, attach.ErrInvalid}, "unknown message type"},
		{"refuses", findFD + `eval "printf '{\"type\":\"error\",\"error\":\"disk full\",\"code\":\"no-space\"}' >&$fd"; exec sleep 20`,
			[]error{ErrHelper, attach.ErrRefused, syscall.ENOSPC}, "disk full"},
		{"dies", "exit 7", []error{restore.ErrHelperDied, ErrHelper, attach.ErrClosed}, "exited"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			exe := filepath.Join(t.TempDir(), "helper.sh")
			if err := os.WriteFile(exe, []byte("#!/bin/sh\n"+tc.script+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			r, err := restore.Open(context.Background(), path, restore.WithBacking(restore.BackingShmem), restore.WithHelper(exe))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			t0 := time.Now()
			err = r.Wait(ctx)
			for _, w := range tc.want {
				if !errors.Is(err, w) {
					t.Errorf("Wait = %v; want it to match %v", err, w)
				}
			}
			if err == nil || !strings.Contains(err.Error(), tc.text) || ctx.Err() != nil {
				t.Errorf("Wait = %v (after %v); want %q in it, before the deadline", err, time.Since(t0), tc.text)
			}
			if _, serr := r.Stats(context.Background()); !errors.Is(serr, ErrHelper) {
				t.Errorf("Stats after the helper failed = %v, want ErrHelper", serr)
			}
		})
	}
}

// TestNoTakeover: importing restore does not make a program a helper. A
// real built program that imports restore but not restore/helper, started
// exactly as restore.Open starts a helper (argv[0] and environment), runs
// its own main, and its lazy Open fails with restore.ErrNoHelper. This
// test binary, which imports restore/helper, is taken over by the same
// start.
func TestNoTakeover(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "plain")
	build := exec.Command("go", "build", "-o", bin, "./testdata/plain")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	snap := testutil.WriteSnapshot(t, []testutil.Region{{Name: "a", Data: image(64 << 10)}}, format.CodecZstd, 64<<10)
	asHelper := func(path string, args ...string) (string, error) {
		cmd := exec.Command(path, args...)
		cmd.Args[0] = argv0
		cmd.Env = append(os.Environ(), envName+`={"socket":3,"snapshot":4,"backing":5}`)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := asHelper(bin, snap)
	if err != nil || !strings.Contains(out, "main ran") || !strings.Contains(out, "open: no helper") ||
		!strings.Contains(out, `import _ "github.com/uffdrestore/uffdrestore/restore/helper"`) {
		t.Fatalf("a program importing restore only, started as a helper: %v\n%s", err, out)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	out, err = asHelper(exe, "-test.run=^$")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, argv0+":") || strings.Contains(out, "PASS") {
		t.Fatalf("a program importing restore/helper, started as a helper, was not taken over: %v\n%s", err, out)
	}
}

// TestSilentHelper: a helper that never answers ends a Wait on a context
// without deadline after the handshake timeout, with a named error.
func TestSilentHelper(t *testing.T) {
	testutil.RequireRoot(t)
	defer func(d time.Duration) { handshakeTimeout = d }(handshakeTimeout)
	handshakeTimeout = 300 * time.Millisecond
	path := testutil.WriteSnapshot(t, []testutil.Region{{Name: "a", Data: image(1 << 20)}}, format.CodecZstd, 64<<10)
	exe := filepath.Join(t.TempDir(), "helper.sh")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\nexec sleep 20\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r, err := restore.Open(context.Background(), path, restore.WithBacking(restore.BackingShmem), restore.WithHelper(exe))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	done := make(chan error, 1)
	go func() { done <- r.Wait(context.Background()) }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrHelper) || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Wait with a silent helper = %v, want ErrHelper after the handshake timeout", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Wait on context.Background() with a silent helper hangs")
	}
}

// TestPrestartedDiesBeforeAttach: a prestarted helper that dies after its
// job was queued in its socket but before the attach was (a SIGKILL sent
// while it waited: the process exits after kill returns) is replaced by a
// new one, and the Open serves the right bytes, instead of failing with a
// reset connection.
func TestPrestartedDiesBeforeAttach(t *testing.T) {
	testutil.RequireRoot(t)
	data := image(4 << 20)
	path := testutil.WriteSnapshot(t, []testutil.Region{{Name: "a", Data: data}}, format.CodecZstd, 1<<20)
	opts := []restore.Option{restore.WithBacking(restore.BackingShmem)}
	t.Cleanup(restore.StopPrestartedHelper)
	if err := restore.PrestartHelper(opts...); err != nil {
		t.Fatal(err)
	}
	killed := 0
	testAfterJob = func(pid int) {
		if killed != 0 {
			return
		}
		killed = pid
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Error(err)
			return
		}
		waitExited(t, pid) // its socket closed
	}
	t.Cleanup(func() { testAfterJob = nil })
	r, err := restore.Open(context.Background(), path, opts...)
	if err != nil {
		t.Fatalf("Open with a prestarted helper that died before its attach: %v", err)
	}
	defer r.Close()
	if killed == 0 {
		t.Fatal("the hook did not run: the Open took no prestarted helper")
	}
	if !bytes.Equal(r.Bytes()[:len(data)], data) {
		t.Fatal("the view differs from the image")
	}
	s, err := r.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s.HelperPID == killed || s.HelperPID == 0 {
		t.Errorf("the view is served by helper %d; the killed one was %d", s.HelperPID, killed)
	}
}

// TestHelperRefusesJobAndExits: a helper that refuses its job and exits
// before the attach is sent fails Open with the helper's own error (its
// text and code), not with the broken pipe the attach then meets.
func TestHelperRefusesJobAndExits(t *testing.T) {
	testutil.RequireRoot(t)
	path := testutil.WriteSnapshot(t, []testutil.Region{{Name: "a", Data: image(1 << 20)}}, format.CodecZstd, 64<<10)
	const findFD = `fd=$(printf '%s' "$_UFFDRESTORE_HELPER" | sed 's/.*"socket":\([0-9]*\).*/\1/')` + "\n"
	exe := filepath.Join(t.TempDir(), "helper.sh")
	script := findFD + `eval "printf '{\"type\":\"error\",\"error\":\"disk full\",\"code\":\"no-space\"}' >&$fd"` + "\nexit 0\n"
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	testAfterJob = func(pid int) {
		waitExited(t, pid) // the attach then meets a closed socket
	}
	t.Cleanup(func() { testAfterJob = nil })
	r, err := restore.Open(context.Background(), path, restore.WithBacking(restore.BackingShmem), restore.WithHelper(exe))
	if err == nil {
		r.Close()
		t.Fatal("Open with a helper that refused its job succeeded")
	}
	for _, w := range []error{ErrHelper, attach.ErrRefused, syscall.ENOSPC} {
		if !errors.Is(err, w) {
			t.Errorf("Open = %v; want it to match %v", err, w)
		}
	}
	if !strings.Contains(err.Error(), "disk full") {
		t.Errorf("Open = %v; want the helper's text in it", err)
	}
}

// waitExited waits (up to 10 s) until process pid exited: a zombie, its
// files closed, or gone.
func waitExited(t *testing.T, pid int) {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil || strings.Contains(string(b), ") Z ") {
			return
		}
	}
	t.Errorf("process %d did not exit in 10 s", pid)
}
