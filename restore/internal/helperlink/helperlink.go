// Package helperlink connects restore.Open (restore/internal/engine) to the
// fault-handler helper that package restore/helper provides, without an
// import cycle: restore/attach (the protocol the two speak) imports the
// engine (for its Loader), so the engine cannot import the protocol.
// restore/helper imports both and, when a program opts in by importing it,
// installs its side here from its init; the engine installs the Loader
// constructor the helper process needs.
package helperlink

import (
	"context"
	"encoding/json"
	"errors"
	"os"

	"github.com/uffdrestore/uffdrestore/format"
)

// Request is what restore.Open hands the helper's client side: a view it
// has mapped and registered, and what the helper process inherits.
type Request struct {
	Exe      string   // the executable to run as the helper
	Config   []byte   // the Loader's configuration, for NewLoader (opaque here)
	Workers  int      // filler workers (the helper sizes GOMAXPROCS from it)
	Snapshot *os.File // the snapshot, inherited by the helper
	Backing  *os.File // the backing file, inherited by the helper
	Journal  *os.File // the fill journal (a memfd), inherited by the helper
	Uffd     int      // the view's userfaultfd, sent with the attach
	Features uint64   // the UFFD_FEATURE_* bits enabled on it
	ViewAddr uintptr  // where the view maps the whole backing
	ViewSize uint64
	PageSize uint64
	// Reattach: a new helper for a view whose helper died; the attach is a
	// reattach (PROTOCOL.md), which makes the helper wake the whole view.
	Reattach bool
	// OnGone, if set, is called (on its own goroutine) when the helper
	// went away unasked: its socket closed before Close.
	OnGone func(Session, error)
	// Spawned, if set, is a helper process Spawn started ahead (its exec
	// and Go runtime start overlapping the caller's own work): Start hands
	// it this request instead of starting one. Start owns it, also on error.
	Spawned Spawned
}

// Spawned is a helper process started by Spawn, waiting for its request.
type Spawned interface {
	// Abandon stops and reaps the process (a Spawned never handed to
	// Start).
	Abandon()
}

// Spawn starts a helper process (exe, as Request.Exe) that waits for its
// request; installed by restore/helper, nil when the program did not
// import it.
var Spawn func(exe string) (Spawned, error)

// WarmUp runs in a helper started ahead of its job, while it waits, the
// first use of what NewLoader uses (so that the job does not pay for it);
// installed by restore.
var WarmUp func()

// ErrGone is wrapped by a Session's errors once its helper went away.
var ErrGone = errors.New("the helper process went away")

// Session is a started helper, attached to (or attaching to) the view.
type Session interface {
	Stats(ctx context.Context) (json.RawMessage, error)
	Wait(ctx context.Context) error
	Profile(ctx context.Context) (format.Profile, error)
	// Pid is the helper process's id.
	Pid() int
	// Ready is closed once the handshake ended (the helper serves the
	// view, or failed).
	Ready() <-chan struct{}
	// Close hangs up and waits for the helper to exit.
	Close() error
}

// Start starts a helper for req; installed by restore/helper, nil when
// the program did not import it.
var Start func(ctx context.Context, req Request) (Session, error)

// NewLoader builds the helper process's *restore.Loader (returned as any:
// this package cannot name restore's types) on the inherited snapshot and
// backing, from Request.Config. Installed by restore.
var NewLoader func(config []byte, snapshot, backing, journal *os.File) (any, error)
