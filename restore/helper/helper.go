// Package helper is the fault-handler helper process of restore.Open, and
// the opt-in to it: a program that restores lazily in its own address space
// (restore.Open in ModeLazy, ModePrefetch or ModeWorkingSet) imports it for
// its side effect, in its main package:
//
//	import _ "github.com/uffdrestore/uffdrestore/restore/helper"
//
// (A program that only uses ModeEager, a restore.Loader or restore/attach
// needs nothing.) Without it such an Open fails at once with
// restore.ErrNoHelper. Importing restore alone never changes what a program
// does.
//
// Why a helper process: a page fault of a Go goroutine blocks its thread
// and its P, so the faults of the view cannot be served by Go code in the
// same process (see the restore package documentation). Open therefore
// runs this program again (/proc/self/exe, or restore.WithHelper) as
// "uffdrestore-helper", and this package's init, seeing that it was started
// so (its argv[0] and the _UFFDRESTORE_HELPER environment variable, which
// names the inherited descriptors), runs the helper and exits: the
// program's main never runs in it, and nothing else in it should depend on
// being run first. The helper is a restore.Loader on the backing Open
// created, served by an attach server (restore/attach, PROTOCOL.md) on one
// end of a socketpair; Open is the attach client on the other end. So a
// lazy restore speaks the one attach protocol: one handshake (ready), the
// same validation, and errors that keep their kind across the process
// boundary (an error message's "code": errors.Is(err, format.ErrChecksum)
// holds for Restore.Wait as for Loader.Wait).
//
// This is the pattern of runc's nsenter (opted into by an import) rather
// than an explicit call in main (a restore.MaybeRunHelper()): an import
// also covers the test binaries of the program's packages (a test binary
// never runs main), and a program that forgot it gets a named error from
// Open instead of a second copy of itself running its main as a "helper".
package helper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/trace"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/attach"
	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
	"github.com/uffdrestore/uffdrestore/restore/internal/helperlink"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

const (
	// envName carries the helper's configuration (an envConfig, JSON).
	envName = "_UFFDRESTORE_HELPER"
	// argv0 is the helper's argv[0] (and so its name in ps).
	argv0 = "uffdrestore-helper"
)

// envConfig is what the helper learns from its environment: which of its
// descriptors are what, and its Loader's configuration.
type envConfig struct {
	Socket   int             `json:"socket"`             // the attach socket (a socketpair end)
	Snapshot int             `json:"snapshot,omitempty"` // the snapshot file
	Backing  int             `json:"backing,omitempty"`  // the backing file
	Workers  int             `json:"workers,omitempty"`
	Loader   json.RawMessage `json:"loader,omitempty"`
	// Job: the rest (and the snapshot and backing) come in the socket's
	// first message, a jobMsg: the helper was started ahead (Spawn).
	Job bool `json:"job,omitempty"`
}

func init() {
	helperlink.Start = start
	helperlink.Spawn = spawn
	if js, ok := os.LookupEnv(envName); ok && len(os.Args) > 0 && os.Args[0] == argv0 {
		os.Exit(run(js))
	}
}

