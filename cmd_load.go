package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

func init() {
	registerCommand(&cli.Command{
		Name:      "load",
		Usage:     "load a snapshot and serve it to target processes over a Unix socket",
		ArgsUsage: "SNAP",
		Description: `Loads SNAP into a backing file (a hugetlb memfd, a file in a hugetlbfs mount,
or a shmem memfd) and listens on --socket for target processes. A target (for
example one linked with bin/libuffdrestore.a, or bin/uffdrestore-target)
receives the backing file, maps the snapshot's regions, and hands its
userfaultfd back; from then on the first touch of each page is filled from
the snapshot (the attach protocol: PROTOCOL.md). Any number of targets may
attach; every chunk is decompressed once for all of them.

Modes: lazy fills only what targets touch; prefetch also fills the rest in
the background; eager fills everything before listening; working-set fills a
recorded working set first, in recorded order, ahead of the faults (then the
rest with --prefetch-rest).

Working sets: --record NAME records which chunks the targets touch first, in
order; on shutdown the profile is stored in the snapshot (replacing one of the
same name) or, with --record-to FILE, in a sidecar file. Replay it with
--profile NAME (or --profile-file FILE), which implies --mode working-set.

SIGINT or SIGTERM shuts down: targets are asked to detach, and detached after
--shutdown-timeout (a target touching a page never filled then waits until it
is killed); a second signal shuts down at once. With --once, load also ends
(exit 1) when its first target fails before attaching.

--stats-json and --record-to are checked before loading: their directory must
exist and be writable, and an existing file is replaced only with --force. The stats are printed (and
written to --stats-json), the socket is removed and the backing freed.

Restarting: if load dies, its targets keep their mappings and wait (faults
queue in their userfaultfds); the client library reconnects to the same
socket for a while (30 s by default). Start load again with --adopt, the same
SNAP, --socket and --backing: it removes the stale socket, announces the
snapshot, adopts the backing the first re-attaching target hands back
(learning which pages are already filled: those are never filled again, so a
shared target's writes stay) and serves every re-attaching target. A server of
another snapshot is refused by every re-attaching target, which exits with an
error. See PROTOCOL.md section 5.1.

Only the server's own uid and root may attach, plus --allow-uid; the socket
is created mode 0600 (--socket-mode). Attached targets may write the shared
snapshot pages unless --read-only-targets (then they must map it private).
Put the socket in a directory only the server's user can write: targets
attach only to a server running as root or as their own uid.

Examples:
   uffdrestore load app.snap --socket /run/app.sock
   uffdrestore load app.snap --socket /run/app.sock --mode prefetch --backing memfd
   uffdrestore load app.snap --socket /tmp/s.sock --once --stats-json stats.json &
   bin/uffdrestore-target --socket /tmp/s.sock --private --pattern random --dump out.raw
   uffdrestore load app.snap --socket /tmp/s.sock --record boot --once
   uffdrestore load app.snap --socket /tmp/s.sock --profile boot --prefetch-rest
   uffdrestore load app.snap --socket /run/app.sock --backing memfd --adopt   (after the first load died)`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "socket", Aliases: []string{"s"}, Usage: "Unix socket to listen on (`PATH`)", Required: true},
			&cli.StringFlag{Name: "mode", Value: "lazy", Usage: "lazy, eager, prefetch or working-set"},
			&cli.StringFlag{Name: "record", Usage: "record the targets' first-touch order as the working-set profile `NAME`"},
			&cli.StringFlag{Name: "record-to", Usage: "with --record: write the profile to this sidecar `FILE` instead of into the snapshot"},
			&cli.StringFlag{Name: "profile", Usage: "replay the snapshot's working-set profile `NAME` (implies --mode working-set)"},
			&cli.StringFlag{Name: "profile-file", Usage: "replay the working-set profile in this sidecar `FILE` (implies --mode working-set)"},
			&cli.BoolFlag{Name: "prefetch-rest", Usage: "working-set mode: after the working set, prefetch everything else"},
			&cli.StringFlag{Name: "backing", Value: "auto", Usage: "auto, hugetlbfs (needs --hugetlbfs), memfd (hugetlb memfd) or shmem"},
			&cli.StringFlag{Name: "hugetlbfs", Usage: "hugetlbfs mount for --backing hugetlbfs (`DIR`)"},
			&cli.StringFlag{Name: "allow-uid", Usage: "uids that may attach besides the server's own and root (`UID,...`)"},
			&cli.StringFlag{Name: "socket-mode", Value: "0600", Usage: "permission bits of the socket file (octal)"},
			&cli.BoolFlag{Name: "read-only-targets", Usage: "give targets a read-only backing fd: they map it private (copy-on-write) and cannot change the snapshot for the others"},
			&cli.StringFlag{Name: "stats-json", Usage: "write the final stats as JSON to `FILE`"},
			&cli.BoolFlag{Name: "once", Usage: "exit when the first target detaches or goes away"},
			&cli.IntFlag{Name: "workers", Usage: "fill workers (default: number of CPUs)"},
			&cli.DurationFlag{Name: "shutdown-timeout", Value: 5 * time.Second, Usage: "how long targets get to detach on shutdown"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no per-target lines on stderr"},
			&cli.BoolFlag{Name: "adopt", Usage: "take over the targets of a server that died on --socket: they re-attach and the first hands back the backing (same SNAP and --backing as the first server)"},
			forceFlag(),
		},
		Action: runLoad,
	})
}

