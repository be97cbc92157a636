package main

import (
	"bytes"
	"encoding/json"
	"fmt"
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
)

// runFixture is what the `uffdrestore run` tests share: a 0755 directory
// (uid 65534 reaches it) holding the preload library built from csrc/, the
// unmodified test program testdata/preload_prog.c, a multi-MiB snapshot and
// its raw bytes from `snapshot extract` (the oracle).
type runFixture struct {
	dir, preload, prog, snap string
	raw                      [2][]byte // regions #0 "img" and #1 "heap"
}

func runSetup(t *testing.T) *runFixture {
	t.Helper()
	loadRequire(t)
	if _, err := exec.LookPath("gcc"); err != nil {
		testutil.Skip(t, "cannot build the preload library: %v", err)
	}
	dir, err := os.MkdirTemp("", "uffdrestore-run-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f := &runFixture{dir: dir, preload: filepath.Join(dir, preloadName), prog: filepath.Join(dir, "prog")}
	cf := []string{"-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-Icsrc"}
	for _, args := range [][]string{
		append(append([]string{}, cf...), "-fPIC", "-shared", "-fvisibility=hidden", "-o", f.preload, "csrc/ur_preload.c", "-ldl", "-lpthread"),
		append(append([]string{}, cf...), "-o", f.prog, "testdata/preload_prog.c"),
	} {
		if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %v: %v\n%s", args, err, b)
		}
	}
	// Two regions, so a marker of the second one maps at a non-zero backing offset.
	f.snap = filepath.Join(dir, "img.snap")
	sf, err := os.Create(f.snap)
	if err != nil {
		t.Fatal(err)
	}
	w, err := format.NewWriter(sf, format.WriterOptions{ChunkSize: 2 << 20, Codec: format.CodecS2}) // hugetlb-aligned regions
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range []int{3<<20 + 777, 1<<20 + 5} {
		img := make([]byte, n)
		for j := range img {
			if (j>>16)%3 != 0 {
				img[j] = byte(j*13+i*7) ^ byte(j>>10)
			}
		}
		if err := w.BeginRegion([]string{"img", "heap"}[i], 0, 3); err != nil {
			t.Fatal(err)
		}
		w.Write(img)
		if err := w.EndRegion(); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	sf.Close()
	for i := range f.raw {
		raw := filepath.Join(dir, fmt.Sprintf("img%d.raw", i))
		if b, err := loadCmd("snapshot", "extract", f.snap, "--region", fmt.Sprintf("#%d", i), "-o", raw, "-q").CombinedOutput(); err != nil {
			t.Fatalf("snapshot extract: %v\n%s", err, b)
		}
		if f.raw[i], err = os.ReadFile(raw); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// run is `uffdrestore run --preload ... args` (the test binary as uffdrestore).
func (f *runFixture) run(args ...string) *exec.Cmd {
	return loadCmd(append([]string{"run", "--preload", f.preload}, args...)...)
}

// checkDump checks a dump of the region (its size rounded up to a page)
// against the oracle: the extracted bytes, then zeros.
func (f *runFixture) checkDump(t *testing.T, path string, region int) {
	t.Helper()
	raw := f.raw[region]
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < len(raw) || !bytes.Equal(b[:len(raw)], raw) || bytes.ContainsFunc(b[len(raw):], func(r rune) bool { return r != 0 }) {
		n := 0
		for n < len(b) && n < len(raw) && b[n] == raw[n] {
			n++
		}
		t.Fatalf("%s: %d bytes, differs from snapshot extract's %d bytes of region #%d at byte %d", path, len(b), len(raw), region, n)
	}
}

// ownGroup puts cmd (and the children it forks) in a process group of its
// own that is killed when the test ends, and bounds Wait's wait for output
// a leftover child holds open: a hung child fails the test, never hangs it.
func ownGroup(t *testing.T, cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.WaitDelay = 5 * time.Second
	t.Cleanup(func() {
		if cmd.Process != nil {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
	})
}

func combined(t *testing.T, cmd *exec.Cmd) (string, int) {
	t.Helper()
	var out syncBuf
	ownGroup(t, cmd)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	code := waitExit(t, cmd, 30*time.Second)
	return out.String(), code
}

// TestRun runs an unmodified C program under `uffdrestore run` against
// `uffdrestore load` (one fixture for the subtests: building it is most of the time).
func TestRun(t *testing.T) {
	f := runSetup(t)
	t.Run("Oracle", func(t *testing.T) { testRunOracle(t, f) })
	t.Run("NonRoot", func(t *testing.T) { testRunNonRoot(t, f) })
	t.Run("Errors", func(t *testing.T) { testRunErrors(t, f) })
}

// testRunOracle: an unmodified program under `uffdrestore run` opens a marker,
// checks its size, and maps it shared and private, fixed and not: every byte
// equals `snapshot extract`; a private mapping that writes leaves what the
// next process reads alone; processes reading at once share one fill (each
// unit filled once). shmem and hugetlb memfd backings.
func testRunOracle(t *testing.T, f *runFixture) {
	for _, backing := range []string{"shmem", "memfd"} {
		t.Run(backing, func(t *testing.T) {
			if backing == "memfd" {
				testutil.RequireHugePages(t, 8)
			}
			sock, stats := filepath.Join(f.dir, backing+".sock"), filepath.Join(f.dir, backing+".stats.json")
			ld, lderr := startLoad(t, "ready: serving", 30*time.Second, f.snap, "--socket", sock, "--backing", backing, "--stats-json", stats)
			marker := filepath.Join(f.dir, "no-such-dir", "ram") // need not exist
			marker2 := filepath.Join(f.dir, "heap")
			maps := []string{"--socket", sock, "--map", marker + "=img", "--map", marker2 + "=#1", "--"}
			// Two processes at once, then the others one after another.
			var wg sync.WaitGroup
			modes := [][]string{{"shared", "fixed"}, {"private", "any"}}
			outs := make([]string, len(modes))
			for i, m := range modes {
				wg.Add(1)
				dump := filepath.Join(f.dir, fmt.Sprintf("%s.dump%d", backing, i))
				cmd := f.run(append(maps, f.prog, "dump", []string{marker, marker2}[i], dump, m[0], m[1])...)
				ownGroup(t, cmd)
				go func() {
					defer wg.Done()
					var out syncBuf
					cmd.Stdout, cmd.Stderr = &out, &out
					if err := cmd.Run(); err != nil {
						outs[i] = fmt.Sprintf("%v: %s", err, out.String())
					}
				}()
			}
			wg.Wait()
			for i, o := range outs {
				if o != "" {
					t.Fatalf("dump %v: %s", modes[i], o)
				}
				f.checkDump(t, filepath.Join(f.dir, fmt.Sprintf("%s.dump%d", backing, i)), i)
			}
			// A private mapping that writes: the next process still reads the snapshot.
			if out, code := combined(t, f.run(append(maps, f.prog, "scribble", marker2, "170")...)); code != 0 || !strings.HasPrefix(out, "ok ") {
				t.Fatalf("scribble: exit %d: %s", code, out)
			}
			// fork: with fork events (root) the child reads its inherited
			// mapping; a child that opens and maps the marker itself works.
			fo := filepath.Join(f.dir, backing+".fork")
			if out, code := combined(t, f.run(append(maps, f.prog, "fork", marker, fo)...)); code != 0 || !strings.Contains(out, "inherit: exit 0") || !strings.Contains(out, "reopen: exit 0") {
				t.Fatalf("fork: exit %d: %s", code, out)
			}
			f.checkDump(t, fo, 0)
			f.checkDump(t, fo+".inherit", 0)
			f.checkDump(t, fo+".reopen", 0)
			dump := filepath.Join(f.dir, backing+".after")
			// A relative marker path, by region index, private at a fixed address.
			cmd := f.run("--socket", sock, "--map", "m=#1", "--", f.prog, "dump", "./m", dump, "shared", "fixed")
			cmd.Dir = f.dir
			if out, code := combined(t, cmd); code != 0 {
				t.Fatalf("dump after the scribble: exit %d: %s", code, out)
			}
			f.checkDump(t, dump, 1)
			ld.Process.Signal(syscall.SIGTERM)
			if code := waitExit(t, ld, 30*time.Second); code != 0 {
				t.Fatalf("load exited %d:\n%s", code, lderr.String())
			}
			var st struct {
				Units    int `json:"units"`
				ByFault  int `json:"filled_by_fault"`
				Prefill  int `json:"filled_by_prefill"`
				Refills  int `json:"refills"`
				Decoded  int `json:"bytes_decoded"`
				Poisoned int `json:"poisoned"`
			}
			b, err := os.ReadFile(stats)
			if err != nil || json.Unmarshal(b, &st) != nil {
				t.Fatalf("stats: %v %s", err, b)
			}
			// 4 processes, 2 mappings each, all read everything: each unit filled once.
			if st.Units == 0 || st.ByFault+st.Prefill != st.Units || st.Refills != 0 {
				t.Fatalf("units %d, filled %d by fault + %d by prefill, %d refills: want each unit filled once\n%s", st.Units, st.ByFault, st.Prefill, st.Refills, b)
			}
			if strings.Contains(lderr.String(), "ended: error") || st.Poisoned != 0 {
				t.Errorf("load logged an error:\n%s", lderr.String())
			}
		})
	}
}

// testRunNonRoot: uid 65534 runs the program under `uffdrestore run` (the
// preload found next to the binary) against a server that allows it and
// reads the snapshot; a uid the server does not allow gets the clear error.
func testRunNonRoot(t *testing.T, f *runFixture) {
	testutil.RequireRoot(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(f.dir, "uffdrestore.test")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(f.dir, "out")
	if err := os.Mkdir(out, 0o777); err != nil || os.Chmod(out, 0o777) != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(f.dir, "nonroot.sock")
	startLoad(t, "ready: serving", 30*time.Second, f.snap, "--socket", sock, "--backing", "shmem", "--allow-uid", "65534", "--socket-mode", "0666")
	as := func(uid uint32, args ...string) *exec.Cmd {
		cmd := doctorCmd(bin, append([]string{"run", "--socket", sock, "--map", filepath.Join(f.dir, "ram") + "=#1", "--"}, args...)...)
		cmd.Dir = f.dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: 65534}}
		return cmd
	}
	dump := filepath.Join(out, "dump")
	if o, code := combined(t, as(65534, f.prog, "dump", filepath.Join(f.dir, "ram"), dump, "private", "fixed")); code != 0 {
		t.Fatalf("uid 65534: exit %d: %s", code, o)
	}
	f.checkDump(t, dump, 1)
	// Without fork events (no CAP_SYS_PTRACE) a child has no mapping where
	// the parent's was (a touch is SIGSEGV, never zeros); mapping the marker
	// itself works.
	fo := filepath.Join(out, "fork")
	if o, code := combined(t, as(65534, f.prog, "fork", filepath.Join(f.dir, "ram"), fo)); code != 0 || !strings.Contains(o, "inherit: signal 11") || !strings.Contains(o, "reopen: exit 0") {
		t.Fatalf("uid 65534 fork: exit %d: %s", code, o)
	}
	f.checkDump(t, fo, 1)
	f.checkDump(t, fo+".reopen", 1)
	o, code := combined(t, as(65533, f.prog, "dump", filepath.Join(f.dir, "ram"), dump+"2", "private", "any"))
	if code == 0 || !strings.Contains(o, "uid 65533 may not attach") || !strings.Contains(o, "--allow-uid 65533") {
		t.Fatalf("uid 65533 (not allowed): exit %d, want the refusal naming --allow-uid: %s", code, o)
	}
}

// testRunErrors: the launcher's and the preload's named errors, each a
// failing call or exit (never a crash or a hang): server down, a region
// that does not exist, an mmap larger than the region; and ftruncate.
func testRunErrors(t *testing.T, f *runFixture) {
	sock := filepath.Join(f.dir, "errors.sock")
	marker := filepath.Join(f.dir, "ram")
	// The preload alone (no launcher checks first).
	direct := func(sock, mapv string, args ...string) *exec.Cmd {
		cmd := exec.Command(f.prog, args...)
		cmd.Env = append(os.Environ(), "LD_PRELOAD="+f.preload, envPreloadSocket+"="+sock, envPreloadMap+"="+mapv)
		return cmd
	}
	dump := filepath.Join(f.dir, "dump")
	cases := []struct {
		name string
		cmd  func() *exec.Cmd
		want []string
	}{
		{"launcher, server down", func() *exec.Cmd {
			return f.run("--socket", sock+".none", "--map", marker, "--", f.prog, "dump", marker, dump, "shared", "any")
		}, []string{"cannot reach the server", "is the server running"}},
		{"preload, server down", func() *exec.Cmd { return direct(sock+".none", marker, "dump", marker, dump, "shared", "any") },
			[]string{"uffdrestore-preload: open " + marker + ": cannot attach", "is the server running", "FAIL open: No such file or directory"}},
		{"launcher, no such region", func() *exec.Cmd {
			return f.run("--socket", sock, "--map", marker+"=nosuch", "--", f.prog, "dump", marker, dump, "shared", "any")
		}, []string{`the snapshot has no region "nosuch" (its regions: #0 "img", #1 "heap")`}},
		{"launcher, region not named", func() *exec.Cmd {
			return f.run("--socket", sock, "--map", marker, "--", f.prog, "dump", marker, dump, "shared", "any")
		}, []string{"the snapshot has 2 regions", "PATH=#INDEX"}},
		{"preload, region not named", func() *exec.Cmd { return direct(sock, marker, "dump", marker, dump, "shared", "any") },
			[]string{"uffdrestore-preload: open " + marker + ": the snapshot has 2 regions: name one", "FAIL open: No such device or address"}},
		{"preload, no such region", func() *exec.Cmd { return direct(sock, marker+"=#3", "dump", marker, dump, "shared", "any") },
			[]string{"uffdrestore-preload: open " + marker + ": region #3 does not exist", "FAIL open: No such device or address"}},
		{"preload, no such region name", func() *exec.Cmd { return direct(sock, marker+"=nosuch", "dump", marker, dump, "shared", "any") },
			[]string{`no region "nosuch"`, "FAIL open: No such device or address"}},
		{"oversized mmap", func() *exec.Cmd { return direct(sock, marker+"=heap", "mapbig", marker) },
			[]string{"goes past the end of region #1", "mmap: Invalid argument"}},
		{"ftruncate", func() *exec.Cmd { return direct(sock, marker+"=#1", "truncate", marker) },
			[]string{"cannot grow", "ok ftruncate(size+1): File too large"}},
	}
	startLoad(t, "ready: serving", 30*time.Second, f.snap, "--socket", sock, "--backing", "shmem")
	for _, c := range cases {
		out, code := combined(t, c.cmd())
		ok := true
		for _, w := range c.want {
			ok = ok && strings.Contains(out, w)
		}
		wantCode := c.name != "oversized mmap" && c.name != "ftruncate" // those print and exit 0
		if !ok || (code != 0) != wantCode {
			t.Errorf("%s: exit %d, want %v; output:\n%s\nwant it to contain %q", c.name, code, wantCode, out, c.want)
		}
	}
}
