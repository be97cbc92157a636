package main

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// TestLoadOutputsCheckedAtStart: a --stats-json or --record-to path that
// cannot be written, or an existing one without --force, is reported before
// anything is loaded or served (it used to be found only at shutdown).
func TestLoadOutputsCheckedAtStart(t *testing.T) {
	snap, _ := loadTestSnap(t)
	dir := t.TempDir()
	existing := filepath.Join(dir, "stats.json")
	os.WriteFile(existing, []byte("{}\n"), 0o644)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--stats-json", filepath.Join(dir, "missing", "stats.json")}, "directory " + filepath.Join(dir, "missing") + " does not exist"},
		{[]string{"--record", "boot", "--record-to", filepath.Join(dir, "missing", "p.json")}, "--record-to"},
		{[]string{"--stats-json", existing}, "already exists: give --force"},
		{[]string{"--stats-json", snap, "--force"}, "is the input"},
	} {
		cmd := loadCmd(append([]string{"load", snap, "--socket", filepath.Join(dir, "s.sock"), "--backing", "shmem"}, c.args...)...)
		var out syncBuf
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		code := waitExit(t, cmd, 20*time.Second)
		if code == 0 || !strings.Contains(out.String(), c.want) || strings.Contains(out.String(), "ready: serving") {
			t.Errorf("%q: exit %d, %q; want a failure naming %q before serving", c.args, code, out.String(), c.want)
		}
	}
}

// TestLoadOnceTargetFailsBeforeAttach: with --once, a target that fails in
// the handshake ends load (exit 1, saying why) instead of leaving it serving
// nobody.
func TestLoadOnceTargetFailsBeforeAttach(t *testing.T) {
	loadRequire(t)
	snap, _ := loadTestSnap(t)
	sock := filepath.Join(t.TempDir(), "s.sock")
	ld, stderr := startLoad(t, "ready: serving", 30*time.Second, snap, "--socket", sock, "--once", "--backing", "shmem")
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, fds, err := attach.RecvMsg(c)
	if err != nil {
		t.Fatal(err)
	}
	attach.CloseFDs(fds)
	// An attach without its userfaultfd: refused.
	if err := attach.SendMsg(c, []byte(`{"type":"attach","version":1,"mappings":[]}`)); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, ld, 15*time.Second); code != 1 {
		t.Errorf("load exited %d:\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "failed before attaching") {
		t.Errorf("stderr does not say why:\n%s", stderr.String())
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("socket left behind")
	}
}

// TestLoadSIGINTAtAnyMoment sends one SIGINT to a real load process at
// varied moments from start-up to serving; every time it must end (exit 0
// after "ready", 130 before, or killed by the signal's default action before
// the handler is installed) and leave no socket. Load used to lose a SIGINT
// that arrived while it switched from loading to serving.
func TestLoadSIGINTAtAnyMoment(t *testing.T) {
	loadRequire(t)
	snap, _ := loadTestSnap(t)
	dir := t.TempDir()
	// How long start-up to "ready" takes here, to spread the signals over.
	start := time.Now()
	var b syncBuf
	ld := loadCmd("load", snap, "--socket", filepath.Join(dir, "probe.sock"), "--backing", "shmem")
	ld.Stderr = &b
	if err := ld.Start(); err != nil {
		t.Fatal(err)
	}
	waitOutput(t, &b, "ready: serving", 30*time.Second)
	ready := time.Since(start)
	ld.Process.Signal(syscall.SIGINT)
	if code := waitExit(t, ld, 5*time.Second); code != 0 {
		t.Fatalf("SIGINT while serving: exit %d\n%s", code, b.String())
	}
	deadline := time.Now().Add(4 * time.Second)
	n := 0
	for ; time.Now().Before(deadline) || n < 8; n++ {
		sock := filepath.Join(dir, "s.sock")
		var out syncBuf
		ld := loadCmd("load", snap, "--socket", sock, "--backing", "shmem")
		ld.Stderr = &out
		if err := ld.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(rand.Int64N(int64(ready + ready/4))))
		ld.Process.Signal(syscall.SIGINT)
		code := waitExit(t, ld, 5*time.Second) // fails the test if the signal was lost
		switch {
		case code == 0 && strings.Contains(out.String(), "shutting down (got interrupt)"):
		case code == 130 && strings.Contains(out.String(), "load: interrupted"):
		case code == -1 && ld.ProcessState.Sys().(syscall.WaitStatus).Signal() == syscall.SIGINT:
		default:
			t.Fatalf("run %d: exit %d after SIGINT:\n%s", n, code, out.String())
		}
		if _, err := os.Lstat(sock); err == nil {
			t.Fatalf("run %d: socket left behind", n)
		}
	}
	t.Logf("%d runs, SIGINT within the first %v", n, ready+ready/4)
}

