package main

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

// RestartMiBEnv sets the snapshot size of the restart tests in MiB (default
// 64; `make test-restart-1g` runs them with 1024).
const RestartMiBEnv = "UFFDRESTORE_RESTART_MIB"

func restartMiB(t *testing.T) int {
	mib := 64
	if v := os.Getenv(RestartMiBEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 4 || n > 16384 {
			t.Fatalf("%s=%q: want a size in MiB, 4..16384", RestartMiBEnv, v)
		}
		mib = n
	}
	return mib
}

// restartSnap writes a snapshot of mib MiB (one region; zero runs,
// compressible runs, random runs: seed makes it another snapshot of the
// same layout).
func restartSnap(t *testing.T, mib int, seed uint64) (string, []byte) {
	t.Helper()
	img := make([]byte, mib<<20)
	rng := rand.New(rand.NewPCG(seed, 5))
	for off := 0; off < len(img); {
		run := min(len(img)-off, 4096+rng.IntN(300<<10))
		switch rng.IntN(3) {
		case 0:
		case 1:
			for i := off; i < off+run; i++ {
				img[i] = byte(rng.Uint32())
			}
		default:
			for i := off; i < off+run; i++ {
				img[i] = byte(i>>3) ^ byte(seed)
			}
		}
		off += run
	}
	return testutil.WriteSnapshot(t, []testutil.Region{{Name: "mem", Data: img}}, format.CodecS2, 64<<10), img
}

type restartTarget struct {
	cmd   *exec.Cmd
	out   syncBuf
	dump  string
	stdin interface{ Close() error } // with --hold: closing it detaches
}

func startRestartTarget(t *testing.T, tp, sock, dump string, args ...string) *restartTarget {
	t.Helper()
	tg := &restartTarget{dump: dump}
	tg.cmd = exec.Command(tp, append([]string{"--socket", sock, "--pattern", "random", "--dump", dump}, args...)...)
	tg.cmd.Stdout, tg.cmd.Stderr = &tg.out, &tg.out
	in, err := tg.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	tg.stdin = in
	if err := tg.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.cmd.Process.Kill() })
	return tg
}

func freeHugePages() int64 {
	for _, p := range uffd.HugePools() {
		if p.PageSize == uffd.DefaultHugePageSize() {
			return p.Free
		}
	}
	return -1
}

// restartSetup starts load on a snapshot and two paced targets: a shared
// one that reads, and a private clone that writes (each byte it touches,
// xor 0x5a). It returns once both have attached and touched some pages.
func restartSetup(t *testing.T, backing string, snap string, mib int) (sock string, ld *exec.Cmd, shared, clone *restartTarget) {
	t.Helper()
	tp := loadTarget(t)
	dir := t.TempDir()
	sock = filepath.Join(dir, "s.sock")
	var stderr syncBuf
	ld = loadCmd("load", snap, "--socket", sock, "--backing", backing, "--workers", "1")
	ld.Stderr = &stderr
	if err := ld.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ld.Process.Kill() })
	waitOutput(t, &stderr, "ready: serving", 60*time.Second)
	// Pace the touches: about 1 s for the whole snapshot (plus what the
	// faults cost).
	pages := int64(mib) << 20 / 4096
	if backing != "shmem" {
		pages = int64(mib) << 20 / uffd.DefaultHugePageSize()
	}
	delay := strconv.FormatInt(max(1, 1000000/pages), 10)
	shared = startRestartTarget(t, tp, sock, filepath.Join(dir, "shared.raw"), "--delay-us", delay, "--seed", "1", "--hold")
	clone = startRestartTarget(t, tp, sock, filepath.Join(dir, "clone.raw"), "--delay-us", delay, "--seed", "2", "--private", "--write-xor", "0x5a", "--hold")
	waitOutput(t, &shared.out, "attached to", 30*time.Second)
	waitOutput(t, &clone.out, "attached to", 30*time.Second)
	time.Sleep(300 * time.Millisecond) // some pages in, most not
	return sock, ld, shared, clone
}

