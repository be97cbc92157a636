package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

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
	quiet := c.Bool("quiet") || out == "-"
	start := time.Now()
	var st snapshot.ReorderStats
	err = snapWriteOutput(c, out, "reorder", quiet, func(ctx context.Context, w io.Writer, progress func(done, total uint64)) (err error) {
		st, err = snapshot.Reorder(ctx, f.Reader, w, p, snapshot.ReorderOptions{UnitSize: unit, Profiles: keep, Progress: progress})
		return err
	})
	if err != nil {
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
