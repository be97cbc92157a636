package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/vm/internal/qmp"
)

// MapSpec is one marker path the preload answers with a served region.
type MapSpec struct {
	Marker string
	Region string // "#INDEX"
	Name   string // the region's name in the snapshot (the backend id)
	Length uint64 // its length in the snapshot: the server's must match
}

// Launcher prepares cmd to run under the preload library so that opening
// and mapping each marker maps the region served on socket (the set-up of
// `uffdrestore run`).
type Launcher func(cmd *exec.Cmd, socket string, maps []MapSpec) error

// RestoreOptions configure Restore.
type RestoreOptions struct {
	Snapshot string
	// Socket is the server of the snapshot's RAM: a running `uffdrestore
	// load` of the same snapshot, or a Server.
	Socket string
	// Private: share=off, a copy-on-write clone; many clones of one server
	// share its fill. Without it the VM writes into the served memory
	// (one VM per server).
	Private bool
	// Command is QEMU and its arguments (see rewriteArgs for what they must
	// hold).
	Command []string
	Launch  Launcher
	// RAMFiles, if set, restores without a server: region i's RAM is the
	// plain file RAMFiles[i] (already holding its bytes), mapped by QEMU
	// itself; Socket and Launch are not used. This is the non-lazy
	// baseline.
	RAMFiles []string
	// Dir holds the markers and QMP socket (default: a new temporary
	// directory, removed by Close).
	Dir string
	// Timeout bounds QEMU's start and the device-state load (default 60 s).
	Timeout        time.Duration
	Stdout, Stderr io.Writer
	Progress       func(string)
}

func (o *RestoreOptions) progress(format string, args ...any) {
	if o.Progress != nil {
		o.Progress(fmt.Sprintf(format, args...))
	}
}

// VM is a restored, running QEMU.
type VM struct {
	Cmd       *exec.Cmd
	QMP       *qmp.Client
	QMPPath   string
	Args      []string      // the command line run
	Resumed   time.Duration // Restore's start → cont done
	DeviceLen int

	dir, ownDir string
	waitOnce    sync.Once
	waitErr     error
	exited      chan struct{}
	stderr      *tailBuffer
}

// Restore starts QEMU from the snapshot (see the package documentation) and
// returns once the VM runs.
func Restore(ctx context.Context, o RestoreOptions) (_ *VM, err error) {
	start := time.Now()
	if o.Timeout <= 0 {
		o.Timeout = 60 * time.Second
	}
	if len(o.Command) == 0 {
		return nil, fmt.Errorf("%w: no QEMU command given (vm restore SNAP -- qemu-system-x86_64 ARGS...)", ErrArgs)
	}
	if o.Launch == nil && o.RAMFiles == nil {
		return nil, errors.New("vm: Restore needs a Launcher")
	}
	f, err := format.Open(o.Snapshot)
	if err != nil {
		return nil, err
	}
	state, ok := f.Attachment(format.AttachQEMUDeviceState)
	regs := f.Regions()
	f.Close()
	if !ok {
		return nil, fmt.Errorf("%w: %s holds memory only; make VM snapshots with uffdrestore vm checkpoint", ErrNoDeviceState, o.Snapshot)
	}

	v := &VM{DeviceLen: len(state), exited: make(chan struct{}), stderr: &tailBuffer{max: 4096}}
	dir := o.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "uffdrestore-vm-"); err != nil {
			return nil, err
		}
		v.ownDir = dir
	}
	v.dir = dir
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	var ram []ramRegion
	var maps []MapSpec
	if o.RAMFiles != nil && len(o.RAMFiles) != len(regs) {
		return nil, fmt.Errorf("%w: %d RAM files for %d RAM regions", ErrArgs, len(o.RAMFiles), len(regs))
	}
	for i, r := range regs {
		m := filepath.Join(dir, fmt.Sprintf("ram%d", i))
		if o.RAMFiles != nil {
			m = o.RAMFiles[i]
		}
		ram = append(ram, ramRegion{ID: r.Name, Size: r.Length, Marker: m})
		maps = append(maps, MapSpec{Marker: m, Region: fmt.Sprintf("#%d", i), Name: r.Name, Length: r.Length})
	}
	v.QMPPath = filepath.Join(dir, "qmp.sock")
	args, err := rewriteArgs(o.Command[1:], ram, o.Private, v.QMPPath)
	if err != nil {
		return nil, err
	}
	v.Args = append([]string{o.Command[0]}, args...)
	cmd := exec.Command(o.Command[0], args...)
	cmd.Stdin = nil
	cmd.Stdout = o.Stdout
	var se io.Writer = v.stderr
	if o.Stderr != nil {
		se = io.MultiWriter(o.Stderr, v.stderr)
	}
	cmd.Stderr = se
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if o.RAMFiles == nil {
		if err := o.Launch(cmd, o.Socket, maps); err != nil {
			return nil, err
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%w: start %s: %v", ErrNotQEMU, o.Command[0], err)
	}
	v.Cmd = cmd
	go func() {
		v.waitErr = cmd.Wait()
		close(v.exited)
	}()
	if o.RAMFiles == nil {
		o.progress("started %s (pid %d), RAM served from %s", filepath.Base(o.Command[0]), cmd.Process.Pid, o.Socket)
	} else {
		o.progress("started %s (pid %d), RAM in %s", filepath.Base(o.Command[0]), cmd.Process.Pid, strings.Join(o.RAMFiles, ", "))
	}

	tctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	if v.QMP, err = v.waitQMP(tctx, o.Command[0]); err != nil {
		return nil, err
	}
	if st, err := runStatus(tctx, v.QMP); err != nil {
		return nil, err
	} else if st != "inmigrate" {
		return nil, fmt.Errorf("%w: QEMU is %q, not waiting for an incoming migration", ErrMigration, st)
	}
	if err := setIgnoreShared(tctx, v.QMP); err != nil {
		return nil, err
	}
	if err := loadDeviceState(tctx, v.QMP, state, o.Timeout); err != nil {
		return nil, v.withStderr(err)
	}
	if err := v.QMP.Run(tctx, "cont", nil, nil); err != nil {
		return nil, fmt.Errorf("cont: %w", err)
	}
	v.Resumed = time.Since(start)
	o.progress("device state loaded (%d bytes); VM resumed %s after start", len(state), v.Resumed.Round(time.Millisecond))
	return v, nil
}