// run is the helper process: it serves the faults of its parent's view
// until the parent hangs up or detaches.
func run(js string) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, argv0+":", err)
		return 1
	}
	var ec envConfig
	if err := json.Unmarshal([]byte(js), &ec); err != nil {
		return fail(fmt.Errorf("%s is not a helper configuration (%v): this process was not started by restore.Open", envName, err))
	}
	// UFFDRESTORE_HELPER_TRACE=FILE writes a Go execution trace of the
	// helper (go tool trace), for looking into where a restore waits.
	if p := os.Getenv("UFFDRESTORE_HELPER_TRACE"); p != "" {
		if f, err := os.Create(fmt.Sprintf("%s.%d", p, os.Getpid())); err == nil {
			if trace.Start(f) == nil {
				defer func() { trace.Stop(); f.Close() }()
			}
		}
	}
	sf := os.NewFile(uintptr(ec.Socket), "uffdrestore-helper-socket")
	if sf == nil {
		return fail(fmt.Errorf("socket fd %d is not open", ec.Socket))
	}
	fc, err := net.FileConn(sf)
	sf.Close()
	if err != nil {
		return fail(fmt.Errorf("socket fd %d: %w", ec.Socket, err))
	}
	c, ok := fc.(*net.UnixConn)
	if !ok {
		fc.Close()
		return fail(fmt.Errorf("socket fd %d is not a Unix socket", ec.Socket))
	}
	var journal *os.File // the fill journal, when the job brings one
	if ec.Job {
		// Started ahead: the job is the first message.
		// A helper whose job is not there yet was started ahead of its
		// Open (PrestartHelper): while it waits it warms what the job's
		// first fault uses (warmUp). When the job is waiting already (a
		// helper started by its Open), the same work would only compete
		// with the restore (measured: cold first byte 22 -> 30 ms).
		var jobCame atomic.Bool
		if !readable(c) {
			go warmUp(&jobCame)
		}
		raw, fds, err := attach.RecvMsg(c)
		jobCame.Store(true)
		if errors.Is(err, attach.ErrClosed) {
			return 0 // abandoned before its job: nothing to do
		}
		var job jobMsg
		if err == nil {
			if err = json.Unmarshal(raw, &job); err == nil && job.Type != typeJob {
				err = fmt.Errorf("a %q message, want %q", job.Type, typeJob)
			}
		}
		if err == nil && len(fds) != 2 && len(fds) != 3 {
			err = fmt.Errorf("%d file descriptors came with the job, want 2 or 3 (snapshot, backing, fill journal)", len(fds))
		}
		if err != nil {
			attach.CloseFDs(fds)
			c.Close()
			return fail(fmt.Errorf("receiving its job: %w", err))
		}
		ec.Workers, ec.Loader, ec.Snapshot, ec.Backing = job.Config.Workers, job.Config.Loader, fds[0], fds[1]
		if len(fds) == 3 {
			journal = os.NewFile(uintptr(fds[2]), "fill-journal")
		}
	}
	// One more P than filler workers: a fault loop that wakes up must not
	// wait for a P while every P decodes a chunk (Go preempts those only
	// every 10 ms). Measured with a trace of the helper: without it, fault
	// loops and fillers spent 260 ms runnable without a P in a 320 ms
	// working-set restore.
	workers := ec.Workers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	runtime.GOMAXPROCS(workers + 1)
	snap := os.NewFile(uintptr(ec.Snapshot), "snapshot")
	backing := os.NewFile(uintptr(ec.Backing), "backing")
	lv, err := helperlink.NewLoader(ec.Loader, snap, backing, journal)
	snap.Close()
	backing.Close()
	if journal != nil {
		journal.Close() // mapped
	}
	if err != nil {
		// Refused instead of the hello, with the error's code.
		attach.SendMsg(c, attach.Reply{Type: attach.TypeError, Error: err.Error(), Code: attach.ErrorCode(err)})
		c.Close()
		return fail(err)
	}
	l := lv.(*engine.Loader)
	defer l.Close()
	// A session that ends with an error (a fault it could not answer, a
	// parent that broke the protocol) is logged; the parent got the error
	// message too.
	logEnd := func(ti attach.TargetInfo) {
		if r, ok := strings.CutPrefix(ti.Reason, "error: "); ok {
			fmt.Fprintln(os.Stderr, argv0+":", r)
		} else if r, ok := strings.CutPrefix(ti.Reason, "refused: "); ok && !parentGone(r) {
			fmt.Fprintln(os.Stderr, argv0+":", r)
		}
	}
	attach.ServeConn(c, backend{l}, attach.Options{OnDetach: logEnd, OnRefuse: logEnd})
	return 0
}

// warmUp runs, in a helper started ahead of its job, the first use of what
// the job's first steps use, while it waits: decoders and buffers for the
// job's and the attach protocol's messages (encoding/json builds a type's
// codec on its first use), then decoders and buffers for the writer's
// default chunk size (format.Prewarm). Measured on a 2-vCPU VM, the
// helper configuration's codec alone took 0.4-1.2 ms of a prestarted first
// byte, the decoders' and buffers' first use 2-3 ms. It stops early once
// the job came (jobCame): then it would only compete with the restore.
func warmUp(jobCame *atomic.Bool) {
	if helperlink.WarmUp != nil {
		helperlink.WarmUp()
	}
	for _, v := range []any{
		&attach.Hello{Regions: make([]attach.Region, 1)},
		&attach.Attach{Mappings: make([]attach.Mapping, 1)},
		&attach.Reply{}, &jobMsg{},
	} {
		if b, err := json.Marshal(v); err == nil {
			json.Unmarshal(b, v)
		}
	}
	format.PrewarmUntil(2<<20, runtime.NumCPU(), jobCame.Load)
}

// readable reports whether a message is waiting on c.
func readable(c *net.UnixConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	ready := false
	rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		ready = err == nil && n > 0
	})
	return ready
}

// parentGone reports whether a refusal only says that the parent hung up
// before the handshake ended (a Restore closed right after Open): nothing
// to report.
func parentGone(reason string) bool {
	for _, s := range []string{"broken pipe", "connection reset", attach.ErrClosed.Error()} {
		if strings.Contains(reason, s) {
			return true
		}
	}
	return false
}

// backend serves the Loader to the one view of the parent: the hello
// describes the backing as one region (the parent maps it whole, and knows
// the snapshot's regions from its index), a view's stats are the Loader's
// totals (it has no other view), and it answers wait and profile.
type backend struct{ l *engine.Loader }

func (b backend) Hello() attach.Hello {
	lay := b.l.Layout()
	return attach.Hello{
		Backing: lay.Backing, PageSize: uint64(lay.PageSize), ChunkSize: uint64(lay.ChunkSize),
		FileSize: lay.FileSize, Snapshot: lay.Snapshot,
		Regions:  []attach.Region{{Name: lay.Snapshot, Size: lay.FileSize, Length: lay.FileSize}},
		Requests: []string{attach.TypeWait, attach.TypeProfile},
	}
}

func (b backend) BackingFile() *uffd.File { return b.l.BackingFile() }

func (b backend) AttachView(u *uffd.FD, ranges []attach.Range, name string) (attach.View, error) {
	v, err := attach.FromLoader(b.l).AttachView(u, ranges, name)
	if err != nil {
		return nil, err
	}
	return totalsView{v, b.l}, nil
}

func (b backend) Wait(ctx context.Context) error { return b.l.Wait(ctx) }

func (b backend) Profile() (format.Profile, error) { return b.l.Profile() }

type totalsView struct {
	attach.View
	l *engine.Loader
}

func (v totalsView) Stats() engine.Stats { return v.l.Stats() }
