package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

// TestDemoNonRoot runs `uffdrestore demo --target` (what `make demo` runs)
// as uid 65534 with nothing set up for it: on this kernel's defaults
// (vm.unprivileged_userfaultfd=0, /dev/userfaultfd root's) the in-process
// restore and the C target get only UFFD_USER_MODE_ONLY userfaultfds and no
// fork events, and both must still restore every byte; auto must pick the
// hugetlb memfd that the doctor finds usable for that user.
func TestDemoNonRoot(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 16)
	if _, err := exec.LookPath("gcc"); err != nil {
		testutil.Skip(t, "cannot build the C target: %v", err)
	}
	// Everything uid 65534 runs or reads sits in a 0755 directory; its HOME
	// and TMPDIR are its own.
	dir := testutil.SharedTempDir(t)
	home := filepath.Join(dir, "home")
	for _, err := range []error{os.Mkdir(home, 0o700), os.Chown(home, 65534, 65534)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	cmdExe := testutil.CopyTestBinary(t, dir, "uffdrestore.test")
	target := filepath.Join(dir, "uffdrestore-target")
	if b, err := exec.Command("gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-Icsrc", "-o", target,
		"csrc/target.c", "csrc/ur_client.c", "-lpthread").CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, b)
	}

	cmd := doctorCmd(cmdExe, "demo", "--size", "8MiB", "--target", target)
	cmd.Dir = home
	cmd.Env = append(cmd.Env, "HOME="+home, "TMPDIR="+home, "XDG_CACHE_HOME="+filepath.Join(home, ".cache"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	var err error
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-done
		t.Fatalf("demo as uid 65534 did not finish in 2 minutes:\n%s", out.String())
	}
	if err != nil {
		t.Fatalf("demo as uid 65534: %v\n%s", err, out.String())
	}
	text := out.String()
	t.Logf("demo as uid 65534:\n%s", text)
	for _, want := range []string{"all 8 MiB equal to the original", "the target process's 8 MiB equal the original"} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}

	// What the target's JSON line says about its userfaultfd.
	var tj struct {
		Uffd       string `json:"uffd"`
		ForkEvents *bool  `json:"fork_events"`
	}
	if _, line, ok := strings.Cut(text, "target:   "); !ok {
		t.Fatal("no target line in the demo output")
	} else if line, _, _ = strings.Cut(line, "\n"); json.Unmarshal([]byte(line), &tj) != nil || tj.ForkEvents == nil {
		t.Fatalf("target line %q: want uffd and fork_events", line)
	}
	if *tj.ForkEvents {
		t.Error("the target as uid 65534 (no CAP_SYS_PTRACE) reports fork events")
	}
	// The doctor's view for uid 65534 is not at hand here; as root, read
	// what decides it: the sysctl and /dev/userfaultfd's owner and mode.
	p := uffd.Probe().Permission
	if st, err := os.Stat("/dev/userfaultfd"); p.UnprivilegedSysctl == 0 && (err != nil || st.Mode().Perm()&0o066 == 0) {
		if tj.Uffd != "user-mode-only" {
			t.Errorf("the target as uid 65534 got a %q userfaultfd; only user-mode-only is allowed to it here", tj.Uffd)
		}
	}
	// Auto: the hugetlb memfd, usable for uid 65534 (user-mode-only
	// userfaultfds register hugetlb views) with the pool this test required.
	if !uffd.Probe().FeatureOK(uffd.FeatureMinorHugetlbfs) {
		testutil.Skip(t, "no minor faults on hugetlbfs on this kernel: auto cannot pick a hugetlb memfd")
	}
	if !strings.Contains(text, "mode on memfd-hugetlb") || !strings.Contains(text, "(backing hugetlb)") {
		t.Error("auto did not pick the hugetlb memfd for uid 65534 (doctor reports it usable)")
	}
}
