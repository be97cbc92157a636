package vm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/vm/internal/guest"
)

func TestScratch(t *testing.T) {
	q, k, bb, err := guest.Find()
	if err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	cfg := guest.Config{PatternLines: 2000000}
	ird, err := guest.Initramfs(bb, cfg)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "initrd"), ird, 0o644)
	m := guest.Machine{Kernel: k, Initrd: filepath.Join(dir, "initrd"), RAM: 128 << 20, MemPath: "/dev/shm/scratch.ram", Share: true,
		Serial: filepath.Join(dir, "serial"), QMP: filepath.Join(dir, "qmp")}
	cmd := exec.Command(q, m.Args()...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	con, err := guest.DialConsole(ctx, m.Serial, func(s string) { t.Log("guest:", s) })
	if err != nil {
		t.Fatal(err)
	}
	boot, err := con.WaitReady(ctx)
	t.Log("ready", boot, err, time.Since(start))
	st := time.Now()
	v, err := con.Command(ctx, "verify", "")
	t.Log("verify", v, err, cfg.PatternMD5(), time.Since(st))
	n, err := con.Command(ctx, "counter", "")
	t.Log("counter", n, err)
	res, err := Checkpoint(ctx, CheckpointOptions{QMP: m.QMP, Output: filepath.Join(dir, "vm.snap"), Resume: true, Progress: func(s string) { t.Log(s) }})
	t.Logf("%+v %v", res, err)
	n, err = con.Command(ctx, "counter", "")
	t.Log("counter", n, err)
}