// waitQMP waits for QEMU's QMP socket; a program that exits first, or
// whose socket does not speak QMP, is not QEMU.
func (v *VM) waitQMP(ctx context.Context, prog string) (*qmp.Client, error) {
	for {
		if _, err := os.Stat(v.QMPPath); err == nil {
			c, err := dialQMP(ctx, v.QMPPath, 10*time.Second)
			if err == nil {
				return c, nil
			}
			if !errors.Is(err, ErrQMPSocket) {
				return nil, v.withStderr(err)
			}
		}
		select {
		case <-v.exited:
			return nil, v.withStderr(fmt.Errorf("%w: %s exited (%v) without opening its QMP socket", ErrNotQEMU, prog, v.waitErr))
		case <-ctx.Done():
			return nil, v.withStderr(fmt.Errorf("%w: %s opened no QMP socket within the timeout", ErrNotQEMU, prog))
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (v *VM) withStderr(err error) error {
	if s := strings.TrimSpace(v.stderr.String()); s != "" {
		return fmt.Errorf("%w; its stderr: %s", err, s)
	}
	return err
}

// loadDeviceState feeds the device state to QEMU's incoming migration
// through a pipe passed with getfd.
func loadDeviceState(ctx context.Context, c *qmp.Client, state []byte, timeout time.Duration) error {
	r, w, err := pipe(false)
	if err != nil {
		return err
	}
	err = passFD(ctx, c, "uffdrestore-state", int(r.Fd()))
	r.Close()
	if err != nil {
		w.Close()
		return err
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := w.Write(state)
		w.Close()
		wrote <- err
	}()
	if err := c.Run(ctx, "migrate-incoming", map[string]any{"uri": "fd:uffdrestore-state"}, nil); err != nil {
		w.Close()
		<-wrote
		return fmt.Errorf("%w: migrate-incoming: %v", ErrMigration, err)
	}
	if _, err := waitMigration(ctx, c, timeout, "device-state load"); err != nil {
		w.Close()
		<-wrote
		return err
	}
	if err := <-wrote; err != nil {
		return fmt.Errorf("%w: writing the device state: %v", ErrMigration, err)
	}
	return nil
}

// Exited is closed when QEMU has exited.
func (v *VM) Exited() <-chan struct{} { return v.exited }

// Wait waits for QEMU to exit.
func (v *VM) Wait() error {
	<-v.exited
	return v.waitErr
}

// Close ends QEMU (quit over QMP, then SIGKILL after 5 s) and removes the
// temporary directory.
func (v *VM) Close() error {
	if v.Cmd != nil && v.Cmd.Process != nil {
		select {
		case <-v.exited:
		default:
			if v.QMP != nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, _ = v.QMP.Execute(ctx, "quit", nil)
				cancel()
			}
			select {
			case <-v.exited:
			case <-time.After(5 * time.Second):
				v.Cmd.Process.Kill()
				<-v.exited
			}
		}
	}
	if v.QMP != nil {
		v.QMP.Close()
	}
	if v.ownDir != "" {
		os.RemoveAll(v.ownDir)
	}
	return nil
}

// tailBuffer keeps the last max bytes written.
type tailBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = t.b[len(t.b)-t.max:]
	}
	t.mu.Unlock()
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
