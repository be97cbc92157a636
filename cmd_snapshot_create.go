package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/internal/size"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

func snapCreateCmd() *cli.Command {
	return &cli.Command{
		Name:            "create",
		HideHelpCommand: true,
		Usage:           "make a snapshot from a raw image, stdin or a running process",
		ArgsUsage:       " ",
		Description: `Reads a raw memory image (a file, a hugetlbfs/shmem file, or stdin with
--from-file -) or the memory of a running process (--from-pid: one region per
readable mapping of /proc/PID/maps, read through /proc/PID/mem; [vdso], [vvar]
and [vsyscall] are skipped, unreadable ranges are skipped with a warning), cuts
it into chunks, compresses them in parallel and writes the snapshot atomically
(a temporary file in the output directory, renamed when complete). An
existing output is replaced only with --force; an output that is the input
(the same file under any name) is refused. An empty input is an error.

The process keeps running while it is read: stop it first (kill -STOP PID)
for a consistent image. --region selects mappings whose name contains NAME, or
matches it as a glob (e.g. '[heap]', '*.so', 'memfd:*'); repeat it for more.

--reorder-profile FILE takes a sidecar working-set profile (written by
"snapshot profile export" or a recording restore) of an earlier snapshot of
the same image: if the new snapshot has the same identity (same chunk size
and chunk contents), its chunk data is laid out with the working set first
(as "snapshot reorder" does) and the profile is stored in it. A profile of
another snapshot is foreign: the data stays in chunk order, with a warning.

Examples:
   uffdrestore snapshot create --from-file image.raw --output image.snap
   cat image.raw | uffdrestore snapshot create --from-file - -o image.snap --codec s2
   uffdrestore snapshot create --from-pid 1234 --region '[heap]' --region anon -o app.snap
   uffdrestore snapshot create --from-file image.raw -o image.snap --chunk-size 256K --level 1 --workers 2
   uffdrestore snapshot create --from-file image.raw -o image.snap --reorder-profile boot.profile.json`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "snapshot file to write (`SNAP`; - for stdout)"},
			&cli.StringFlag{Name: "from-file", Usage: "raw image to read (`IMAGE`; - for stdin)"},
			&cli.IntFlag{Name: "from-pid", Usage: "running process to read (`PID`)"},
			&cli.StringSliceFlag{Name: "region", Usage: "with --from-pid: only mappings whose name contains or glob-matches `NAME` (repeatable)"},
			&cli.StringFlag{Name: "codec", Value: "zstd", Usage: "compression: zstd (smallest), s2 (fastest to restore) or none"},
			&cli.IntFlag{Name: "level", Usage: "codec level (zstd 1-22, s2 1-3; 0 = default)"},
			&cli.StringFlag{Name: "chunk-size", Value: "2M", Usage: "chunk size, a power of two from 64K to 2M (64K, 256KiB, 2M, bytes)"},
			&cli.IntFlag{Name: "workers", Usage: "parallel compression workers (default: number of CPUs)"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress bar or summary"},
			&cli.StringFlag{Name: "reorder-profile", Usage: "lay out the working set of this sidecar profile (`FILE`) first"},
			&cli.StringFlag{Name: "reorder-unit", Value: "2M", Usage: "with --reorder-profile: fill unit the working set is grouped by (`SIZE`; the chunk size for shmem restores)"},
			forceFlag(),
		},
		Action: runSnapCreate,
	}
}

// errEmptyInput: the input of snapshot create held no bytes.
var errEmptyInput = errors.New("the input is empty")

