package attach

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Failure paths: every fault ends mapped with verified bytes, with SIGBUS,
// or with the session ended (the error logged by the server and shown by
// the target); a target that lies about its ranges only hurts itself.

// helperLiar is a Go target (this test binary, re-executed) that attaches
// honestly with the Go client and then lies to its userfaultfd:
//
//	unclaimed    registers an anonymous page it never attached and touches it
//	anon         swaps a page of an attached range (never touched) for
//	             anonymous memory behind the server's back (unregistered
//	             first, so no event tells it) and touches it: the server's
//	             UFFDIO_CONTINUE there fails (EINVAL)
//	anon-mapped  the same on a page the server has mapped (its fast path)
//
// It prints "touching", touches from another thread, and prints
// "session ended: ERR" once the server ends the session.
func helperLiar(mode, sock string) int {
	runtime.GOMAXPROCS(4)
	cl, err := Dial(sock, ClientOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "liar:", err)
		return 1
	}
	ps := int(cl.Hello.PageSize)
	var reg *ClientRegion
	for i := range cl.Regions {
		if cl.Regions[i].m != nil && cl.Regions[i].Size >= cl.Hello.ChunkSize*2 {
			reg = &cl.Regions[i]
			break
		}
	}
	if reg == nil {
		fmt.Fprintln(os.Stderr, "liar: no region of two chunks")
		return 1
	}
	rw := unix.PROT_READ | unix.PROT_WRITE
	anon := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS
	var addr uintptr
	switch mode {
	case "unclaimed":
		m, err := uffd.Mmap(0, ps, rw, anon, -1, 0)
		if err == nil {
			_, err = cl.u.Register(m.Addr(), uintptr(ps), uffd.ModeMissing)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "liar:", err)
			return 1
		}
		addr = m.Addr()
	case "anon", "anon-mapped":
		addr = reg.m.Addr() + uintptr(cl.Hello.ChunkSize) + uintptr(ps)
		if mode == "anon-mapped" {
			uffd.Touch(addr, ps, ps, false, nil, nil) // served: the server maps the unit
		}
		err := cl.u.Unregister(addr, uintptr(ps))
		if err == nil {
			_, err = uffd.Mmap(addr, ps, rw, anon|unix.MAP_FIXED, -1, 0)
		}
		if err == nil {
			_, err = cl.u.Register(addr, uintptr(ps), uffd.ModeMissing)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "liar:", err)
			return 1
		}
	default:
		fmt.Fprintln(os.Stderr, "liar: unknown mode", mode)
		return 1
	}
	fmt.Println("touching")
	go uffd.Touch(addr, ps, ps, false, nil, nil) // waits forever once the server lets go
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := cl.Poll(time.Second); err != nil {
			fmt.Println("session ended:", err)
			return 3
		}
	}
	fmt.Println("session still open")
	return 2
}

func startLiar(t *testing.T, sock, mode string) *target {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "UR_ATTACH_TEST_LIAR="+mode, "UR_ATTACH_TEST_LIAR_SOCK="+sock)
	return startTargetCmd(t, cmd)
}

// logSink collects the server's log lines.
type logSink struct {
	t  *testing.T
	mu sync.Mutex
	b  strings.Builder
}

func (l *logSink) logf(format string, args ...any) {
	l.t.Logf(format, args...)
	l.mu.Lock()
	fmt.Fprintf(&l.b, format+"\n", args...)
	l.mu.Unlock()
}

func (l *logSink) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// cpuTime is this process's user+system CPU time.
func cpuTime(t *testing.T) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestEngineLyingTargetOnlyHurtsItself: a target that registered memory it
// did not attach and faults there gets its session ended, named in the
// server's log and in the error it receives; the server does not spin on
// it, and another target attached afterwards is served.
func TestEngineLyingTargetOnlyHurtsItself(t *testing.T) {
	requireUffd(t, false)
	buildTarget(t)
	regions := []snapRegion{{"data", 0, memImage(1<<20, 5)}}
	snap := writeSnapshot(t, regions, 64<<10)
	l := newLoader(t, snap, restore.BackingShmem)
	logs := &logSink{t: t}
	_, sock := listen(t, FromLoader(l), Options{Logf: logs.logf})
	liar := startLiar(t, sock, "unclaimed")
	liar.stdout.wait(t, "touching", 10*time.Second)
	cpu0, t0 := cpuTime(t), time.Now()
	time.Sleep(2 * time.Second)
	cpu, wall := cpuTime(t)-cpu0, time.Since(t0)
	t.Logf("server CPU with a lying target: %v in %v", cpu, wall)
	if cpu > 500*time.Millisecond {
		t.Errorf("the server used %v of CPU in %v serving a target that faults outside its ranges", cpu, wall)
	}
	liar.stdout.wait(t, "session ended", 5*time.Second)
	if out := liar.stdout.String(); !strings.Contains(out, "did not list in the attach message") {
		t.Errorf("the liar's session ended with: %s", out)
	}
	if lg := logs.String(); !strings.Contains(lg, "ended: error:") || !strings.Contains(lg, "outside every mapping it attached") {
		t.Errorf("the server's log does not say why it ended the liar's view:\n%s", lg)
	}
	dump := filepath.Join(t.TempDir(), "dump")
	tg := startTarget(t, sock, "--dump", dump)
	if err := tg.wait(t, 30*time.Second); err != nil {
		t.Fatalf("an honest target after the liar: %v\n%s", err, tg.stderr)
	}
	if got, _ := os.ReadFile(dump); !bytes.Equal(got, regions[0].data) {
		t.Errorf("the honest target's dump differs at %d", firstDiff(got, regions[0].data))
	}
}

