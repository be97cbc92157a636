package attach

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/restore"
	"golang.org/x/sys/unix"
)

// These tests serve real snapshots with the real engine to targets that
// change their view after attaching (csrc/target.c --unmap-part, --mremap,
// --remove, --fork, --churn): the server follows the uffd events (UNMAP,
// REMAP, REMOVE, FORK) and stays correct for that target and for a plain one
// attached at the same time; nothing leaks once the targets are gone.

// eventsResult is the "events" object of the target's JSON line.
type eventsResult struct {
	Unmap *struct {
		Region int    `json:"region"`
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
	} `json:"unmap"`
	Mremap *struct {
		Region int    `json:"region"`
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
	} `json:"mremap"`
	Remove *struct {
		Region        int    `json:"region"`
		Advice        string `json:"advice"`
		MarkerOffset  uint64 `json:"marker_offset"`
		RemovedOffset uint64 `json:"removed_offset"`
		RemovedOK     bool   `json:"removed_ok"`
		RemovedZero   bool   `json:"removed_zero"`
		MarkerOK      bool   `json:"marker_ok"`
	} `json:"remove"`
	Fork *struct {
		ChildPID             int   `json:"child_pid"`
		ParentTouched        int   `json:"parent_touched"`
		ChildTouched         int   `json:"child_touched"`
		ChildDump            bool  `json:"child_dump"`
		PrivateWriteIsolated *bool `json:"private_write_isolated"`
	} `json:"fork"`
	Churn *uint64 `json:"churn"`
}

func (tg *target) events(t testing.TB) eventsResult {
	t.Helper()
	var r struct {
		Events *eventsResult `json:"events"`
	}
	out := tg.stdout.String()
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("target output %q: %v", out, err)
	}
	if r.Events == nil {
		t.Fatalf("target output has no events: %s", out)
	}
	return *r.Events
}

// eventsFixture is one loader + server serving testRegions() for one
// subtest, with the fd count taken once the server is listening.
type eventsFixture struct {
	regions []snapRegion
	want    []byte
	l       *restore.Loader
	s       *Server
	sock    string
	dir     string
	fds     int
	hugetlb bool
}

func newEventsFixture(t *testing.T, kind restore.BackingKind, hugetlb bool) *eventsFixture {
	t.Helper()
	requireUffd(t, hugetlb)
	buildTarget(t)
	chunk := 2 << 20
	if !hugetlb {
		chunk = 256 << 10 // 64 pages of 4 KiB per unit: a punched page is refilled alone
	}
	f := &eventsFixture{regions: testRegions(), dir: t.TempDir(), hugetlb: hugetlb}
	f.want = concatRegions(f.regions)
	snap := writeSnapshot(t, f.regions, chunk)
	f.l = newLoader(t, snap, kind)
	f.s, f.sock = listen(t, FromLoader(f.l), Options{})
	f.fds = countFDs(t)
	return f
}

func (f *eventsFixture) path(name string) string { return filepath.Join(f.dir, name) }

// finish waits until every target is gone and its views are freed, and
// checks the server holds no more fds than before the first attach.
func (f *eventsFixture) finish(t *testing.T) {
	t.Helper()
	waitFor(t, 10*time.Second, "targets gone", func() bool { return len(f.s.Targets()) == 0 })
	waitFor(t, 10*time.Second, "views freed", func() bool { return f.l.Stats().Views == 0 })
	waitFor(t, 5*time.Second, "server fds back", func() bool { return countFDs(t) == f.fds })
	if st := f.l.Stats(); st.Errors != 0 || st.Poisoned != 0 {
		t.Errorf("engine errors: %s", st.JSON())
	}
}

func (f *eventsFixture) checkDump(t *testing.T, what, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s: dump differs from the image (%d vs %d bytes, first difference at %d)", what, len(got), len(want), firstDiff(got, want))
	}
}

func privArgs(private bool, args ...string) []string {
	if private {
		args = append(args, "--private")
	}
	return args
}

func mustFinish(t *testing.T, what string, tg *target) {
	t.Helper()
	if err := tg.wait(t, 60*time.Second); err != nil {
		t.Fatalf("%s: %v\nstdout %s\nstderr %s", what, err, tg.stdout, tg.stderr)
	}
}

// startPlain starts a plain target that waits after attaching, so it is
// attached while the other one changes its view; release it with a line.
func (f *eventsFixture) startPlain(t *testing.T, private bool) *target {
	t.Helper()
	args := privArgs(private, "--wait", "--dump", f.path("plain"), "--pattern", "random", "--threads", "2")
	if private {
		args = append(args, "--write")
	}
	tg := startTarget(t, f.sock, args...)
	tg.stderr.wait(t, "attached", 10*time.Second)
	return tg
}

