package attach

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"golang.org/x/sys/unix"
)

// The C client as a user without CAP_SYS_PTRACE: it must fall back to the
// userfaultfd it may have (UFFD_USER_MODE_ONLY when vm.unprivileged_userfaultfd
// is 0 and /dev/userfaultfd is root's) and go on without fork events.

const nobodyUID = 65534

// uffdClient is what the target's JSON line says about its userfaultfd.
type uffdClient struct {
	Uffd       string `json:"uffd"`
	ForkEvents *bool  `json:"fork_events"`
}

func (tg *target) uffdClient(t testing.TB) uffdClient {
	t.Helper()
	var u uffdClient
	if err := json.Unmarshal([]byte(tg.stdout.String()), &u); err != nil || u.ForkEvents == nil {
		t.Fatalf("target output %q: %v (want uffd and fork_events)", tg.stdout.String(), err)
	}
	return u
}

// nobodyIsUnprivileged reports whether uid 65534 can get only a
// UFFD_USER_MODE_ONLY userfaultfd here: the sysctl is 0 and
// /dev/userfaultfd (if any) is root's, with no access for others.
func nobodyIsUnprivileged(t testing.TB) bool {
	b, err := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd")
	if err != nil || strings.TrimSpace(string(b)) != "0" {
		return false
	}
	var st unix.Stat_t
	if err := unix.Stat("/dev/userfaultfd", &st); err != nil {
		return true
	}
	if _, err := unix.Getxattr("/dev/userfaultfd", "system.posix_acl_access", nil); err == nil {
		return false // an ACL may grant it
	}
	return st.Uid == 0 && st.Gid == 0 && st.Mode&0o066 == 0
}

// nobodyServer serves b on a socket in a directory 65534 can reach, to
// root and 65534, and returns the socket and a directory 65534 may write.
func nobodyServer(t *testing.T, b Backend) (sock, out string) {
	t.Helper()
	dir, err := os.MkdirTemp(sharedDir(t), "nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out = filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(out, nobodyUID, nobodyUID); err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(dir, "s.sock")
	s, err := Listen(sock, b, Options{Mode: 0o666, AllowUIDs: []uint32{nobodyUID}, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return sock, out
}

func asNobody(cmd *exec.Cmd) *exec.Cmd {
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID}}
	return cmd
}

// TestCClientNonRoot: the C target as uid 65534 attaches with the
// userfaultfd it may have, reads every byte right, reports that it has no
// fork events, and a child it forks gets no mapping of the regions (SIGSEGV)
// rather than an unserved one reading zeros.
func TestCClientNonRoot(t *testing.T) {
	testutil.RequireRoot(t)
	for _, hugetlb := range []bool{false, true} {
		t.Run(backingName(hugetlb), func(t *testing.T) {
			requireUffd(t, hugetlb)
			tp := buildTarget(t)
			b := newFakeBackend(t, hugetlb, nil)
			sock, out := nobodyServer(t, b)

			dump := filepath.Join(out, "plain")
			tg := startTargetCmd(t, asNobody(exec.Command(tp, "--socket", sock, "--pattern", "random", "--threads", "2", "--dump", dump)))
			if err := tg.wait(t, 30*time.Second); err != nil {
				t.Fatalf("target as uid %d: %v\n%s", nobodyUID, err, tg.stderr)
			}
			got, err := os.ReadFile(dump)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, b.want()) {
				t.Fatalf("uid %d's dump differs from the image", nobodyUID)
			}
			u := tg.uffdClient(t)
			t.Logf("uid %d: userfaultfd %s, fork events %v", nobodyUID, u.Uffd, *u.ForkEvents)
			if *u.ForkEvents {
				t.Errorf("uid %d (no CAP_SYS_PTRACE) reports fork events", nobodyUID)
			}
			if nobodyIsUnprivileged(t) && u.Uffd != "user-mode-only" {
				t.Errorf("uid %d got a %q userfaultfd with vm.unprivileged_userfaultfd=0 and /dev/userfaultfd root's", nobodyUID, u.Uffd)
			}

			// --fork: the child touches pages the parent has not.
			// Without fork events its copy of the regions would be
			// unregistered and read zeros there; the client marks them
			// MADV_DONTFORK, so the child dies on the first touch.
			dump = filepath.Join(out, "fork")
			tg = startTargetCmd(t, asNobody(exec.Command(tp, "--socket", sock, "--fork", "--dump", dump)))
			err = tg.wait(t, 30*time.Second)
			if err == nil || !strings.Contains(tg.stderr.String(), "killed by signal 11") {
				t.Fatalf("forked child without fork events: %v, want it killed by SIGSEGV\n%s", err, tg.stderr)
			}
			if _, err := os.Stat(dump + ".child"); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the child wrote a dump of regions it cannot have: %v", err)
			}
		})
	}
}

