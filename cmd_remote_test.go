package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

// remoteServe copies the test snapshot into a directory nginx serves and
// returns the nginx, the snapshot's URL and the image.
func remoteServe(t *testing.T, chunkSize int) (*testutil.Nginx, string, []byte) {
	t.Helper()
	// Memory-like: runs of zero chunks among compressible data.
	img := make([]byte, 3<<20+777)
	for off := 0; off < len(img); off += 4096 {
		if (off>>16)%3 != 0 {
			memgen.Fill(img[off:min(off+4096, len(img))], int64(off/4096))
		}
	}
	snap := testutil.WriteSnapshot(t, []testutil.Region{{Name: "img", Data: img}}, format.CodecS2, chunkSize)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "app.snap"), mustRead(t, snap), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "notes.txt"), []byte("not a snapshot, just text\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ng := testutil.StartNginx(t, root)
	return ng, ng.URL + "/app.snap", img
}

// TestLoadRemote: `load http://127.0.0.1:PORT/app.snap --socket S` serves
// the C target byte for byte from nginx, and its stats say how many bytes
// came over the network; snapshot info, verify and extract read the URL too.
func TestLoadRemote(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	_, url, img := remoteServe(t, 256<<10)
	dir := t.TempDir()
	sock, statsPath, dump := filepath.Join(dir, "s.sock"), filepath.Join(dir, "stats.json"), filepath.Join(dir, "dump")
	ld, stderr := startLoad(t, "ready: serving "+url+" on "+sock, 30*time.Second, url, "--socket", sock, "--once", "--backing", "shmem", "--stats-json", statsPath, "--workers", "2")
	out, err := exec.Command(tp, "--socket", sock, "--dump", dump, "--pattern", "random").CombinedOutput()
	if err != nil {
		t.Fatalf("target: %v\n%s", err, out)
	}
	if code := waitExit(t, ld, 30*time.Second); code != 0 {
		t.Fatalf("load exited %d:\n%s", code, stderr.String())
	}
	if got, _ := os.ReadFile(dump); !bytes.Equal(got, img) {
		t.Error("dump differs from the image")
	}
	var st struct {
		BytesRead int64 `json:"bytes_read"`
		Remote    *struct {
			Requests     int64 `json:"requests"`
			BytesFetched int64 `json:"bytes_fetched"`
			Size         int64 `json:"size"`
		} `json:"remote"`
	}
	b, err := os.ReadFile(statsPath)
	if err != nil || json.Unmarshal(b, &st) != nil || st.Remote == nil {
		t.Fatalf("stats file %s: %v", b, err)
	}
	// Every stored byte once (the target read them all), plus the first
	// request's 4 KiB, the index and the footer: the file less its 32-byte
	// header, plus 4 KiB.
	if st.Remote.BytesFetched != st.Remote.Size-32+4096 || st.Remote.Requests == 0 {
		t.Errorf("remote stats %+v, %d stored bytes read", *st.Remote, st.BytesRead)
	}

	// snapshot info / verify / extract take the URL.
	if out, err := loadCmd("snapshot", "info", url).CombinedOutput(); err != nil || !strings.Contains(string(out), "img") {
		t.Errorf("snapshot info %s: %v\n%s", url, err, out)
	}
	doctorLike := func(args ...string) ([]byte, error) { return loadCmd(args...).CombinedOutput() }
	if out, err := doctorLike("snapshot", "verify", url); err != nil {
		t.Errorf("snapshot verify %s: %v\n%s", url, err, out)
	}
	raw := filepath.Join(dir, "img.raw")
	if out, err := doctorLike("snapshot", "extract", url, "-q", "-o", raw); err != nil {
		t.Errorf("snapshot extract %s: %v\n%s", url, err, out)
	} else if got, _ := os.ReadFile(raw); !bytes.Equal(got, img) {
		t.Error("extract from the URL differs from the image")
	}
}

