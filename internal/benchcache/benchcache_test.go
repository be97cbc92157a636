package benchcache

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

func TestDirPerUser(t *testing.T) {
	home := t.TempDir()
	t.Setenv("UFFDRESTORE_BENCH_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", home)
	d, err := Dir()
	if err != nil || d != filepath.Join(home, ".cache", "uffdrestore", "bench") {
		t.Fatalf("Dir() = %q, %v; want under $HOME/.cache", d, err)
	}
	t.Setenv("XDG_CACHE_HOME", filepath.Join(home, "xdg"))
	if d, err = Dir(); err != nil || d != filepath.Join(home, "xdg", "uffdrestore", "bench") {
		t.Fatalf("Dir() = %q, %v; want under $XDG_CACHE_HOME", d, err)
	}
	os.WriteFile(filepath.Join(d, "x.raw"), make([]byte, 1000), 0o600)
	got, n, err := Clear()
	if err != nil || got != d || n != 1000 {
		t.Errorf("Clear() = %q, %d, %v", got, n, err)
	}
	if _, err := os.Stat(d); !os.IsNotExist(err) {
		t.Error("Clear left the directory")
	}

	// No usable home (one under a regular file cannot be created, even by
	// root): a per-uid directory in $TMPDIR, not a shared one.
	tmp := t.TempDir()
	os.WriteFile(filepath.Join(home, "file"), nil, 0o600)
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", filepath.Join(home, "file", "home"))
	t.Setenv("TMPDIR", tmp)
	d, err = Dir()
	if want := filepath.Join(tmp, "uffdrestore-bench-"+itoa(os.Geteuid())); err != nil || d != want {
		t.Errorf("Dir() = %q, %v; want %q", d, err, want)
	}
	// One planted with the wrong mode is refused.
	os.Chmod(d, 0o777)
	if _, err := Dir(); err == nil || !strings.Contains(err.Error(), "closed to others") {
		t.Errorf("a world-writable cache was accepted: %v", err)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// TestTwoUsers: after root used the cache, another uid (65534, as a real
// separate process) gets its own, instead of "permission denied".
func TestTwoUsers(t *testing.T) {
	testutil.RequireRoot(t)
	// A shared sticky directory, as /tmp is; both users' homes unusable.
	tmp, err := os.MkdirTemp("", "benchcache-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	os.Chmod(tmp, 0o1777)
	os.WriteFile(filepath.Join(tmp, "file"), nil, 0o644)
	t.Setenv("TMPDIR", tmp)
	t.Setenv("UFFDRESTORE_BENCH_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", filepath.Join(tmp, "file", "home"))
	rootDir, err := Dir()
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	cp := filepath.Join(tmp, "benchcache.test")
	b, _ := os.ReadFile(exe)
	os.WriteFile(cp, b, 0o755)
	cmd := exec.Command(cp, "-test.run=^TestHelperDir$")
	cmd.Env = append(os.Environ(), "BENCHCACHE_HELPER=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("as uid 65534: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "dir="+filepath.Join(tmp, "uffdrestore-bench-65534")) || strings.Contains(string(out), rootDir+"\n") {
		t.Errorf("uid 65534 got %q; root has %s", out, rootDir)
	}
}

func TestHelperDir(t *testing.T) {
	if os.Getenv("BENCHCACHE_HELPER") != "1" {
		return
	}
	d, err := Dir()
	if err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("dir=" + d + "\n")
}
