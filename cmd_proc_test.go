package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// Snapshots of real processes (snapshot create --from-pid) have many
// regions with repeated names: a library mapped 4-5 times under one path,
// many "anon" regions. These tests snapshot live processes and restore the
// snapshot through load into the C target and the Go client, and through
// restore.Open, comparing every region with snapshot extract's output.

// procPython is the CPython workload: it imports every extension module it
// has (each shared library is mapped several times under one path),
// allocates a few MiB of bytearrays and many small objects, lets any
// process of this user read its memory, says "ready" and waits for stdin.
const procPython = `
import ctypes, importlib, os, sys
try:
    ctypes.CDLL(None).prctl(0x59616d61, ctypes.c_ulong(-1), 0, 0, 0)  # PR_SET_PTRACER_ANY
except Exception:
    pass
for d in sys.path:
    if d.endswith("lib-dynload") and os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            name = f.split(".")[0]
            if name.startswith("_test") or name in ("_tkinter", "xxlimited_35"):
                continue
            try:
                importlib.import_module(name)
            except Exception:
                pass
blobs = [bytearray(os.urandom(1 << 20)) for _ in range(4)]
for i, b in enumerate(blobs):
    b[:16] = b"uffdrestore-%04d" % i
small = [("object-%d" % i, i * 7) for i in range(100000)]
print("ready", len(blobs), len(small), flush=True)
sys.stdin.read()
`

// startWorkload starts cmd, waits for its "ready" line and returns its pid;
// the process ends (stdin closed, then killed) when the test ends.
func startWorkload(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- l
		io.Copy(io.Discard, stdout)
	}()
	select {
	case l := <-line:
		if !strings.HasPrefix(l, "ready") {
			t.Fatalf("%s: no ready line (got %q)", cmd.Path, l)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: not ready within 30s", cmd.Path)
	}
	return cmd.Process.Pid
}