func runSnapCreate(c *cli.Context) error {
	if c.NArg() > 0 {
		return snapUsage("create takes no positional arguments (got %q): use --from-file IMAGE or --from-pid PID, and --output SNAP", c.Args().Slice())
	}
	out := c.String("output")
	if out == "" {
		return snapUsage("create: --output SNAP is required (the snapshot file to write)")
	}
	fromFile, fromPID := c.String("from-file"), c.Int("from-pid")
	if (fromFile == "") == !c.IsSet("from-pid") {
		return snapUsage("create: give exactly one of --from-file IMAGE (- for stdin) or --from-pid PID")
	}
	if c.IsSet("region") && fromFile != "" {
		return snapUsage("create: --region selects mappings of a process; it only works with --from-pid")
	}
	codec, err := format.ParseCodec(c.String("codec"))
	if err != nil {
		return snapUsage("create: --codec %q: want zstd, s2 or none", c.String("codec"))
	}
	cs, err := size.Parse(c.String("chunk-size"))
	if err != nil {
		return snapUsage("create: --chunk-size: %v", err)
	}
	if cs < format.MinChunkSize || cs > format.MaxChunkSize || cs&(cs-1) != 0 {
		return snapUsage("create: --chunk-size %s: must be a power of two from 64K to 2M (e.g. 64K, 256K, 2M)", c.String("chunk-size"))
	}
	if c.Int("workers") < 0 {
		return snapUsage("create: --workers must be positive")
	}
	quiet := c.Bool("quiet")
	var reorder *restore.SidecarProfile
	var reorderUnit int
	if rp := c.String("reorder-profile"); rp != "" {
		if out == "-" {
			return snapUsage("create: --reorder-profile needs a file --output (the snapshot is reordered after it is written)")
		}
		if reorderUnit, err = snapParseUnit(c.String("reorder-unit")); err != nil {
			return snapUsage("create: --reorder-unit: %v", err)
		}
		if reorder, err = restore.LoadProfile(rp); err != nil {
			return fmt.Errorf("snapshot create: --reorder-profile: %w", err)
		}
	}
	if err := checkOutputs("snapshot create", c.Bool("force"),
		outputCheck{flag: "--output", path: out, inputs: []string{fromFile, c.String("reorder-profile")}}); err != nil {
		return err
	}
	if fromFile != "" && fromFile != "-" {
		if st, err := os.Stat(fromFile); err == nil && st.Mode().IsRegular() && st.Size() == 0 {
			return cli.Exit(fmt.Sprintf("snapshot create: --from-file %s is empty (0 bytes): nothing to snapshot; give a non-empty image", fromFile), 1)
		}
	}
	opts := snapshot.Options{
		WriterOptions: format.WriterOptions{
			ChunkSize: int(cs), Codec: codec, Level: c.Int("level"), Workers: c.Int("workers"),
			Metadata: format.Metadata{ToolVersion: version, Extra: map[string]string{}},
		},
		Regions: c.StringSlice("region"),
		Warn:    func(m string) { fmt.Fprintln(c.App.ErrWriter, "uffdrestore: warning:", m) },
	}
	if h, err := os.Hostname(); err == nil {
		opts.Metadata.Extra["host"] = h
	}
	ctx, cancel := snapSignalContext(c)
	defer cancel()
	prog := newSnapProgress(c, "create", quiet)
	opts.Progress = prog.Update

	w, commit, abort, err := snapOutput(c, out)
	if err != nil {
		return err
	}
	// A read blocked on a pipe does not see ctx: if an interrupt is not
	// honoured within 2 s, remove the partial output and exit from here.
	var finish sync.Mutex
	finished := make(chan struct{})
	go func() {
		select {
		case <-finished:
			return
		case <-ctx.Done():
		}
		select {
		case <-finished:
			return
		case <-time.After(2 * time.Second):
		}
		finish.Lock() // never unlocked: the process exits
		select {
		case <-finished:
			finish.Unlock()
			return
		default:
		}
		abort()
		fmt.Fprintln(c.App.ErrWriter, "uffdrestore: snapshot create: interrupted; no output written")
		os.Exit(130)
	}()
	start := time.Now()
	var st format.WriterStats
	switch {
	case fromFile == "-":
		opts.Metadata.Source = "stdin"
		st, err = snapshot.CreateFromReader(ctx, os.Stdin, w, opts)
	case fromFile != "":
		st, err = snapshot.CreateFromFile(ctx, fromFile, w, opts)
	default:
		st, err = snapshot.CreateFromPID(ctx, fromPID, w, opts)
	}
	prog.Done()
	finish.Lock()
	close(finished)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err == nil && st.RawBytes == 0 {
		src := "--from-file " + fromFile
		switch {
		case fromFile == "-":
			src = "standard input"
		case fromFile == "":
			src = fmt.Sprintf("process %d (no readable mapping selected)", fromPID)
		}
		err = fmt.Errorf("%w: %s gave 0 bytes, nothing to snapshot; no output written", errEmptyInput, src)
	}
	if err == nil && reorder != nil {
		var reordered bool
		reordered, err = snapCreateReorder(ctx, c, w.(*atomicfile.File), reorder, reorderUnit, quiet)
		if reordered {
			commit = func() error { return nil } // the reordered copy is in place
		}
	}
	if err == nil {
		err = commit()
	}
	finish.Unlock()
	if err != nil {
		abort()
		if errors.Is(err, context.Canceled) {
			return cli.Exit("snapshot create: interrupted; no output written", 130)
		}
		if out == "-" && errors.Is(err, errEmptyInput) {
			err = fmt.Errorf("%w (a snapshot of nothing was written to standard output)", err)
		}
		return fmt.Errorf("snapshot create: %w", err)
	}
	if !quiet && out != "-" {
		el := time.Since(start)
		ratio := 0.0
		if st.StoredBytes > 0 {
			ratio = float64(st.RawBytes) / float64(st.StoredBytes)
		}
		fmt.Fprintf(c.App.ErrWriter, "wrote %s: %s -> %s (%.1fx), %d regions, %d chunks (zstd %d, s2 %d, raw %d, zero %d) in %s (%s/s)\n",
			out, snapshot.HumanBytes(st.RawBytes), snapshot.HumanBytes(st.FileBytes), ratio, st.Regions, st.Chunks,
			st.PerCodec[format.CodecZstd], st.PerCodec[format.CodecS2], st.PerCodec[format.CodecRaw], st.PerCodec[format.CodecZero],
			el.Round(time.Millisecond), snapshot.HumanBytes(uint64(float64(st.RawBytes)/max(el.Seconds(), 1e-9))))
	}
	return nil
}

