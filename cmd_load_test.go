package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

func loadCmd(args ...string) *exec.Cmd {
	return doctorCmd(os.Args[0], args...) // the test binary as the uffdrestore command
}

// loadTarget compiles csrc/target.c with the Makefile's flags into the
// test's directory (no make needed). Package main has no TestMain to remove
// a per-binary cache, so each test compiles its own (about 0.3 s).
func loadTarget(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		testutil.Skip(t, "cannot build the C target: %v", err)
	}
	out := filepath.Join(t.TempDir(), "uffdrestore-target")
	b, err := exec.Command("gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-Icsrc", "-o", out, "csrc/target.c", "csrc/ur_client.c").CombinedOutput()
	if err != nil {
		t.Fatalf("gcc: %v\n%s", err, b)
	}
	return out
}

func loadRequire(t *testing.T) {
	t.Helper()
	have, _, err := uffd.Supported(uffd.OpenOptions{Via: uffd.ViaSyscall})
	if err != nil {
		testutil.Skip(t, "userfaultfd: %v", err)
	}
	if have&uffd.FeatureMinorShmem == 0 {
		testutil.Skip(t, "kernel lacks minor faults on shmem")
	}
}

func loadTestSnap(t *testing.T) (string, []byte) {
	t.Helper()
	img := make([]byte, 3<<20+777)
	for i := range img {
		if (i>>16)%3 != 0 {
			img[i] = byte(i*13) ^ byte(i>>10)
		}
	}
	p := filepath.Join(t.TempDir(), "img.snap")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	w, err := format.NewWriter(f, format.WriterOptions{ChunkSize: 256 << 10, Codec: format.CodecS2})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.BeginRegion("img", 0, 3); err != nil {
		t.Fatal(err)
	}
	w.Write(img)
	if err := w.EndRegion(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p, img
}

// syncBuf is a bytes.Buffer safe to read while a child writes it.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func waitOutput(t *testing.T, b *syncBuf, sub string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(b.String(), sub) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %v; output:\n%s", sub, d, b.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startLoad starts `uffdrestore load` with args, its stderr captured, and
// waits up to d for ready on it; the process is killed when the test ends.
func startLoad(t *testing.T, ready string, d time.Duration, args ...string) (*exec.Cmd, *syncBuf) {
	t.Helper()
	var stderr syncBuf
	ld := loadCmd(append([]string{"load"}, args...)...)
	ld.Stderr = &stderr
	if err := ld.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ld.Process.Kill() })
	waitOutput(t, &stderr, ready, d)
	return ld, &stderr
}

// waitExit waits up to d for cmd and returns its exit code; a timeout
// (cmd is killed) or a failed wait fails the test.
func waitExit(t *testing.T, cmd *exec.Cmd, d time.Duration) int {
	t.Helper()
	err := waitExitErr(cmd, d)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("%s: %v", cmd.Path, err)
	}
	return 0
}

// waitExitErr waits up to d for cmd and returns what Wait returned, or an
// error saying it did not exit (it is killed then).
func waitExitErr(cmd *exec.Cmd, d time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		cmd.Process.Kill()
		<-done
		return errors.New("did not exit within " + d.String())
	}
}

// TestLoadOnce: load --once serves one target, which dumps the image, then
// exits, writes the stats, removes the socket.
func TestLoadOnce(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	snap, img := loadTestSnap(t)
	dir := t.TempDir()
	sock, statsPath, dump := filepath.Join(dir, "s.sock"), filepath.Join(dir, "stats.json"), filepath.Join(dir, "dump")
	ld, stderr := startLoad(t, "ready: serving "+snap+" on "+sock+" (backing shmem, 1 region, 3.0 MiB, mode lazy)", 30*time.Second, snap, "--socket", sock, "--once", "--backing", "shmem", "--stats-json", statsPath, "--workers", "2")
	out, err := exec.Command(tp, "--socket", sock, "--dump", dump, "--pattern", "random").CombinedOutput()
	if err != nil {
		t.Fatalf("target: %v\n%s", err, out)
	}
	if code := waitExit(t, ld, 30*time.Second); code != 0 {
		t.Fatalf("load exited %d:\n%s", code, stderr.String())
	}
	if got, _ := os.ReadFile(dump); !bytes.Equal(got, img) {
		t.Error("dump differs from the image")
	}
	var st struct {
		FilledByFault int64 `json:"filled_by_fault"`
		Continues     int64 `json:"continues"`
	}
	b, err := os.ReadFile(statsPath)
	if err != nil || json.Unmarshal(b, &st) != nil || st.FilledByFault == 0 || st.Continues == 0 {
		t.Errorf("stats file %s: %v", b, err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Error("socket left behind")
	}
	for _, want := range []string{"attached: 1 mapping", "--once", "stats: {"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
		}
	}
}