func (f *eventsFixture) releasePlain(t *testing.T, tg *target) {
	t.Helper()
	tg.stdin.Write([]byte("\n"))
	mustFinish(t, "plain target", tg)
	f.checkDump(t, "plain target", f.path("plain"), f.want)
}

func forEachEventsCase(t *testing.T, run func(t *testing.T, f *eventsFixture, private bool)) {
	for _, bk := range engineBackings {
		for _, private := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/private=%v", bk.name, private), func(t *testing.T) {
				run(t, newEventsFixture(t, bk.kind, bk.hugetlb), private)
			})
		}
	}
}

// TestEngineEventsUnmapPart: a target munmaps the middle of a region (an
// UNMAP event) and touches and dumps the rest: its dump is the image
// without that part; a plain target attached meanwhile dumps the image.
func TestEngineEventsUnmapPart(t *testing.T) {
	forEachEventsCase(t, func(t *testing.T, f *eventsFixture, private bool) {
		plain := f.startPlain(t, private)
		tg := startTarget(t, f.sock, privArgs(private, "--unmap-part", "--dump", f.path("ev"), "--pattern", "random", "--threads", "2")...)
		mustFinish(t, "unmap target", tg)
		ev := tg.events(t)
		if ev.Unmap == nil {
			t.Fatalf("no unmap event: %s", tg.stdout)
		}
		u := ev.Unmap
		ps := uint64(4096)
		if f.hugetlb {
			ps = 2 << 20
		}
		if u.Length == 0 || u.Offset%ps != 0 || u.Length%ps != 0 || u.Offset+u.Length > uint64(len(f.regions[u.Region].data)) {
			t.Fatalf("unmapped part %+v is not whole pages of %d inside the region", *u, ps)
		}
		var want []byte
		for i, r := range f.regions {
			if i == u.Region {
				want = append(want, r.data[:u.Offset]...)
				want = append(want, r.data[u.Offset+u.Length:]...)
			} else {
				want = append(want, r.data...)
			}
		}
		f.checkDump(t, "unmap target", f.path("ev"), want)
		f.releasePlain(t, plain)
		f.finish(t)
	})
}

// TestEngineEventsMremap: a target moves part of a region elsewhere with
// mremap (a REMAP event; one page of it touched before the move, the rest
// after) and dumps it there: the bytes are the snapshot's. It munmaps the
// moved part before detaching (an UNMAP event at the new place).
func TestEngineEventsMremap(t *testing.T) {
	forEachEventsCase(t, func(t *testing.T, f *eventsFixture, private bool) {
		plain := f.startPlain(t, private)
		args := privArgs(private, "--mremap", "--dump", f.path("ev"), "--pattern", "random", "--threads", "2")
		if private {
			args = append(args, "--write")
		}
		tg := startTarget(t, f.sock, args...)
		mustFinish(t, "mremap target", tg)
		if ev := tg.events(t); ev.Mremap == nil || ev.Mremap.Length == 0 {
			t.Fatalf("no mremap event: %s", tg.stdout)
		}
		f.checkDump(t, "mremap target", f.path("ev"), f.want)
		f.releasePlain(t, plain)
		f.finish(t)
	})
}

