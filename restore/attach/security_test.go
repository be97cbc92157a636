package attach

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// The security tests run parts of themselves as uid 65534 in a copy of this
// test binary (the original sits in a 0700 directory); these environment
// variables choose which part.
func init() {
	switch {
	case os.Getenv("UR_SEC_EVIL") != "":
		os.Exit(evilServer(os.Getenv("UR_SEC_EVIL")))
	case os.Getenv("UR_SEC_RACE") != "":
		os.Exit(symlinkRacer(os.Getenv("UR_SEC_RACE"), os.Getenv("UR_SEC_VICTIM")))
	case os.Getenv("UR_SEC_ROPROBE") != "":
		os.Exit(readOnlyProbe(os.Getenv("UR_SEC_ROPROBE")))
	}
}

var (
	nobodyOnce sync.Once
	nobodyPath string
	nobodyErr  error
)

// nobodyCmd runs this test binary (copied where uid 65534 can execute it)
// as uid 65534 with env set.
func nobodyCmd(t *testing.T, env ...string) *exec.Cmd {
	t.Helper()
	testutil.RequireRoot(t)
	dir := sharedDir(t)
	nobodyOnce.Do(func() {
		exe, err := os.Executable()
		if err != nil {
			nobodyErr = err
			return
		}
		b, err := os.ReadFile(exe)
		if err != nil {
			nobodyErr = err
			return
		}
		nobodyPath = filepath.Join(dir, "attach.test")
		nobodyErr = os.WriteFile(nobodyPath, b, 0o755)
	})
	if nobodyErr != nil {
		t.Fatal(nobodyErr)
	}
	cmd := exec.Command(nobodyPath, "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	return cmd
}

// nobodyDir is a directory owned by uid 65534 (where it may bind a socket).
func nobodyDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp(sharedDir(t), "nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chown(d, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// evilServer listens on path like a server, hands the first peer a memfd
// full of "EVILEVIL" in a well-formed hello, and reports on stdout whether
// the peer sent back a file descriptor (its userfaultfd).
func evilServer(path string) int {
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		fmt.Println("evil: listen:", err)
		return 1
	}
	fmt.Println("listening")
	ln.SetDeadline(time.Now().Add(20 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		fmt.Println("evil: accept:", err)
		return 1
	}
	fd, err := unix.MemfdCreate("evil", unix.MFD_CLOEXEC)
	if err != nil {
		fmt.Println("evil: memfd:", err)
		return 1
	}
	unix.Pwrite(fd, bytes.Repeat([]byte("EVILEVIL"), 2*4096/8), 0)
	h := Hello{Type: TypeHello, Version: Version, Backing: BackingShmem, PageSize: 4096, ChunkSize: 4096,
		FileSize: 8192, Snapshot: "evil.snap", Regions: []Region{{Name: "data", Size: 8192, Length: 8192, Prot: 3}}}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	SendHello(func(v any, fds ...int) error { return SendMsg(c, v, fds...) }, h, fd) // fails if the peer already hung up
	raw, fds, err := RecvMsg(c)
	if len(fds) > 0 {
		fmt.Printf("GOT-FD %d (%s)\n", len(fds), raw)
		return 0
	}
	fmt.Printf("NO-FD (%v)\n", err)
	return 0
}

// startEvil starts evilServer as uid 65534 and waits until it listens.
func startEvil(t *testing.T) (sock string, result func() string) {
	t.Helper()
	sock = filepath.Join(nobodyDir(t), "app.sock")
	cmd := nobodyCmd(t, "UR_SEC_EVIL="+sock)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	rd := bufio.NewReader(out)
	line, err := rd.ReadString('\n')
	if err != nil || line != "listening\n" {
		t.Fatalf("fake server: %q %v", line, err)
	}
	return sock, func() string {
		done := make(chan string, 1)
		go func() { b, _ := io.ReadAll(rd); done <- string(b) }()
		select {
		case s := <-done:
			cmd.Wait()
			return s
		case <-time.After(30 * time.Second):
			t.Fatal("fake server did not finish")
			return ""
		}
	}
}

// TestUntrustedServerC: a server bound by uid 65534 where a root target
// connects gets no userfaultfd from the C client; the target maps nothing,
// dumps nothing, and names the server's uid. --server-uid trusts it.
func TestUntrustedServerC(t *testing.T) {
	testutil.RequireRoot(t)
	requireUffd(t, false)
	buildTarget(t)
	sock, result := startEvil(t)
	dump := filepath.Join(t.TempDir(), "d")
	tg := startTarget(t, sock, "--dump", dump)
	err := tg.wait(t, 20*time.Second)
	if err == nil || !strings.Contains(tg.stderr.String(), "runs as uid 65534") {
		t.Fatalf("root target against uid 65534's server: %v\n%s", err, tg.stderr)
	}
	if r := result(); !strings.HasPrefix(r, "NO-FD") {
		t.Fatalf("the fake server got a file descriptor from a root target: %s", r)
	}
	if _, err := os.Stat(dump); err == nil {
		t.Fatal("the target dumped the fake server's bytes")
	}
	t.Logf("refused: %s", strings.TrimSpace(tg.stderr.String()))

	// Named as trusted, the same server is believed (and gets the uffd).
	sock, result = startEvil(t)
	tg = startTarget(t, sock, "--server-uid", "65534")
	tg.wait(t, 20*time.Second)
	if r := result(); !strings.HasPrefix(r, "GOT-FD 1") {
		t.Fatalf("--server-uid 65534: the fake server got %s\ntarget: %s", r, tg.stderr)
	}
}

// TestUntrustedServerGo: the same for the Go client.
func TestUntrustedServerGo(t *testing.T) {
	testutil.RequireRoot(t)
	requireUffd(t, false)
	sock, result := startEvil(t)
	cl, err := Dial(sock, ClientOptions{Timeout: 10 * time.Second})
	if err == nil {
		cl.Close()
		t.Fatal("Dial attached to uid 65534's server")
	}
	if !errors.Is(err, ErrUntrustedServer) || !strings.Contains(err.Error(), "runs as uid 65534") {
		t.Fatalf("Dial: %v", err)
	}
	if r := result(); !strings.HasPrefix(r, "NO-FD") {
		t.Fatalf("the fake server got a file descriptor from the Go client: %s", r)
	}

	sock, result = startEvil(t)
	cl, err = Dial(sock, ClientOptions{Timeout: 10 * time.Second, ServerUID: 65534})
	if err == nil {
		cl.Close()
	}
	if r := result(); !strings.HasPrefix(r, "GOT-FD 1") {
		t.Fatalf("ServerUID 65534: the fake server got %s (Dial: %v)", r, err)
	}
}

// symlinkRacer, as uid 65534, moves the socket file away as soon as it
// appears in dir and puts a symlink to victim in its place, for a few
// seconds; it prints how many times it got the socket.
func symlinkRacer(dir, victim string) int {
	sock, moved := filepath.Join(dir, "s.sock"), filepath.Join(dir, "moved")
	n := 0
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); {
		if unix.Rename(sock, moved) == nil {
			unix.Symlink(victim, sock)
			unix.Unlink(moved)
			n++
		}
	}
	fmt.Println(n)
	return 0
}

// TestListenSymlinkRace: with a world-writable socket mode in a directory
// anyone may write (no sticky bit), a user racing rename + symlink against
// Listen never gets a root-owned file chmodded, and a Listen that succeeds
// had its own socket at the path.
func TestListenSymlinkRace(t *testing.T) {
	testutil.RequireRoot(t)
	vdir, err := os.MkdirTemp(sharedDir(t), "victim-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(vdir)
	os.Chmod(vdir, 0o755)
	victim := filepath.Join(vdir, "secret")
	if err := os.WriteFile(victim, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp(sharedDir(t), "open-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o777); err != nil { // world-writable, not sticky
		t.Fatal(err)
	}
	racer := nobodyCmd(t, "UR_SEC_RACE="+dir, "UR_SEC_VICTIM="+victim)
	var out bytes.Buffer
	racer.Stdout, racer.Stderr = &out, os.Stderr
	if err := racer.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { racer.Wait(); close(done) }()
	sock := filepath.Join(dir, "s.sock")
	var ok, refused int
	var lastErr error
loop:
	for {
		select {
		case <-done:
			break loop
		default:
		}
		if st, err := os.Lstat(sock); err == nil && st.Mode()&os.ModeSymlink != 0 {
			os.Remove(sock)
		}
		s, err := Listen(sock, nullBackend{}, Options{Mode: 0o666})
		if err != nil {
			refused++
			lastErr = err
			continue
		}
		ok++
		s.Close()
	}
	st, err := os.Stat(victim)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d listens, %d refused (last: %v); the racer moved the socket %s times", ok, refused, lastErr, strings.TrimSpace(out.String()))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("the victim file is now mode %v: Listen chmodded through the racer's symlink", st.Mode().Perm())
	}
	if ok == 0 {
		t.Fatal("no Listen succeeded: the race says nothing")
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".uffdrestore-bind-*"))
	if len(left) > 0 {
		t.Errorf("private bind directories left behind: %v", left)
	}
}

// readOnlyProbe, as the target's uid, connects to sock, takes the hello's
// backing fd and tries every way to write it; it prints what happened.
func readOnlyProbe(sock string) int {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		fmt.Println("probe:", err)
		return 1
	}
	_, fds, err := RecvMsg(c)
	if err != nil || len(fds) != 1 {
		fmt.Println("probe: hello:", err, len(fds))
		return 1
	}
	fd := fds[0]
	res := map[string]string{}
	e := func(err error) string {
		if err == nil {
			return "ok"
		}
		return err.Error()
	}
	_, err = unix.Pwrite(fd, []byte("x"), 0)
	res["write"] = e(err)
	m, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err == nil {
		unix.Munmap(m)
	}
	res["mmap_shared_rw"] = e(err)
	m, err = unix.Mmap(fd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err == nil {
		res["mprotect_rw"] = e(unix.Mprotect(m, unix.PROT_READ|unix.PROT_WRITE))
		unix.Munmap(m)
	}
	ro, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_RDWR, 0)
	if err == nil {
		unix.Close(ro)
	}
	res["reopen_rw"] = e(err)
	m, err = unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err == nil {
		unix.Munmap(m)
	}
	res["mmap_private_rw"] = e(err)
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
	return 0
}

