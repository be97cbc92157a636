// Package testutil holds what every kernel test in uffdrestore shares: the
// strict switch that turns skips into failures, requirement checks, and a
// TestMain leak check for file descriptors and huge-page mappings.
package testutil

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"golang.org/x/sys/unix"
)

// Strict reports whether UFFDRESTORE_STRICT=1: every "kernel feature
// missing / not root / no huge pages" skip becomes a failure.
func Strict() bool { return os.Getenv("UFFDRESTORE_STRICT") == "1" }

// Skip skips the test with a reason, or fails it in strict mode.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if Strict() {
		t.Fatalf("UFFDRESTORE_STRICT=1 forbids skipping: %s", msg)
	}
	t.Skip(msg)
}

// RequireRoot skips (or fails in strict mode) unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (euid %d)", os.Geteuid())
	}
}

// FreeHugePages returns the free (unreserved) default-size huge pages.
func FreeHugePages() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	var free, rsvd int64
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "HugePages_Free:":
			free = n
		case "HugePages_Rsvd:":
			rsvd = n
		}
	}
	return free - rsvd
}

// RequireHugePages skips (or fails in strict mode) unless n default-size
// huge pages are free.
func RequireHugePages(t testing.TB, n int64) {
	t.Helper()
	if got := FreeHugePages(); got < n {
		Skip(t, "needs %d free huge pages, %d free: echo %d > /proc/sys/vm/nr_hugepages", n, got, n+64)
	}
}

// openFDs lists this process's open fds with what they point at.
func openFDs() map[int]string {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	out := map[int]string{}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out[n] = target
	}
	return out
}

// hugetlbMappings lists mappings of this process backed by huge pages or
// memfds that the tests create.
func leakedMappings() []string {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "memfd:") || strings.Contains(l, "uffdrestore-hugetlbfs") || strings.Contains(l, "/uffdrestore-backing") {
			out = append(out, l)
		}
	}
	return out
}

// Main runs the tests, then fails the run if file descriptors or memfd /
// huge-page mappings opened during the tests are still open. Use it as
// func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }.
func Main(m *testing.M) int {
	before := openFDs()
	code := m.Run()
	if code != 0 {
		return code
	}
	var leaks []string
	for try := 0; try < 20; try++ {
		runtime.GC()
		leaks = leaks[:0]
		for fd, target := range openFDs() {
			if _, ok := before[fd]; ok {
				continue
			}
			if strings.HasPrefix(target, "/proc/") || target == "" {
				continue // the ReadDir of /proc/self/fd itself
			}
			// The race detector and the Go runtime keep a few fds of their own.
			if strings.HasPrefix(target, "anon_inode:[eventpoll]") || strings.HasPrefix(target, "anon_inode:[eventfd]") || strings.HasPrefix(target, "pipe:") {
				continue
			}
			leaks = append(leaks, fmt.Sprintf("fd %d -> %s", fd, target))
		}
		leaks = append(leaks, leakedMappings()...)
		if len(leaks) == 0 {
			return 0
		}
		time.Sleep(50 * time.Millisecond)
	}
	sort.Strings(leaks)
	fmt.Fprintf(os.Stderr, "LEAK: %d resources left open after the tests:\n  %s\n", len(leaks), strings.Join(leaks, "\n  "))
	return 1
}

// MountHugetlbfs mounts a private hugetlbfs in a temporary directory and
// unmounts it when the test ends. It needs root.
func MountHugetlbfs(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	dir, err := os.MkdirTemp("", "uffdrestore-hugetlbfs-")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("none", dir, "hugetlbfs", 0, "mode=0700"); err != nil {
		os.Remove(dir)
		Skip(t, "cannot mount hugetlbfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
		os.Remove(dir)
	})
	return dir
}

// HugetlbMappedKB is how much huge-page memory this process maps now
// (/proc/self/smaps_rollup). Unlike the pool's free count, other processes
// (such as test packages running in parallel) do not move it.
func HugetlbMappedKB() int64 {
	b, err := os.ReadFile("/proc/self/smaps_rollup")
	if err != nil {
		return -1
	}
	var total int64
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && (f[0] == "Shared_Hugetlb:" || f[0] == "Private_Hugetlb:") {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			total += n
		}
	}
	return total
}

// Region is one region of a test snapshot.
type Region struct {
	Name string
	Addr uint64
	Data []byte
}

// WriteSnapshot writes regions as a snapshot (2 compression workers) in a
// temporary directory of the test and returns its path.
func WriteSnapshot(t testing.TB, regions []Region, codec format.Codec, chunk int) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "test.snap")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := format.NewWriter(f, format.WriterOptions{ChunkSize: chunk, Codec: codec, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range regions {
		if err := w.BeginRegion(r.Name, r.Addr, 3); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(r.Data); err != nil {
			t.Fatal(err)
		}
		if err := w.EndRegion(); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}
