package attach

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// binDir holds what the tests compile once per test binary (the C target).
var (
	binDir     string
	binDirOnce sync.Once
	targetOnce sync.Once
	targetPath string
	targetErr  error
)

func TestMain(m *testing.M) {
	if path := os.Getenv("UR_ATTACH_TEST_SERVER"); path != "" {
		os.Exit(helperServer(path))
	}
	if mode := os.Getenv("UR_ATTACH_TEST_LIAR"); mode != "" {
		os.Exit(helperLiar(mode, os.Getenv("UR_ATTACH_TEST_LIAR_SOCK")))
	}
	code := testutil.Main(m)
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// sharedDir is a 0755 directory for this test binary (so a child running
// as another uid can reach what is in it).
func sharedDir(t testing.TB) string {
	binDirOnce.Do(func() {
		d, err := os.MkdirTemp("", "uffdrestore-attach-test-")
		if err == nil {
			err = os.Chmod(d, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
		binDir = d
	})
	return binDir
}

// cflags are the Makefile's flags for the C client and target.
var cflags = []string{"-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"}

func csrcDir(t testing.TB) string {
	d, err := filepath.Abs("../../csrc")
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// buildTarget compiles csrc/target.c + csrc/ur_client.c with gcc, once per
// test binary.
func buildTarget(t testing.TB) string {
	t.Helper()
	dir := sharedDir(t)
	targetOnce.Do(func() {
		if _, err := exec.LookPath("gcc"); err != nil {
			targetErr = fmt.Errorf("gcc not found: %w", err)
			return
		}
		src := csrcDir(t)
		out := filepath.Join(dir, "uffdrestore-target")
		args := append(append([]string{}, cflags...), "-I"+src, "-o", out, filepath.Join(src, "target.c"), filepath.Join(src, "ur_client.c"))
		if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			targetErr = fmt.Errorf("gcc %s: %v\n%s", strings.Join(args, " "), err, b)
			return
		}
		targetPath = out
	})
	if targetErr != nil {
		if strings.Contains(targetErr.Error(), "gcc not found") {
			testutil.Skip(t, "%v", targetErr)
		}
		t.Fatal(targetErr)
	}
	return targetPath
}

// requireUffd skips unless this process may create a full userfaultfd with
// minor faults on the backing.
func requireUffd(t testing.TB, hugetlb bool) {
	t.Helper()
	f := uffd.FeatureMinorShmem
	if hugetlb {
		f = uffd.FeatureMinorHugetlbfs
	}
	have, _, err := uffd.Supported(uffd.OpenOptions{Via: uffd.ViaSyscall})
	if err != nil {
		testutil.Skip(t, "userfaultfd: %v", err)
	}
	if have&f == 0 {
		testutil.Skip(t, "kernel lacks minor faults for this backing")
	}
	if hugetlb {
		testutil.RequireHugePages(t, 16)
	}
}

// fakeBackend is a small stand-in for the restore engine: a memfd holding a
// generated image, filled chunk by chunk on the first fault, one goroutine
// per view answering with UFFDIO_CONTINUE. It lets the protocol tests run
// without the engine; the engine tests in engine_test.go use the real one.
type fakeBackend struct {
	fd        *uffd.File
	alias     *uffd.Mapping
	hello     Hello
	image     []byte // the file's intended bytes (regions at their offsets)
	chunks    []sync.Once
	fills     atomic.Int64
	faults    atomic.Int64
	attachErr error

	mu    sync.Mutex
	views map[*fakeView]struct{}
}

type regionSpec struct {
	name   string
	length uint64
	addr   uint64
}

func defaultRegions(page uint64) []regionSpec {
	return []regionSpec{
		{"text", 3*page + 100, 0x400000},
		{"heap", 9 * page, 0x7f0000000000},
		{"stack", page - 5, 0},
		{"tail", 17, 0},
	}
}

func newFakeBackend(t testing.TB, hugetlb bool, specs []regionSpec) *fakeBackend {
	t.Helper()
	page, chunk := uint64(4096), uint64(16<<10)
	backing := BackingShmem
	if hugetlb {
		page, chunk, backing = 2<<20, 2<<20, BackingHugetlb
	}
	if specs == nil {
		specs = defaultRegions(page)
	}
	h := Hello{Backing: backing, PageSize: page, ChunkSize: chunk, Snapshot: "fake.snap"}
	var off uint64
	for _, s := range specs {
		size := (s.length + page - 1) / page * page
		h.Regions = append(h.Regions, Region{Name: s.name, Offset: off, Size: size, Length: s.length, Addr: s.addr, Prot: 3})
		off += (size + chunk - 1) / chunk * chunk
	}
	h.FileSize = off
	b := &fakeBackend{hello: h, image: make([]byte, off), chunks: make([]sync.Once, off/chunk), views: map[*fakeView]struct{}{}}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, r := range h.Regions {
		for i := r.Offset; i < r.Offset+r.Length; i++ {
			b.image[i] = byte(rng.Uint32())
		}
		// A zero page in the middle of each big region.
		if r.Length > 2*page {
			clear(b.image[r.Offset+page : r.Offset+2*page])
		}
	}
	f, err := uffd.MemfdCreate("uffdrestore-attach-fake", hugetlb, 0)
	if err != nil {
		t.Fatalf("memfd: %v", err)
	}
	if err := uffd.Ftruncate(f.Fd(), int64(off)); err != nil {
		f.Close()
		t.Fatal(err)
	}
	if err := uffd.AddSeals(f.Fd(), unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
		f.Close()
		t.Fatal(err)
	}
	b.fd = f
	b.alias, err = uffd.Mmap(0, int(off), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, f.Fd(), 0)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(b.close)
	return b
}

func (b *fakeBackend) close() {
	b.mu.Lock()
	views := make([]*fakeView, 0, len(b.views))
	for v := range b.views {
		views = append(views, v)
	}
	b.mu.Unlock()
	for _, v := range views {
		v.Close()
	}
	b.alias.Close()
	b.fd.Close()
}

// want returns the bytes a --dump of every region must produce.
func (b *fakeBackend) want() []byte {
	var out []byte
	for _, r := range b.hello.Regions {
		out = append(out, b.image[r.Offset:r.Offset+r.Length]...)
	}
	return out
}

func (b *fakeBackend) Hello() Hello            { return b.hello }
func (b *fakeBackend) BackingFile() *uffd.File { return b.fd }

func (b *fakeBackend) liveViews() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.views)
}

func (b *fakeBackend) AttachView(u *uffd.FD, ranges []Range, name string) (View, error) {
	if b.attachErr != nil {
		u.Close()
		return nil, b.attachErr
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		u.Close()
		return nil, err
	}
	v := &fakeView{b: b, u: u, ranges: ranges, wake: wake, done: make(chan struct{}), exited: make(chan struct{})}
	b.mu.Lock()
	b.views[v] = struct{}{}
	b.mu.Unlock()
	go v.loop()
	return v, nil
}

type fakeView struct {
	b      *fakeBackend
	u      *uffd.FD
	ranges []Range
	wake   int
	done   chan struct{}
	exited chan struct{}
	once   sync.Once
	err    error
	faults atomic.Int64
}

func (v *fakeView) loop() {
	defer close(v.exited)
	buf := uffd.NewMsgBuf(16)
	msgs := make([]uffd.Msg, 16)
	for {
		_, woken, _, err := uffd.Poll(v.u.Fd(), v.wake, -1)
		if err != nil {
			v.fail(err)
			return
		}
		if woken {
			return
		}
		n, err := v.u.ReadMsgs(buf, msgs)
		if err != nil {
			v.fail(err)
			return
		}
		for _, m := range msgs[:n] {
			switch m.Event {
			case uffd.EventPagefault:
				if err := v.resolve(uintptr(m.Address)); err != nil {
					v.fail(err)
					return
				}
			case uffd.EventFork:
				unix.Close(int(m.ForkUFD))
			}
		}
	}
}

func (v *fakeView) fail(err error) {
	v.once.Do(func() { v.err = err; close(v.done) })
}

func (v *fakeView) resolve(addr uintptr) error {
	b := v.b
	ps := uintptr(b.hello.PageSize)
	addr &^= ps - 1
	for _, r := range v.ranges {
		if addr < r.Base || addr >= r.Base+uintptr(r.Size) {
			continue
		}
		off := r.Offset + uint64(addr-r.Base)
		c := off / b.hello.ChunkSize
		b.chunks[c].Do(func() {
			lo, hi := c*b.hello.ChunkSize, min((c+1)*b.hello.ChunkSize, b.hello.FileSize)
			copy(b.alias.Bytes()[lo:hi], b.image[lo:hi])
			b.fills.Add(1)
		})
		v.faults.Add(1)
		b.faults.Add(1)
		_, err := v.u.Continue(addr, ps, false)
		return err
	}
	return fmt.Errorf("fault at %#x outside every range", addr)
}

func (v *fakeView) Done() <-chan struct{} { return v.done }
func (v *fakeView) Err() error {
	select {
	case <-v.done:
		return v.err
	default:
		return nil
	}
}
func (v *fakeView) Stats() restore.Stats {
	return restore.Stats{FaultsMissing: v.faults.Load(), FilledByFault: v.b.fills.Load()}
}

func (v *fakeView) Close() error {
	v.b.mu.Lock()
	_, live := v.b.views[v]
	delete(v.b.views, v)
	v.b.mu.Unlock()
	if !live {
		return os.ErrClosed
	}
	unix.Write(v.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	<-v.exited
	v.once.Do(func() { close(v.done) })
	unix.Close(v.wake)
	return v.u.Close()
}

// target is a running C target.
type target struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *lineBuf
	stderr *lineBuf
	done   chan struct{}
	err    error
}

// lineBuf collects stderr and lets a test wait for a line.
type lineBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lineBuf) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(b)
}

