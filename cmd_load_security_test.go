package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

// TestLoadReadOnlyTargets: with --read-only-targets a target asking for a
// shared mapping is refused with the reason, and a private one gets the
// image through the real engine (shmem and hugetlb backings), its writes
// staying its own.
func TestLoadReadOnlyTargets(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	snap, img := loadTestSnap(t)
	for _, backing := range []string{"shmem", "memfd"} {
		t.Run(backing, func(t *testing.T) {
			if backing == "memfd" {
				testutil.RequireHugePages(t, 4)
			}
			dir := t.TempDir()
			sock, dump := filepath.Join(dir, "s.sock"), filepath.Join(dir, "dump")
			var stderr syncBuf
			// No --once: the refused shared target would end a --once server.
			ld := loadCmd("load", snap, "--socket", sock, "--backing", backing, "--read-only-targets", "--workers", "1")
			ld.Stderr = &stderr
			if err := ld.Start(); err != nil {
				t.Fatal(err)
			}
			defer ld.Process.Kill()
			waitOutput(t, &stderr, "ready: serving", 30*time.Second)
			out, err := exec.Command(tp, "--socket", sock).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "read-only access") {
				t.Fatalf("shared target against --read-only-targets: %v\n%s", err, out)
			}
			out, err = exec.Command(tp, "--socket", sock, "--private", "--write", "--dump", dump).CombinedOutput()
			if err != nil {
				t.Fatalf("private target: %v\n%s", err, out)
			}
			if err := ld.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if code := waitExit(t, ld, 30*time.Second); code != 0 {
				t.Fatalf("load exited %d:\n%s", code, stderr.String())
			}
			if got, _ := os.ReadFile(dump); !bytes.Equal(got, img) {
				t.Error("dump differs from the image")
			}
		})
	}
}
