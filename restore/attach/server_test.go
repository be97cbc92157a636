package attach

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// TestCCompiles builds the client library and the target with the
// Makefile's flags, warnings as errors, also as a shared object.
func TestCCompiles(t *testing.T) {
	buildTarget(t)
	src := csrcDir(t)
	dir := t.TempDir()
	args := append(append([]string{}, cflags...), "-fPIC", "-shared", "-I"+src, "-o", filepath.Join(dir, "libuffdrestore.so"), filepath.Join(src, "ur_client.c"))
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %v: %v\n%s", args, err, b)
	}
	// The header is usable on its own, from C and (if present) C++.
	hdr := filepath.Join(dir, "h.c")
	os.WriteFile(hdr, []byte("#include \"ur_client.h\"\nint main(void){return ur_strerror(UR_EREFUSED)[0]==0;}\n"), 0o644)
	args = append(append([]string{}, cflags...), "-I"+src, "-o", filepath.Join(dir, "h"), hdr, filepath.Join(src, "ur_client.c"))
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %v: %v\n%s", args, err, b)
	}
}

// listen starts a server on a fake backend in a fresh directory.
func listen(t *testing.T, b Backend, o Options) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	if o.Logf == nil {
		o.Logf = t.Logf
	}
	s, err := Listen(sock, b, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, sock
}

func backingName(hugetlb bool) string {
	if hugetlb {
		return "hugetlb"
	}
	return "shmem"
}