func (l *lineBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *lineBuf) wait(t testing.TB, sub string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if strings.Contains(l.String(), sub) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no %q on the target's stderr within %v; stderr:\n%s", sub, d, l.String())
}

func startTarget(t testing.TB, sock string, args ...string) *target {
	t.Helper()
	return startTargetCmd(t, exec.Command(buildTarget(t), append([]string{"--socket", sock}, args...)...))
}

func startTargetCmd(t testing.TB, cmd *exec.Cmd) *target {
	t.Helper()
	tg := &target{cmd: cmd, stdout: &lineBuf{}, stderr: &lineBuf{}, done: make(chan struct{})}
	cmd.Stdout = tg.stdout
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = pw
	tg.stdin, err = cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		t.Fatal(err)
	}
	pw.Close()
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewReader(pr)
		for {
			line, err := sc.ReadString('\n')
			tg.stderr.mu.Lock()
			tg.stderr.buf.WriteString(line)
			tg.stderr.mu.Unlock()
			if err != nil {
				pr.Close()
				return
			}
		}
	}()
	go func() {
		tg.err = cmd.Wait()
		<-copied
		close(tg.done)
	}()
	t.Cleanup(func() {
		select {
		case <-tg.done:
		default:
			cmd.Process.Kill()
			<-tg.done
		}
		tg.stdin.Close()
	})
	return tg
}