// TestReadOnlyTargets: with ReadOnlyTargets a target of another uid cannot
// write the backing by any route (write, a shared writable mapping,
// mprotect, reopening it through /proc), yet maps it private; root targets
// mapping private get the snapshot's bytes through minor faults, and one
// asking for a shared mapping (which the kernel would not let it register)
// is told why not.
func TestReadOnlyTargets(t *testing.T) {
	testutil.RequireRoot(t)
	requireUffd(t, false)
	buildTarget(t)
	b := newFakeBackend(t, false, nil)
	dir, err := os.MkdirTemp(sharedDir(t), "ro-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "s.sock")
	probe := func(readOnly bool) map[string]string {
		t.Helper()
		s, err := Listen(sock, b, Options{Mode: 0o666, AllowUIDs: []uint32{65534}, ReadOnlyTargets: readOnly, Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		out, err := nobodyCmd(t, "UR_SEC_ROPROBE="+sock).Output()
		res := map[string]string{}
		if jerr := json.Unmarshal(out, &res); err != nil || jerr != nil {
			t.Fatalf("probe: %v %v: %s", err, jerr, out)
		}
		return res
	}
	// The default, documented: an allowed uid gets write access.
	if res := probe(false); res["write"] != "ok" || res["mmap_shared_rw"] != "ok" {
		t.Fatalf("without ReadOnlyTargets: %v (want write access, as PROTOCOL.md §6 says)", res)
	}
	res := probe(true)
	t.Logf("uid 65534 with ReadOnlyTargets: %v", res)
	for _, k := range []string{"write", "mmap_shared_rw", "mprotect_rw", "reopen_rw"} {
		if res[k] == "ok" || res[k] == "" {
			t.Errorf("%s: %q, want refused", k, res[k])
		}
	}
	if res["mmap_private_rw"] != "ok" {
		t.Errorf("mmap_private_rw: %s, want ok", res["mmap_private_rw"])
	}

	s, err := Listen(sock, b, Options{Mode: 0o666, ReadOnlyTargets: true, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, args := range [][]string{{"--private", "--write"}, {"--private", "--readonly"}} {
		dump := filepath.Join(t.TempDir(), "dump")
		tg := startTarget(t, sock, append(args, "--dump", dump)...)
		if err := tg.wait(t, 30*time.Second); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, tg.stderr)
		}
		if got, _ := os.ReadFile(dump); !bytes.Equal(got, b.want()) {
			t.Errorf("%v: dump differs from the snapshot", args)
		}
	}
	tg := startTarget(t, sock, "--readonly")
	if err := tg.wait(t, 30*time.Second); err == nil || !strings.Contains(tg.stderr.String(), "read-only access") {
		t.Fatalf("shared writable against a read-only server: %v\n%s", err, tg.stderr)
	}
	cl, err := Dial(sock, ClientOptions{Private: true})
	if err != nil {
		t.Fatal(err)
	}
	touchFromC(cl)
	var got []byte
	for _, r := range cl.Regions {
		got = append(got, r.Data...)
	}
	if !bytes.Equal(got, b.want()) {
		t.Error("Go client, private: bytes differ from the snapshot")
	}
	cl.Detach()
	if _, err := Dial(sock, ClientOptions{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "read-only access") {
		t.Fatalf("Go client, shared writable: %v", err)
	}
}

// TestUffdWithoutAPI: a userfaultfd that never had UFFDIO_API, or had it
// without minor faults, is refused before ready, naming the cause.
func TestUffdWithoutAPI(t *testing.T) {
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	_, sock := listen(t, b, Options{})
	for _, c := range []struct {
		name string
		open func() (int, error)
		want string
	}{
		{"no UFFDIO_API", func() (int, error) {
			fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
			if e != 0 {
				return -1, e
			}
			return int(fd), nil
		}, "has had no UFFDIO_API"},
		{"no minor faults", func() (int, error) {
			u, err := uffd.Open(uffd.OpenOptions{Via: uffd.ViaSyscall}, uffd.FeatureEventUnmap)
			if err != nil {
				return -1, err
			}
			return u.Fd(), nil
		}, "did not enable UFFD_FEATURE_MINOR_SHMEM"},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, h, fds := rawPeer(t, sock)
			defer CloseFDs(fds)
			r := h.Regions[0]
			m, err := uffd.Mmap(0, int(r.Size), unix.PROT_READ, unix.MAP_SHARED, fds[0], int64(r.Offset))
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			fd, err := c.open()
			if err != nil {
				testutil.Skip(t, "userfaultfd: %v", err)
			}
			defer unix.Close(fd)
			a := Attach{UffdFeatures: uint64(uffd.FeatureMinorShmem), Mappings: []Mapping{
				{Region: 0, BaseHostVirtAddr: uint64(m.Addr()), Size: r.Size, Offset: r.Offset, PageSize: h.PageSize}}}
			sendAttachFDs(conn, a, fd)
			expectRefusal(t, conn, c.want)
		})
	}
}

// TestDuplicateMembers: a member twice in one object is an error, at any
// depth, on both sides (never "the last one wins").
func TestDuplicateMembers(t *testing.T) {
	for _, c := range []struct{ msg, field string }{
		{`{"type":"ready","type":"error"}`, "type"},
		{`{"type":"attach","version":1,"version":2}`, "version"},
		{`{"type":"attach","mappings":[{"size":4096},{"offset":0,"size":1,"size":2}]}`, "mappings[1].size"},
		{`{"type":"stats","stats":{"a":{"b":1,"b":1}}}`, "stats.a.b"},
	} {
		_, err := PeekType([]byte(c.msg))
		var pe *ProtocolError
		if !errors.As(err, &pe) || pe.Field != c.field || !strings.Contains(err.Error(), "appears twice") {
			t.Errorf("%s: %v, want a duplicate-member error at %s", c.msg, err, c.field)
		}
	}
	for _, ok := range []string{`{"type":"ready","x":{"type":1},"y":[{"type":2},{"type":3}]}`, `{"type":"stats","stats":{}}`} {
		if _, err := PeekType([]byte(ok)); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}

	// The server refuses such an attach.
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	_, sock := listen(t, b, Options{})
	conn, _, fds := rawPeer(t, sock)
	CloseFDs(fds)
	if err := SendMsg(conn, []byte(`{"type":"attach","version":2,"version":2,"uffd_features":0,"mapping_count":1}`)); err != nil {
		t.Fatal(err)
	}
	expectRefusal(t, conn, `member "version" appears twice`)
}

// TestClientRejectsHello: a client that refuses a hello tells the server
// why with an error message before it closes (PROTOCOL.md §3.4).
func TestClientRejectsHello(t *testing.T) {
	buildTarget(t)
	memfd, err := unix.MemfdCreate("x", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(memfd)
	hb, _ := json.Marshal(testHello())
	bad := bytes.Replace(hb, []byte(`"version":2`), []byte(`"version":9`), 1)
	if bytes.Equal(bad, hb) {
		t.Fatal("the bad hello is the good one")
	}
	for _, client := range []string{"C", "Go"} {
		t.Run(client, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "s")
			ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			clientErr := make(chan error, 1)
			if client == "C" {
				tg := startTarget(t, sock)
				go func() { clientErr <- tg.wait(t, 20*time.Second) }()
			} else {
				go func() {
					cl, err := Dial(sock, ClientOptions{})
					if err == nil {
						cl.Close()
					}
					clientErr <- err
				}()
			}
			conn, err := ln.AcceptUnix()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			if err := SendMsg(conn, bad, memfd); err != nil {
				t.Fatal(err)
			}
			raw, fds, err := RecvMsg(conn)
			CloseFDs(fds)
			if err != nil {
				t.Fatalf("the %s client closed without saying why: %v", client, err)
			}
			var r Reply
			if err := Decode(raw, TypeError, &r); err != nil || !strings.Contains(r.Error, "version 9") {
				t.Fatalf("the %s client sent %s (%v), want an error naming version 9", client, raw, err)
			}
			if err := <-clientErr; err == nil {
				t.Fatal("the client accepted version 9")
			}
		})
	}
}

// TestShutdownDuringHandshake: shutdown never precedes ready (PROTOCOL.md
// §3.7): a target whose handshake is in progress when the server starts
// stopping gets ready, then shutdown, and may still detach.
func TestShutdownDuringHandshake(t *testing.T) {
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	s, sock := listen(t, b, Options{})
	conn, h, fds := rawPeer(t, sock)
	defer CloseFDs(fds)
	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stopped <- s.Shutdown(ctx)
	}()
	waitFor(t, 5*time.Second, "no longer accepting", func() bool {
		c, err := net.Dial("unixpacket", sock)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	r := h.Regions[0]
	m, err := uffd.Mmap(0, int(r.Size), unix.PROT_READ, unix.MAP_SHARED, fds[0], int64(r.Offset))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	u, err := uffd.Open(uffd.OpenOptions{NonBlock: true}, uffd.FeatureMinorShmem)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if _, err := u.Register(m.Addr(), uintptr(r.Size), uffd.ModeMinor|uffd.ModeMissing); err != nil {
		t.Fatal(err)
	}
	a := Attach{UffdFeatures: uint64(uffd.FeatureMinorShmem), Mappings: []Mapping{
		{Region: 0, BaseHostVirtAddr: uint64(m.Addr()), Size: r.Size, Offset: r.Offset, PageSize: h.PageSize}}}
	sendAttachFDs(conn, a, u.Fd())
	var types []string
	for len(types) < 2 {
		raw, fds, err := RecvMsg(conn)
		CloseFDs(fds)
		if err != nil {
			t.Fatalf("after %v: %v", types, err)
		}
		typ, _ := PeekType(raw)
		types = append(types, typ)
	}
	if types[0] != TypeReady || types[1] != TypeShutdown {
		t.Fatalf("got %v, want ready then shutdown", types)
	}
	if err := SendMsg(conn, Reply{Type: TypeDetach}); err != nil {
		t.Fatal(err)
	}
	raw, _, err := RecvMsg(conn)
	if typ, _ := PeekType(raw); err != nil || typ != TypeBye {
		t.Fatalf("after detach: %s %v, want bye", raw, err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestBytesBetweenRegions: a target mapping the whole backing file (region
// "") reads each region's bytes at its offset and zeros everywhere else —
// the rest of a region's last chunk and after the last region (PROTOCOL.md
// §3.1) — served by the real engine.
func TestBytesBetweenRegions(t *testing.T) {
	requireUffd(t, false)
	regions := []snapRegion{{"a", 0, memImage(5000, 11)}, {"b", 0, memImage(70000, 12)}, {"c", 0, []byte{7, 7, 7}}}
	for i := range regions { // no zero bytes, so a stray zero is visible
		for j := range regions[i].data {
			regions[i].data[j] |= 1
		}
	}
	snap := writeSnapshot(t, regions, 64<<10)
	l := newLoader(t, snap, restore.BackingShmem)
	_, sock := listen(t, FromLoader(l), Options{})
	conn, h, fds := rawPeer(t, sock)
	defer CloseFDs(fds)
	m, err := uffd.Mmap(0, int(h.FileSize), unix.PROT_READ, unix.MAP_SHARED, fds[0], 0)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	u, err := uffd.Open(uffd.OpenOptions{NonBlock: true}, uffd.FeatureMinorShmem|uffd.FeatureMissingShmem)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if _, err := u.Register(m.Addr(), uintptr(h.FileSize), uffd.ModeMinor|uffd.ModeMissing); err != nil {
		t.Fatal(err)
	}
	a := Attach{UffdFeatures: uint64(uffd.FeatureMinorShmem | uffd.FeatureMissingShmem), Mappings: []Mapping{
		{Region: NoRegion, BaseHostVirtAddr: uint64(m.Addr()), Size: h.FileSize, PageSize: h.PageSize}}}
	sendAttachFDs(conn, a, u.Fd())
	raw, _, err := RecvMsg(conn)
	if typ, _ := PeekType(raw); err != nil || typ != TypeReady {
		t.Fatalf("attach of the whole file: %s %v", raw, err)
	}
	want := make([]byte, h.FileSize)
	gaps := 0
	for i, r := range h.Regions {
		copy(want[r.Offset:], regions[i].data)
		next := h.FileSize
		if i+1 < len(h.Regions) {
			next = h.Regions[i+1].Offset
		}
		gaps += int(next - r.Offset - r.Length)
	}
	if gaps == 0 {
		t.Fatal("the layout has no bytes between regions: the test says nothing")
	}
	got := m.Bytes()
	if !bytes.Equal(got, want) {
		i := firstDiff(got, want)
		t.Fatalf("byte %d of the file: %d, want %d (regions %+v)", i, got[i], want[i], h.Regions)
	}
	t.Logf("%d bytes outside the regions read as zeros", gaps)
	SendMsg(conn, Reply{Type: TypeDetach})
	RecvMsg(conn)
}
