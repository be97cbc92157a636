package vm

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/snapshot"
	"github.com/uffdrestore/uffdrestore/vm/internal/qmp"
)

// CheckpointOptions configure Checkpoint.
type CheckpointOptions struct {
	QMP    string // QEMU's QMP socket
	Output string // snapshot path
	Resume bool   // cont the VM afterwards (default: leave it stopped)
	// Timeout bounds the device-state migration (default 2 minutes).
	Timeout time.Duration
	// Writer options for the snapshot (codec, chunk size...).
	Writer format.WriterOptions
	// Progress gets one line per step (may be nil).
	Progress func(string)
}

// Backend is one guest RAM backend.
type Backend struct {
	ID      string `json:"id"`
	Size    uint64 `json:"size"`
	MemPath string `json:"mem_path"`
}

// CheckpointResult says what Checkpoint did.
type CheckpointResult struct {
	QEMU             string
	Backends         []Backend
	DeviceStateBytes int
	Snapshot         format.WriterStats
	Stopped          time.Duration // VM stopped: stop → cont, or stop → end if left stopped
	Resumed          bool
}

func (o *CheckpointOptions) progress(format string, args ...any) {
	if o.Progress != nil {
		o.Progress(fmt.Sprintf(format, args...))
	}
}

// Checkpoint saves a running QEMU VM (see the package documentation).
func Checkpoint(ctx context.Context, o CheckpointOptions) (res CheckpointResult, err error) {
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	c, err := dialQMP(ctx, o.QMP, 10*time.Second)
	if err != nil {
		return res, err
	}
	defer c.Close()
	res.QEMU = c.Version().String()
	o.progress("connected to QEMU %s on %s", res.QEMU, o.QMP)

	status, err := runStatus(ctx, c)
	if err != nil {
		return res, err
	}
	if status != "running" {
		return res, fmt.Errorf("%w (status %q): checkpoint a running VM (resume it with the QMP command cont first)", ErrNotRunning, status)
	}
	backends, err := ramBackends(ctx, c)
	if err != nil {
		return res, err
	}
	res.Backends = backends
	for _, b := range backends {
		o.progress("RAM backend %q: %s in %s (share=on)", b.ID, sizeArg(b.Size), b.MemPath)
	}
	if err := setIgnoreShared(ctx, c); err != nil {
		return res, err
	}
	// The output is created before the VM stops: a bad path costs nothing.
	out, err := atomicfile.Create(o.Output, 0o644)
	if err != nil {
		return res, err
	}
	defer func() {
		if err != nil {
			out.Abort()
		}
	}()

	stopAt := time.Now()
	if err := c.Run(ctx, "stop", nil, nil); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	o.progress("VM stopped")
	stopped := true
	defer func() {
		// A failed checkpoint leaves the VM as it found it: running.
		if err != nil && stopped {
			if cerr := c.Run(context.Background(), "cont", nil, nil); cerr != nil {
				err = fmt.Errorf("%w (and resuming the VM failed: %v; it is stopped)", err, cerr)
			} else {
				err = fmt.Errorf("%w (the VM was resumed)", err)
			}
		}
	}()

	state, err := saveDeviceState(ctx, c, o.Timeout)
	if err != nil {
		return res, err
	}
	res.DeviceStateBytes = len(state)
	o.progress("device state saved: %d bytes", len(state))

	var files []snapshot.NamedFile
	var total uint64
	for _, b := range backends {
		files = append(files, snapshot.NamedFile{Name: b.ID, Path: b.MemPath})
		total += b.Size
	}
	sopts := snapshot.Options{WriterOptions: o.Writer}
	sopts.Metadata.Source = "qemu " + res.QEMU + " via " + o.QMP
	sopts.Metadata.Extra = map[string]string{"vm.qemu_version": res.QEMU}
	sopts.Attachments = []format.Attachment{{Kind: format.AttachQEMUDeviceState, Data: state}}
	next := uint64(0)
	sopts.Progress = func(done, _ uint64) {
		if done >= next {
			o.progress("RAM: %d of %d MiB compressed", done>>20, total>>20)
			next += max(total/4, 1)
		}
	}
	st, err := snapshot.CreateFromFiles(ctx, files, out, sopts)
	if err != nil {
		return res, fmt.Errorf("snapshot of the RAM: %w", err)
	}
	if err := out.Commit(); err != nil {
		return res, err
	}
	res.Snapshot = st
	o.progress("snapshot %s: %d MiB RAM stored in %d MiB", o.Output, st.RawBytes>>20, st.FileBytes>>20)
	if o.Resume {
		if err := c.Run(ctx, "cont", nil, nil); err != nil {
			return res, fmt.Errorf("cont: %w", err)
		}
		stopped = false
		res.Resumed = true
	}
	res.Stopped = time.Since(stopAt)
	return res, nil
}