// procRoundTrip snapshots process pid (only mappings matching filters, if
// any), extracts it, and checks that load + the C target, load + the Go
// client, and restore.Open each give every region's bytes exactly. It
// returns the snapshot's regions.
func procRoundTrip(t *testing.T, tp string, pid int, minRegions int, filters ...string) []format.Region {
	t.Helper()
	dir := t.TempDir()
	snap, raw := filepath.Join(dir, "proc.snap"), filepath.Join(dir, "proc.raw")
	args := []string{"snapshot", "create", "--from-pid", strconv.Itoa(pid), "-o", snap, "--chunk-size", "64K", "--codec", "s2", "-q"}
	for _, f := range filters {
		args = append(args, "--region", f)
	}
	t0 := time.Now()
	if out, err := loadCmd(args...).CombinedOutput(); err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	if out, err := loadCmd("snapshot", "extract", snap, "-o", raw, "-q").CombinedOutput(); err != nil {
		t.Fatalf("snapshot extract: %v\n%s", err, out)
	}
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	regions := f.Regions()
	f.Close()
	img, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	// Where each region is in the extract output.
	starts := make([]uint64, len(regions)+1)
	names := map[string]int{}
	for i, r := range regions {
		starts[i+1] = starts[i] + r.Length
		names[r.Name]++
	}
	if starts[len(regions)] != uint64(len(img)) {
		t.Fatalf("extract wrote %d bytes, the regions add up to %d", len(img), starts[len(regions)])
	}
	dups := 0
	for _, n := range names {
		if n > 1 {
			dups++
		}
	}
	if len(regions) < minRegions || dups == 0 {
		t.Fatalf("snapshot of pid %d has %d regions (want >= %d), %d names repeated (want some)", pid, len(regions), minRegions, dups)
	}
	t.Logf("pid %d: %d regions, %d distinct names, %d repeated, %.1f MiB; snapshot+extract %v",
		pid, len(regions), len(names), dups, float64(len(img))/(1<<20), time.Since(t0).Round(time.Millisecond))
	region := func(b []byte, i int) []byte { return b[starts[i]:starts[i+1]] }
	// compare reports the first region of got that differs from the image.
	compare := func(what string, got func(i int) []byte) {
		t.Helper()
		for i, r := range regions {
			if g := got(i); !bytes.Equal(g, region(img, i)) {
				t.Fatalf("%s: region %d %q (%d bytes at %#x) differs from snapshot extract (got %d bytes)", what, i, r.Name, r.Length, r.Addr, len(g))
			}
		}
	}

	// load + the C target + the Go client.
	sock, dump := filepath.Join(dir, "s.sock"), filepath.Join(dir, "dump")
	var stderr syncBuf
	// The default backing: auto must pick one every target can map (64 KiB
	// chunks put regions off huge-page boundaries: shmem).
	ld := loadCmd("load", snap, "--socket", sock, "--workers", "2")
	ld.Stderr = &stderr
	if err := ld.Start(); err != nil {
		t.Fatal(err)
	}
	defer ld.Process.Kill()
	waitOutput(t, &stderr, "ready: serving", 30*time.Second)
	if !strings.Contains(stderr.String(), "(backing shmem,") {
		t.Errorf("load chose another backing than shmem for a snapshot of 64 KiB chunks:\n%s", stderr.String())
	}
	if out, err := exec.Command(tp, "--socket", sock, "--dump", dump, "--threads", "2").CombinedOutput(); err != nil {
		t.Fatalf("C target: %v\n%s\nload:\n%s", err, out, stderr.String())
	}
	d, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	if len(d) != len(img) {
		t.Fatalf("C target dumped %d bytes, snapshot extract %d", len(d), len(img))
	}
	compare("load + C target", func(i int) []byte { return region(d, i) })
	cl, err := attach.Dial(sock, attach.ClientOptions{})
	if err != nil {
		t.Fatalf("Go client: %v\nload:\n%s", err, stderr.String())
	}
	if len(cl.Regions) != len(regions) {
		t.Fatalf("Go client: %d regions, want %d", len(cl.Regions), len(regions))
	}
	compare("load + Go client", func(i int) []byte { return cl.Regions[i].Data })
	if _, err := cl.Detach(); err != nil {
		t.Error(err)
	}
	ld.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, ld, 30*time.Second); code != 0 {
		t.Errorf("load exited %d:\n%s", code, stderr.String())
	}

	// restore.Open, in this process.
	r, err := restore.Open(context.Background(), snap, restore.WithBacking(restore.BackingShmem))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	compare("restore.Open", r.RegionAt)
	return regions
}

// TestProcSnapshot: a live CPython process (hundreds of regions, repeated
// names) and a live process with 5,000 mappings restore byte for byte
// through load into the C target and the Go client, and through
// restore.Open. (One test, so the C target is compiled once.)
func TestProcSnapshot(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	t.Run("cpython", func(t *testing.T) {
		py, err := exec.LookPath("python3")
		if err != nil {
			testutil.Skip(t, "python3 is not installed (apt-get install python3): %v", err)
		}
		pid := startWorkload(t, exec.Command(py, "-c", procPython))
		procRoundTrip(t, tp, pid, 200)
	})
	t.Run("5000-mappings", func(t *testing.T) {
		const n = 5000
		cmd := exec.Command(os.Args[0], "-test.run=^TestManyMapsHelperProcess$")
		cmd.Env = append(os.Environ(), "UFFDRESTORE_HELPER_MANYMAPS="+strconv.Itoa(n))
		pid := startWorkload(t, cmd)
		regions := procRoundTrip(t, tp, pid, n, "uffdrestore-manymaps")
		if len(regions) != n {
			t.Errorf("%d regions, want the %d mappings of the memfd", len(regions), n)
		}
	})
}

