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

// demoCmd runs this test binary as "uffdrestore demo ..." with its own
// TMPDIR, so what the demo leaves behind is visible.
func demoCmd(tmp string, args ...string) *exec.Cmd {
	cmd := loadCmd(append([]string{"demo"}, args...)...)
	cmd.Env = append(cmd.Env, "TMPDIR="+tmp)
	return cmd
}

// TestDemoSizeBounded: a size the machine cannot hold is refused at once,
// naming what is short, before anything is written.
func TestDemoSizeBounded(t *testing.T) {
	tmp := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--size", "100TiB"}, "free: give a smaller --size"},
		{[]string{"--size", "8PiB", "--backing", "memfd", "--dir", tmp}, "free: give a smaller --size"},
		{[]string{"--size", "nonsense"}, "--size: bad size"},
		{[]string{"--backing", "hugetlbfs"}, "needs --hugetlbfs DIR"},
	} {
		cmd := demoCmd(tmp, c.args...)
		var out syncBuf
		cmd.Stdout, cmd.Stderr = &out, &out
		start := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if code := waitExit(t, cmd, 10*time.Second); code != 2 || !strings.Contains(out.String(), c.want) {
			t.Errorf("demo %q: exit %d, %q; want exit 2 and %q", c.args, code, out.String(), c.want)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("demo %q took %v to refuse", c.args, d)
		}
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("refused demos left %v", ents)
	}
}

// TestDemoSignalCleanup: SIGINT or SIGTERM while the demo writes its
// snapshot (and, with --dir, into a given directory) removes everything it
// wrote.
func TestDemoSignalCleanup(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		for _, ownDir := range []bool{false, true} {
			tmp := t.TempDir()
			args := []string{"--size", "1GiB", "--codec", "zstd", "--backing", "shmem"}
			watch := tmp
			if ownDir {
				watch = filepath.Join(tmp, "mine")
				os.Mkdir(watch, 0o755)
				os.WriteFile(filepath.Join(watch, "keep"), []byte("x"), 0o644)
				args = append(args, "--dir", watch)
			}
			cmd := demoCmd(tmp, args...)
			var out syncBuf
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Wait until the snapshot is being written.
			deadline := time.Now().Add(20 * time.Second)
			for {
				m, _ := filepath.Glob(filepath.Join(watch, "*", "demo.snap"))
				m2, _ := filepath.Glob(filepath.Join(watch, "demo.snap"))
				if len(m)+len(m2) > 0 {
					if fi, err := os.Stat(append(m, m2...)[0]); err == nil && fi.Size() > 0 {
						break
					}
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatalf("no snapshot being written; output:\n%s", out.String())
				}
				time.Sleep(5 * time.Millisecond)
			}
			cmd.Process.Signal(sig)
			if code := waitExit(t, cmd, 10*time.Second); code != 130 || !strings.Contains(out.String(), "removed what it wrote") {
				t.Errorf("%v (--dir %v): exit %d:\n%s", sig, ownDir, code, out.String())
			}
			ents, _ := os.ReadDir(watch)
			var left []string
			for _, e := range ents {
				if e.Name() != "mine" && e.Name() != "keep" {
					left = append(left, e.Name())
				}
			}
			if len(left) != 0 {
				t.Errorf("%v (--dir %v): left %v", sig, ownDir, left)
			}
			if ownDir {
				if _, err := os.Stat(filepath.Join(watch, "keep")); err != nil {
					t.Errorf("--dir: the demo removed a file it did not write: %v", err)
				}
			}
		}
	}
}

// TestDemoHugetlbfs: demo --backing hugetlbfs works given --hugetlbfs (the
// demo had no way to name the mount).
func TestDemoHugetlbfs(t *testing.T) {
	loadRequire(t)
	testutil.RequireHugePages(t, 8)
	mnt := testutil.MountHugetlbfs(t)
	cmd := demoCmd(t.TempDir(), "--size", "8MiB", "--backing", "hugetlbfs", "--hugetlbfs", mnt, "--touch", "0.5")
	var out syncBuf
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, 60*time.Second); code != 0 || !strings.Contains(out.String(), "on hugetlbfs") || !strings.Contains(out.String(), "all 8 MiB equal to the original") {
		t.Errorf("exit %d:\n%s", code, out.String())
	}
}