// TestCTargets attaches several C targets at once, shared and private, and
// checks each --dump is the image byte for byte and each chunk was filled
// once for all of them.
func TestCTargets(t *testing.T) {
	for _, hugetlb := range []bool{false, true} {
		for _, private := range []bool{false, true} {
			for _, n := range []int{2, 8} {
				name := fmt.Sprintf("%s/private=%v/targets=%d", backingName(hugetlb), private, n)
				t.Run(name, func(t *testing.T) {
					requireUffd(t, hugetlb)
					b := newFakeBackend(t, hugetlb, nil)
					s, sock := listen(t, b, Options{})
					want := b.want()
					dir := t.TempDir()
					var tgs []*target
					patterns := []string{"sequential", "random", "fraction:0.5"}
					for i := 0; i < n; i++ {
						args := []string{"--dump", filepath.Join(dir, fmt.Sprint(i)), "--pattern", patterns[i%3],
							"--threads", fmt.Sprint(1 + i%3), "--seed", fmt.Sprint(i), "--stats"}
						if private {
							args = append(args, "--private", "--write")
						}
						tgs = append(tgs, startTarget(t, sock, args...))
					}
					for i, tg := range tgs {
						if err := tg.wait(t, 60*time.Second); err != nil {
							t.Fatalf("target %d: %v\n%s", i, err, tg.stderr)
						}
						r := tg.result(t)
						if r.Backing != backingName(hugetlb) || r.Regions != len(b.hello.Regions) || r.Private != private {
							t.Errorf("target %d: result %+v", i, r)
						}
						if len(r.Stats) == 0 || !bytes.Contains(r.Stats, []byte(`"faults_missing"`)) {
							t.Errorf("target %d: stats %s", i, r.Stats)
						}
						got, err := os.ReadFile(filepath.Join(dir, fmt.Sprint(i)))
						if err != nil {
							t.Fatal(err)
						}
						if !bytes.Equal(got, want) {
							t.Fatalf("target %d: dump differs from the image (%d vs %d bytes, first difference at %d)", i, len(got), len(want), firstDiff(got, want))
						}
					}
					// Every chunk a region touches, filled exactly once.
					var chunks int64
					for _, r := range b.hello.Regions {
						chunks += int64((r.Size + b.hello.ChunkSize - 1) / b.hello.ChunkSize)
					}
					if got := b.fills.Load(); got != chunks {
						t.Errorf("fills = %d, want %d (each chunk once)", got, chunks)
					}
					waitFor(t, 5*time.Second, "views closed", func() bool { return b.liveViews() == 0 && len(s.Targets()) == 0 })
					if private {
						// Writes stayed private: the backing still holds the image.
						for _, r := range b.hello.Regions {
							if !bytes.Equal(b.alias.Bytes()[r.Offset:r.Offset+r.Length], b.image[r.Offset:r.Offset+r.Length]) {
								t.Errorf("region %s: the backing changed under private targets", r.Name)
							}
						}
					}
				})
			}
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestGoClient attaches a Go target, reads every region, asks for stats
// and detaches.
func TestGoClient(t *testing.T) {
	for _, hugetlb := range []bool{false, true} {
		t.Run(backingName(hugetlb), func(t *testing.T) {
			requireUffd(t, hugetlb)
			b := newFakeBackend(t, hugetlb, nil)
			var mu sync.Mutex
			var ended []TargetInfo
			s, sock := listen(t, b, Options{OnDetach: func(ti TargetInfo) { mu.Lock(); ended = append(ended, ti); mu.Unlock() }})
			fds := countFDs(t)
			cl, err := Dial(sock, ClientOptions{Private: true})
			if err != nil {
				t.Fatal(err)
			}
			if len(s.Targets()) != 1 {
				t.Errorf("Targets() = %v", s.Targets())
			}
			var got []byte
			for _, r := range cl.Regions {
				// Touch from C (a P-free thread), then copy from Go: both
				// fault into the server, which is another goroutine here,
				// so only the C touch is safe for any GOMAXPROCS.
				if len(r.Data) > 0 {
					touch.Touch(uintptr(unsafe.Pointer(unsafe.SliceData(r.Data))), len(r.Data), int(b.hello.PageSize), false, nil, nil)
				}
				got = append(got, r.Data...)
			}
			if !bytes.Equal(got, b.want()) {
				t.Fatalf("regions differ from the image at %d", firstDiff(got, b.want()))
			}
			st, err := cl.Stats()
			if err != nil || !bytes.Contains(st, []byte(`"faults_missing"`)) {
				t.Fatalf("Stats = %s, %v", st, err)
			}
			if _, err := cl.Detach(); err != nil {
				t.Fatal(err)
			}
			if _, err := cl.Stats(); !errors.Is(err, os.ErrClosed) {
				t.Errorf("Stats after Detach: %v", err)
			}
			waitFor(t, 5*time.Second, "detach seen", func() bool { mu.Lock(); defer mu.Unlock(); return len(ended) == 1 })
			if ended[0].Reason != "detach" {
				t.Errorf("reason %q", ended[0].Reason)
			}
			waitFor(t, 5*time.Second, "fds back", func() bool { return countFDs(t) == fds })
		})
	}
}

// rawPeer connects without the client library, for hostile peers.
func rawPeer(t *testing.T, sock string) (*net.UnixConn, Hello, []int) {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	h, fds, err := RecvHello(func() ([]byte, []int, error) { return RecvMsg(c) })
	if err != nil {
		t.Fatal(err)
	}
	return c, h, fds
}

// sendAttachFDs sends a's header with fds (any number), then its mappings
// in batches.
func sendAttachFDs(c *net.UnixConn, a Attach, fds ...int) {
	a.Type, a.MappingCount = TypeAttach, len(a.Mappings)
	if a.Version == 0 {
		a.Version = Version
	}
	SendMsg(c, a, fds...)
	batches, _ := encodeBatches(TypeMappings, a.Mappings)
	for _, b := range batches {
		SendMsg(c, b)
	}
}

// expectRefusal reads the server's answer: an error message containing
// want, then the close.
func expectRefusal(t *testing.T, c *net.UnixConn, want string) {
	t.Helper()
	raw, fds, err := RecvMsg(c)
	CloseFDs(fds)
	if err != nil {
		t.Fatalf("expected an error message with %q, got %v", want, err)
	}
	var r Reply
	if err := json.Unmarshal(raw, &r); err != nil || r.Type != TypeError || !strings.Contains(r.Error, want) {
		t.Fatalf("got %s, want an error containing %q", raw, want)
	}
	if _, _, err := RecvMsg(c); !errors.Is(err, ErrClosed) {
		t.Fatalf("after the error: %v, want the server to close", err)
	}
}

// TestHostilePeers sends what a broken or malicious target might; each is
// refused with a message naming the problem, and the server goes on
// serving a good target.
func TestHostilePeers(t *testing.T) {
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	s, sock := listen(t, b, Options{HandshakeTimeout: 2 * time.Second})
	uf := func(t *testing.T) *uffd.FD {
		u, err := uffd.Open(uffd.OpenOptions{NonBlock: true}, uffd.FeatureMinorShmem)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { u.Close() })
		return u
	}
	// A valid attach for h, mapping region 0 at a real address.
	valid := func(t *testing.T, h Hello, backing int) (Attach, *uffd.FD) {
		r := h.Regions[0]
		m, err := uffd.Mmap(0, int(r.Size), unix.PROT_READ, unix.MAP_SHARED, backing, int64(r.Offset))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		u := uf(t)
		if _, err := u.Register(m.Addr(), uintptr(r.Size), uffd.ModeMinor|uffd.ModeMissing); err != nil {
			t.Fatal(err)
		}
		return Attach{Type: TypeAttach, Version: Version, UffdFeatures: uint64(u.Features()), Mappings: []Mapping{
			{Region: 0, BaseHostVirtAddr: uint64(m.Addr()), Size: r.Size, Offset: r.Offset, PageSize: h.PageSize},
		}}, u
	}
	cases := []struct {
		name string
		send func(t *testing.T, c *net.UnixConn, h Hello, backing int)
		want string
	}{
		{"garbage json", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			SendMsg(c, []byte(`{"type":"attach",`))
		}, "malformed JSON"},
		{"not utf8", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			SendMsg(c, []byte("{\"type\":\"attach\",\"x\":\"\xfe\"}"))
		}, "not valid UTF-8"},
		{"unknown type", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			SendMsg(c, []byte(`{"type":"gimme"}`))
		}, `unknown message type "gimme"`},
		{"wrong message", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			SendMsg(c, Reply{Type: TypeDetach})
		}, `expected a "attach" message, got "detach"`},
		{"huge", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			rc, _ := c.SyscallConn()
			rc.Write(func(fd uintptr) bool {
				unix.Sendmsg(int(fd), bytes.Repeat([]byte(" "), 200<<10), nil, nil, 0)
				return true
			})
		}, "message too large"},
		{"zero fds", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, _ := valid(t, h, backing)
			sendAttachFDs(c, a)
		}, "fds: 0 file descriptors"},
		{"two fds", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			sendAttachFDs(c, a, u.Fd(), u.Fd())
		}, "fds: 2 file descriptors"},
		{"five fds", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			sendAttachFDs(c, a, u.Fd(), u.Fd(), u.Fd(), u.Fd(), u.Fd())
		}, "message too large"},
		{"not a uffd", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, _ := valid(t, h, backing)
			sendAttachFDs(c, a, backing)
		}, "not a userfaultfd"},
		{"version", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			a.Version = 7
			sendAttachFDs(c, a, u.Fd())
		}, "version: protocol version 7"},
		{"version 1", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			// A version-1 attach: mappings inline, regions by name.
			_, u := valid(t, h, backing)
			SendMsg(c, []byte(`{"type":"attach","version":1,"uffd_features":0,"mappings":[{"region":"text","base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"private":false}]}`), u.Fd())
		}, "version: protocol version 1, the server speaks 2 (the peer is older: rebuild it"},
		{"region by name", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			SendMsg(c, Attach{Type: TypeAttach, Version: Version, MappingCount: 1}, u.Fd())
			SendMsg(c, []byte(fmt.Sprintf(`{"type":"mappings","first":0,"mappings":[{"region":"text","base_host_virt_addr":%d,"size":%d,"offset":0,"page_size":%d}]}`,
				a.Mappings[0].BaseHostVirtAddr, a.Mappings[0].Size, h.PageSize)))
		}, "mappings.region: wrong JSON type"},
		{"batch out of order", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			SendMsg(c, Attach{Type: TypeAttach, Version: Version, MappingCount: 1}, u.Fd())
			SendMsg(c, Batch{Type: TypeMappings, First: 1, Mappings: a.Mappings})
		}, "mappings message: first: 1, expected 0"},
		{"batch past the count", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			SendMsg(c, Attach{Type: TypeAttach, Version: Version, MappingCount: 1}, u.Fd())
			SendMsg(c, Batch{Type: TypeMappings, Mappings: append(a.Mappings, a.Mappings...)})
		}, "2 more, but the attach announced 1"},
		{"batch with an fd", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			SendMsg(c, Attach{Type: TypeAttach, Version: Version, MappingCount: 1}, u.Fd())
			SendMsg(c, Batch{Type: TypeMappings, Mappings: a.Mappings}, backing)
		}, "1 file descriptors came with a \"mappings\" message"},
		{"mappings missing", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			_, u := valid(t, h, backing)
			SendMsg(c, Attach{Type: TypeAttach, Version: Version, MappingCount: 3}, u.Fd())
		}, "no complete attach within 2s (it announced 3 mappings)"},
		{"outside file", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			a.Mappings[0].Region = NoRegion
			a.Mappings[0].Offset = h.FileSize
			sendAttachFDs(c, a, u.Fd())
		}, "mappings[0].size: file range"},
		{"misaligned", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			a.Mappings[0].BaseHostVirtAddr += 100
			sendAttachFDs(c, a, u.Fd())
		}, "mappings[0].base_host_virt_addr"},
		{"no mappings", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {
			a, u := valid(t, h, backing)
			a.Mappings = nil
			sendAttachFDs(c, a, u.Fd())
		}, "mapping_count: 0 mappings"},
		{"silent", func(t *testing.T, c *net.UnixConn, h Hello, backing int) {}, "no attach message within"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn, h, bfds := rawPeer(t, sock)
			if len(bfds) != 1 {
				t.Fatalf("hello came with %d fds", len(bfds))
			}
			c.send(t, conn, h, bfds[0])
			expectRefusal(t, conn, c.want)
			CloseFDs(bfds)
			conn.Close()
		})
	}
	// After all that, a good target is served.
	dump := filepath.Join(t.TempDir(), "dump")
	tg := startTarget(t, sock, "--dump", dump)
	if err := tg.wait(t, 30*time.Second); err != nil {
		t.Fatalf("good target after hostile peers: %v\n%s", err, tg.stderr)
	}
	if got, _ := os.ReadFile(dump); !bytes.Equal(got, b.want()) {
		t.Error("good target's dump differs")
	}
	waitFor(t, 5*time.Second, "no targets", func() bool { return len(s.Targets()) == 0 })
}

