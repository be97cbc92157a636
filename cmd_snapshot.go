package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/internal/progress"
	"github.com/uffdrestore/uffdrestore/internal/size"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

func init() {
	registerCommand(&cli.Command{
		Name:            "snapshot",
		Usage:           "create, inspect, verify and extract snapshots",
		HideHelpCommand: true, // "--help" works; no "help" pseudo-subcommand
		Description: `Snapshots are compressed, chunked memory images with an index, built for
random access by chunk (see format/SPEC.md).

Examples:
   uffdrestore snapshot create --from-file image.raw --output image.snap
   uffdrestore snapshot info image.snap
   uffdrestore snapshot verify image.snap
   uffdrestore snapshot profile list image.snap
   uffdrestore snapshot reorder image.snap --profile boot -o image.snap --force`,
		Subcommands: []*cli.Command{snapCreateCmd(), snapInfoCmd(), snapVerifyCmd(), snapExtractCmd(), snapReorderCmd(), snapProfileCmd()},
	})
}

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

func snapInfoCmd() *cli.Command {
	return &cli.Command{
		Name:            "info",
		HideHelpCommand: true,
		Usage:           "show a snapshot's regions, codecs, sizes, metadata and profiles",
		ArgsUsage:       "SNAP",
		Description: `Reads and validates the header, footer and index (not the chunk data: use
verify for that) and prints a summary.

Examples:
   uffdrestore snapshot info image.snap
   uffdrestore snapshot info image.snap --json | jq .ratio`,
		Flags:  []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: runSnapInfo,
	}
}

func snapVerifyCmd() *cli.Command {
	return &cli.Command{
		Name:            "verify",
		HideHelpCommand: true,
		Usage:           "check every chunk's checksums",
		ArgsUsage:       "SNAP",
		Description: `Decodes every chunk in parallel and checks its CRC-32C checksums. Exits 0
with "ok: N chunks verified", or 1 naming each bad chunk (index, region, file
offset).

Examples:
   uffdrestore snapshot verify image.snap
   uffdrestore snapshot verify image.snap --workers 1`,
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "workers", Usage: "parallel workers (default: number of CPUs)"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress bar"},
		},
		Action: runSnapVerify,
	}
}

func snapExtractCmd() *cli.Command {
	return &cli.Command{
		Name:            "extract",
		HideHelpCommand: true,
		Usage:           "write a snapshot's raw bytes back out",
		ArgsUsage:       "SNAP",
		Description: `Writes the raw bytes of all regions (or of those --region selects), in
order, each exactly its length. Output to a file is atomic (temporary file +
rename); - writes to stdout. An existing output is replaced only with --force;
the snapshot itself is never overwritten.

Region names need not be unique (a --from-pid snapshot has many "anon"
regions and a library mapped several times under one path): a region's
identity is its index, the # column of "snapshot info". --region NAME selects
every region named NAME (else every region whose name matches NAME as a glob);
--region '#N' selects region N alone.

Examples:
   uffdrestore snapshot extract image.snap --output image.raw
   uffdrestore snapshot extract app.snap --region '[heap]' -o - | xxd | less
   uffdrestore snapshot extract app.snap --region '#12' -o region12.raw`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "file to write (`IMAGE`; - for stdout)"},
			&cli.StringFlag{Name: "region", Usage: "only the regions named `NAME` (exact, else a glob), or '#N': region N alone (index as snapshot info lists it)"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress bar"},
			forceFlag(),
		},
		Action: runSnapExtract,
	}
}

// errEmptyInput: the input of snapshot create held no bytes.
var errEmptyInput = errors.New("the input is empty")

// snapUsage is a usage error: exit status 2.
func snapUsage(format string, args ...any) error {
	return cli.Exit("snapshot: "+fmt.Sprintf(format, args...), 2)
}

// snapSignalContext is cancelled on SIGINT/SIGTERM so partial outputs are
// removed.
func snapSignalContext(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
}

// newSnapProgress is the progress bar of a snapshot command, on stderr.
func newSnapProgress(c *cli.Context, label string, quiet bool) *progress.Bar {
	return progress.New(c.App.ErrWriter, label, quiet, snapshot.HumanBytes)
}