// TestLoadSignal: SIGTERM asks an attached --hold target to detach; it does,
// and load exits 0 having removed its socket.
func TestLoadSignal(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	snap, _ := loadTestSnap(t)
	sock := filepath.Join(t.TempDir(), "s.sock")
	ld, stderr := startLoad(t, "ready: serving", 30*time.Second, snap, "--socket", sock, "--backing", "shmem", "--mode", "prefetch")
	tg := exec.Command(tp, "--socket", sock, "--hold")
	var tout syncBuf
	tg.Stdout, tg.Stderr = &tout, &tout
	stdin, _ := tg.StdinPipe() // kept open: only the shutdown notice ends --hold
	defer stdin.Close()
	if err := tg.Start(); err != nil {
		t.Fatal(err)
	}
	defer tg.Process.Kill()
	waitOutput(t, &tout, `"pages":`, 30*time.Second)
	ld.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, tg, 10*time.Second); code != 0 {
		t.Errorf("target exited %d:\n%s", code, tout.String())
	}
	if code := waitExit(t, ld, 10*time.Second); code != 0 {
		t.Errorf("load exited %d:\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "ended: detach") || !strings.Contains(stderr.String(), "shutting down (got terminated)") {
		t.Errorf("stderr:\n%s", stderr.String())
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Error("socket left behind")
	}
}

// TestLoadErrors: usage and setup errors are reported clearly.
func TestLoadErrors(t *testing.T) {
	snap, _ := loadTestSnap(t)
	dir := t.TempDir()
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"load", "--socket", filepath.Join(dir, "s")}, 2, "want exactly one SNAP"},
		{[]string{"load", snap, "--socket", filepath.Join(dir, "s"), "--mode", "fast"}, 2, "unknown mode"},
		{[]string{"load", snap, "--socket", filepath.Join(dir, "s"), "--allow-uid", "bob"}, 2, `"bob" is not a uid`},
		{[]string{"load", snap, "--socket", filepath.Join(dir, "s"), "--socket-mode", "rw"}, 2, "--socket-mode"},
		{[]string{"load", snap, "--socket", filepath.Join(dir, "missing", "s"), "--backing", "shmem"}, 1, "missing does not exist"},
		{[]string{"load", filepath.Join(dir, "nosuch.snap"), "--socket", filepath.Join(dir, "s")}, 1, "nosuch.snap"},
	}
	for _, c := range cases {
		cmd := loadCmd(c.args...)
		var out syncBuf
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if code := waitExit(t, cmd, 30*time.Second); code != c.code || !strings.Contains(out.String(), c.want) {
			t.Errorf("%v: exit %d, output %q; want exit %d and %q", c.args, code, out.String(), c.code, c.want)
		}
	}
}

// TestLoadRecordReplay: --record stores the targets' first-touch order in
// the snapshot; --profile replays it, so the same workload finds its working
// set filled before it faults.
func TestLoadRecordReplay(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	snap, _ := loadTestSnap(t)
	dir := t.TempDir()
	run := func(args ...string) (stats []byte, stderr string) {
		t.Helper()
		sock, statsPath := filepath.Join(dir, "s.sock"), filepath.Join(dir, "stats.json")
		var se syncBuf
		ld := loadCmd(append([]string{"load", snap, "--socket", sock, "--once", "--backing", "shmem", "--stats-json", statsPath, "--force"}, args...)...)
		ld.Stderr = &se
		if err := ld.Start(); err != nil {
			t.Fatal(err)
		}
		defer ld.Process.Kill()
		waitOutput(t, &se, "ready: serving", 30*time.Second)
		if out, err := exec.Command(tp, "--socket", sock, "--pattern", "fraction:0.4", "--seed", "7").CombinedOutput(); err != nil {
			t.Fatalf("target: %v\n%s", err, out)
		}
		if code := waitExit(t, ld, 30*time.Second); code != 0 {
			t.Fatalf("load %v exited %d:\n%s", args, code, se.String())
		}
		b, _ := os.ReadFile(statsPath)
		return b, se.String()
	}
	_, se := run("--record", "boot")
	if !strings.Contains(se, `recorded working set "boot"`) {
		t.Fatalf("no recording reported:\n%s", se)
	}
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	profs := f.Profiles()
	f.Close()
	if len(profs) != 1 || profs[0].Name != "boot" || len(profs[0].Entries) == 0 {
		t.Fatalf("profiles in the snapshot after --record: %+v", profs)
	}
	b, se := run("--profile", "boot")
	var st restore.Stats
	if err := json.Unmarshal(b, &st); err != nil || st.WorkingSet == nil {
		t.Fatalf("stats %s: %v", b, err)
	}
	if st.WorkingSet.Missed != 0 || st.WorkingSet.Prefilled+st.WorkingSet.Late != int64(st.WorkingSet.Units) {
		t.Fatalf("replay of the same workload: %+v\n%s", st.WorkingSet, se)
	}
	// Recording twice under the same name replaces the profile.
	run("--record", "boot", "--record-to", filepath.Join(dir, "side.json"))
	if _, err := restore.LoadProfile(filepath.Join(dir, "side.json")); err != nil {
		t.Fatal(err)
	}
	// Bad combinations are refused up front.
	out, err := loadCmd("load", snap, "--socket", filepath.Join(dir, "x.sock"), "--record", "a", "--mode", "prefetch").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--record needs --mode lazy") {
		t.Fatalf("--record with prefetch: %v\n%s", err, out)
	}
}