// TestAttachAfterReady: messages after ready other than stats/detach are
// refused, and the view is freed.
func TestAfterReady(t *testing.T) {
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	s, sock := listen(t, b, Options{})
	cl, err := Dial(sock, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := SendMsg(cl.c, Attach{Type: TypeAttach, Version: Version}); err != nil {
		t.Fatal(err)
	}
	expectRefusal(t, cl.c, `a "attach" message is not valid after ready`)
	waitFor(t, 5*time.Second, "view freed", func() bool { return b.liveViews() == 0 && len(s.Targets()) == 0 })
}

// TestRefusedUID: a peer whose uid is not allowed is refused by name.
func TestRefusedUID(t *testing.T) {
	testutil.RequireRoot(t)
	requireUffd(t, false)
	tp := buildTarget(t)
	b := newFakeBackend(t, false, nil)
	dir, err := os.MkdirTemp(sharedDir(t), "sock-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "s.sock")
	s, err := Listen(sock, b, Options{Mode: 0o666, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cmd := exec.Command(tp, "--socket", sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	tg := startTargetCmd(t, cmd)
	err = tg.wait(t, 10*time.Second)
	if err == nil || !strings.Contains(tg.stderr.String(), "uid 65534 may not attach") {
		t.Fatalf("disallowed uid: %v\n%s", err, tg.stderr)
	}
	// Allowed when listed.
	s.Close()
	s2, err := Listen(sock, b, Options{Mode: 0o666, AllowUIDs: []uint32{65534}, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	cmd = exec.Command(tp, "--socket", sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	tg = startTargetCmd(t, cmd)
	if err := tg.wait(t, 30*time.Second); err != nil {
		// Without /dev/userfaultfd or vm.unprivileged_userfaultfd, uid
		// 65534 cannot create a userfaultfd: the handshake got that far.
		if !strings.Contains(tg.stderr.String(), "userfaultfd") {
			t.Fatalf("allowed uid: %v\n%s", err, tg.stderr)
		}
		t.Logf("allowed uid got past the uid check: %s", tg.stderr)
	}
	// And the server still serves root.
	tg = startTarget(t, sock)
	if err := tg.wait(t, 30*time.Second); err != nil {
		t.Fatalf("root after a refused uid: %v\n%s", err, tg.stderr)
	}
}

// TestKilledTarget: a target killed with SIGKILL while attached is freed;
// the others keep being served; no fd stays open.
func TestKilledTarget(t *testing.T) {
	for _, hugetlb := range []bool{false, true} {
		t.Run(backingName(hugetlb), func(t *testing.T) {
			requireUffd(t, hugetlb)
			b := newFakeBackend(t, hugetlb, nil)
			var mu sync.Mutex
			reasons := map[string]int{}
			s, sock := listen(t, b, Options{OnDetach: func(ti TargetInfo) { mu.Lock(); reasons[ti.Reason]++; mu.Unlock() }})
			fds := countFDs(t)
			// One target holds (attached, touched everything), one waits
			// before touching: both are killed.
			hold := startTarget(t, sock, "--hold")
			waitOn := startTarget(t, sock, "--wait", "--pattern", "fraction:0.3")
			hold.stderr.wait(t, "attached", 10*time.Second)
			waitOn.stderr.wait(t, "attached", 10*time.Second)
			waitFor(t, 10*time.Second, "hold target touched", func() bool { return hold.stdout.String() != "" })
			other := startTarget(t, sock, "--hold")
			other.stderr.wait(t, "attached", 10*time.Second)
			waitFor(t, 5*time.Second, "3 attached", func() bool { return len(s.Targets()) == 3 })
			hold.cmd.Process.Kill()
			waitOn.cmd.Process.Kill()
			hold.wait(t, 5*time.Second)
			waitOn.wait(t, 5*time.Second)
			waitFor(t, 5*time.Second, "killed targets freed", func() bool { return len(s.Targets()) == 1 && b.liveViews() == 1 })
			mu.Lock()
			if reasons["hangup"] != 2 {
				t.Errorf("reasons %v, want 2 hangups", reasons)
			}
			mu.Unlock()
			// The survivor still works, and a new target too.
			st := startTarget(t, sock, "--stats")
			if err := st.wait(t, 30*time.Second); err != nil {
				t.Fatalf("new target: %v\n%s", err, st.stderr)
			}
			other.stdin.Close() // EOF ends --hold: detach
			if err := other.wait(t, 10*time.Second); err != nil {
				t.Fatalf("survivor: %v\n%s", err, other.stderr)
			}
			waitFor(t, 5*time.Second, "all freed", func() bool { return len(s.Targets()) == 0 && b.liveViews() == 0 })
			waitFor(t, 5*time.Second, "fds back to where they were", func() bool { return countFDs(t) == fds })
		})
	}
}

// TestServerKilled: the server process dies (SIGKILL) while a target is
// attached; when the target then touches a page never filled it waits: it
// neither finishes nor dumps zeros.
func TestServerKilled(t *testing.T) {
	for _, hugetlb := range []bool{false, true} {
		t.Run(backingName(hugetlb), func(t *testing.T) {
			requireUffd(t, hugetlb)
			buildTarget(t)
			env := []string{}
			if hugetlb {
				env = append(env, "UR_ATTACH_TEST_HUGETLB=1")
			}
			killServerUnderTarget(t, env...)
		})
	}
}

// killServerUnderTarget starts a server (this test binary, with env) in a
// child process, attaches a target that waits, SIGKILLs the server, lets
// the target touch its pages, and checks it neither finishes nor dumps: a
// page never filled makes it wait instead of reading zeros.
func killServerUnderTarget(t *testing.T, env ...string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	srv := startHelperServer(t, sock, env...)
	dump := filepath.Join(t.TempDir(), "dump")
	tg := startTarget(t, sock, "--wait", "--dump", dump)
	tg.stderr.wait(t, "attached", 10*time.Second)
	srv.Process.Kill()
	srv.Wait()
	tg.stdin.Write([]byte("\n")) // now touch
	select {
	case <-tg.done:
		t.Fatalf("target finished after the server died (%v); it must wait on the unfilled page\nstdout %s\nstderr %s", tg.err, tg.stdout.String(), tg.stderr)
	case <-time.After(time.Second):
	}
	if _, err := os.Stat(dump); err == nil {
		t.Fatal("target dumped after the server died")
	}
	tg.cmd.Process.Kill()
	tg.wait(t, 5*time.Second)
}

// TestListenPaths: the socket path's corner cases.
func TestListenPaths(t *testing.T) {
	b := &nullBackend{}
	dir := t.TempDir()

	_, err := Listen(filepath.Join(dir, "nope", "s.sock"), b, Options{})
	if err == nil || !strings.Contains(err.Error(), "nope does not exist") {
		t.Errorf("missing dir: %v", err)
	}

	live := filepath.Join(dir, "live.sock")
	s, err := Listen(live, b, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(live); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v %v", st.Mode(), err)
	}
	_, err = Listen(live, b, Options{})
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "socket "+live+" is in use by a running server") {
		t.Errorf("live: %v", err)
	}
	s.Close()
	if _, err := os.Lstat(live); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket not removed on Close: %v", err)
	}

	// A stale socket file: bound, never listened on / its server gone.
	stale := filepath.Join(dir, "stale.sock")
	fd, _ := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	s, err = Listen(stale, b, Options{Mode: 0o660})
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	if st, _ := os.Stat(stale); st.Mode().Perm() != 0o660 {
		t.Errorf("mode %v", st.Mode())
	}
	s.Close()

	link := filepath.Join(dir, "link.sock")
	os.Symlink(filepath.Join(dir, "elsewhere"), link)
	if _, err := Listen(link, b, Options{}); err == nil || !strings.Contains(err.Error(), "is a symlink") {
		t.Errorf("symlink: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "elsewhere")); err == nil {
		t.Error("followed the symlink")
	}

	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("keep me"), 0o644)
	if _, err := Listen(file, b, Options{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file: %v", err)
	}
	if got, _ := os.ReadFile(file); string(got) != "keep me" {
		t.Error("regular file replaced")
	}

	// A stream socket someone else listens on: not ours, not removed.
	other := filepath.Join(dir, "stream.sock")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := Listen(other, b, Options{}); !errors.Is(err, ErrInUse) {
		t.Errorf("stream socket: %v", err)
	}
}

type nullBackend struct{}

func (nullBackend) Hello() Hello {
	return Hello{Backing: BackingShmem, PageSize: 4096, ChunkSize: 65536, FileSize: 65536, Regions: []Region{{Name: "r", Size: 4096, Length: 4096}}}
}
func (nullBackend) BackingFile() *uffd.File { return nil }
func (nullBackend) AttachView(u *uffd.FD, _ []Range, _ string) (View, error) {
	u.Close()
	return nil, errors.New("null backend")
}

// TestShutdown: targets are told, detach, and the socket goes away; one
// that ignores the notice is detached when the context expires.
func TestShutdown(t *testing.T) {
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	s, sock := listen(t, b, Options{})
	polite := startTarget(t, sock, "--hold")
	polite.stderr.wait(t, "attached", 10*time.Second)
	// A Go peer that never reads: it gets a bye when Shutdown gives up.
	rude, err := Dial(sock, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rude.Close()
	waitFor(t, 5*time.Second, "2 attached", func() bool { return len(s.Targets()) == 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	err = s.Shutdown(ctx)
	if err == nil || !strings.Contains(err.Error(), "1 target(s) had not detached") {
		t.Errorf("Shutdown = %v", err)
	}
	if err := polite.wait(t, 5*time.Second); err != nil {
		t.Errorf("polite target: %v\n%s", err, polite.stderr)
	}
	var types []string
	for {
		raw, _, err := RecvMsg(rude.c)
		if err != nil {
			break
		}
		typ, _ := PeekType(raw)
		types = append(types, typ)
	}
	if strings.Join(types, ",") != "shutdown,bye" {
		t.Errorf("rude peer got %v, want shutdown then bye", types)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	if b.liveViews() != 0 {
		t.Errorf("%d views left", b.liveViews())
	}
	if _, err := net.Dial("unixpacket", sock); err == nil {
		t.Error("still accepting")
	}
}

// TestCClientVsBadServer: the C client refuses a broken server cleanly.
func TestCClientVsBadServer(t *testing.T) {
	buildTarget(t)
	memfd, _ := unix.MemfdCreate("x", unix.MFD_CLOEXEC)
	defer unix.Close(memfd)
	h := testHello()
	hb, _ := json.Marshal(h)
	rb, _ := encodeBatches(TypeRegions, h.Regions)
	cases := []struct {
		name string
		msg  []byte
		fds  []int
		want string
		more [][]byte // sent after msg
	}{
		{"garbage", []byte(`{"type":"hello",`), []int{memfd}, "malformed", nil},
		{"error", []byte(`{"type":"error","error":"go away"}`), nil, "server: go away", nil},
		{"version", bytes.Replace(hb, []byte(`"version":2`), []byte(`"version":9`), 1), []int{memfd}, "version 9, this client speaks 2 (the server is newer", nil},
		{"version 1 server", []byte(`{"type":"hello","version":1,"backing":"shmem","page_size":4096,"chunk_size":65536,"file_size":65536,"snapshot":"x","regions":[{"name":"a","offset":0,"size":4096,"length":4096,"addr":0,"prot":3}]}`),
			[]int{memfd}, "version 1, this client speaks 2 (the server is older", nil},
		{"no regions", bytes.Replace(hb, []byte(`"region_count":2`), []byte(`"region_count":0`), 1), []int{memfd}, "hello: region_count: 0, want 1..65536", nil},
		{"regions never come", hb, []int{memfd}, "the server closed the connection", nil},
		{"regions out of order", hb, []int{memfd}, `expected a "regions" message with regions 0.. (of 2) and no fds, got "regions" with first 1`,
			[][]byte{bytes.Replace(rb[0], []byte(`"first":0`), []byte(`"first":1`), 1)}},
		{"regions too many", hb, []int{memfd}, `got "regions" with first 0, 3 regions`,
			[][]byte{bytes.Replace(rb[0], []byte(`"regions":[`), []byte(`"regions":[{"name":"x","offset":0,"size":0,"length":0},`), 1)}},
		{"region outside", hb, []int{memfd}, `hello: regions[1] ("b"): offset 8388608`,
			[][]byte{bytes.Replace(rb[0], []byte(`"offset":4194304`), []byte(`"offset":8388608`), 1)}},
		{"nofd", hb, nil, "0 file descriptors", nil},
		{"huge", bytes.Repeat([]byte(" "), 100<<10), nil, "message too large", nil},
		{"deep", []byte(`{"type":"hello","x":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}`), []int{memfd}, "malformed", nil},
		{"bignum", []byte(`{"type":"hello","version":2,"page_size":99999999999999999999999}`), []int{memfd}, "malformed", nil},
		{"duplicate", bytes.Replace(hb, []byte(`"page_size":2097152`), []byte(`"page_size":4096,"page_size":2097152`), 1), []int{memfd}, "page_size (appears twice)", nil},
		{"duplicate-in-region", hb, []int{memfd}, "field regions[0]",
			[][]byte{bytes.Replace(rb[0], []byte(`{"name":"a"`), []byte(`{"name":"z","name":"a"`), 1)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "s")
			ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			tg := startTarget(t, sock)
			conn, err := ln.AcceptUnix()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			rc, _ := conn.SyscallConn()
			rc.Write(func(fd uintptr) bool {
				var oob []byte
				if len(c.fds) > 0 {
					oob = unix.UnixRights(c.fds...)
				}
				err = unix.Sendmsg(int(fd), c.msg, oob, nil, 0)
				return true
			})
			if err != nil {
				t.Fatal(err)
			}
			if c.name == "regions never come" {
				conn.CloseWrite() // the target reads the end instead of a batch
			}
			for _, m := range c.more {
				if err := SendMsg(conn, m); err != nil {
					t.Fatal(err)
				}
			}
			err = tg.wait(t, 10*time.Second)
			if err == nil || !strings.Contains(tg.stderr.String(), c.want) {
				t.Fatalf("target: %v, stderr %q, want %q", err, tg.stderr, c.want)
			}
		})
	}
}

// TestCParserHostile runs the C client's JSON reader, under ASan and
// UBSan, over every truncation and thousands of byte flips of real server
// messages, plus deep nesting and huge numbers: it must never read out of
// bounds, and must reject what is not a well-formed message.
func TestCParserHostile(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		testutil.Skip(t, "gcc: %v", err)
	}
	dir := t.TempDir()
	harness := filepath.Join(dir, "h.c")
	os.WriteFile(harness, []byte(`#include "ur_client.c"
#include <stdio.h>
int main(void) {
	static char buf[UR_MAX_MSG + 1];
	unsigned len;
	int ok = 0, bad = 0;
	while (fread(&len, 4, 1, stdin) == 1) {
		if (len > UR_MAX_MSG || fread(buf, 1, len, stdin) != len)
			return 2;
		char *copy = malloc(len ? len : 1); /* exact size: ASan sees any overread */
		memcpy(copy, buf, len);
		struct msg m;
		if (parse_msg(copy, len, &m) == 0) {
			ok++;
			char err[UR_ERRLEN];
			if (!strcmp(m.type, "hello"))
				validate_hello(&m, err);
			if (!strcmp(m.type, "regions"))
				validate_regions(m.regions, m.nregions, 4096, (uint64_t)1 << 30, err);
			msg_free(&m);
		} else {
			bad++;
		}
		free(copy);
	}
	printf("%d %d\n", ok, bad);
	return 0;
}
`), 0o644)
	exe := filepath.Join(dir, "h")
	args := []string{"-O1", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-I" + csrcDir(t), "-o", exe, harness}
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		testutil.Skip(t, "gcc with sanitizers: %v\n%s", err, b)
	}
	h := testHello()
	h.Regions[0].Name = "h\u00e9ap \"quoted\" \\ \U0001F600"
	hb, _ := json.Marshal(h)
	rb, _ := encodeBatches(TypeRegions, h.Regions)
	seeds := [][]byte{hb, rb[0],
		[]byte(`{"type":"error","error":"uid 5 may not attach \u00e9\ud83d\ude00"}`),
		[]byte(`{"type":"bye","stats":{"a":[1,2.5e-3,-4,{"b":null,"c":true}],"d":"x"}}`),
		[]byte(`{"type":"ready"}`), []byte(`{"type":"shutdown","extra":[[[]]]}`),
	}
	var in bytes.Buffer
	add := func(b []byte) {
		var l [4]byte
		binary.LittleEndian.PutUint32(l[:], uint32(len(b)))
		in.Write(l[:])
		in.Write(b)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, s := range seeds {
		add(s)
		for i := range s {
			add(s[:i])
		}
		for i := 0; i < 3000; i++ {
			m := bytes.Clone(s)
			for k := 0; k < 1+rng.IntN(3); k++ {
				m[rng.IntN(len(m))] = "{}[]\",:\\0123456789eE.-+ tfnu\x00\xff"[rng.IntN(30)]
			}
			add(m)
		}
	}
	add([]byte(`{"type":"hello","x":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`))
	add([]byte(`{"type":"hello","page_size":18446744073709551615}`))
	add([]byte(`{"type":"hello","page_size":18446744073709551616}`))
	add([]byte(`{"type":"hello","snapshot":"` + strings.Repeat("\\u00e9", 5000) + `"}`))
	add([]byte(`{"type":"hello","regions":[` + strings.Repeat(`{"name":"r"},`, 1100) + `{"name":"r"}]}`))
	add([]byte(`{"type":"error","error":"` + strings.Repeat("x", 60000) + `"}`))
	add([]byte(`{"type":"x\ud800"}`))
	cmd := exec.Command(exe)
	cmd.Stdin = &in
	cmd.Env = append(os.Environ(), "ASAN_OPTIONS=detect_leaks=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("harness: %v\n%s", err, out)
	}
	var ok, bad int
	fmt.Sscanf(string(out), "%d %d", &ok, &bad)
	if ok == 0 || bad == 0 {
		t.Errorf("parsed %d, rejected %d: the corpus should have both", ok, bad)
	}
	t.Logf("C parser: %d accepted, %d rejected, no sanitizer report", ok, bad)
}

// TestOriginalAddr: --at-original-addr maps each region where it was; with
// a hugetlb backing an address that is not 2 MiB aligned is refused with a
// message saying so; a shmem backing takes 4 KiB-aligned addresses.
func TestOriginalAddr(t *testing.T) {
	cases := []struct {
		hugetlb bool
		specs   []regionSpec
		want    string // error text; "" = success
	}{
		{true, []regionSpec{{"a", 3<<20 + 5, 0x7e0000000000}, {"b", 100, 0x7e0000800000}}, ""},
		{true, []regionSpec{{"a", 100, 0x7e0000001000}}, "huge-page-aligned"},
		{true, []regionSpec{{"a", 100, 0}}, `region 0 "a": original address 0`},
		{false, []regionSpec{{"a", 3<<12 + 5, 0x7e0000001000}, {"b", 100, 0x7e0000100000}}, ""},
	}
	for i, c := range cases {
		t.Run(fmt.Sprintf("%s/%d", backingName(c.hugetlb), i), func(t *testing.T) {
			requireUffd(t, c.hugetlb)
			b := newFakeBackend(t, c.hugetlb, c.specs)
			_, sock := listen(t, b, Options{})
			dump := filepath.Join(t.TempDir(), "dump")
			tg := startTarget(t, sock, "--at-original-addr", "--hold", "--dump", dump)
			if c.want != "" {
				if err := tg.wait(t, 10*time.Second); err == nil || !strings.Contains(tg.stderr.String(), c.want) {
					t.Fatalf("want an error with %q, got %v\n%s", c.want, err, tg.stderr)
				}
				return
			}
			waitFor(t, 10*time.Second, "touched", func() bool { return tg.stdout.String() != "" })
			maps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/maps", tg.cmd.Process.Pid))
			for _, s := range c.specs {
				if !strings.Contains(string(maps), fmt.Sprintf("%x-", s.addr)) {
					t.Errorf("no mapping at %#x:\n%s", s.addr, maps)
				}
			}
			tg.stdin.Close()
			if err := tg.wait(t, 10*time.Second); err != nil {
				t.Fatalf("%v\n%s", err, tg.stderr)
			}
			if got, _ := os.ReadFile(dump); !bytes.Equal(got, b.want()) {
				t.Error("dump differs")
			}
			// The Go client too.
			cl, err := Dial(sock, ClientOptions{AtOriginalAddr: true, ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			for j, r := range cl.Regions {
				if got := uint64(uintptr(unsafe.Pointer(unsafe.SliceData(r.Data)))); got != c.specs[j].addr {
					t.Errorf("Go client: region %s at %#x, want %#x", r.Name, got, c.specs[j].addr)
				}
			}
			if _, err := cl.Detach(); err != nil {
				t.Error(err)
			}
		})
	}
}