// snapOutput opens the output: stdout for "-", else an atomic file.
func snapOutput(c *cli.Context, path string) (w io.Writer, commit func() error, abort func(), err error) {
	if path == "-" {
		bw := bufio.NewWriterSize(c.App.Writer, 1<<20)
		return bw, bw.Flush, func() {}, nil
	}
	a, err := atomicfile.Create(path, 0o644)
	if err != nil {
		return nil, nil, nil, err
	}
	return a, a.Commit, a.Abort, nil
}

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

func snapOpenArg(c *cli.Context, cmd string) (*format.File, error) {
	if c.NArg() != 1 {
		return nil, snapUsage("%s: want exactly one snapshot file argument, got %d (usage: uffdrestore snapshot %s SNAP)", cmd, c.NArg(), cmd)
	}
	f, err := format.Open(c.Args().First())
	if err != nil {
		hint := ""
		switch {
		case errors.Is(err, format.ErrNotSnapshot):
			hint = "; is this a raw image? make a snapshot with: uffdrestore snapshot create --from-file IMAGE -o SNAP"
		case errors.Is(err, format.ErrVersion):
			hint = "; it was written by a newer uffdrestore: upgrade this one"
		case errors.Is(err, format.ErrTruncated), errors.Is(err, format.ErrChecksum), errors.Is(err, format.ErrCorrupt):
			hint = "; the file is damaged: copy it again or re-create it"
		}
		return nil, fmt.Errorf("snapshot %s: %w%s", cmd, err, hint)
	}
	return f, nil
}

func runSnapInfo(c *cli.Context) error {
	f, err := snapOpenArg(c, "info")
	if err != nil {
		return err
	}
	defer f.Close()
	rep := snapshot.Info(f.Reader)
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return rep.WriteText(c.App.Writer)
}

func runSnapVerify(c *cli.Context) error {
	f, err := snapOpenArg(c, "verify")
	if err != nil {
		return cli.Exit(err.Error(), 1)
	}
	defer f.Close()
	if c.Int("workers") < 0 {
		return snapUsage("verify: --workers must be positive")
	}
	ctx, cancel := snapSignalContext(c)
	defer cancel()
	prog := newSnapProgress(c, "verify", c.Bool("quiet"))
	errs := snapshot.VerifyProgress(ctx, f.Reader, c.Int("workers"), prog.Update)
	prog.Done()
	if len(errs) == 0 {
		fmt.Fprintf(c.App.Writer, "ok: %d chunks verified (%s)\n", f.NumChunks(), snapshot.HumanBytes(f.RawSize()))
		return nil
	}
	bad := 0
	for _, e := range errs {
		if e.Chunk >= 0 {
			bad++
			fmt.Fprintf(c.App.Writer, "bad chunk %d: region %d %q at +%#x, file offset %#x: %v\n",
				e.Chunk, e.Region, e.RegionName, e.RegionOff, e.Offset, e.Err)
		} else {
			fmt.Fprintf(c.App.Writer, "error: %v\n", e.Err)
		}
	}
	return cli.Exit(fmt.Sprintf("snapshot verify: %s: %d of %d chunks bad; the file is damaged: copy it again or re-create it",
		c.Args().First(), bad, f.NumChunks()), 1)
}

func runSnapExtract(c *cli.Context) error {
	out := c.String("output")
	if out == "" {
		return snapUsage("extract: --output IMAGE is required (- for stdout)")
	}
	f, err := snapOpenArg(c, "extract")
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := snapshot.SelectRegions(f.Reader, c.String("region")); err != nil {
		return fmt.Errorf("snapshot extract: %w", err)
	}
	if err := checkOutputs("snapshot extract", c.Bool("force"),
		outputCheck{flag: "--output", path: out, inputs: []string{c.Args().First()}}); err != nil {
		return err
	}
	ctx, cancel := snapSignalContext(c)
	defer cancel()
	w, commit, abort, err := snapOutput(c, out)
	if err != nil {
		return err
	}
	prog := newSnapProgress(c, "extract", c.Bool("quiet") || out == "-")
	err = snapshot.ExtractProgress(ctx, f.Reader, w, c.String("region"), prog.Update)
	prog.Done()
	if err == nil {
		err = commit()
	}
	if err != nil {
		abort()
		return fmt.Errorf("snapshot extract: %w", err)
	}
	return nil
}

