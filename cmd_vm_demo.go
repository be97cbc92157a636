package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/internal/vmguest"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/vm"
)

func vmDemoCmd() *cli.Command {
	return &cli.Command{
		Name:   "demo",
		Hidden: true,
		Usage:  "make vm-demo: boot a busybox guest, checkpoint it, restore it plainly and as N lazy private clones, verify memory",
		Description: `Needs qemu-system-x86_64, busybox-static and a guest kernel (UFFDRESTORE_VM_KERNEL).

Examples:
   uffdrestore vm demo --ram 512M --clones 2`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "ram", Value: "512M", Usage: "guest RAM"},
			&cli.IntFlag{Name: "lines", Value: 8000000, Usage: "guest pattern: seq 1 `N` in a tmpfs"},
			&cli.IntFlag{Name: "clones", Value: 2, Usage: "private clones from one server"},
			&cli.StringFlag{Name: "backing", Value: "auto", Usage: "server backing"},
			&cli.BoolFlag{Name: "verbose", Usage: "show the guest's console"},
		},
		Action: func(c *cli.Context) error {
			ram, err := parseMiB(c.String("ram"))
			if err != nil {
				return cli.Exit("vm demo: --ram: "+err.Error(), 2)
			}
			backing, err := restore.ParseBacking(c.String("backing"))
			if err != nil {
				return cli.Exit("vm demo: --backing: "+err.Error(), 2)
			}
			sig := notifyShutdown(c.Context)
			defer sig.Stop()
			cfg := vmPipelineConfig{RAM: ram, Lines: c.Int("lines"), Clones: c.Int("clones"), Backing: backing,
				Out: c.App.Writer, Verbose: c.Bool("verbose")}
			r, err := runVMPipeline(sig.Graceful, cfg)
			if err != nil {
				return cli.Exit("vm demo: "+err.Error(), 1)
			}
			fmt.Fprintln(c.App.Writer, r.summary())
			return nil
		},
	}
}

func parseMiB(s string) (uint64, error) {
	n, err := strconv.ParseUint(s[:len(s)-1], 10, 64)
	if err != nil || len(s) < 2 {
		return 0, fmt.Errorf("%q: want e.g. 512M or 1G", s)
	}
	switch s[len(s)-1] {
	case 'M':
		return n << 20, nil
	case 'G':
		return n << 30, nil
	}
	return 0, fmt.Errorf("%q: want e.g. 512M or 1G", s)
}

type vmPipelineConfig struct {
	RAM     uint64
	Lines   int
	Clones  int
	Backing restore.BackingKind
	Out     io.Writer
	Verbose bool
	Dir     string // default: a new directory in /dev/shm
	Preload string // the preload library (default: next to this executable)
}

type vmClone struct {
	Resumed       time.Duration
	DecodedResume int64 // bytes decoded by the server between this clone's start and its resume
	DecodedVerify int64 // bytes decoded from its resume until its memory was verified
	Counter       [2]int
}

type vmPipelineResult struct {
	RAM           uint64
	Pattern       int64
	Checkpoint    vm.CheckpointResult
	SnapshotBytes int64
	Plain         time.Duration
	PlainCopy     time.Duration
	Clones        []vmClone
	Stats         restore.Stats
	CounterAtCkpt int
}

func (r vmPipelineResult) summary() string {
	s := fmt.Sprintf("vm-demo: %d clones resumed, memory verified; time to resumed: lazy %s vs plain %s (copy of the %d MiB RAM file %s)",
		len(r.Clones), r.Clones[0].Resumed.Round(time.Millisecond), r.Plain.Round(time.Millisecond), r.RAM>>20, r.PlainCopy.Round(time.Millisecond))
	s += "; RAM decoded after resume:"
	for i, c := range r.Clones {
		sep := ","
		if i == 0 {
			sep = ""
		}
		s += fmt.Sprintf("%s clone %d %.1f MiB", sep, i+1, float64(c.DecodedVerify)/(1<<20))
	}
	s += fmt.Sprintf(" (server: %.1f of %d MiB decoded in all, %d units filled once each)", float64(r.Stats.BytesDecoded)/(1<<20), r.RAM>>20, r.Stats.FilledByFault+r.Stats.FilledByPrefill)
	return s
}