// TestTargetHelp: uffdrestore-target --help prints its usage on stdout and
// exits 0; a usage error still exits 2 on stderr.
func TestTargetHelp(t *testing.T) {
	tp := loadTarget(t)
	for _, a := range []string{"--help", "-h"} {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(tp, a)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil || !strings.Contains(stdout.String(), "usage: uffdrestore-target --socket PATH") || stderr.Len() != 0 {
			t.Errorf("%s: %v, stdout %q, stderr %q", a, err, stdout.String(), stderr.String())
		}
	}
	var stderr bytes.Buffer
	cmd := exec.Command(tp, "--bogus")
	cmd.Stderr = &stderr
	var ee *exec.ExitError
	if err := cmd.Run(); !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(stderr.String(), "unknown argument --bogus") {
		t.Errorf("--bogus: %v, %q", err, stderr.String())
	}
}

// TestLoadHugetlbfsHints: the fixes load suggests are safe and right: a
// directory that is not hugetlbfs is never suggested as a mount point (a
// mount would hide what is in it), and a hugetlbfs mount limited by size=
// is named as such, with the remount that fixes it (not nr_hugepages).
func TestLoadHugetlbfsHints(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 4)
	snap, _ := loadTestSnap(t) // 3 MiB: 2 huge pages
	dir, err := os.MkdirTemp("", "uffdrestore-hugetlbfs-small-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	if err := unix.Mount("none", dir, "hugetlbfs", 0, "mode=0700,size=2M"); err != nil {
		testutil.Skip(t, "cannot mount hugetlbfs on %s: %v", dir, err)
	}
	defer unix.Unmount(dir, 0)
	busy := t.TempDir() // holds a file, as /tmp does
	os.WriteFile(filepath.Join(busy, "precious"), []byte("x"), 0o644)

	run := func(args ...string) (int, string) {
		cmd := loadCmd(append([]string{"load", snap, "--socket", filepath.Join(t.TempDir(), "s.sock"), "--backing", "hugetlbfs"}, args...)...)
		var out syncBuf
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return waitExit(t, cmd, 20*time.Second), out.String()
	}
	code, out := run("--hugetlbfs", dir)
	if code != 1 || !strings.Contains(out, "limited by its size= option to 2 MiB") ||
		!strings.Contains(out, "mount -o remount,size=4M "+dir) || strings.Contains(out, "nr_hugepages") {
		t.Errorf("size-limited mount: exit %d, %q", code, out)
	}
	code, out = run("--hugetlbfs", busy)
	if code != 1 || !strings.Contains(out, busy+" is not a hugetlbfs mount") || strings.Contains(out, "none "+busy) {
		t.Errorf("not hugetlbfs: exit %d, %q", code, out)
	}
	// Any writable hugetlbfs mount may be suggested: test packages running
	// in parallel mount their own, and one of those may come first.
	if m := regexp.MustCompile(`use the mount at (\S+): --hugetlbfs (\S+)`).FindStringSubmatch(out); m != nil {
		if m[1] != m[2] || m[1] == busy {
			t.Errorf("not hugetlbfs: suggested mount %q / %q: %q", m[1], m[2], out)
		}
	} else if !strings.Contains(out, "mkdir -p ") {
		t.Errorf("not hugetlbfs: no usable mount or new directory suggested: %q", out)
	}
	if _, err := os.Stat(filepath.Join(busy, "precious")); err != nil {
		t.Error(err)
	}
}
