package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/vm/internal/qmp"
)

// dialQMP connects to QEMU's QMP socket, mapping the client's errors to
// this package's.
func dialQMP(ctx context.Context, path string, timeout time.Duration) (*qmp.Client, error) {
	c, err := qmp.Dial(ctx, path, timeout)
	switch {
	case errors.Is(err, qmp.ErrNoSocket):
		return nil, fmt.Errorf("%w: %v", ErrQMPSocket, err)
	case errors.Is(err, qmp.ErrNotQMP):
		return nil, fmt.Errorf("%w: %v", ErrNotQEMU, err)
	}
	return c, err
}

// setIgnoreShared turns on x-ignore-shared (RAM in share=on backends is not
// migrated), or says this QEMU lacks it.
func setIgnoreShared(ctx context.Context, c *qmp.Client) error {
	var caps []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := c.Run(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return err
	}
	found := false
	for _, cp := range caps {
		found = found || cp.Capability == "x-ignore-shared"
	}
	if !found {
		return fmt.Errorf("%w (QEMU %s): use QEMU 4.0 or newer", ErrNoIgnoreShared, c.Version())
	}
	args := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
	if err := c.Run(ctx, "migrate-set-capabilities", args, nil); err != nil {
		return fmt.Errorf("set x-ignore-shared: %w", err)
	}
	return nil
}

type migrateStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
	TotalTime int64  `json:"total-time"`
	Downtime  int64  `json:"downtime"`
}

// waitMigration polls query-migrate until the migration completed, failed
// or timeout passed.
func waitMigration(ctx context.Context, c *qmp.Client, timeout time.Duration, what string) (migrateStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var st migrateStatus
	for {
		if err := c.Run(ctx, "query-migrate", nil, &st); err != nil {
			if ctx.Err() != nil {
				return st, fmt.Errorf("%w: %s did not complete within %s (status %q)", ErrMigration, what, timeout, st.Status)
			}
			return st, fmt.Errorf("%w: %s: %v", ErrMigration, what, err)
		}
		switch st.Status {
		case "completed":
			return st, nil
		case "failed", "cancelled":
			return st, fmt.Errorf("%w: %s %s: %s", ErrMigration, what, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("%w: %s did not complete within %s (status %q)", ErrMigration, what, timeout, st.Status)
		case <-c.Done():
			return st, fmt.Errorf("%w: %s: QEMU closed QMP (status %q)", ErrMigration, what, st.Status)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// passFD hands fd to QEMU under name with getfd (QEMU gets its own copy).
func passFD(ctx context.Context, c *qmp.Client, name string, fd int) error {
	// A name left from an earlier run would make getfd replace it; close
	// it first, ignoring "not found".
	_, _ = c.Execute(ctx, "closefd", map[string]any{"fdname": name})
	if _, err := c.ExecuteWithFD(ctx, "getfd", map[string]any{"fdname": name}, fd); err != nil {
		return fmt.Errorf("getfd: %w", err)
	}
	return nil
}

// pipe returns a pipe's ends, close-on-exec. The end this process keeps
// (the read end if keepRead, else the write end) is non-blocking, so Go's
// poller serves it and closing it ends a pending read or write; the end
// handed to QEMU stays blocking, as QEMU's fd: migration expects.
func pipe(keepRead bool) (r, w *os.File, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, fmt.Errorf("pipe: %w", err)
	}
	keep := p[1]
	if keepRead {
		keep = p[0]
	}
	if err := unix.SetNonblock(keep, true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, nil, fmt.Errorf("pipe: %w", err)
	}
	return os.NewFile(uintptr(p[0]), "state-r"), os.NewFile(uintptr(p[1]), "state-w"), nil
}

func runStatus(ctx context.Context, c *qmp.Client) (string, error) {
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := c.Run(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}