// snapParseUnit parses a working-set fill unit: a power-of-two size from 4K
// to 1G, or "chunk" (chunk by chunk, as a restore into 4 KiB shmem pages
// fills).
func snapParseUnit(s string) (int, error) {
	if strings.EqualFold(strings.TrimSpace(s), "chunk") {
		return 1, nil
	}
	n, err := size.Parse(s)
	if err != nil {
		return 0, err
	}
	if n < 4<<10 || n > 1<<30 || n&(n-1) != 0 {
		return 0, fmt.Errorf("%q: want a power of two from 4K to 1G, or \"chunk\"", s)
	}
	return int(n), nil
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
	if id := restore.SnapshotID(r); sc.SnapshotID != id {
		fmt.Fprintf(c.App.ErrWriter, "uffdrestore: warning: --reorder-profile %s is a foreign profile: recorded on snapshot %s (%d chunks of %s), the new snapshot is %s (%d chunks of %s); chunk data left in chunk order\n",
			c.String("reorder-profile"), sc.SnapshotID, sc.Chunks, snapshot.HumanBytes(uint64(sc.ChunkSize)), id, r.NumChunks(), snapshot.HumanBytes(uint64(r.ChunkSize())))
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

func snapReorderCmd() *cli.Command {
	return &cli.Command{
		Name:            "reorder",
		HideHelpCommand: true,
		Usage:           "lay out a snapshot's working set first in the file",
		ArgsUsage:       "SNAP",
		Description: `Copies SNAP to --output with the chunk data of a working-set profile first,
then the rest in chunk order, so a restore that prefetches the working set
reads it with a few large reads. Stored chunks are copied verbatim (never
recompressed; each one's stored checksum is checked on the way); the output
decodes to exactly the same bytes, keeps the regions, metadata and profiles,
and has the same identity (sidecar profiles stay valid).

The profile is --profile NAME (stored in SNAP), or --profile-file FILE (a
sidecar, which must belong to SNAP: a foreign profile is rejected; it is
stored in the output). With neither, SNAP's only profile, or all of its
profiles merged. The working set is grouped by fill units of --unit (2M: a
restore into huge pages fills 2 MiB at a time; "chunk" for 4 KiB shmem
restores). --output may be SNAP itself with --force (replaced atomically: the
output decodes to the same bytes); any other existing output is replaced only
with --force.

Examples:
   uffdrestore snapshot reorder app.snap --profile boot -o app.snap --force
   uffdrestore snapshot reorder app.snap --profile-file boot.profile.json -o app-ws.snap
   uffdrestore snapshot reorder app.snap -o app-ws.snap --unit chunk`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "snapshot file to write (`SNAP`; may be the input, with --force; - for stdout)"},
			&cli.StringFlag{Name: "profile", Usage: "working-set profile stored in the snapshot (`NAME`)"},
			&cli.StringFlag{Name: "profile-file", Usage: "sidecar working-set profile (`FILE`)"},
			&cli.StringFlag{Name: "unit", Value: "2M", Usage: "fill unit the working set is grouped by (`SIZE`, or chunk)"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress bar or summary"},
			forceFlag(),
		},
		Action: runSnapReorder,
	}
}

func runSnapReorder(c *cli.Context) error {
	out := c.String("output")
	if out == "" {
		return snapUsage("reorder: --output SNAP is required (it may be the input file, with --force)")
	}
	if c.IsSet("profile") && c.IsSet("profile-file") {
		return snapUsage("reorder: give --profile NAME or --profile-file FILE, not both")
	}
	unit, err := snapParseUnit(c.String("unit"))
	if err != nil {
		return snapUsage("reorder: --unit: %v", err)
	}
	f, err := snapOpenArg(c, "reorder")
	if err != nil {
		return err
	}
	defer f.Close()
	var p format.Profile
	var keep []format.Profile // nil: keep SNAP's profiles
	switch {
	case c.IsSet("profile-file"):
		sc, err := restore.LoadSidecar(f.Reader, c.String("profile-file"))
		if err != nil {
			return fmt.Errorf("snapshot reorder: %w", err)
		}
		p = sc.Profile
		if p.Name == "" {
			p.Name = "default"
		}
		keep = restore.ReplaceProfile(f.Profiles(), p)
	default:
		if p, err = restore.FindProfile(f.Reader, c.String("profile")); err != nil {
			return fmt.Errorf("snapshot reorder: %w", err)
		}
	}
	// The sidecar may never be the output; SNAP may, with --force.
	if err := checkOutputs("snapshot reorder", true,
		outputCheck{flag: "--output", path: out, inputs: []string{c.String("profile-file")}}); err != nil {
		return err
	}
	if err := checkOutputs("snapshot reorder", c.Bool("force"),
		outputCheck{flag: "--output", path: out, inputs: []string{c.Args().First()}, sameOK: true}); err != nil {
		return err
	}
	ctx, cancel := snapSignalContext(c)
	defer cancel()
	w, commit, abort, err := snapOutput(c, out)
	if err != nil {
		return err
	}
	quiet := c.Bool("quiet") || out == "-"
	prog := newSnapProgress(c, "reorder", quiet)
	start := time.Now()
	st, err := snapshot.Reorder(ctx, f.Reader, w, p, snapshot.ReorderOptions{UnitSize: unit, Profiles: keep, Progress: prog.Update})
	prog.Done()
	if err == nil {
		err = commit()
	}
	if err != nil {
		abort()
		if errors.Is(err, context.Canceled) {
			return cli.Exit("snapshot reorder: interrupted; no output written", 130)
		}
		return fmt.Errorf("snapshot reorder: %w", err)
	}
	if !quiet {
		fmt.Fprintf(c.App.ErrWriter, "wrote %s: working set of profile %q first (%d of %d stored chunks, %s of %s), in %s\n",
			out, p.Name, st.Leading, st.Chunks, snapshot.HumanBytes(st.WorkingSetBytes), snapshot.HumanBytes(st.StoredBytes),
			time.Since(start).Round(time.Millisecond))
	}
	return nil
}

func snapProfileCmd() *cli.Command {
	nameFlag := func(usage string) cli.Flag { return &cli.StringFlag{Name: "name", Usage: usage} }
	replace := func() cli.Flag { return &cli.BoolFlag{Name: "replace", Usage: "replace a profile of the same name"} }
	return &cli.Command{
		Name:            "profile",
		HideHelpCommand: true,
		Usage:           "list, add, export, merge and remove working-set profiles",
		Description: `A working-set profile lists the chunks a restore touched first, in
first-touch order. Profiles are stored in the snapshot (several, by name;
adding or removing one rewrites only the index, never the chunk data) or in
sidecar JSON files, which carry the snapshot's identity: a sidecar of another
snapshot is rejected.

Examples:
   uffdrestore snapshot profile list app.snap
   uffdrestore snapshot profile add app.snap --from run1.profile.json --name run1
   uffdrestore snapshot profile merge app.snap --name boot --from run1,run2
   uffdrestore snapshot profile export app.snap --name boot -o boot.profile.json
   uffdrestore snapshot profile remove app.snap --name run1`,
		Subcommands: []*cli.Command{
			{
				Name: "list", HideHelpCommand: true, ArgsUsage: "SNAP",
				Usage: "show each profile's entries, chunks and units covered, and first/last touch times",
				Description: `Units are fill units of --unit (2M: as a restore into huge pages fills).

Examples:
   uffdrestore snapshot profile list app.snap
   uffdrestore snapshot profile list app.snap --json | jq '.[].units'`,
				Flags: []cli.Flag{
					&cli.BoolFlag{Name: "json", Usage: "print JSON"},
					&cli.StringFlag{Name: "unit", Value: "2M", Usage: "fill unit to count (`SIZE`, or chunk)"},
				},
				Action: runSnapProfileList,
			},
			{
				Name: "add", HideHelpCommand: true, ArgsUsage: "SNAP",
				Usage: "store a sidecar profile file in the snapshot",
				Description: `Reads the sidecar --from FILE, checks it was recorded on this snapshot
(its identity must match: a foreign profile is rejected) and stores it under
its own name or --name. Only the index is rewritten.

Examples:
   uffdrestore snapshot profile add app.snap --from run1.profile.json
   uffdrestore snapshot profile add app.snap --from run2.profile.json --name boot --replace`,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "from", Usage: "sidecar profile to add (`FILE`)"},
					nameFlag("store it under this `NAME` (default: the name in the file)"),
					replace(),
				},
				Action: runSnapProfileAdd,
			},
			{
				Name: "export", HideHelpCommand: true, ArgsUsage: "SNAP",
				Usage: "write a stored profile to a sidecar file",
				Description: `Writes profile --name (default: the only one) as a sidecar JSON file that
carries the snapshot's identity. An existing FILE is replaced only with
--force.

Examples:
   uffdrestore snapshot profile export app.snap --name boot --output boot.profile.json`,
				Flags: []cli.Flag{
					nameFlag("profile to export (`NAME`)"),
					&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "sidecar file to write (`FILE`)"},
					forceFlag(),
				},
				Action: runSnapProfileExport,
			},
			{
				Name: "merge", HideHelpCommand: true, ArgsUsage: "SNAP",
				Usage: "merge profiles of several runs into one",
				Description: `Unions the profiles --from NAME,... (stored in the snapshot) and
--from-file FILE (sidecars of this snapshot; repeatable): every chunk any of
them touched, ordered by average first-touch rank. With neither, all stored
profiles. The result is stored as --name.

Examples:
   uffdrestore snapshot profile merge app.snap --name boot --from run1,run2,run3
   uffdrestore snapshot profile merge app.snap --name boot --from-file a.json --from-file b.json --replace`,
				Flags: []cli.Flag{
					nameFlag("name of the merged profile (`NAME`)"),
					&cli.StringSliceFlag{Name: "from", Usage: "stored profiles to merge (`NAME,...`)"},
					&cli.StringSliceFlag{Name: "from-file", Usage: "sidecar profiles to merge (`FILE`; repeatable)"},
					replace(),
				},
				Action: runSnapProfileMerge,
			},
			{
				Name: "remove", HideHelpCommand: true, ArgsUsage: "SNAP",
				Usage: "delete a stored profile",
				Description: `Removes profile --name from the snapshot. Only the index is rewritten.

Examples:
   uffdrestore snapshot profile remove app.snap --name run1`,
				Flags:  []cli.Flag{nameFlag("profile to remove (`NAME`)")},
				Action: runSnapProfileRemove,
			},
		},
	}
}

