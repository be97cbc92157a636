package attach

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/internal/touch"
)

// startHelperServer runs a server (this test binary) in a child process on
// sock and waits until it serves.
func startHelperServer(t *testing.T, sock string, env ...string) *exec.Cmd {
	t.Helper()
	srv := exec.Command(os.Args[0], "-test.run=^$")
	srv.Env = append(append(os.Environ(), "UR_ATTACH_TEST_SERVER="+sock), env...)
	out, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	line := make([]byte, 8)
	if _, err := out.Read(line); err != nil || !strings.HasPrefix(string(line), "serving") {
		t.Fatalf("helper server: %q %v", line, err)
	}
	return srv
}

// TestClientReattach: a Go client whose server (a child process) is
// SIGKILLed with most pages unfilled: a goroutine touching them waits;
// Poll re-attaches to a server started with adopt on the same socket, the
// goroutine finishes and every byte is the snapshot's, the shared writes
// made before the restart included. A server of another snapshot is
// refused with ErrOtherSnapshot.
func TestClientReattach(t *testing.T) {
	for _, bk := range engineBackings {
		t.Run(bk.name, func(t *testing.T) {
			requireUffd(t, bk.hugetlb)
			img := memImage(8<<20, 4)
			snap := writeSnapshot(t, []snapRegion{{"data", 0, img}}, 2<<20)
			other := writeSnapshot(t, []snapRegion{{"data", 0, memImage(8<<20, 5)}}, 2<<20)
			sock := filepath.Join(t.TempDir(), "s.sock")
			env := []string{"UR_ATTACH_TEST_SNAP=" + snap, "UR_ATTACH_TEST_BACKING=" + bk.kind.String()}
			fdsBefore := countFDs(t)
			srv := startHelperServer(t, sock, env...)
			cl, err := Dial(sock, ClientOptions{ReattachTimeout: 20 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			data := cl.Regions[0].Data
			ps := int(cl.Hello.PageSize)
			data[ps+5] ^= 0xff // a shared write into a filled page
			want := bytes.Clone(img)
			want[ps+5] ^= 0xff
			srv.Process.Kill()
			srv.Wait()
			// Touch every page from C (touch.Touch holds no P): a goroutine
			// waiting in a fault in Go code would stall this process's
			// garbage collector until the fault is answered.
			done := make(chan []byte)
			go func() {
				touch.Touch(uintptr(unsafe.Pointer(&data[0])), len(data), ps, false, nil, nil)
				done <- bytes.Clone(data)
			}()
			select {
			case <-done:
				t.Fatal("the touch finished with no server")
			case <-time.After(300 * time.Millisecond):
			}
			// Another snapshot first: refused, the client gives up.
			wrong := startHelperServer(t, sock, "UR_ATTACH_TEST_SNAP="+other, "UR_ATTACH_TEST_BACKING="+bk.kind.String(), "UR_ATTACH_TEST_ADOPT=1")
			if _, err := cl.Poll(time.Second); !errors.Is(err, ErrOtherSnapshot) {
				t.Fatalf("Poll with a server of another snapshot = %v, want ErrOtherSnapshot", err)
			}
			wrong.Process.Kill()
			wrong.Wait()
			adopter := startHelperServer(t, sock, append(env, "UR_ATTACH_TEST_ADOPT=1")...)
			if _, err := cl.Poll(time.Second); err != nil {
				t.Fatalf("Poll after the restart: %v", err)
			}
			if cl.Reattaches != 1 {
				t.Errorf("Reattaches = %d, want 1", cl.Reattaches)
			}
			select {
			case got := <-done:
				if !bytes.Equal(got, want) {
					t.Error("after the restart the region differs from the snapshot (with the write made before)")
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the touch still waits after the re-attach")
			}
			if _, err := cl.Detach(); err != nil {
				t.Fatal(err)
			}
			adopter.Process.Kill()
			adopter.Wait()
			// The kept backing fd and every socket are closed.
			if countFDs(t) != fdsBefore {
				ents, _ := os.ReadDir("/proc/self/fd")
				for _, e := range ents {
					l, _ := os.Readlink("/proc/self/fd/" + e.Name())
					t.Logf("open: fd %s -> %s", e.Name(), l)
				}
			}
			waitFor(t, 5*time.Second, "fds back", func() bool { return countFDs(t) == fdsBefore })
		})
	}
}

// TestAdoptingServerRefusesFreshTargets: before a target handed a backing
// back, an adopting server sends a hello without an fd; a fresh client
// (Go, and the C target) says the server is adopting instead of mapping.
func TestAdoptingServerRefusesFreshTargets(t *testing.T) {
	requireUffd(t, false)
	snap := writeSnapshot(t, []snapRegion{{"data", 0, memImage(1<<20, 4)}}, 64<<10)
	sock := filepath.Join(t.TempDir(), "s.sock")
	startHelperServer(t, sock, "UR_ATTACH_TEST_SNAP="+snap, "UR_ATTACH_TEST_BACKING=shmem", "UR_ATTACH_TEST_ADOPT=1")
	_, err := Dial(sock, ClientOptions{})
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "adopting") {
		t.Errorf("Dial of an adopting server = %v, want a refusal naming it", err)
	}
	tg := startTarget(t, sock)
	if err := tg.wait(t, 10*time.Second); err == nil || !strings.Contains(tg.stderr.String(), "the server is adopting") {
		t.Errorf("C target: %v\n%s", err, tg.stderr.String())
	}
}