// TestLoadRemoteErrors: a 404 and a body that is not a snapshot are named
// errors, for load and for snapshot info.
func TestLoadRemoteErrors(t *testing.T) {
	ng, _, _ := remoteServe(t, 256<<10)
	for _, c := range []struct{ path, want string }{
		{"/missing.snap", "not found on the server (HTTP 404)"},
		{"/notes.txt", "not a uffdrestore snapshot"},
	} {
		for _, args := range [][]string{{"load", ng.URL + c.path, "--socket", filepath.Join(t.TempDir(), "s")}, {"snapshot", "info", ng.URL + c.path}} {
			out, err := loadCmd(args...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), c.want) {
				t.Errorf("%v: %v, want exit 1 saying %q:\n%s", args, err, c.want, out)
			}
		}
	}
}

// TestLoadRemoteFailures: the target touches 2% of its pages, then
// the server dies (or the snapshot is replaced on it) and the target reads
// the rest. The faults that need the network fail (after retries, or at
// once for a replaced file): the target gets SIGBUS (its session ended
// without UFFDIO_POISON), load names the cause, and every byte the target
// did read is the image's.
func TestLoadRemoteFailures(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	for _, c := range []struct {
		name string
		want string // in load's output
	}{
		{"server-dies", "the server failed on every attempt"},
		{"replaced", "the snapshot changed on the server"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ng, url, img := remoteServe(t, 64<<10)
			dir := t.TempDir()
			sock, dump := filepath.Join(dir, "s.sock"), filepath.Join(dir, "dump")
			ld, stderr := startLoad(t, "ready: serving "+url, 30*time.Second, url, "--socket", sock, "--backing", "shmem", "--workers", "2")
			tg := exec.Command(tp, "--socket", sock, "--pattern", "fraction:0.02", "--pause-before-dump", "--dump", dump)
			var tout syncBuf
			tg.Stdout, tg.Stderr = &tout, &tout
			stdin, err := tg.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := tg.Start(); err != nil {
				t.Fatal(err)
			}
			defer tg.Process.Kill()
			waitOutput(t, &tout, "touched", 30*time.Second)
			switch c.name {
			case "server-dies":
				ng.Kill()
			case "replaced":
				// A new version, renamed over the old one as a deploy would.
				other := append([]byte(nil), mustRead(t, filepath.Join(ng.Root, "app.snap"))...)
				other[len(other)/2] ^= 1
				tmp := filepath.Join(ng.Root, ".app.snap.new")
				if err := os.WriteFile(tmp, other, 0o644); err != nil {
					t.Fatal(err)
				}
				future := time.Now().Add(time.Hour)
				os.Chtimes(tmp, future, future)
				if err := os.Rename(tmp, filepath.Join(ng.Root, "app.snap")); err != nil {
					t.Fatal(err)
				}
			}
			io.WriteString(stdin, "\n")
			err = waitExitErr(tg, 60*time.Second)
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("target read the rest after the failure: %v\n%s", err, tout.String())
			}
			ws := ee.Sys().(syscall.WaitStatus)
			if !(ws.Signaled() && ws.Signal() == syscall.SIGBUS) && !(ws.ExitStatus() == 1 && strings.Contains(tout.String(), "the server ended the session")) {
				t.Fatalf("target: %v, want SIGBUS or the session ended\n%s", err, tout.String())
			}
			// Whatever reached the dump is the image's prefix.
			if got, err := os.ReadFile(dump); err == nil && (len(got) > len(img) || !bytes.Equal(got, img[:len(got)])) {
				t.Errorf("the dump (%d bytes) is not a prefix of the image", len(got))
			}
			// load names the cause in its stats' last_error at exit.
			ld.Process.Signal(syscall.SIGTERM)
			waitExit(t, ld, 30*time.Second)
			if !strings.Contains(stderr.String(), c.want) {
				t.Errorf("load's output does not say %q:\n%s", c.want, stderr.String())
			}
		})
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLoadRemoteMAC: with a MAC key in the environment, load refuses a
// signed snapshot whose index was modified (CRCs fixed up, so only the MAC
// can tell) before it serves anything, serves the intact one byte for byte,
// and a target touching a chunk whose bytes were modified gets SIGBUS (or
// its session ended), the chunk's signed hash named as the cause.
func TestLoadRemoteMAC(t *testing.T) {
	loadRequire(t)
	tp := loadTarget(t)
	const keyHex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	img := make([]byte, 1<<20)
	for i := range img {
		img[i] = byte(i*7) ^ byte(i>>11)
	}
	// Signed with the key from the environment, as snapshot create does.
	t.Setenv(format.MACKeyEnv, keyHex)
	signed := mustRead(t, testutil.WriteSnapshot(t, []testutil.Region{{Name: "img", Data: img}}, format.CodecS2, 64<<10))
	t.Setenv(format.MACKeyEnv, "") // each command below gets it, or not, explicitly
	le := binary.LittleEndian
	// Index tampered: a region name byte, index and footer CRCs fixed up.
	badIndex := bytes.Clone(signed)
	ft := badIndex[len(badIndex)-32:]
	ioff, ilen := le.Uint64(ft), le.Uint64(ft[8:])
	ib := badIndex[ioff : ioff+ilen]
	ib[bytes.Index(ib, []byte("img"))+2] = 'x'
	le.PutUint32(ft[16:], format.Checksum(ib))
	le.PutUint32(ft[20:], format.Checksum(ft[:20]))
	// A chunk's bytes tampered (the last chunk's: the dump reaches it last).
	badChunk := bytes.Clone(signed)
	badChunk[ioff-100] ^= 0x40
	root := t.TempDir()
	for name, b := range map[string][]byte{"signed.snap": signed, "bad-index.snap": badIndex, "bad-chunk.snap": badChunk} {
		if err := os.WriteFile(filepath.Join(root, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ng := testutil.StartNginx(t, root)
	withKey := func(cmd *exec.Cmd) *exec.Cmd {
		cmd.Env = append(cmd.Env, format.MACKeyEnv+"="+keyHex)
		return cmd
	}

	sock := filepath.Join(t.TempDir(), "s.sock")
	out, err := withKey(loadCmd("load", ng.URL+"/bad-index.snap", "--socket", sock)).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "authentication failed: the index MAC does not match") || strings.Contains(string(out), "ready:") {
		t.Errorf("load of a tampered index: %v, want exit 1 before serving, naming the MAC:\n%s", err, out)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("load of a tampered index created its socket")
	}
	// Without the key the same file loads: the MAC is what refused it.
	if out, err := loadCmd("snapshot", "info", ng.URL+"/bad-index.snap").CombinedOutput(); err != nil {
		t.Errorf("snapshot info without a key: %v\n%s", err, out)
	}

	for _, c := range []struct {
		name string
		ok   bool
	}{{"signed.snap", true}, {"bad-chunk.snap", false}} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			sock, dump := filepath.Join(dir, "s.sock"), filepath.Join(dir, "dump")
			var stderr syncBuf
			ld := withKey(loadCmd("load", ng.URL+"/"+c.name, "--socket", sock, "--once", "--backing", "shmem", "--workers", "2"))
			ld.Stderr = &stderr
			if err := ld.Start(); err != nil {
				t.Fatal(err)
			}
			defer ld.Process.Kill()
			waitOutput(t, &stderr, "ready: serving", 30*time.Second)
			tout, err := exec.Command(tp, "--socket", sock, "--dump", dump).CombinedOutput()
			if c.ok {
				if err != nil {
					t.Fatalf("target: %v\n%s", err, tout)
				}
				if got, _ := os.ReadFile(dump); !bytes.Equal(got, img) {
					t.Error("dump differs from the image")
				}
				return
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("target read a tampered chunk: %v\n%s", err, tout)
			}
			if got, err := os.ReadFile(dump); err == nil && !bytes.Equal(got, img[:len(got)]) {
				t.Error("the dump is not a prefix of the image")
			}
			waitExit(t, ld, 30*time.Second)
			if !strings.Contains(stderr.String(), "SHA-256 does not match the signed index") {
				t.Errorf("load does not name the chunk hash:\n%s", stderr.String())
			}
		})
	}
}
