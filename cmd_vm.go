package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
	"github.com/uffdrestore/uffdrestore/vm"
)

func init() {
	registerCommand(&cli.Command{
		Name:            "vm",
		Usage:           "checkpoint a QEMU virtual machine into a snapshot and restore it lazily",
		HideHelpCommand: true,
		Description: `QEMU VMs whose RAM is a shared file are checkpointed over QMP (device state
and RAM in one snapshot) and restored with their RAM served lazily: QEMU
maps the snapshot through the preload library (as "uffdrestore run" does) and
resumes before its memory has been read. Many --private clones of one
snapshot share one fill.

The VM must be started with its RAM in a file, shared, and a QMP socket:
   qemu-system-x86_64 ... \
       -object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm.ram,share=on \
       -machine memory-backend=mem -qmp unix:/tmp/vm.qmp,server=on,wait=off

Examples:
   uffdrestore vm checkpoint --qmp /tmp/vm.qmp --output vm.snap
   uffdrestore vm restore vm.snap -- qemu-system-x86_64 ...same arguments...
   uffdrestore load vm.snap --socket /tmp/vm.sock &
   uffdrestore vm restore vm.snap --socket /tmp/vm.sock --private -- qemu-system-x86_64 ...`,
		Subcommands: []*cli.Command{vmCheckpointCmd(), vmRestoreCmd(), vmDemoCmd()},
	})
}

func vmCheckpointCmd() *cli.Command {
	return &cli.Command{
		Name:  "checkpoint",
		Usage: "save a running QEMU VM (RAM and device state) into one snapshot",
		Description: `Connects to QEMU's QMP socket, finds the RAM backends (query-memdev, qom),
which must be memory-backend-file objects with share=on, sets the
x-ignore-shared migration capability, stops the VM, migrates its device
state only (the RAM stays in its files) to a pipe passed with getfd, then
compresses each RAM file into the snapshot as a region named after its
backend, with the device state inside the same file. The VM is left stopped
unless --resume (it must not run while its RAM is read).

Examples:
   uffdrestore vm checkpoint --qmp /tmp/vm.qmp --output vm.snap
   uffdrestore vm checkpoint --qmp /tmp/vm.qmp --output vm.snap --resume --force`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "qmp", Usage: "QEMU's QMP Unix socket (`PATH`)", Required: true},
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "the snapshot to write (`FILE`)", Required: true},
			&cli.BoolFlag{Name: "resume", Usage: "resume the VM after the checkpoint (default: leave it stopped)"},
			&cli.BoolFlag{Name: "force", Usage: "replace an existing --output"},
			&cli.DurationFlag{Name: "timeout", Value: 2 * time.Minute, Usage: "bound for the device-state migration"},
			&cli.StringFlag{Name: "codec", Value: "zstd", Usage: "zstd, s2 or none"},
		},
		Action: runVMCheckpoint,
	}
}

func runVMCheckpoint(c *cli.Context) error {
	if c.NArg() != 0 {
		return cli.Exit("vm checkpoint: unexpected arguments (give --qmp and --output)", 2)
	}
	out := c.String("output")
	if err := checkOutputs("vm checkpoint", c.Bool("force"), outputCheck{flag: "--output", path: out}); err != nil {
		return err
	}
	var codec format.Codec
	switch c.String("codec") {
	case "zstd":
		codec = format.CodecZstd
	case "s2":
		codec = format.CodecS2
	case "none", "raw":
		codec = format.CodecRaw
	default:
		return cli.Exit(fmt.Sprintf("vm checkpoint: --codec %q: want zstd, s2 or none", c.String("codec")), 2)
	}
	stderr := c.App.ErrWriter
	if stderr == nil {
		stderr = os.Stderr
	}
	sig := notifyShutdown(c.Context)
	defer sig.Stop()
	res, err := vm.Checkpoint(sig.Graceful, vm.CheckpointOptions{
		QMP: c.String("qmp"), Output: out, Resume: c.Bool("resume"), Timeout: c.Duration("timeout"),
		Writer:   format.WriterOptions{Codec: codec},
		Progress: func(s string) { fmt.Fprintf(stderr, "vm checkpoint: %s\n", s) },
	})
	if err != nil {
		return cli.Exit("vm checkpoint: "+err.Error(), 1)
	}
	state := "left stopped (resume it with the QMP command cont, or quit it)"
	if res.Resumed {
		state = fmt.Sprintf("resumed (stopped for %s)", res.Stopped.Round(time.Millisecond))
	}
	fmt.Fprintf(c.App.Writer, "checkpoint: %s: %d MiB RAM in %d backend(s) + %d bytes device state, %d MiB on disk; VM %s\n",
		out, res.Snapshot.RawBytes>>20, len(res.Backends), res.DeviceStateBytes, res.Snapshot.FileBytes>>20, state)
	return nil
}

