package main

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

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