// snapCreateReorder lays out the freshly written snapshot in a (flushed,
// not yet committed) with sc's working set first, committing the reordered
// copy in its place. It returns false, with a warning, if sc belongs to
// another snapshot: the caller then commits a as it is.
func snapCreateReorder(ctx context.Context, c *cli.Context, a *atomicfile.File, sc *restore.SidecarProfile, unit int, quiet bool) (bool, error) {
	n, err := a.Size()
	if err != nil {
		return false, fmt.Errorf("write %s: %w", a.Name(), err)
	}
	r, err := format.NewReader(a, n)
	if err != nil {
		return false, fmt.Errorf("re-read new snapshot: %w", err)
	}
	if err := sc.Check(r, c.String("reorder-profile")); err != nil {
		fmt.Fprintf(c.App.ErrWriter, "uffdrestore: warning: --reorder-profile: %v; chunk data left in chunk order\n", err)
		return false, nil
	}
	p := sc.Profile
	if p.Name == "" {
		p.Name = "default"
	}
	b, err := atomicfile.Create(a.Path(), 0o644)
	if err != nil {
		return false, err
	}
	rs, err := snapshot.Reorder(ctx, r, b, p, snapshot.ReorderOptions{UnitSize: unit, Profiles: []format.Profile{p}})
	if err == nil {
		err = b.Commit()
	} else {
		b.Abort()
	}
	if err != nil {
		return false, fmt.Errorf("reorder: %w", err)
	}
	a.Abort() // the chunk-ordered temporary file
	if !quiet {
		fmt.Fprintf(c.App.ErrWriter, "reordered: working set of profile %q first (%d chunks, %s)\n", p.Name, rs.Leading, snapshot.HumanBytes(rs.WorkingSetBytes))
	}
	return true, nil
}