// TestManyMapsHelperProcess is not a test: run by manyMapsCmd as a child,
// it maps a memfd N times, one page per mapping, with distinct contents
// and alternating protections (so the kernel cannot merge them), says
// "ready" and waits for stdin.
func TestManyMapsHelperProcess(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("UFFDRESTORE_HELPER_MANYMAPS"))
	if n == 0 {
		return
	}
	unix.Prctl(unix.PR_SET_PTRACER, ^uintptr(0), 0, 0, 0) // let the snapshot read us under Yama
	fd, err := unix.MemfdCreate("uffdrestore-manymaps", 0)
	if err == nil {
		err = unix.Ftruncate(fd, int64(n)*4096)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "memfd:", err)
		os.Exit(1)
	}
	maps := make([][]byte, n)
	for i := range maps {
		m, err := unix.Mmap(fd, int64(i)*4096, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mmap %d: %v\n", i, err)
			os.Exit(1)
		}
		for j := range m {
			m[j] = byte(i*31 + j*7 + j>>8)
		}
		copy(m, fmt.Sprintf("mapping %d of %d", i, n))
		if i%2 == 1 {
			if err := unix.Mprotect(m, unix.PROT_READ); err != nil {
				fmt.Fprintf(os.Stderr, "mprotect %d: %v\n", i, err)
				os.Exit(1)
			}
		}
		maps[i] = m
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// TestLoadRefusesUnattachable: load refuses at start, before loading, a
// snapshot no target could attach, naming the limit and the fix.
func TestLoadRefusesUnattachable(t *testing.T) {
	write := func(n, length int) string {
		p := filepath.Join(t.TempDir(), "x.snap")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		w, err := format.NewWriter(f, format.WriterOptions{ChunkSize: 64 << 10, Codec: format.CodecRaw})
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, length)
		for i := range n {
			w.BeginRegion("anon", uint64(i)<<12, 3)
			w.Write(b)
			if err := w.EndRegion(); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := []struct {
		name, snap, want string
	}{
		{"too many regions", write(attach.MaxRegions+1, 1), "65537 regions; the attach protocol carries at most 65536 (one mapping each): make a snapshot of fewer regions"},
		{"all empty", write(3, 0), "holds 0 bytes in 3 region(s)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "s.sock")
			var out syncBuf
			ld := loadCmd("load", c.snap, "--socket", sock, "--backing", "shmem")
			ld.Stdout, ld.Stderr = &out, &out
			if err := ld.Start(); err != nil {
				t.Fatal(err)
			}
			if code := waitExit(t, ld, 20*time.Second); code != 1 || !strings.Contains(out.String(), c.want) || strings.Contains(out.String(), "ready") {
				t.Fatalf("load exited %d, output:\n%s\nwant exit 1 before ready with %q", code, out.String(), c.want)
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Error("socket created")
			}
		})
	}
}

// TestBenchOutOfProcessProcLike: bench --out-of-process of a snapshot shaped
// like a --from-pid one (64 KiB chunks, repeated region names) attaches
// the C target with the default backing.
func TestBenchOutOfProcessProcLike(t *testing.T) {
	loadRequire(t)
	target := loadTarget(t)
	var regions []testutil.Region
	for i, name := range []string{"/usr/lib/libx.so", "anon", "/usr/lib/libx.so", "anon", "[heap]", "anon"} {
		b := make([]byte, 20000+i*70000)
		for j := range b {
			b[j] = byte(i*37 + j*11)
		}
		regions = append(regions, testutil.Region{Name: name, Addr: uint64(i+1) << 24, Data: b})
	}
	snap := testutil.WriteSnapshot(t, regions, format.CodecS2, 64<<10)
	t.Setenv("TMPDIR", t.TempDir())
	code, out, errOut := runSnapCLI(t, "bench", snap, "--runs", "1", "--out-of-process", "--target", target, "--modes", "lazy")
	if code != 0 || !strings.Contains(out, "lazy (oop)") {
		t.Fatalf("bench exit %d\n%s\n%s", code, out, errOut)
	}
}