// ramBackends lists the memory backends and checks that each is a shared
// file this process can read.
func ramBackends(ctx context.Context, c *qmp.Client) ([]Backend, error) {
	var memdevs []struct {
		ID    string `json:"id"`
		Size  uint64 `json:"size"`
		Share bool   `json:"share"`
	}
	if err := c.Run(ctx, "query-memdev", nil, &memdevs); err != nil {
		return nil, err
	}
	var objs []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := c.Run(ctx, "qom-list", map[string]any{"path": "/objects"}, &objs); err != nil {
		return nil, err
	}
	types := map[string]string{}
	for _, ob := range objs {
		types[ob.Name] = strings.TrimSuffix(strings.TrimPrefix(ob.Type, "child<"), ">")
	}
	if len(memdevs) == 0 {
		return nil, fmt.Errorf("%w: QEMU reports no memory backend; start it with %s", ErrRAMNotFile, fileBackendArgs("mem", 0))
	}
	var bs []Backend
	for _, m := range memdevs {
		if m.ID == "" {
			return nil, fmt.Errorf("%w: a memory backend without an id; start QEMU with %s", ErrRAMNotFile, fileBackendArgs("mem", m.Size))
		}
		if t := types[m.ID]; t != "memory-backend-file" {
			return nil, fmt.Errorf("%w: backend %q is a %s; start QEMU with %s", ErrRAMNotFile, m.ID, t, fileBackendArgs(m.ID, m.Size))
		}
		if !m.Share {
			return nil, fmt.Errorf("%w: backend %q; start QEMU with %s", ErrRAMNotShared, m.ID, fileBackendArgs(m.ID, m.Size))
		}
		var path string
		if err := c.Run(ctx, "qom-get", map[string]any{"path": "/objects/" + m.ID, "property": "mem-path"}, &path); err != nil {
			return nil, err
		}
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("RAM backend %q: %w", m.ID, err)
		}
		if fi.IsDir() {
			return nil, fmt.Errorf("%w: backend %q has mem-path=%s, a directory (QEMU made an unnamed file in it); give a file: %s",
				ErrRAMNotFile, m.ID, path, fileBackendArgs(m.ID, m.Size))
		}
		if uint64(fi.Size()) != m.Size {
			return nil, fmt.Errorf("%w: backend %q: %s is %d bytes, the backend %d", ErrRAMSize, m.ID, path, fi.Size(), m.Size)
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("RAM backend %q: %w (run vm checkpoint as a user who may read it)", m.ID, err)
		}
		f.Close()
		bs = append(bs, Backend{ID: m.ID, Size: m.Size, MemPath: path})
	}
	return bs, nil
}

// saveDeviceState migrates the (stopped) VM's device state, without the
// shared RAM, into a pipe given to QEMU with getfd, and returns it.
func saveDeviceState(ctx context.Context, c *qmp.Client, timeout time.Duration) ([]byte, error) {
	r, w, err := pipe(true)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	err = passFD(ctx, c, "uffdrestore-state", int(w.Fd()))
	w.Close() // QEMU has its own copy: EOF comes when it closes that
	if err != nil {
		return nil, err
	}
	type result struct {
		b   []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		var buf bytes.Buffer
		_, err := io.Copy(&buf, r)
		got <- result{buf.Bytes(), err}
	}()
	if err := c.Run(ctx, "migrate", map[string]any{"uri": "fd:uffdrestore-state"}, nil); err != nil {
		_, _ = c.Execute(ctx, "closefd", map[string]any{"fdname": "uffdrestore-state"})
		r.Close()
		<-got
		return nil, fmt.Errorf("%w: migrate: %v", ErrMigration, err)
	}
	if _, err := waitMigration(ctx, c, timeout, "device-state migration"); err != nil {
		_, _ = c.Execute(context.Background(), "migrate_cancel", nil)
		r.Close()
		<-got
		return nil, err
	}
	select {
	case g := <-got:
		if g.err != nil {
			return nil, fmt.Errorf("%w: reading the device state: %v", ErrMigration, g.err)
		}
		if len(g.b) == 0 {
			return nil, fmt.Errorf("%w: QEMU wrote no device state", ErrMigration)
		}
		return g.b, nil
	case <-time.After(timeout):
		r.Close()
		<-got
		return nil, fmt.Errorf("%w: QEMU did not close the device-state pipe", ErrMigration)
	}
}