// TestEngineUnanswerableFaultEndsSession: a fault whose UFFDIO_CONTINUE
// fails with an unexpected errno (on the slow path and on the fast path for
// a unit the view has mapped) ends the session with that error: logged by
// the server, received by the target; it is never counted as served and
// left waiting in silence.
func TestEngineUnanswerableFaultEndsSession(t *testing.T) {
	requireUffd(t, false)
	regions := []snapRegion{{"data", 0, memImage(1<<20, 6)}}
	snap := writeSnapshot(t, regions, 64<<10)
	for _, mode := range []string{"anon", "anon-mapped"} {
		t.Run(mode, func(t *testing.T) {
			l := newLoader(t, snap, restore.BackingShmem)
			logs := &logSink{t: t}
			_, sock := listen(t, FromLoader(l), Options{Logf: logs.logf})
			liar := startLiar(t, sock, mode)
			liar.stdout.wait(t, "touching", 10*time.Second)
			liar.stdout.wait(t, "session ended", 5*time.Second)
			if out := liar.stdout.String(); !strings.Contains(out, "invalid argument") {
				t.Errorf("the liar's session ended with: %s", out)
			}
			// The server logs the end once the target hung up (or after
			// its 100 ms drain): it may come just after the target's line.
			for deadline := time.Now().Add(5 * time.Second); !strings.Contains(logs.String(), "ended: error:") && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
			if lg := logs.String(); !strings.Contains(lg, "ended: error:") || !strings.Contains(lg, "UFFDIO_CONTINUE") {
				t.Errorf("the server's log does not name the failed CONTINUE:\n%s", lg)
			}
			if st := l.Stats(); st.Errors == 0 || !strings.Contains(st.LastError, "invalid argument") {
				t.Errorf("stats: %s", st.JSON())
			}
		})
	}
}

// TestEngineCorruptChunk: a C target touching a chunk that fails its
// checksum gets SIGBUS (UFFDIO_POISON) or, with POISON unavailable (Linux
// < 6.6, forced here with restore.DisablePoisonEnv), its session ended: the
// target prints the server's error and exits 1. Never the chunk's bytes,
// never a silent hang.
func TestEngineCorruptChunk(t *testing.T) {
	requireUffd(t, false)
	buildTarget(t)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>9) // no zero chunk
	}
	snap := writeSnapshot(t, []snapRegion{{"data", 0, data}}, 64<<10)
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	const bad = 3
	off := f.Chunk(bad).Offset + uint64(f.Chunk(bad).StoredLen)/2
	f.Close()
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	b[off] ^= 0x55
	if err := os.WriteFile(snap, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, poison := range []bool{true, false} {
		t.Run(fmt.Sprintf("poison=%v", poison), func(t *testing.T) {
			if poison && !uffd.Probe().FeatureOK(uffd.FeaturePoison) {
				testutil.Skip(t, "UFFDIO_POISON needs Linux >= 6.6")
			}
			if !poison {
				t.Setenv(restore.DisablePoisonEnv, "1")
			}
			l := newLoader(t, snap, restore.BackingShmem)
			logs := &logSink{t: t}
			_, sock := listen(t, FromLoader(l), Options{Logf: logs.logf})
			dump := filepath.Join(t.TempDir(), "dump")
			tg := startTarget(t, sock, "--dump", dump)
			err := tg.wait(t, 20*time.Second)
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("target touching a corrupt chunk: %v\n%s", err, tg.stderr)
			}
			if _, err := os.Stat(dump); err == nil {
				t.Error("the target dumped a snapshot with a corrupt chunk")
			}
			st := ee.Sys().(syscall.WaitStatus)
			if poison {
				if !st.Signaled() || st.Signal() != syscall.SIGBUS {
					t.Fatalf("target: %v, want SIGBUS\n%s", err, tg.stderr)
				}
				return
			}
			if st.ExitStatus() != 1 || !strings.Contains(tg.stderr.String(), "the server ended the session") ||
				!strings.Contains(tg.stderr.String(), "UFFDIO_POISON") {
				t.Fatalf("target: %v, want exit 1 with the server's error\n%s", err, tg.stderr)
			}
			if lg := logs.String(); !strings.Contains(lg, "ended: error:") || !strings.Contains(lg, fmt.Sprintf("unit %d ", bad)) {
				t.Errorf("the server's log does not say why it ended the view:\n%s", lg)
			}
		})
	}
}