// runVMPipeline is make vm-demo and the QEMU test: boot a guest, checkpoint
// it, restore it from a plain copy of its RAM file (the baseline), then as
// cfg.Clones private clones served lazily by one in-process server, checking
// the guest's memory pattern and counter in each, and that one clone's write
// stays out of the others.
func runVMPipeline(ctx context.Context, cfg vmPipelineConfig) (res vmPipelineResult, err error) {
	say := func(format string, args ...any) { fmt.Fprintf(cfg.Out, "vm-demo: "+format+"\n", args...) }
	qemu, kernel, busybox, err := vmguest.Find()
	if err != nil {
		return res, err
	}
	dir := cfg.Dir
	if dir == "" {
		base := ""
		if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
			base = "/dev/shm"
		}
		if dir, err = os.MkdirTemp(base, "uffdrestore-vm-demo-"); err != nil {
			return res, err
		}
		defer os.RemoveAll(dir)
	}
	gcfg := vmguest.Config{PatternLines: cfg.Lines}
	ird, err := vmguest.Initramfs(busybox, gcfg)
	if err != nil {
		return res, err
	}
	initrd := filepath.Join(dir, "initrd")
	if err := os.WriteFile(initrd, ird, 0o644); err != nil {
		return res, err
	}
	res.RAM, res.Pattern = cfg.RAM, gcfg.PatternBytes()
	want := gcfg.PatternMD5()
	var logf func(string)
	if cfg.Verbose {
		logf = func(s string) { fmt.Fprintf(cfg.Out, "  guest| %s\n", s) }
	}
	machine := func(n string, mem string, share bool) vmguest.Machine {
		return vmguest.Machine{Kernel: kernel, Initrd: initrd, RAM: cfg.RAM, MemPath: mem, Share: share,
			Serial: filepath.Join(dir, "serial-"+n), QMP: filepath.Join(dir, "qmp-"+n)}
	}

	// 1. Boot.
	m := machine("boot", filepath.Join(dir, "ram"), true)
	say("booting a %d MiB guest under %s (TCG); its init writes `seq 1 %d` (%.1f MiB) into a tmpfs", cfg.RAM>>20, filepath.Base(qemu), cfg.Lines, float64(res.Pattern)/(1<<20))
	boot := exec.Command(qemu, m.Args()...)
	boot.Stderr = os.Stderr
	if err := boot.Start(); err != nil {
		return res, err
	}
	defer func() { boot.Process.Kill(); boot.Wait() }()
	bctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	con, err := vmguest.DialConsole(bctx, m.Serial, logf)
	if err != nil {
		return res, err
	}
	defer con.Close()
	t0 := time.Now()
	bootID, err := con.WaitReady(bctx)
	if err != nil {
		return res, err
	}
	if err := checkGuest(bctx, con, "booted guest", want, bootID, -1, &[2]int{}); err != nil {
		return res, err
	}
	var cnt [2]int
	if err := checkGuest(bctx, con, "booted guest", want, bootID, -1, &cnt); err != nil {
		return res, err
	}
	res.CounterAtCkpt = cnt[1]
	say("guest ready after %s, pattern verified, counter %d", time.Since(t0).Round(time.Second), cnt[1])

	// 2. Checkpoint, leaving the VM stopped, then quit it.
	snap := filepath.Join(dir, "vm.snap")
	res.Checkpoint, err = vm.Checkpoint(ctx, vm.CheckpointOptions{QMP: m.QMP, Output: snap,
		Progress: func(s string) { say("checkpoint: %s", s) }})
	if err != nil {
		return res, err
	}
	if fi, err := os.Stat(snap); err == nil {
		res.SnapshotBytes = fi.Size()
	}
	ckCnt := cnt[1]
	con.Close()
	boot.Process.Kill()
	boot.Wait()
	args := func(m vmguest.Machine) []string { return append([]string{qemu}, m.Args()...) }

	// 3. Plain restore: copy the RAM file, QEMU maps the copy.
	m = machine("plain", filepath.Join(dir, "ram-never-used"), true)
	start := time.Now()
	plainRAM := filepath.Join(dir, "ram-plain")
	if err := copyFile(filepath.Join(dir, "ram"), plainRAM); err != nil {
		return res, err
	}
	res.PlainCopy = time.Since(start)
	pv, err := vm.Restore(ctx, vm.RestoreOptions{Snapshot: snap, Command: args(m), RAMFiles: []string{plainRAM}, Stderr: os.Stderr})
	if err != nil {
		return res, fmt.Errorf("plain restore: %w", err)
	}
	res.Plain = time.Since(start)
	if err := verifyRestored(ctx, m, logf, "plain restore", want, bootID, ckCnt); err != nil {
		pv.Close()
		return res, err
	}
	pv.Close()
	os.Remove(plainRAM)
	say("plain restore (copy %d MiB RAM file, start QEMU, load device state, cont): resumed in %s, memory verified",
		cfg.RAM>>20, res.Plain.Round(time.Millisecond))

	// 4. Lazy private clones from one in-process server.
	start = time.Now()
	sock := filepath.Join(dir, "ram.sock")
	srv, err := vm.Serve(ctx, snap, sock, nil, restore.WithBacking(cfg.Backing))
	if err != nil {
		return res, err
	}
	defer srv.Close()
	var clones []*vm.VM
	defer func() {
		for _, v := range clones {
			v.Close()
		}
	}()
	var cons []*vmguest.Console
	defer func() {
		for _, c := range cons {
			c.Close()
		}
	}()
	for i := 0; i < cfg.Clones; i++ {
		if i > 0 {
			start = time.Now()
		}
		before := srv.Stats().BytesDecoded
		m := machine(fmt.Sprintf("clone%d", i+1), filepath.Join(dir, "ram-never-used"), false)
		v, err := vm.Restore(ctx, vm.RestoreOptions{Snapshot: snap, Socket: sock, Private: true, Command: args(m),
			Launch: vmLauncher(cfg.Preload, ""), Stderr: os.Stderr})
		if err != nil {
			return res, fmt.Errorf("clone %d: %w", i+1, err)
		}
		var cl vmClone
		cl.Resumed = time.Since(start)
		clones = append(clones, v)
		atResume := srv.Stats().BytesDecoded
		cl.DecodedResume = atResume - before
		vctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		con, err := vmguest.DialConsole(vctx, m.Serial, logf)
		if err != nil {
			cancel()
			return res, err
		}
		cons = append(cons, con)
		err = checkGuest(vctx, con, fmt.Sprintf("clone %d", i+1), want, bootID, ckCnt, &cl.Counter)
		cancel()
		if err != nil {
			return res, err
		}
		cl.DecodedVerify = srv.Stats().BytesDecoded - atResume
		res.Clones = append(res.Clones, cl)
		say("clone %d (lazy, private): resumed in %s (%.1f MiB decoded until then), memory verified (%.1f MiB decoded for it), counter %d -> %d",
			i+1, cl.Resumed.Round(time.Millisecond), float64(cl.DecodedResume)/(1<<20), float64(cl.DecodedVerify)/(1<<20), ckCnt, cl.Counter[1])
	}
	// 5. A clone's write stays in that clone.
	if len(cons) >= 2 {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		got, err := cons[0].Command(wctx, "write", "clone-1-was-here")
		if err != nil {
			return res, err
		}
		if w := gcfg.WrittenMD5("clone-1-was-here"); got != w {
			return res, fmt.Errorf("clone 1 after its write: pattern md5 %s, want %s", got, w)
		}
		for i := 1; i < len(cons); i++ {
			got, err := cons[i].Command(wctx, "verify", "")
			if err != nil {
				return res, err
			}
			if got != want {
				return res, fmt.Errorf("clone %d changed by clone 1's write: md5 %s, want %s", i+1, got, want)
			}
		}
		say("clone 1 wrote to its memory; the other clones still hold the checkpointed pattern")
	}
	res.Stats = srv.Stats()
	if n := res.Stats.FilledByFault + res.Stats.FilledByPrefill; n != res.Stats.UnitsPresent || res.Stats.Refills != 0 {
		return res, fmt.Errorf("server filled %d units, %d present, %d refills: a unit was decoded twice", n, res.Stats.UnitsPresent, res.Stats.Refills)
	}
	return res, nil
}

