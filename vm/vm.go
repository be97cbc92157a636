// Package vm checkpoints a QEMU virtual machine into a uffdrestore snapshot
// and restores it lazily, over QMP only (no exec: migration, no fork).
//
// Checkpoint: the guest RAM must live in memory-backend-file objects with
// share=on; the device state (everything but that RAM, thanks to the
// x-ignore-shared migration capability) is migrated to a pipe handed to
// QEMU with getfd, and stored in the snapshot as the "qemu-device-state"
// attachment next to one region per RAM backend, named after the backend.
//
// Restore: the RAM is served by a uffdrestore server (in-process, or a
// running `uffdrestore load`); QEMU is started through the preload launcher
// with each backend's mem-path rewritten to a marker path that the preload
// answers with the server's backing, and with -incoming defer; the device
// state goes in through migrate-incoming from a pipe, then cont.
package vm

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Errors. Each names the cause; the message says what to do.
var (
	// ErrQMPSocket: no QMP server at the given socket path.
	ErrQMPSocket = errors.New("vm: QMP socket missing")
	// ErrNotQEMU: the peer, or the program given to restore, is not QEMU
	// (no QMP greeting, or the program exited without opening QMP).
	ErrNotQEMU = errors.New("vm: not QEMU")
	// ErrNotRunning: checkpoint needs a running VM.
	ErrNotRunning = errors.New("vm: the VM is not running")
	// ErrRAMNotFile: a RAM backend is not a memory-backend-file (or there
	// is no RAM backend object at all).
	ErrRAMNotFile = errors.New("vm: guest RAM is not file-backed")
	// ErrRAMNotShared: a memory-backend-file has share=off, so its file
	// does not hold the guest's writes.
	ErrRAMNotShared = errors.New("vm: guest RAM file is not shared (share=off)")
	// ErrNoIgnoreShared: this QEMU lacks the x-ignore-shared migration
	// capability.
	ErrNoIgnoreShared = errors.New("vm: QEMU lacks the x-ignore-shared migration capability")
	// ErrMigration: the device-state migration failed or timed out.
	ErrMigration = errors.New("vm: migration failed")
	// ErrNoDeviceState: the snapshot has no QEMU device state (not made by
	// vm checkpoint).
	ErrNoDeviceState = errors.New("vm: snapshot has no device state")
	// ErrRAMSize: a memory backend's size on the QEMU command line differs
	// from the snapshot's RAM region.
	ErrRAMSize = errors.New("vm: RAM size mismatch")
	// ErrArgs: the QEMU command line cannot be used for a restore.
	ErrArgs = errors.New("vm: unusable QEMU command line")
)

// parseSize parses a QEMU size: a number with an optional suffix B, K, M,
// G, T, P or E (binary multiples, case-insensitive).
func parseSize(s string) (uint64, error) {
	if s == "" {
		return 0, fmt.Errorf("empty size")
	}
	mul := uint64(1)
	switch strings.ToUpper(s[len(s)-1:]) {
	case "B":
		s = s[:len(s)-1]
	case "K":
		mul, s = 1<<10, s[:len(s)-1]
	case "M":
		mul, s = 1<<20, s[:len(s)-1]
	case "G":
		mul, s = 1<<30, s[:len(s)-1]
	case "T":
		mul, s = 1<<40, s[:len(s)-1]
	case "P":
		mul, s = 1<<50, s[:len(s)-1]
	case "E":
		mul, s = 1<<60, s[:len(s)-1]
	}
	n, err := strconv.ParseUint(s, 0, 64)
	if err != nil || (mul > 1 && n > ^uint64(0)/mul) {
		return 0, fmt.Errorf("%q is not a size (e.g. 512M)", s)
	}
	return n * mul, nil
}

// fileBackendArgs is the QEMU command line that gives backend id file-backed,
// shared RAM of size bytes.
func fileBackendArgs(id string, size uint64) string {
	if id == "" {
		id = "mem"
	}
	return fmt.Sprintf("-object memory-backend-file,id=%s,size=%s,mem-path=/dev/shm/%s.ram,share=on -machine memory-backend=%s",
		id, sizeArg(size), id, id)
}

func sizeArg(n uint64) string {
	switch {
	case n == 0:
		return "512M"
	case n%(1<<30) == 0:
		return fmt.Sprintf("%dG", n>>30)
	case n%(1<<20) == 0:
		return fmt.Sprintf("%dM", n>>20)
	case n%(1<<10) == 0:
		return fmt.Sprintf("%dK", n>>10)
	}
	return strconv.FormatUint(n, 10)
}