// TestEngineEventsRemove: a target writes a marker into page M, drops page P
// of the same range (MADV_REMOVE when shared: P is punched out of the
// backing for everyone; MADV_DONTNEED when private) and touches P again: P
// comes back with the snapshot's bytes, M keeps the marker. A plain target
// that had mapped everything before the punch then dumps the image (its
// mapping of P was zapped by the punch: it faults again and is served).
func TestEngineEventsRemove(t *testing.T) {
	forEachEventsCase(t, func(t *testing.T, f *eventsFixture, private bool) {
		args := privArgs(private, "--pause-before-dump", "--dump", f.path("plain"))
		plain := startTarget(t, f.sock, args...)
		plain.stderr.wait(t, "touched", 30*time.Second)
		refillsBefore := f.l.Stats().Refills
		tg := startTarget(t, f.sock, privArgs(private, "--remove", "--dump", f.path("ev"), "--stats")...)
		mustFinish(t, "remove target", tg)
		ev := tg.events(t)
		if ev.Remove == nil {
			t.Fatalf("no remove event: %s", tg.stdout)
		}
		r := ev.Remove
		wantAdv := "MADV_REMOVE"
		if private {
			wantAdv = "MADV_DONTNEED"
		}
		if r.Advice != wantAdv || !r.RemovedOK || r.RemovedZero || !r.MarkerOK {
			t.Errorf("remove: %+v\nstderr %s", *r, tg.stderr)
		}
		if !strings.Contains(tg.stderr.String(), "came back with the snapshot's bytes") || !strings.Contains(tg.stderr.String(), "kept the marker") {
			t.Errorf("stderr does not say what was checked:\n%s", tg.stderr)
		}
		f.checkDump(t, "remove target", f.path("ev"), f.want)
		refills := f.l.Stats().Refills - refillsBefore
		if !private && refills < 1 {
			t.Errorf("MADV_REMOVE punched a page but the engine refilled no unit: %s", f.l.Stats().JSON())
		}
		if private && refills != 0 {
			t.Errorf("MADV_DONTNEED of a private page made %d refills (the backing was not punched)", refills)
		}
		plain.stdin.Write([]byte("\n"))
		mustFinish(t, "plain target", plain)
		f.checkDump(t, "plain target (mapped before the punch)", f.path("plain"), f.want)
		f.finish(t)
		if !private {
			// The backing holds the snapshot's bytes again (the marker was
			// put back, the punched page refilled): a late target sees the
			// image.
			late := startTarget(t, f.sock, "--dump", f.path("late"))
			mustFinish(t, "late target", late)
			f.checkDump(t, "late target", f.path("late"), f.want)
			f.finish(t)
		}
	})
}

// TestEngineEventsFork: a target forks after attaching; the child (served
// through the FORK event's new userfaultfd) touches the pages the parent
// has not and dumps its view; the parent then dumps its own. Both are the
// image; with MAP_PRIVATE the child's write does not show in the parent.
// The child's view lives until the parent detaches, then it is freed.
func TestEngineEventsFork(t *testing.T) {
	forEachEventsCase(t, func(t *testing.T, f *eventsFixture, private bool) {
		plain := f.startPlain(t, private)
		tg := startTarget(t, f.sock, privArgs(private, "--fork", "--dump", f.path("ev"), "--hold", "--pattern", "random", "--threads", "2")...)
		waitFor(t, 60*time.Second, "the fork target's result", func() bool {
			select {
			case <-tg.done:
				return true
			default:
			}
			return strings.HasSuffix(tg.stdout.String(), "\n")
		})
		select {
		case <-tg.done:
			t.Fatalf("fork target exited early: %v\nstdout %s\nstderr %s", tg.err, tg.stdout, tg.stderr)
		default:
		}
		ev := tg.events(t)
		if ev.Fork == nil || ev.Fork.ChildTouched == 0 || !ev.Fork.ChildDump {
			t.Fatalf("fork: %s", tg.stdout)
		}
		if private != (ev.Fork.PrivateWriteIsolated != nil && *ev.Fork.PrivateWriteIsolated) {
			t.Errorf("fork: private_write_isolated %v with private=%v", ev.Fork.PrivateWriteIsolated, private)
		}
		f.checkDump(t, "fork child", f.path("ev.child"), f.want)
		f.checkDump(t, "fork parent", f.path("ev"), f.want)
		// plain + fork parent + fork child (exited, but its view is served
		// until the parent's ends).
		if v := f.l.Stats().Views; v != 3 {
			t.Errorf("%d views with the plain target, the fork parent and its child attached, want 3", v)
		}
		f.releasePlain(t, plain)
		waitFor(t, 10*time.Second, "plain view freed", func() bool { return f.l.Stats().Views == 2 })
		tg.stdin.Close()
		mustFinish(t, "fork target", tg)
		f.finish(t) // the child's view went with the parent's
	})
}