func loadParseUIDs(s string) ([]uint32, error) {
	var out []uint32
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		n, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("--allow-uid: %q is not a uid", f)
		}
		out = append(out, uint32(n))
	}
	return out, nil
}

func runLoad(c *cli.Context) error {
	start := time.Now()
	if c.NArg() != 1 {
		return cli.Exit("load: want exactly one SNAP argument (see uffdrestore load --help)", 2)
	}
	snap := c.Args().First()
	mode, err := restore.ParseMode(c.String("mode"))
	if err != nil {
		return cli.Exit("load: --mode: "+err.Error(), 2)
	}
	backing, err := restore.ParseBacking(c.String("backing"))
	if err != nil {
		return cli.Exit("load: --backing: "+err.Error(), 2)
	}
	uids, err := loadParseUIDs(c.String("allow-uid"))
	if err != nil {
		return cli.Exit("load: "+err.Error(), 2)
	}
	sockMode, err := strconv.ParseUint(c.String("socket-mode"), 8, 32)
	if err != nil || sockMode > 0o777 || sockMode == 0 {
		return cli.Exit(fmt.Sprintf("load: --socket-mode: %q is not an octal mode such as 0600", c.String("socket-mode")), 2)
	}
	sock := c.String("socket")
	stderr := c.App.ErrWriter
	if stderr == nil {
		stderr = os.Stderr
	}

	// Outputs are checked before anything is loaded or served: a bad path
	// is reported now, not at shutdown.
	if err := checkOutputs("load", c.Bool("force"),
		outputCheck{flag: "--stats-json", path: c.String("stats-json"), inputs: []string{snap, c.String("profile-file")}},
		outputCheck{flag: "--record-to", path: c.String("record-to"), inputs: []string{snap, c.String("profile-file")}}); err != nil {
		return err
	}

	// Signals: the first starts a graceful shutdown, the second forces it.
	// One goroutine owns them for the whole run (see shutdownSignals).
	sig := notifyShutdown(c.Context)
	defer sig.Stop()

	opts := []restore.Option{restore.WithMode(mode), restore.WithBacking(backing), restore.ForTargets()}
	if d := c.String("hugetlbfs"); d != "" {
		opts = append(opts, restore.WithHugetlbfsDir(d))
	}
	workers := runtime.NumCPU()
	if n := c.Int("workers"); n > 0 {
		opts = append(opts, restore.WithWorkers(n))
		workers = n
	}
	// One P more than fill workers, so a target's fault loop never waits for
	// a P while every P decodes (see restore's package documentation).
	runtime.GOMAXPROCS(workers + 1)
	record := c.String("record")
	if record != "" {
		if mode != restore.ModeLazy || c.IsSet("profile") || c.IsSet("profile-file") {
			return cli.Exit("load: --record needs --mode lazy: prefetched pages raise no faults to record", 2)
		}
		opts = append(opts, restore.WithRecord(record))
	} else if c.IsSet("record-to") {
		return cli.Exit("load: --record-to goes with --record NAME", 2)
	}
	if c.IsSet("profile") && c.IsSet("profile-file") {
		return cli.Exit("load: give --profile or --profile-file, not both", 2)
	}
	if c.IsSet("profile") || c.IsSet("profile-file") || mode == restore.ModeWorkingSet {
		opts = append(opts, restore.WithProfile(restore.ProfileSource{Name: c.String("profile"), File: c.String("profile-file")}))
		mode = restore.ModeWorkingSet
	}
	if c.Bool("prefetch-rest") {
		opts = append(opts, restore.WithPrefetchRest(true))
	}
	if err := loadCheckAttachable(snap, opts); err != nil {
		return cli.Exit("load: "+err.Error(), 1)
	}
	// The fill journal beside the socket (for a restart: PROTOCOL.md §5.1)
	// belongs to the server on the socket: never touch a live one's.
	if err := attach.PrepareSocket(sock); err != nil {
		return cli.Exit("load: "+err.Error(), 1)
	}
	journal := sock + ".fills"
	opts = append(opts, restore.WithFillJournal(journal))
	logf := func(format string, args ...any) { fmt.Fprintf(stderr, "uffdrestore: "+format+"\n", args...) }
	if c.Bool("quiet") {
		logf = func(string, ...any) {}
	}
	var (
		l       *restore.Loader
		backend attach.Backend
		lay     restore.Layout
		adopted loadAdopted
	)
	if c.Bool("adopt") {
		backend, lay, err = loadAdopt(sig.Graceful, snap, opts, start, stderr, &adopted)
		if err != nil {
			return cli.Exit("load: "+err.Error(), 1)
		}
		defer adopted.close()
	} else {
		l, err = restore.NewLoader(sig.Graceful, snap, opts...)
		if err != nil {
			os.Remove(journal)
			if sig.Signalled() {
				return cli.Exit("load: interrupted ("+sig.Reason()+") before serving", 130)
			}
			return cli.Exit("load: "+err.Error(), 1)
		}
		defer l.Close()
		if sig.Graceful.Err() != nil { // interrupted while loading
			return cli.Exit("load: interrupted ("+sig.Reason()+") before serving", 130)
		}
		backend, lay = attach.FromLoader(l), l.Layout()
	}

	type ended struct {
		ti       attach.TargetInfo
		attached bool
	}
	detached := make(chan ended, 1)
	srv, err := attach.Listen(sock, backend, attach.Options{
		Mode:            fs.FileMode(sockMode),
		AllowUIDs:       uids,
		ReadOnlyTargets: c.Bool("read-only-targets"),
		Logf:            logf,
		OnDetach: func(ti attach.TargetInfo) {
			select {
			case detached <- ended{ti, true}:
			default:
			}
		},
		// A target that fails before attaching ends --once too: it was the
		// one target, and it will not come back.
		OnRefuse: func(ti attach.TargetInfo) {
			select {
			case detached <- ended{ti, false}:
			default:
			}
		},
	})
	if err != nil {
		return cli.Exit("load: "+err.Error(), 1)
	}
	var total uint64
	for _, r := range lay.Regions {
		total += r.Length
	}
	plural := "s"
	if len(lay.Regions) == 1 {
		plural = ""
	}
	fmt.Fprintf(stderr, "ready: serving %s on %s (backing %s, %d region%s, %.1f MiB, mode %s)\n",
		snap, sock, lay.Backing, len(lay.Regions), plural, float64(total)/(1<<20), mode)

	var once <-chan ended
	if c.Bool("once") {
		once = detached
	}
	var reason string
	var errs []error
	select {
	case <-sig.Graceful.Done():
		reason = sig.Reason()
	case e := <-once:
		reason = fmt.Sprintf("--once: %s ended (%s)", e.ti.Name, e.ti.Reason)
		if !e.attached {
			errs = append(errs, fmt.Errorf("--once: the target %s failed before attaching (%s); nothing was served", e.ti.Name, e.ti.Reason))
		}
	}
	fmt.Fprintf(stderr, "uffdrestore: shutting down (%s)\n", reason)

	// A second signal ends the wait for targets at once.
	ctx, cancel := context.WithTimeout(sig.Force, c.Duration("shutdown-timeout"))
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "uffdrestore: %v\n", err)
	}
	if l == nil {
		if l = adopted.get(); l == nil {
			fmt.Fprintf(stderr, "uffdrestore: --adopt: no target re-attached; nothing was served\n")
			return errors.Join(errs...)
		}
	}
	st := l.Stats()
	fmt.Fprintf(stderr, "stats: %s\n", loadStatsLine(st))
	if w := st.WorkingSet; w != nil {
		fmt.Fprintf(stderr, "working set %q: %d units, %d filled ahead of any fault, %d needed by a fault first, %d faulted outside it\n",
			w.Profile, w.Units, w.Prefilled, w.Late, w.Missed)
	}
	var recorded *format.Profile
	if record != "" {
		if p, err := l.Profile(); err != nil {
			errs = append(errs, err)
		} else {
			recorded = &p
		}
	}
	if p := c.String("stats-json"); p != "" {
		if err := atomicfile.WriteBytes(p, 0o644, append(st.JSON(), '\n')); err != nil {
			errs = append(errs, fmt.Errorf("--stats-json: %w", err))
		}
	}
	if err := l.Err(); err != nil {
		errs = append(errs, fmt.Errorf("serving %s: %w", snap, err))
	}
	if recorded != nil {
		if err := loadSaveProfile(l, snap, c.String("record-to"), *recorded); err != nil {
			errs = append(errs, fmt.Errorf("--record: %w", err))
		} else {
			where := snap
			if f := c.String("record-to"); f != "" {
				where = f
			}
			fmt.Fprintf(stderr, "recorded working set %q: %d chunks, saved to %s\n", recorded.Name, len(recorded.Entries), where)
		}
	}
	if err := l.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		errs = append(errs, fmt.Errorf("free the backing: %w", err))
	}
	os.Remove(journal) // stopped cleanly: no fill in flight
	if err := errors.Join(errs...); err != nil {
		return cli.Exit("load: "+err.Error(), 1)
	}
	return nil
}

// loadSaveProfile stores a recorded profile in a sidecar file, or in the
// snapshot itself (its index is rewritten; the chunk data stays), replacing
// a profile of the same name.
func loadSaveProfile(l *restore.Loader, snap, sidecar string, p format.Profile) error {
	if sidecar != "" {
		return restore.SaveProfile(sidecar, l.Reader(), p)
	}
	return restore.StoreProfile(snap, l.Reader().Profiles(), p, true)
}

func loadStatsLine(st restore.Stats) string {
	b, err := json.Marshal(st)
	if err != nil {
		return err.Error()
	}
	return string(b)
}
