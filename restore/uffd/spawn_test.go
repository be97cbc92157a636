package uffd

import (
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// runSpawned starts sh -c script with the write end of a pipe as fds 1 and
// 3 (and 2 this process's stderr, 0 /dev/null) and returns what it wrote.
func runSpawned(t *testing.T, script string, env []string, extra ...int) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	fds := append([]int{int(null.Fd()), int(w.Fd()), 2, int(w.Fd())}, extra...)
	sp, err := StartSpawn("/bin/sh", []string{"sh", "-c", script}, env, fds)
	w.Close() // the child has its copy (StartSpawn duplicated it)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := sp.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if p2, err2 := sp.Wait(); p2 != pid || err2 != nil {
		t.Errorf("a second Wait = %d, %v; want %d, nil", p2, err2, pid)
	}
	out := new(strings.Builder)
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			break
		}
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 0 {
		t.Fatalf("child: %v, status %v; output %q", err, ws, out.String())
	}
	return out.String()
}

// TestStartSpawn: the child gets its argv, env and exactly the descriptors
// asked for (nothing else of this process's, even one without
// close-on-exec), with no signal blocked, and Wait gives its pid.
func TestStartSpawn(t *testing.T) {
	leak, err := unix.Open(os.DevNull, unix.O_RDONLY, 0) // no O_CLOEXEC
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(leak)
	out := runSpawned(t, `echo "v=$UR_SPAWN_TEST" >&3; ls /proc/self/fd | tr '\n' ' '; grep SigBlk /proc/self/status`, []string{"UR_SPAWN_TEST=42"})
	if !strings.Contains(out, "v=42\n") {
		t.Errorf("env not passed: %q", out)
	}
	// ls itself opens one more (the directory it lists).
	fdLine := strings.SplitN(strings.SplitN(out, "\n", 2)[1], "SigBlk", 2)[0]
	if f := strings.Fields(fdLine); len(f) > 5 || f[0] != "0" || f[3] != "3" {
		t.Errorf("child's descriptors %q, want 0 1 2 3 and ls's own", fdLine)
	}
	if !strings.Contains(out, "SigBlk:\t0000000000000000") {
		t.Errorf("child's blocked signals: %q", out)
	}
}

// TestStartSpawnFails: a program that cannot be run is reported by Wait,
// with its errno, and no child is left.
func TestStartSpawnFails(t *testing.T) {
	sp, err := StartSpawn("/nonexistent/uffdrestore-helper", []string{"x"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sp.Wait(); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("Wait = %v, want ENOENT", err)
	}
	dir := t.TempDir()
	notExec := dir + "/script"
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sp, err = StartSpawn(notExec, []string{"x"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sp.Wait(); !errors.Is(err, syscall.EACCES) { // root too: no x bit at all
		t.Fatalf("Wait = %v, want EACCES", err)
	}
	if _, err := StartSpawn("/bin/true", []string{"true"}, nil, make([]int, 9)); err == nil {
		t.Error("9 descriptors accepted")
	}
	var ws unix.WaitStatus
	if pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil); !errors.Is(err, unix.ECHILD) && pid != 0 {
		t.Errorf("a child is left: pid %d (%v)", pid, err)
	}
}