func runSnapProfileList(c *cli.Context) error {
	unit, err := snapParseUnit(c.String("unit"))
	if err != nil {
		return snapUsage("profile list: --unit: %v", err)
	}
	f, err := snapOpenArg(c, "profile list")
	if err != nil {
		return err
	}
	defer f.Close()
	infos := []snapshot.ProfileInfo{}
	for _, p := range f.Profiles() {
		infos = append(infos, snapshot.SummarizeProfile(f.Reader, p, unit))
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(infos)
	}
	if len(infos) == 0 {
		fmt.Fprintln(c.App.Writer, "no working-set profiles")
		return nil
	}
	tw := tabwriter.NewWriter(c.App.Writer, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "ENTRIES\tCHUNKS\tCOVERED\tUNITS\tUNIT\tFIRST\tLAST\t NAME\n")
	for _, p := range infos {
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%s\t%s\t%s\t %s\n", p.Entries, p.Chunks, snapshot.HumanBytes(p.CoveredBytes), p.Units,
			snapshot.HumanBytes(uint64(p.UnitSize)), time.Duration(p.FirstNS), time.Duration(p.LastNS), strconv.Quote(p.Name))
	}
	return tw.Flush()
}

func runSnapProfileAdd(c *cli.Context) error {
	from := c.String("from")
	if from == "" {
		return snapUsage("profile add: --from FILE is required (a sidecar profile)")
	}
	f, err := snapOpenArg(c, "profile add")
	if err != nil {
		return err
	}
	snap := c.Args().First()
	sc, err := restore.LoadSidecar(f.Reader, from)
	existing := f.Profiles()
	f.Close()
	if err != nil {
		return fmt.Errorf("snapshot profile add: %w", err)
	}
	p := sc.Profile
	if n := c.String("name"); n != "" {
		p.Name = n
	}
	if p.Name == "" {
		p.Name = "default"
	}
	if err := restore.StoreProfile(snap, existing, p, c.Bool("replace")); err != nil {
		return fmt.Errorf("snapshot profile add: %w", err)
	}
	fmt.Fprintf(c.App.ErrWriter, "added profile %q to %s: %d entries\n", p.Name, snap, len(p.Entries))
	return nil
}