func vmRestoreCmd() *cli.Command {
	return &cli.Command{
		Name:      "restore",
		Usage:     "start QEMU from a VM snapshot, its RAM served lazily",
		ArgsUsage: "SNAP -- qemu-system-x86_64 ARGS...",
		Description: `Serves SNAP's RAM (in-process, or from a running "uffdrestore load SNAP" given
--socket), starts QEMU through the preload library with the arguments given,
loads the device state and resumes the VM; prints the time to resumed, then
waits for QEMU to exit (SIGINT/SIGTERM quit it).

ARGS are the VM's own arguments, as at checkpoint: for each RAM region of the
snapshot there must be a -object memory-backend-file with the same id (the
region name); vm restore replaces its mem-path with a marker the preload
answers with the served RAM and sets share=on (share=off with --private),
after checking its size=. It adds -incoming defer, -S and a QMP socket of its
own: do not give -incoming or -daemonize.

--private restores a copy-on-write clone: the guest's writes stay in the
clone. Without it the VM writes into the served RAM: one such VM per server.

Examples:
   uffdrestore vm restore vm.snap -- qemu-system-x86_64 -machine pc -m 512M \
       -object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm.ram,share=on \
       -machine memory-backend=mem -kernel vmlinuz -initrd initrd -nographic
   uffdrestore load vm.snap --socket /run/vm.sock &
   uffdrestore vm restore vm.snap --socket /run/vm.sock --private -- qemu-system-x86_64 ...`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "socket", Usage: "a running `uffdrestore load SNAP` socket (`PATH`); default: serve in-process"},
			&cli.BoolFlag{Name: "private", Usage: "a copy-on-write clone (share=off)"},
			&cli.StringFlag{Name: "backing", Value: "auto", Usage: "in-process server's backing: auto, shmem, memfd-hugetlb or hugetlbfs (with --hugetlbfs)"},
			&cli.StringFlag{Name: "hugetlbfs", Usage: "in-process server's hugetlbfs mount (`DIR`) for --backing hugetlbfs"},
			&cli.StringFlag{Name: "preload", Usage: "the preload library (default: " + preloadName + " next to the uffdrestore binary)"},
			&cli.StringFlag{Name: "server-uid", Usage: "one more `UID` the --socket server may run as (besides root and this uid)"},
			&cli.DurationFlag{Name: "timeout", Value: time.Minute, Usage: "bound for QEMU's start and the device-state load"},
		},
		Action: runVMRestore,
	}
}

// vmLauncher sets a command up as `uffdrestore run` does: the preload
// library and its environment, after checking that the server is reachable,
// trusted and has the regions.
func vmLauncher(preloadFlag, serverUID string) vm.Launcher {
	return func(cmd *exec.Cmd, socket string, maps []vm.MapSpec) error {
		var uid uint32
		if serverUID != "" {
			u, err := strconv.ParseUint(serverUID, 10, 32)
			if err != nil {
				return fmt.Errorf("--server-uid %q is not a uid", serverUID)
			}
			uid = uint32(u)
		}
		preload, err := findPreload(preloadFlag)
		if err != nil {
			return err
		}
		socket, err = filepath.Abs(socket)
		if err != nil {
			return err
		}
		h, err := serverLayout(socket, uid)
		if err != nil {
			return err
		}
		var rm []runMarker
		for _, m := range maps {
			// vm.Restore names regions by index (#N).
			n, ok := strings.CutPrefix(m.Region, "#")
			i, err := strconv.Atoi(n)
			if !ok || err != nil {
				return fmt.Errorf("vm restore: region %q is not #INDEX", m.Region)
			}
			if err := checkRegion(h, m.Region); err != nil {
				return fmt.Errorf("the server on %s: %w (is it serving this snapshot?)", socket, err)
			}
			if r := h.Regions[i]; r.Length != m.Length || r.Name != m.Name {
				return fmt.Errorf("%w: the server on %s serves region %s %q of %d bytes, the snapshot's RAM %q is %d bytes: serve this snapshot (uffdrestore load SNAP)",
					vm.ErrRAMSize, socket, m.Region, r.Name, r.Length, m.Name, m.Length)
			}
			rm = append(rm, runMarker{m.Marker, m.Region})
		}
		env := cmd.Env
		if env == nil {
			env = os.Environ()
		}
		cmd.Env = runEnv(env, preload, socket, rm, serverUID)
		return nil
	}
}