func (tg *target) wait(t testing.TB, d time.Duration) error {
	t.Helper()
	select {
	case <-tg.done:
		return tg.err
	case <-time.After(d):
		tg.cmd.Process.Kill()
		<-tg.done
		t.Fatalf("target did not finish within %v; stderr:\n%s", d, tg.stderr.String())
		return nil
	}
}

// result is the target's JSON line.
type result struct {
	ReadyMS     float64 `json:"ready_ms"`
	FirstByteMS float64 `json:"first_byte_ms"`
	TouchMS     float64 `json:"touch_ms"`
	Pages       uint64  `json:"pages"`
	PageSize    uint64  `json:"page_size"`
	Threads     int     `json:"threads"`
	Pattern     string  `json:"pattern"`
	Private     bool    `json:"private"`
	Lat         struct {
		P50, P90, P99, Max float64
	} `json:"lat_us"`
	Regions int             `json:"regions"`
	Bytes   uint64          `json:"bytes"`
	Backing string          `json:"backing"`
	Stats   json.RawMessage `json:"stats"`
}

func (tg *target) result(t testing.TB) result {
	t.Helper()
	var r result
	if err := json.Unmarshal([]byte(tg.stdout.String()), &r); err != nil {
		t.Fatalf("target output %q: %v", tg.stdout.String(), err)
	}
	return r
}