// TestCClientForkEventsRefused: root of a new user namespace (uid 65534
// outside) has CAP_SYS_PTRACE there but not in the initial namespace, which
// UFFD_FEATURE_EVENT_FORK needs: the client asks for it, UFFDIO_API refuses
// with EPERM, and the client retries without it on a fresh userfaultfd.
func TestCClientForkEventsRefused(t *testing.T) {
	testutil.RequireRoot(t)
	requireUffd(t, false)
	tp := buildTarget(t)
	b := newFakeBackend(t, false, nil)
	sock, out := nobodyServer(t, b)
	dump := filepath.Join(out, "userns")
	// The server's uid as the target sees it through SO_PEERCRED from
	// inside its namespace is 65534 (the overflow uid): trust it by name.
	cmd := exec.Command(tp, "--socket", sock, "--dump", dump, "--server-uid", "65534")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWUSER,
		// uid 0 inside, that is 65534 outside (without it the
		// process keeps root's kernel uid, unmapped inside).
		Credential:  &syscall.Credential{Uid: 0, Gid: 0},
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: nobodyUID, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: nobodyUID, Size: 1}},
	}
	probe := exec.Command("/bin/true")
	probe.SysProcAttr = cmd.SysProcAttr
	if err := probe.Run(); err != nil {
		testutil.Skip(t, "cannot create a user namespace here: %v", err)
	}
	tg := startTargetCmd(t, cmd)
	if err := tg.wait(t, 30*time.Second); err != nil {
		t.Fatalf("target in a user namespace: %v\n%s", err, tg.stderr)
	}
	got, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, b.want()) {
		t.Fatal("the dump differs from the image")
	}
	u := tg.uffdClient(t)
	t.Logf("root in a user namespace: userfaultfd %s, fork events %v", u.Uffd, *u.ForkEvents)
	if *u.ForkEvents {
		t.Error("fork events enabled without CAP_SYS_PTRACE in the initial user namespace")
	}
}

const goClientEnv = "UR_ATTACH_TEST_GOCLIENT"

// goClientResult is what the uid 65534 child of TestGoClientNonRoot reports.
type goClientResult struct {
	Sum          string `json:"sum"` // sha256 of every region's bytes, in hello order
	UserModeOnly bool   `json:"user_mode_only"`
	ForkEvents   bool   `json:"fork_events"`
	DontFork     bool   `json:"dontfork"` // every region's VmFlags has dc
	Err          string `json:"err,omitempty"`
}

// TestGoClientNonRoot: the Go client (Dial) as uid 65534 falls back as the
// C client does (UFFD_USER_MODE_ONLY, no fork events, regions
// MADV_DONTFORK) and reads every byte right.
func TestGoClientNonRoot(t *testing.T) {
	if sock := os.Getenv(goClientEnv); sock != "" {
		goClientChild(sock)
		return
	}
	testutil.RequireRoot(t)
	requireUffd(t, false)
	b := newFakeBackend(t, false, nil)
	sock, _ := nobodyServer(t, b)
	bin := testutil.CopyTestBinary(t, filepath.Dir(sock), "attach.test")
	cmd := asNobody(exec.Command(bin, "-test.run=^TestGoClientNonRoot$"))
	cmd.Env = append(os.Environ(), goClientEnv+"="+sock)
	out, err := cmd.CombinedOutput()
	_, js, ok := strings.Cut(string(out), "GOCLIENT-RESULT ")
	var res goClientResult
	if ok {
		js, _, _ = strings.Cut(js, "\n")
		ok = json.Unmarshal([]byte(js), &res) == nil
	}
	if !ok || err != nil || res.Err != "" {
		t.Fatalf("Go client as uid %d: %v %s\n%s", nobodyUID, err, res.Err, out)
	}
	want := sha256.Sum256(b.want())
	if res.Sum != hex.EncodeToString(want[:]) {
		t.Errorf("uid %d's Go client read other bytes than the image", nobodyUID)
	}
	t.Logf("uid %d: user-mode-only %v, fork events %v, MADV_DONTFORK %v", nobodyUID, res.UserModeOnly, res.ForkEvents, res.DontFork)
	if res.ForkEvents || !res.DontFork {
		t.Errorf("uid %d (no CAP_SYS_PTRACE): fork events %v, regions MADV_DONTFORK %v; want false, true", nobodyUID, res.ForkEvents, res.DontFork)
	}
	if nobodyIsUnprivileged(t) && !res.UserModeOnly {
		t.Errorf("uid %d got a full userfaultfd with vm.unprivileged_userfaultfd=0 and /dev/userfaultfd root's", nobodyUID)
	}
}

func goClientChild(sock string) {
	var res goClientResult
	defer func() {
		js, _ := json.Marshal(res)
		fmt.Printf("GOCLIENT-RESULT %s\n", js)
	}()
	cl, err := Dial(sock, ClientOptions{})
	if err != nil {
		res.Err = err.Error()
		return
	}
	defer cl.Detach()
	h := sha256.New()
	for _, r := range cl.Regions {
		h.Write(r.Data)
	}
	res.Sum = hex.EncodeToString(h.Sum(nil))
	res.UserModeOnly, res.ForkEvents = cl.UserModeOnly(), cl.ForkEvents()
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		res.Err = err.Error()
		return
	}
	res.DontFork = true
	for _, r := range cl.Regions {
		if r.m != nil && !vmFlag(string(smaps), r.m.Addr(), "dc") {
			res.DontFork = false
		}
	}
}

// vmFlag reports whether the mapping starting at addr has flag in its
// /proc/self/smaps VmFlags.
func vmFlag(smaps string, addr uintptr, flag string) bool {
	head := fmt.Sprintf("%x-", addr)
	in := false
	for _, l := range strings.Split(smaps, "\n") {
		if strings.HasPrefix(l, head) {
			in = true
		} else if in {
			if v, ok := strings.CutPrefix(l, "VmFlags:"); ok {
				return slices.Contains(strings.Fields(v), flag)
			}
		}
	}
	return false
}