func runSnapProfileExport(c *cli.Context) error {
	out := c.String("output")
	if out == "" {
		return snapUsage("profile export: --output FILE is required")
	}
	f, err := snapOpenArg(c, "profile export")
	if err != nil {
		return err
	}
	defer f.Close()
	ps := f.Profiles()
	name := c.String("name")
	if name == "" && len(ps) > 1 {
		return snapUsage("profile export: the snapshot has %d profiles (%s): choose one with --name", len(ps), restore.ProfileNames(ps))
	}
	p, err := restore.FindProfile(f.Reader, name)
	if err != nil {
		return fmt.Errorf("snapshot profile export: %w", err)
	}
	if err := checkOutputs("snapshot profile export", c.Bool("force"),
		outputCheck{flag: "--output", path: out, inputs: []string{c.Args().First()}}); err != nil {
		return err
	}
	if err := restore.SaveProfile(out, f.Reader, p); err != nil {
		return fmt.Errorf("snapshot profile export: %w", err)
	}
	fmt.Fprintf(c.App.ErrWriter, "wrote %s: profile %q, %d entries\n", out, p.Name, len(p.Entries))
	return nil
}

func runSnapProfileMerge(c *cli.Context) error {
	name := c.String("name")
	if name == "" {
		return snapUsage("profile merge: --name NAME is required (the merged profile's name)")
	}
	f, err := snapOpenArg(c, "profile merge")
	if err != nil {
		return err
	}
	snap := c.Args().First()
	existing := f.Profiles()
	var srcs []format.Profile
	err = func() error {
		defer f.Close()
		for _, n := range c.StringSlice("from") {
			if n = strings.TrimSpace(n); n == "" {
				continue
			}
			p, err := restore.FindProfile(f.Reader, n)
			if err != nil {
				return err
			}
			srcs = append(srcs, p)
		}
		for _, file := range c.StringSlice("from-file") {
			sc, err := restore.LoadSidecar(f.Reader, file)
			if err != nil {
				return err
			}
			srcs = append(srcs, sc.Profile)
		}
		if !c.IsSet("from") && !c.IsSet("from-file") {
			if len(existing) == 0 {
				return fmt.Errorf("%w: nothing to merge: the snapshot has no profiles; give --from-file FILE", restore.ErrNoProfile)
			}
			srcs = existing
		}
		return nil
	}()
	if err != nil {
		return fmt.Errorf("snapshot profile merge: %w", err)
	}
	m := restore.MergeProfiles(name, srcs...)
	if err := restore.StoreProfile(snap, existing, m, c.Bool("replace")); err != nil {
		return fmt.Errorf("snapshot profile merge: %w", err)
	}
	fmt.Fprintf(c.App.ErrWriter, "merged %d profiles into %q: %d entries\n", len(srcs), name, len(m.Entries))
	return nil
}

func runSnapProfileRemove(c *cli.Context) error {
	name := c.String("name")
	if !c.IsSet("name") {
		return snapUsage("profile remove: --name NAME is required")
	}
	f, err := snapOpenArg(c, "profile remove")
	if err != nil {
		return err
	}
	ps := f.Profiles()
	f.Close()
	kept := ps[:0:0]
	for _, p := range ps {
		if p.Name != name {
			kept = append(kept, p)
		}
	}
	if len(kept) == len(ps) {
		return fmt.Errorf("snapshot profile remove: %w: no profile %q in the snapshot (it has %s)", restore.ErrNoProfile, name, restore.ProfileNames(ps))
	}
	snap := c.Args().First()
	if err := format.SetProfiles(snap, kept); err != nil {
		return fmt.Errorf("snapshot profile remove: %w", err)
	}
	fmt.Fprintf(c.App.ErrWriter, "removed profile %q from %s\n", name, snap)
	return nil
}
