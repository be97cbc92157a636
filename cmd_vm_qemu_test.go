//go:build vmtest

// QEMU tests (make test-vm): a real qemu-system-x86_64 (TCG), a Debian
// guest kernel (UFFDRESTORE_VM_KERNEL, or where .ci/run extracts it) and a
// busybox initramfs built here. They run the built bin/uffdrestore and
// bin/libuffdrestore-preload.so (make test-vm builds them first).

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/vmguest"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
	"github.com/uffdrestore/uffdrestore/vm"
)

type vmEnv struct {
	qemu, kernel, busybox string
	bin, preload          string
}

func vmRequire(t *testing.T) vmEnv {
	t.Helper()
	loadRequire(t)
	var e vmEnv
	var err error
	if e.qemu, e.kernel, e.busybox, err = vmguest.Find(); err != nil {
		testutil.Skip(t, "%v", err)
	}
	for _, p := range []*string{&e.bin, &e.preload} {
		name := "bin/uffdrestore"
		if p == &e.preload {
			name = "bin/" + preloadName
		}
		abs, _ := filepath.Abs(name)
		if _, err := os.Stat(abs); err != nil {
			t.Fatalf("%s: %v (make test-vm builds it: run make build)", abs, err)
		}
		*p = abs
	}
	return e
}

// shmDir is a directory on a tmpfs (guest RAM files), removed at the end.
func shmDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/dev/shm", "uffdrestore-vmtest-")
	if err != nil {
		d = t.TempDir()
	} else {
		t.Cleanup(func() { os.RemoveAll(d) })
	}
	return d
}

type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// The whole pipeline of make vm-demo at test size: boot, checkpoint,
// plain restore, two lazy private clones from one shmem-backed server
// (each unit decoded once; the second clone's check decodes little), one
// clone's write invisible to the other.
func TestVMPipeline(t *testing.T) {
	e := vmRequire(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, err := runVMPipeline(ctx, vmPipelineConfig{RAM: 128 << 20, Lines: 1000000, Clones: 2, Backing: restore.BackingShmem,
		Out: tlog{t}, Dir: shmDir(t), Preload: e.preload})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(r.summary())
	if len(r.Clones) != 2 || r.Checkpoint.DeviceStateBytes == 0 || len(r.Checkpoint.Backends) != 1 || r.Checkpoint.Backends[0].ID != "mem" {
		t.Fatalf("result %+v", r)
	}
	c1, c2 := r.Clones[0], r.Clones[1]
	// Lazy: the first clone resumed with a small part of its RAM decoded,
	// and checking its pattern decoded at least the pattern.
	if c1.DecodedResume > int64(r.RAM)/4 || c1.DecodedVerify < r.Pattern {
		t.Errorf("clone 1 decoded %d bytes before resuming and %d checking a %d-byte pattern", c1.DecodedResume, c1.DecodedVerify, r.Pattern)
	}
	// One fill: the second clone found the pattern decoded already. It may
	// touch a unit or two the first did not (the guest's own allocations
	// while it checks differ run to run), never a share of what the first
	// decoded (without the shared fill it would decode as much).
	if c2.DecodedVerify > c1.DecodedVerify/4 {
		t.Errorf("clone 2 decoded %d bytes checking the pattern clone 1 had filled (clone 1: %d bytes, pattern %d bytes)", c2.DecodedVerify, c1.DecodedVerify, r.Pattern)
	}
	if r.Stats.BytesDecoded > int64(r.RAM) || r.Stats.Refills != 0 {
		t.Errorf("server stats %+v", r.Stats)
	}
}

// bootGuest starts a guest whose RAM is a shared file, waits until it is
// ready and returns its console and boot id.
func bootGuest(t *testing.T, e vmEnv, dir string, cfg vmguest.Config, ram uint64) (vmguest.Machine, *exec.Cmd, *vmguest.Console, string) {
	t.Helper()
	ird, err := vmguest.Initramfs(e.busybox, cfg)
	if err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "initrd")
	if err := os.WriteFile(initrd, ird, 0o644); err != nil {
		t.Fatal(err)
	}
	m := vmguest.Machine{Kernel: e.kernel, Initrd: initrd, RAM: ram, MemPath: filepath.Join(dir, "ram"), Share: true,
		Serial: filepath.Join(dir, "serial-boot"), QMP: filepath.Join(dir, "qmp-boot")}
	q := exec.Command(e.qemu, m.Args()...)
	q.Stderr = tlog{t}
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Process.Kill(); q.Wait() })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	con, err := vmguest.DialConsole(ctx, m.Serial, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { con.Close() })
	boot, err := con.WaitReady(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return m, q, con, boot
}