func runVMRestore(c *cli.Context) error {
	args := c.Args().Slice()
	if len(args) < 1 {
		return cli.Exit("vm restore: want SNAP -- qemu-system-x86_64 ARGS...", 2)
	}
	snap, qemu := args[0], args[1:]
	if len(qemu) > 0 && qemu[0] == "--" {
		qemu = qemu[1:]
	}
	if len(qemu) == 0 {
		return cli.Exit("vm restore: no QEMU command: vm restore SNAP -- qemu-system-x86_64 ARGS...", 2)
	}
	stderr := c.App.ErrWriter
	if stderr == nil {
		stderr = os.Stderr
	}
	progress := func(s string) { fmt.Fprintf(stderr, "vm restore: %s\n", s) }
	sig := notifyShutdown(c.Context)
	defer sig.Stop()
	start := time.Now()

	dir, err := os.MkdirTemp("", "uffdrestore-vm-")
	if err != nil {
		return cli.Exit("vm restore: "+err.Error(), 1)
	}
	defer os.RemoveAll(dir)
	sock := c.String("socket")
	var srv *vm.Server
	if sock == "" {
		backing, err := restore.ParseBacking(c.String("backing"))
		if err != nil {
			return cli.Exit("vm restore: --backing: "+err.Error(), 2)
		}
		sock = filepath.Join(dir, "ram.sock")
		ropts := []restore.Option{restore.WithBacking(backing)}
		if d := c.String("hugetlbfs"); d != "" {
			ropts = append(ropts, restore.WithHugetlbfsDir(d))
		}
		srv, err = vm.Serve(sig.Graceful, snap, sock, nil, ropts...)
		if err != nil {
			return cli.Exit("vm restore: "+err.Error(), 1)
		}
		defer srv.Close()
		l := srv.Stats()
		progress(fmt.Sprintf("serving %s in-process (backing %s, lazy)", snap, l.Backing))
	} else if c.IsSet("backing") || c.IsSet("hugetlbfs") {
		return cli.Exit("vm restore: --backing and --hugetlbfs are for the in-process server; the --socket server has its own", 2)
	}
	v, err := vm.Restore(sig.Graceful, vm.RestoreOptions{
		Snapshot: snap, Socket: sock, Private: c.Bool("private"), Command: qemu,
		Launch: vmLauncher(c.String("preload"), c.String("server-uid")),
		Dir:    dir, Timeout: c.Duration("timeout"),
		Stdout: os.Stdout, Stderr: stderr, Progress: progress,
	})
	if err != nil {
		return cli.Exit("vm restore: "+err.Error(), 1)
	}
	defer v.Close()
	line := fmt.Sprintf("resumed: %s after start", time.Since(start).Round(time.Millisecond))
	if srv != nil {
		st := srv.Stats()
		line += fmt.Sprintf(" (%.1f MiB of RAM decoded so far)", float64(st.BytesDecoded)/(1<<20))
	}
	fmt.Fprintln(c.App.Writer, line)

	select {
	case <-v.Exited():
	case <-sig.Graceful.Done():
		progress("quitting QEMU (" + sig.Reason() + ")")
		v.Close()
	}
	werr := v.Wait()
	if srv != nil {
		st := srv.Stats()
		progress(fmt.Sprintf("stats: %.1f MiB decoded, %d faults, %d units filled", float64(st.BytesDecoded)/(1<<20), st.FaultsMinor+st.FaultsMissing, st.FilledByFault+st.FilledByPrefill))
	}
	var ee *exec.ExitError
	if werr != nil && errors.As(werr, &ee) && !sig.Signalled() {
		return cli.Exit(fmt.Sprintf("vm restore: QEMU exited: %v", werr), ee.ExitCode())
	}
	return nil
}

// serverLayout reads the hello and all its regions from the server on path
// (trusted as dialServer checks) and hangs up without attaching.
func serverLayout(path string, serverUID uint32) (*attach.Hello, error) {
	c, err := dialServer(path, serverUID)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	h, fds, err := attach.RecvHello(func() ([]byte, []int, error) { return attach.RecvMsg(c) })
	attach.CloseFDs(fds)
	if err != nil {
		return nil, fmt.Errorf("the server on %s: %w", path, allowUIDHint(err))
	}
	return &h, nil
}