// countFDs counts this process's open fds.
func countFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// waitFor polls cond for up to d.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
		runtime.Gosched()
	}
}

// socketPair returns two connected SOCK_SEQPACKET *net.UnixConns.
func socketPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	a, b := conv(fds[0]), conv(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// helperServer runs a fake-backend server in this (child) process until it
// is killed: for the test that kills the server under an attached target.
func helperServer(path string) int {
	var b Backend
	if snap := os.Getenv("UR_ATTACH_TEST_SNAP"); snap != "" {
		kind, err := restore.ParseBacking(os.Getenv("UR_ATTACH_TEST_BACKING"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper server:", err)
			return 1
		}
		if os.Getenv("UR_ATTACH_TEST_ADOPT") == "1" {
			b, err = helperAdopt(snap, kind)
		} else {
			var l *restore.Loader
			if l, err = restore.NewLoader(context.Background(), snap, restore.WithBacking(kind)); err == nil {
				defer l.Close()
				b = FromLoader(l)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper server:", err)
			return 1
		}
	} else {
		b = newFakeBackend(&helperTB{}, os.Getenv("UR_ATTACH_TEST_HUGETLB") == "1", nil)
	}
	s, err := Listen(path, b, Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper server:", err)
		return 1
	}
	defer s.Close()
	fmt.Println("serving")
	for { // until the test kills this process
		time.Sleep(time.Hour)
	}
}

// helperTB is enough of testing.TB for newFakeBackend in a helper process.
type helperTB struct{ testing.TB }

func (helperTB) Helper()           {}
func (helperTB) Cleanup(func())    {}
func (helperTB) Fatal(args ...any) { fmt.Fprintln(os.Stderr, args...); os.Exit(1) }
func (helperTB) Fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// helperAdopt is what `load --adopt` serves: snap announced for kind, the
// backing adopted from the first re-attaching target.
func helperAdopt(snap string, kind restore.BackingKind) (Backend, error) {
	lay, id, err := restore.PlanLayout(snap, restore.WithBacking(kind))
	if err != nil {
		return nil, err
	}
	return NewAdoptBackend(HelloOf(lay, id), func(fd int) (Backend, error) {
		l, _, err := restore.AdoptLoader(context.Background(), snap, fd)
		if err != nil {
			return nil, err
		}
		return FromLoader(l), nil
	}), nil
}

// touchFromC touches every page of the client's regions from C before Go
// code reads them: a goroutine waiting in a fault in Go code (a copy) holds
// its P and cannot be stopped, so a garbage collection in this process,
// whose server must answer that fault, would wait for it forever.
func touchFromC(cl *Client) {
	ps := int(cl.Hello.PageSize)
	for _, r := range cl.Regions {
		if len(r.Data) > 0 {
			touch.Touch(uintptr(unsafe.Pointer(&r.Data[0])), len(r.Data), ps, false, nil, nil)
		}
	}
}