// startCLI starts bin/uffdrestore with args, output captured.
func startCLI(t *testing.T, e vmEnv, args ...string) (*exec.Cmd, *syncBuf, *syncBuf) {
	t.Helper()
	var out, errb syncBuf
	c := exec.Command(e.bin, args...)
	c.Stdout, c.Stderr = &out, &errb
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.ProcessState == nil {
			c.Process.Kill()
			c.Wait()
		}
	})
	return c, &out, &errb
}

// The commands as processes: vm checkpoint --resume of a live guest, vm
// restore with its in-process server, then `load` with two vm restore
// --private clones (load's stats: each unit filled once).
func TestVMCheckpointRestoreCLI(t *testing.T) {
	e := vmRequire(t)
	dir := shmDir(t)
	cfg := vmguest.Config{PatternLines: 500000}
	want := cfg.PatternMD5()
	m, boot, con, bootID := bootGuest(t, e, dir, cfg, 128<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var cnt [2]int
	if err := checkGuest(ctx, con, "booted guest", want, bootID, -1, &cnt); err != nil {
		t.Fatal(err)
	}

	snap := filepath.Join(dir, "vm.snap")
	ck, out, errb := startCLI(t, e, "vm", "checkpoint", "--qmp", m.QMP, "--output", snap, "--resume")
	if code := waitExit(t, ck, 2*time.Minute); code != 0 {
		t.Fatalf("vm checkpoint exited %d: %s", code, errb.String())
	}
	t.Log(errb.String(), out.String())
	for _, s := range []string{"VM stopped", "device state saved", `RAM backend "mem"`} {
		if !strings.Contains(errb.String(), s) {
			t.Errorf("vm checkpoint progress lacks %q", s)
		}
	}
	if !strings.Contains(out.String(), "VM resumed") {
		t.Errorf("vm checkpoint output: %q", out.String())
	}
	// --resume: the guest runs on, its memory unchanged.
	ckCnt := cnt[1]
	if err := checkGuest(ctx, con, "guest after checkpoint --resume", want, bootID, ckCnt, &cnt); err != nil {
		t.Fatal(err)
	}
	info, err := exec.Command(e.bin, "snapshot", "info", snap).CombinedOutput()
	if err != nil || !strings.Contains(string(info), "attachment:      qemu-device-state") {
		t.Errorf("snapshot info: %v\n%s", err, info)
	}
	con.Close()
	boot.Process.Kill()
	boot.Wait()

	qargs := func(name string, share bool) (vmguest.Machine, []string) {
		m2 := m
		m2.Serial, m2.QMP, m2.MemPath, m2.Share = filepath.Join(dir, "serial-"+name), "", "/nonexistent/replaced", share
		return m2, append([]string{e.qemu}, m2.Args()...)
	}
	// vm restore, in-process server on a hugetlbfs file (the clones below
	// use load's auto backing, a hugetlb memfd; TestVMPipeline shmem).
	testutil.RequireHugePages(t, 64)
	mnt := testutil.MountHugetlbfs(t)
	m1, a1 := qargs("restore", true)
	rs, rout, rerr := startCLI(t, e, append([]string{"vm", "restore", snap, "--backing", "hugetlbfs", "--hugetlbfs", mnt, "--"}, a1...)...)
	waitOutputOrExit(t, rs, rout, rerr, "resumed:", time.Minute)
	if err := verifyRestored(ctx, m1, nil, "vm restore", want, bootID, ckCnt); err != nil {
		t.Fatal(err)
	}
	rs.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, rs, 30*time.Second); code != 0 {
		t.Fatalf("vm restore exited %d after SIGTERM: %s", code, rerr.String())
	}
	if !strings.Contains(rerr.String(), "quitting QEMU") || !strings.Contains(rerr.String(), "decoded") || !strings.Contains(rerr.String(), "backing hugetlbfs") {
		t.Errorf("vm restore stderr: %s", rerr.String())
	}

	// load + two private clones.
	sock := filepath.Join(dir, "load.sock")
	ld, lerr := startCLI2(t, e, "ready:", "load", snap, "--socket", sock)
	var cons []*vmguest.Console
	var restores []*exec.Cmd
	for i := 0; i < 2; i++ {
		mc, ac := qargs(fmt.Sprintf("clone%d", i), false)
		c, cout, cerr := startCLI(t, e, append([]string{"vm", "restore", snap, "--socket", sock, "--private", "--"}, ac...)...)
		waitOutputOrExit(t, c, cout, cerr, "resumed:", time.Minute)
		restores = append(restores, c)
		cc, err := vmguest.DialConsole(ctx, mc.Serial, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		if err := checkGuest(ctx, cc, fmt.Sprintf("clone %d", i+1), want, bootID, ckCnt, &cnt); err != nil {
			t.Fatal(err)
		}
		cons = append(cons, cc)
	}
	if got, err := cons[0].Command(ctx, "write", "only-in-clone-1"); err != nil || got != cfg.WrittenMD5("only-in-clone-1") {
		t.Fatalf("clone 1 write: %q %v", got, err)
	}
	if got, err := cons[1].Command(ctx, "verify", ""); err != nil || got != want {
		t.Fatalf("clone 2 after clone 1's write: %q %v, want %s", got, err, want)
	}
	for _, c := range restores {
		c.Process.Signal(syscall.SIGTERM)
		if code := waitExit(t, c, 30*time.Second); code != 0 {
			t.Errorf("vm restore --private exited %d", code)
		}
	}
	ld.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, ld, 30*time.Second); code != 0 {
		t.Fatalf("load exited %d: %s", code, lerr.String())
	}
	var st restore.Stats
	for _, l := range strings.Split(lerr.String(), "\n") {
		if j, ok := strings.CutPrefix(l, "stats: "); ok {
			if err := json.Unmarshal([]byte(j), &st); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Logf("load stats: %+v", st)
	if st.UnitsPresent == 0 || st.FilledByFault+st.FilledByPrefill != st.UnitsPresent || st.Refills != 0 || st.BytesDecoded > 128<<20 {
		t.Errorf("two clones of one server: %d+%d units filled, %d present, %d refills, %d bytes decoded: want each unit decoded once",
			st.FilledByFault, st.FilledByPrefill, st.UnitsPresent, st.Refills, st.BytesDecoded)
	}
}

func startCLI2(t *testing.T, e vmEnv, ready string, args ...string) (*exec.Cmd, *syncBuf) {
	t.Helper()
	c, out, errb := startCLI(t, e, args...)
	waitOutputOrExit(t, c, out, errb, ready, time.Minute)
	return c, errb
}

// waitOutputOrExit waits for sub on stdout or stderr; the command exiting
// first fails the test with its output.
func waitOutputOrExit(t *testing.T, c *exec.Cmd, out, errb *syncBuf, sub string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(out.String(), sub) && !strings.Contains(errb.String(), sub) {
		var ws syscall.WaitStatus
		if pid, _ := syscall.Wait4(c.Process.Pid, &ws, syscall.WNOHANG, nil); pid == c.Process.Pid {
			t.Fatalf("%s exited (%v) before %q:\n%s\n%s", c.Args[:3], ws.ExitStatus(), sub, out.String(), errb.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %v:\n%s\n%s", sub, d, out.String(), errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startBareQEMU starts QEMU with no guest (SeaBIOS finds nothing to boot
// and idles) and returns its QMP socket.
func startBareQEMU(t *testing.T, e vmEnv, dir, name string, args ...string) string {
	t.Helper()
	qmp := filepath.Join(dir, name+".qmp")
	a := append([]string{"-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc,accel=tcg",
		"-qmp", "unix:" + qmp + ",server=on,wait=off"}, args...)
	q := exec.Command(e.qemu, a...)
	q.Stderr = tlog{t}
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Process.Kill(); q.Wait() })
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(qmp); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return qmp
}

func TestVMCheckpointErrors(t *testing.T) {
	e := vmRequire(t)
	dir := shmDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ck := func(qmp string) error {
		_, err := vm.Checkpoint(ctx, vm.CheckpointOptions{QMP: qmp, Output: filepath.Join(dir, "x.snap"), Timeout: 30 * time.Second})
		return err
	}
	fileArgs := func(id, share string) []string {
		return []string{"-object", "memory-backend-file,id=" + id + ",size=64M,mem-path=" + filepath.Join(dir, id+".ram") + ",share=" + share,
			"-machine", "memory-backend=" + id}
	}
	cases := []struct {
		name string
		qmp  func() string
		want error
		msg  string
	}{
		{"missing socket", func() string { return filepath.Join(dir, "none.qmp") }, vm.ErrQMPSocket, "-qmp unix:"},
		{"not qemu", func() string {
			p := filepath.Join(dir, "fake.qmp")
			l, err := net.Listen("unix", p)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Write([]byte("220 smtp.example ESMTP\r\n"))
					c.Close()
				}
			}()
			return p
		}, vm.ErrNotQEMU, "not a QMP greeting"},
		{"ram not file", func() string { return startBareQEMU(t, e, dir, "ram", "-m", "64M") }, vm.ErrRAMNotFile, "memory-backend-file,id=pc.ram,size=64M"},
		{"not shared", func() string { return startBareQEMU(t, e, dir, "priv", fileArgs("priv", "off")...) }, vm.ErrRAMNotShared, "share=on"},
		{"not running", func() string { return startBareQEMU(t, e, dir, "stopped", append(fileArgs("stopped", "on"), "-S")...) }, vm.ErrNotRunning, `"prelaunch"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ck(c.qmp())
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("%v, want %v mentioning %q", err, c.want, c.msg)
			}
			if _, serr := os.Stat(filepath.Join(dir, "x.snap")); serr == nil {
				t.Fatal("a failed checkpoint left a snapshot")
			}
		})
	}
	// The CLI says the same, exit 1.
	out, err := exec.Command(e.bin, "vm", "checkpoint", "--qmp", filepath.Join(dir, "none.qmp"), "--output", filepath.Join(dir, "y.snap")).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "QMP socket missing") {
		t.Errorf("CLI, missing socket: %v\n%s", err, out)
	}
}

func TestVMRestoreErrors(t *testing.T) {
	e := vmRequire(t)
	dir := shmDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// A real (guestless) VM snapshot of 64 MiB.
	qmp := startBareQEMU(t, e, dir, "src", "-object", "memory-backend-file,id=mem,size=64M,mem-path="+filepath.Join(dir, "src.ram")+",share=on",
		"-machine", "memory-backend=mem")
	snap := filepath.Join(dir, "vm.snap")
	if _, err := vm.Checkpoint(ctx, vm.CheckpointOptions{QMP: qmp, Output: snap}); err != nil {
		t.Fatal(err)
	}
	// A memory-only snapshot.
	plain := filepath.Join(dir, "plain.snap")
	f, err := os.Create(plain)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := snapshot.CreateFromFile(ctx, filepath.Join(dir, "src.ram"), f, snapshot.Options{RegionName: "mem"}); err != nil {
		t.Fatal(err)
	}
	f.Close()

	sock := filepath.Join(dir, "ram.sock")
	srv, err := vm.Serve(ctx, snap, sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	vmArgs := func(size string) []string {
		return []string{"-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
			"-object", "memory-backend-file,id=mem,size=" + size + ",mem-path=/replaced,share=on", "-machine", "memory-backend=mem"}
	}
	rs := func(snap string, cmd []string, timeout time.Duration) (*vm.VM, error) {
		return vm.Restore(ctx, vm.RestoreOptions{Snapshot: snap, Socket: sock, Private: true, Command: cmd,
			Launch: vmLauncher(e.preload, ""), Timeout: timeout})
	}
	if _, err := rs(plain, append([]string{e.qemu}, vmArgs("64M")...), time.Minute); !errors.Is(err, vm.ErrNoDeviceState) {
		t.Errorf("memory-only snapshot: %v", err)
	}
	if _, err := vm.Serve(ctx, plain, filepath.Join(dir, "p.sock"), nil); !errors.Is(err, vm.ErrNoDeviceState) {
		t.Errorf("serving a memory-only snapshot for a VM: %v", err)
	}
	if _, err := rs(snap, append([]string{e.qemu}, vmArgs("128M")...), time.Minute); !errors.Is(err, vm.ErrRAMSize) || !strings.Contains(err.Error(), "size=64M") {
		t.Errorf("size mismatch: %v", err)
	}
	if _, err := rs(snap, append([]string{"/bin/true"}, vmArgs("64M")...), time.Minute); !errors.Is(err, vm.ErrNotQEMU) {
		t.Errorf("/bin/true: %v", err)
	}
	if _, err := rs(snap, append([]string{"/bin/sleep", "60", "--"}, vmArgs("64M")...), 2*time.Second); !errors.Is(err, vm.ErrNotQEMU) {
		t.Errorf("sleep: %v", err)
	}
	// A server of another snapshot (32 MiB of RAM "mem"): refused before
	// QEMU starts.
	other := filepath.Join(dir, "other.ram")
	if err := os.WriteFile(other, make([]byte, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	otherSnap := filepath.Join(dir, "other.snap")
	if out, err := exec.Command(e.bin, "snapshot", "create", "--from-file", other, "--output", otherSnap).CombinedOutput(); err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	otherSock := filepath.Join(dir, "other.sock")
	startCLI2(t, e, "ready:", "load", otherSnap, "--socket", otherSock)
	_, err = vm.Restore(ctx, vm.RestoreOptions{Snapshot: snap, Socket: otherSock, Private: true, Command: append([]string{e.qemu}, vmArgs("64M")...),
		Launch: vmLauncher(e.preload, "")})
	if !errors.Is(err, vm.ErrRAMSize) || !strings.Contains(err.Error(), "serve this snapshot") {
		t.Errorf("server of another snapshot: %v", err)
	}
	// And the guestless VM itself restores and runs.
	v, err := rs(snap, append([]string{e.qemu}, vmArgs("64M")...), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	var st struct {
		Status string `json:"status"`
	}
	if err := v.QMP.Run(ctx, "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Fatalf("restored VM: %+v %v", st, err)
	}
	// The CLI: a memory-only snapshot, exit 1, the named error.
	out, err := exec.Command(e.bin, append([]string{"vm", "restore", plain, "--", e.qemu}, vmArgs("64M")...)...).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "snapshot has no device state") {
		t.Errorf("CLI, memory-only snapshot: %v\n%s", err, out)
	}
}