// checkGuest checks a guest's pattern and boot id, and that its counter
// runs on from after (-1: any) — *cnt gets the two readings.
func checkGuest(ctx context.Context, con *vmguest.Console, who, want, bootID string, after int, cnt *[2]int) error {
	if got, err := con.Command(ctx, "boot", ""); err != nil {
		return fmt.Errorf("%s: %w", who, err)
	} else if got != bootID {
		return fmt.Errorf("%s: boot id %s, want %s: the guest rebooted instead of resuming", who, got, bootID)
	}
	got, err := con.Command(ctx, "verify", "")
	if err != nil {
		return fmt.Errorf("%s: %w", who, err)
	}
	if got != want {
		return fmt.Errorf("%s: guest memory pattern md5 %s, want %s", who, got, want)
	}
	for i := 0; i < 2; i++ {
		if i == 1 {
			time.Sleep(500 * time.Millisecond)
		}
		s, err := con.Command(ctx, "counter", "")
		if err != nil {
			return fmt.Errorf("%s: %w", who, err)
		}
		if cnt[i], err = strconv.Atoi(s); err != nil {
			return fmt.Errorf("%s: counter %q", who, s)
		}
	}
	if after >= 0 && cnt[0] < after {
		return fmt.Errorf("%s: counter %d, it was %d at the checkpoint: not the checkpointed guest", who, cnt[0], after)
	}
	if cnt[1] <= cnt[0] {
		return fmt.Errorf("%s: counter stuck at %d: the guest does not run", who, cnt[0])
	}
	return nil
}

func verifyRestored(ctx context.Context, m vmguest.Machine, logf func(string), who, want, bootID string, after int) error {
	vctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	con, err := vmguest.DialConsole(vctx, m.Serial, logf)
	if err != nil {
		return err
	}
	defer con.Close()
	var cnt [2]int
	return checkGuest(vctx, con, who, want, bootID, after, &cnt)
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