// TestLoadRestartAdopt: a server SIGKILLed in the middle of a restore into
// a shared target and a private clone that writes; `load --adopt` on the
// same socket takes both back, and both finish with the snapshot's bytes
// (the clone's writes kept). The time from the new server's start to its
// first served fault is reported.
func TestLoadRestartAdopt(t *testing.T) {
	loadRequire(t)
	mib := restartMiB(t)
	for _, backing := range []string{"shmem", "memfd"} {
		t.Run(backing, func(t *testing.T) {
			if backing == "memfd" {
				have, _, err := uffd.Supported(uffd.OpenOptions{Via: uffd.ViaSyscall})
				if err != nil || have&uffd.FeatureMinorHugetlbfs == 0 {
					testutil.Skip(t, "kernel lacks minor faults on hugetlbfs")
				}
				testutil.RequireHugePages(t, int64(mib)/2+1)
			}
			freeBefore := freeHugePages()
			snap, img := restartSnap(t, mib, 1)
			sock, ld, shared, clone := restartSetup(t, backing, snap, mib)
			ld.Process.Signal(syscall.SIGKILL)
			ld.Wait()
			// Both are in the middle: neither finished while there was no server.
			time.Sleep(200 * time.Millisecond)
			for _, tg := range []*restartTarget{shared, clone} {
				if strings.Contains(tg.out.String(), `"pages":`) {
					t.Fatalf("a target finished before the server was killed (pace it slower):\n%s", tg.out.String())
				}
			}
			var stderr syncBuf
			ld2 := loadCmd("load", snap, "--socket", sock, "--backing", backing, "--adopt", "--workers", "1")
			ld2.Stderr = &stderr
			if err := ld2.Start(); err != nil {
				t.Fatal(err)
			}
			defer ld2.Process.Kill()
			for _, tg := range []*restartTarget{shared, clone} {
				waitOutput(t, &tg.out, `"pages":`, 600*time.Second)
				if !strings.Contains(tg.out.String(), `"reattaches":1`) {
					t.Errorf("target output lacks \"reattaches\":1:\n%s", tg.out.String())
				}
			}
			// No fd leaked by re-attaching: a re-attached target holds as
			// many fds as one attached afresh to the new server.
			fresh := startRestartTarget(t, loadTarget(t), sock, filepath.Join(t.TempDir(), "fresh.raw"), "--pattern", "fraction:0.01", "--hold")
			waitOutput(t, &fresh.out, `"pages":`, 60*time.Second)
			fdsFresh := countProcFDs(t, fresh.cmd.Process.Pid)
			for _, tg := range []*restartTarget{shared, clone, fresh} {
				if n := countProcFDs(t, tg.cmd.Process.Pid); n != fdsFresh {
					t.Errorf("a re-attached target holds %d fds, a fresh one %d", n, fdsFresh)
				}
				tg.stdin.Close() // detach
				if code := waitExit(t, tg.cmd, 60*time.Second); code != 0 {
					t.Fatalf("target exited %d:\n%s\nserver:\n%s", code, tg.out.String(), stderr.String())
				}
			}
			waitOutput(t, &stderr, "first fault served", 10*time.Second)
			m := regexp.MustCompile(`adopted: first fault served ([0-9.]+) ms after start`).FindStringSubmatch(stderr.String())
			a := regexp.MustCompile(`adopted: .*units present.*`).FindString(stderr.String())
			if m == nil || a == "" {
				t.Fatalf("server output:\n%s", stderr.String())
			}
			t.Logf("%s MiB %s: restarted server: %s; first fault served %s ms after its start", strconv.Itoa(mib), backing, a, m[1])
			if got, _ := os.ReadFile(shared.dump); !bytes.Equal(got, img) {
				t.Errorf("the shared target's dump differs from the snapshot")
			}
			want := bytes.Clone(img)
			ps := 4096
			if backing != "shmem" {
				ps = int(uffd.DefaultHugePageSize())
			}
			for i := 0; i < len(want); i += ps {
				want[i] ^= 0x5a
			}
			if got, _ := os.ReadFile(clone.dump); !bytes.Equal(got, want) {
				t.Errorf("the clone's dump is not the snapshot with its own writes")
			}
			if !strings.Contains(stderr.String(), "re-attached: 1 mapping") {
				t.Errorf("server output lacks re-attached lines:\n%s", stderr.String())
			}
			ld2.Process.Signal(syscall.SIGTERM)
			if code := waitExit(t, ld2, 30*time.Second); code != 0 {
				t.Errorf("load --adopt exited %d:\n%s", code, stderr.String())
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Error("socket left behind")
			}
			if _, err := os.Lstat(sock + ".fills"); !errors.Is(err, os.ErrNotExist) {
				t.Error("fill journal left behind after a clean stop")
			}
			if backing == "memfd" {
				// Every process that held the backing is gone: its huge
				// pages are back in the pool (other packages' tests may
				// hold some for a moment).
				deadline := time.Now().Add(10 * time.Second)
				for freeHugePages() < freeBefore && time.Now().Before(deadline) {
					time.Sleep(50 * time.Millisecond)
				}
				if f := freeHugePages(); f < freeBefore {
					t.Errorf("huge pages free: %d before, %d after everything exited", freeBefore, f)
				}
			}
		})
	}
}

// TestLoadRestartRefused: a server restarted with another snapshot (same
// size and layout) is refused by every waiting target, which exits 1
// naming the cause; a server restarted without --adopt is refused too.
func TestLoadRestartRefused(t *testing.T) {
	loadRequire(t)
	const mib = 8
	snap, _ := restartSnap(t, mib, 1)
	other, _ := restartSnap(t, mib, 2)
	for _, c := range []struct {
		name, snap, want string
		args             []string
	}{
		{"other snapshot", other, "serves another snapshot", []string{"--adopt"}},
		{"without --adopt", snap, "restart `uffdrestore load` with --adopt", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			sock, ld, shared, clone := restartSetup(t, "shmem", snap, mib)
			ld.Process.Signal(syscall.SIGKILL)
			ld.Wait()
			var stderr syncBuf
			ld2 := loadCmd(append([]string{"load", c.snap, "--socket", sock, "--backing", "shmem"}, c.args...)...)
			ld2.Stderr = &stderr
			if err := ld2.Start(); err != nil {
				t.Fatal(err)
			}
			defer ld2.Process.Kill()
			for _, tg := range []*restartTarget{shared, clone} {
				if code := waitExit(t, tg.cmd, 30*time.Second); code != 1 {
					t.Errorf("target exited %d, want 1:\n%s", code, tg.out.String())
				}
				if !strings.Contains(tg.out.String(), c.want) {
					t.Errorf("target output lacks %q:\n%s", c.want, tg.out.String())
				}
			}
			if strings.Contains(stderr.String(), "adopted:") {
				t.Errorf("the server adopted a backing:\n%s", stderr.String())
			}
			ld2.Process.Signal(syscall.SIGTERM)
			waitExit(t, ld2, 30*time.Second)
		})
	}
}

func countProcFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
