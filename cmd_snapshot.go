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
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/internal/progress"
	"github.com/uffdrestore/uffdrestore/internal/size"
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

// snapWriteOutput writes out (stdout for "-", else atomically: nothing is
// left at out on any error) with write, which is cancelled on SIGINT/SIGTERM
// and reports progress to a bar labelled label unless quiet.
func snapWriteOutput(c *cli.Context, out, label string, quiet bool, write func(ctx context.Context, w io.Writer, progress func(done, total uint64)) error) error {
	ctx, cancel := snapSignalContext(c)
	defer cancel()
	w, commit, abort, err := snapOutput(c, out)
	if err != nil {
		return err
	}
	prog := newSnapProgress(c, label, quiet)
	err = write(ctx, w, prog.Update)
	prog.Done()
	if err == nil {
		err = commit()
	}
	if err != nil {
		abort()
	}
	return err
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
	err = snapWriteOutput(c, out, "extract", c.Bool("quiet") || out == "-", func(ctx context.Context, w io.Writer, progress func(done, total uint64)) error {
		return snapshot.ExtractProgress(ctx, f.Reader, w, c.String("region"), progress)
	})
	if err != nil {
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