// TestEngineEventsChurn: while two threads touch every page, a third drops
// a page with MADV_DONTNEED in a loop: each raises a REMOVE event, during
// which the kernel refuses UFFDIO_CONTINUE on that userfaultfd with EAGAIN
// (mmap_changing). A fault answered in that window must still be resolved:
// the target finishes and dumps the image.
func TestEngineEventsChurn(t *testing.T) {
	forEachEventsCase(t, func(t *testing.T, f *eventsFixture, private bool) {
		tg := startTarget(t, f.sock, privArgs(private, "--churn", "--dump", f.path("ev"), "--pattern", "random", "--threads", "2")...)
		select {
		case <-tg.done:
		case <-time.After(15 * time.Second):
			threads := threadStates(tg.cmd.Process.Pid)
			if os.Getenv("UR_EVENTS_DEBUG") != "" { // the server's side: goroutines, threads, its uffds' readiness
				pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
				fmt.Fprintf(os.Stderr, "server threads:\n%s", threadStates(os.Getpid()))
				ents, _ := os.ReadDir("/proc/self/fd")
				for _, e := range ents {
					l, _ := os.Readlink("/proc/self/fd/" + e.Name())
					if strings.Contains(l, "userfaultfd") {
						info, _ := os.ReadFile("/proc/self/fdinfo/" + e.Name())
						var fd int
						fmt.Sscan(e.Name(), &fd)
						pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
						n, err := unix.Poll(pfd, 0)
						fmt.Fprintf(os.Stderr, "fd %s: poll %d %v revents %#x\n%s\n", e.Name(), n, err, pfd[0].Revents, info)
					}
				}
			}
			tg.cmd.Process.Kill()
			<-tg.done
			t.Fatalf("target stuck for 15s while another of its threads raised REMOVE events: a fault whose "+
				"UFFDIO_CONTINUE failed with EAGAIN (the kernel's mmap_changing) was never resolved nor woken.\n"+
				"threads:\n%s\nstats %s\nstderr %s", threads, f.l.Stats().JSON(), tg.stderr)
		}
		if tg.err != nil {
			t.Fatalf("%v\n%s", tg.err, tg.stderr)
		}
		if ev := tg.events(t); ev.Churn == nil {
			t.Errorf("no churn count: %s", tg.stdout)
		}
		f.checkDump(t, "churn target", f.path("ev"), f.want)
		f.finish(t)
	})
}

// threadStates describes where each thread of pid waits (wchan, and the
// kernel stack when readable).
func threadStates(pid int) string {
	var b strings.Builder
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, e := range ents {
		dir := fmt.Sprintf("/proc/%d/task/%s/", pid, e.Name())
		wchan, _ := os.ReadFile(dir + "wchan")
		stack, _ := os.ReadFile(dir + "stack")
		fmt.Fprintf(&b, "  tid %s: wchan %s\n", e.Name(), wchan)
		for _, l := range strings.Split(strings.TrimSpace(string(stack)), "\n") {
			if l != "" {
				fmt.Fprintf(&b, "      %s\n", l)
			}
		}
	}
	return b.String()
}

// mappingsOf lists this process's mappings whose line contains sub.
func mappingsOf(sub string) []string {
	b, _ := os.ReadFile("/proc/self/maps")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return out
}

// TestEngineEventsCloseNoLeak: after targets that used every kind of event
// are gone, closing the server and the loader gives back every fd and
// mapping.
func TestEngineEventsCloseNoLeak(t *testing.T) {
	for _, bk := range engineBackings {
		t.Run(bk.name, func(t *testing.T) {
			requireUffd(t, bk.hugetlb)
			buildTarget(t)
			regions := testRegions()
			snap := writeSnapshot(t, regions, 2<<20)
			fdsBefore := countFDs(t)
			l, err := restore.NewLoader(context.Background(), snap, restore.WithBacking(bk.kind))
			if err != nil {
				t.Fatal(err)
			}
			s, sock := listen(t, FromLoader(l), Options{})
			dir := t.TempDir()
			var tgs []*target
			// They run at once: --remove is private (MADV_DONTNEED of its
			// own copy) so that no marker lands in the shared page cache
			// the others read; --mremap is shared (see hugePagesFree).
			for i, opts := range [][]string{{"--unmap-part"}, {"--mremap"}, {"--remove", "--private"}, {"--fork"}} {
				tgs = append(tgs, startTarget(t, sock, append(opts, "--dump", filepath.Join(dir, fmt.Sprint(i)))...))
			}
			for i, tg := range tgs {
				mustFinish(t, fmt.Sprint("target ", i), tg)
			}
			waitFor(t, 10*time.Second, "targets gone", func() bool { return len(s.Targets()) == 0 && l.Stats().Views == 0 })
			if err := s.Close(); err != nil {
				t.Error(err)
			}
			if err := l.Close(); err != nil {
				t.Error(err)
			}
			waitFor(t, 5*time.Second, "fds back", func() bool { return countFDs(t) == fdsBefore })
			// No mapping of the backing is left in this process either.
			for _, m := range mappingsOf("memfd:") {
				t.Errorf("mapping left after Close: %s", m)
			}
			// Huge pages are not counted here: the pool is shared with
			// whatever else runs on the machine, and on Linux 6.18 an mremap
			// of part of a MAP_PRIVATE hugetlb mapping leaks reservations
			// (HugePages_Rsvd grows by a few pages per run and stays, with
			// every process gone): a kernel accounting bug, not pages the
			// server keeps. testutil.Main checks the mappings and fds again.
		})
	}
}
