package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/bench"
	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/internal/benchcache"
	"github.com/uffdrestore/uffdrestore/internal/size"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

func init() {
	registerCommand(&cli.Command{
		Name:      "bench",
		Usage:     "compare restore strategies and the usual baselines on one snapshot",
		ArgsUsage: "[SNAP]",
		Description: `Restores one snapshot with every strategy asked for, interleaved (A B C A B C
...) over --runs timed runs after one untimed warm-up run of each, touches the
memory with an access pattern, checks the memory equals the image byte for
byte, and reports medians with [min-max]:

  eager, lazy, prefetch   restore.Open in that mode (lazy and prefetch: MINOR
                          faults served by a helper process)
  raw-read                read(2) of the uncompressed image, warm in the page
                          cache, into anonymous memory on every CPU
  decompress-anon         every chunk decompressed into anonymous memory on
                          every CPU, then used
  uffd-copy               anonymous 4 KiB pages registered MISSING; a Go
                          handler decompresses the faulting chunk and
                          resolves it with UFFDIO_COPY (Firecracker-style)
  working-set             restore.Open replaying a working set recorded by an
                          untimed lazy run of the same workload; with it, every
                          run touches the same order (a stable working set)

Every strategy uses the same clock: t0 = start of restore, ready = memory
usable, first byte = t0 -> the first touch returns (what a user waits for
the first byte), complete = t0 -> the access pattern is done. Patterns: sequential and random touch every 4 KiB
page; sparse:F touches every page of a random fraction F of the 2 MiB blocks.
Several patterns may be given, comma-separated. Pages are touched from C
(--threads goroutines) so the touch latency is the toucher's.

--out-of-process runs eager, lazy and prefetch through the example C target
(bin/uffdrestore-target, or --target) attached over the attach protocol to a
loader in this process. Generated snapshots and raw images are cached per
user in $XDG_CACHE_HOME/uffdrestore/bench (else ~/.cache/uffdrestore/bench,
else $TMPDIR/uffdrestore-bench-UID; UFFDRESTORE_BENCH_CACHE overrides it);
--clear-cache removes it. Needs root (userfaultfd, huge pages).

--check-targets measures every row of the performance targets (issue 13),
each a ratio of two sides run interleaved (medians), on snapshots it
generates (up to 4 GiB), and prints each next to its target, met or NOT MET;
--readme FILE replaces the targets table between the markers
<!-- bench-targets:begin --> and <!-- bench-targets:end --> in FILE.

Examples:
   uffdrestore bench --generate 1GiB --content realistic --pattern sparse:0.1,sequential
   uffdrestore bench image.snap --modes eager,lazy,uffd-copy --runs 7 --json out.json --svg out.svg
   uffdrestore bench --generate 256MiB --out-of-process --modes eager,lazy,prefetch --threads 2
   uffdrestore bench --generate 1GiB --markdown results.md
   uffdrestore bench --generate 4GiB --modes lazy,working-set,eager --pattern sparse:0.2
   uffdrestore bench --generate 256MiB --modes eager,lazy --pattern sparse:0.2,sequential --backing all
   uffdrestore bench --check-targets --runs 5 --readme README.md
   uffdrestore bench --clear-cache`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "generate", Usage: "benchmark a generated snapshot of `SIZE` (e.g. 1GiB) instead of SNAP"},
			&cli.StringFlag{Name: "content", Value: "realistic", Usage: "with --generate: realistic (heap-like, ~5-8x), zeros or random"},
			&cli.StringFlag{Name: "codec", Value: "zstd", Usage: "with --generate: zstd or s2"},
			&cli.StringFlag{Name: "chunk-size", Value: "2M", Usage: "with --generate: chunk size (64K to 2M)"},
			&cli.StringFlag{Name: "modes", Value: strings.Join(bench.StrategyNames(), ","), Usage: "strategies to run, comma-separated"},
			&cli.StringFlag{Name: "pattern", Value: "sequential", Usage: "access patterns, comma-separated: sequential, random, sparse:FRACTION"},
			&cli.IntFlag{Name: "threads", Value: 1, Usage: "threads touching the memory"},
			&cli.IntFlag{Name: "runs", Value: 5, Usage: "timed runs of every strategy"},
			&cli.BoolFlag{Name: "no-warmup", Usage: "skip the untimed warm-up run"},
			&cli.BoolFlag{Name: "cold", Usage: "drop the snapshot from the page cache before every run (a restore from disk)"},
			&cli.StringFlag{Name: "profile-out", Usage: "with working-set: save the recorded working set as a sidecar profile `FILE`"},
			&cli.BoolFlag{Name: "out-of-process", Usage: "run eager/lazy/prefetch through the example C target"},
			&cli.StringFlag{Name: "target", Usage: "the example target program (`PATH`; default bin/uffdrestore-target)"},
			&cli.StringFlag{Name: "backing", Value: "auto", Usage: "restore backing: auto, memfd-hugetlb, hugetlbfs or shmem; a comma-separated list (or all: memfd-hugetlb,hugetlbfs,shmem) runs eager, lazy, prefetch and working-set on each, side by side"},
			&cli.StringFlag{Name: "hugetlbfs", Usage: "the hugetlbfs mount (`DIR`) of --backing hugetlbfs (default: a writable mount, else, as root, a private one on a temporary directory)"},
			&cli.IntFlag{Name: "workers", Usage: "decompression workers (default: every CPU)"},
			&cli.Uint64Flag{Name: "seed", Value: 1, Usage: "seed of the random patterns"},
			&cli.StringFlag{Name: "json", Usage: "write every run and the summaries as JSON to `FILE`"},
			&cli.StringFlag{Name: "svg", Usage: "write a chart (times, latency CDF) as SVG to `FILE`"},
			&cli.StringFlag{Name: "markdown", Usage: "write the summary as a Markdown table to `FILE` (- for stdout)"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no per-run progress lines"},
			&cli.BoolFlag{Name: "check-targets", Usage: "measure every row of the performance targets (issue 13) on generated snapshots, each as a ratio of two interleaved sides, and print it with its target (met / NOT MET); --runs, --workers, --target, --hugetlbfs, --json, --markdown apply"},
			&cli.StringFlag{Name: "readme", Usage: "with --check-targets: replace the targets table in `FILE` (README.md) with this run's"},
			&cli.StringFlag{Name: "sizes", Value: "issue", Usage: "with --check-targets: issue (the issue's sizes, up to 4 GiB) or small (a quick check of the machinery)"},
			&cli.BoolFlag{Name: "clear-cache", Usage: "remove this user's cache of generated snapshots and images, and exit"},
			forceFlag(),
		},
		Action: runBench,
	})
}

func runBench(c *cli.Context) error {
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if c.Args().Len() > 1 {
		return cli.Exit("bench: one snapshot at most (see --help)", 2)
	}
	errw := c.App.ErrWriter
	if errw == nil {
		errw = os.Stderr
	}
	logf := func(format string, args ...any) { fmt.Fprintf(errw, format+"\n", args...) }
	if c.Bool("quiet") {
		logf = nil
	}
	if c.Bool("clear-cache") {
		dir, n, err := benchcache.Clear()
		if err != nil {
			return cli.Exit("bench: --clear-cache: "+err.Error(), 1)
		}
		fmt.Fprintf(c.App.Writer, "removed the benchmark cache %s (%s)\n", dir, snapshot.HumanBytes(uint64(n)))
		return nil
	}
	if c.Bool("check-targets") {
		return runCheckTargets(ctx, c, logf)
	}
	snap := c.Args().First()
	gen := c.String("generate")
	if (snap == "") == (gen == "") {
		return cli.Exit("bench: give a snapshot or --generate SIZE (see --help)", 2)
	}
	strategies, err := bench.ParseStrategies(c.String("modes"))
	if err != nil {
		return cli.Exit(err, 2)
	}
	patterns, err := bench.ParsePatterns(c.String("pattern"))
	if err != nil {
		return cli.Exit(err, 2)
	}
	backings, err := bench.ParseBackings(c.String("backing"))
	if err != nil {
		return cli.Exit(err, 2)
	}
	if c.Int("threads") < 1 || c.Int("runs") < 1 {
		return cli.Exit("bench: --threads and --runs must be at least 1", 2)
	}

	var outs []outputCheck
	for _, fl := range []string{"json", "svg", "markdown", "profile-out"} {
		if p := c.String(fl); p != "-" {
			outs = append(outs, outputCheck{flag: "--" + fl, path: p, inputs: []string{snap}})
		}
	}
	if err := checkOutputs("bench", c.Bool("force"), outs...); err != nil {
		return err
	}
	cacheDir, err := bench.CacheDir()
	if err != nil {
		return cli.Exit("bench: "+err.Error(), 1)
	}

	var image, generated string
	if gen != "" {
		genSize, err := size.Parse(gen)
		if err != nil {
			return cli.Exit(fmt.Sprintf("bench: --generate: %v", err), 2)
		}
		codec, err := format.ParseCodec(c.String("codec"))
		if err != nil {
			return cli.Exit(fmt.Sprintf("bench: --codec: %v", err), 2)
		}
		chunk, err := size.Parse(c.String("chunk-size"))
		if err != nil {
			return cli.Exit(fmt.Sprintf("bench: --chunk-size: %v", err), 2)
		}
		if logf != nil {
			logf("generating (or reusing) a %s %s snapshot in %s ...", gen, c.String("content"), cacheDir)
		}
		snap, image, err = bench.Generate(ctx, cacheDir, genSize, c.String("content"), codec, int(chunk))
		if err != nil {
			return err
		}
		generated = fmt.Sprintf("generated --generate %s --content %s --codec %s --chunk-size %s", gen, c.String("content"), codec, c.String("chunk-size"))
	} else if image, err = bench.PrepareImage(ctx, cacheDir, snap); err != nil {
		return err
	}
	f, err := format.Open(snap)
	if err != nil {
		return err
	}
	env := &bench.Env{Snap: snap, Image: image, Layout: bench.LayoutOf(f.Reader), Backing: backings[0], Workers: c.Int("workers")}
	f.Close()
	if slices.Contains(backings, restore.BackingHugetlbfs) {
		dir, unmount, err := bench.HugetlbfsDir(c.String("hugetlbfs"))
		if err != nil {
			return cli.Exit(err, 1)
		}
		defer unmount()
		env.HugetlbfsDir = dir
	}

	cfg := bench.Config{Env: env, Strategies: strategies, Patterns: patterns, Threads: c.Int("threads"), Runs: c.Int("runs"),
		NoWarmup: c.Bool("no-warmup"), OutOfProcess: c.Bool("out-of-process"), Seed: c.Uint64("seed"), Log: logf, Cold: c.Bool("cold"), ProfileOut: c.String("profile-out"),
		Backings: backings}
	if cfg.OutOfProcess {
		cfg.Target = c.String("target")
		if cfg.Target == "" {
			cfg.Target = bench.FindTarget()
		}
		if cfg.Target == "" {
			return cli.Exit("bench: --out-of-process: no uffdrestore-target found: run `make build` or pass --target", 2)
		}
	}
	rep, runErr := bench.Run(ctx, cfg)
	if rep == nil {
		return runErr
	}
	rep.Command = benchCommandLine(c)
	rep.Snapshot.Generated = generated

	var errs []error
	errs = append(errs, runErr)
	if p := c.String("json"); p != "" {
		errs = append(errs, atomicfile.WriteFile(p, 0o644, rep.WriteJSON))
	}
	if runErr == nil {
		if p := c.String("svg"); p != "" {
			errs = append(errs, atomicfile.WriteFile(p, 0o644, rep.WriteSVG))
		}
		if p := c.String("markdown"); p != "" {
			if p == "-" {
				errs = append(errs, rep.WriteMarkdown(c.App.Writer))
			} else {
				errs = append(errs, atomicfile.WriteFile(p, 0o644, rep.WriteMarkdown))
			}
		}
		w := c.App.Writer
		if w == nil {
			w = os.Stdout
		}
		if c.String("markdown") != "-" {
			errs = append(errs, rep.WriteTable(w))
		}
	}
	return errors.Join(errs...)
}

// benchCommandLine spells the command as run, from its parsed flags.
func benchCommandLine(c *cli.Context) string {
	parts := []string{"uffdrestore bench"}
	parts = append(parts, c.Args().Slice()...)
	for _, fl := range c.Command.Flags {
		name := fl.Names()[0]
		if !c.IsSet(name) {
			continue
		}
		if _, ok := fl.(*cli.BoolFlag); ok {
			parts = append(parts, "--"+name)
			continue
		}
		parts = append(parts, "--"+name, fmt.Sprint(c.Value(name)))
	}
	return strings.Join(parts, " ")
}

// runCheckTargets is bench --check-targets: every row of the performance
// targets, measured on generated snapshots, printed with its target.
func runCheckTargets(ctx context.Context, c *cli.Context, logf func(string, ...any)) error {
	if c.Args().Len() > 0 || c.IsSet("generate") {
		return cli.Exit("bench: --check-targets generates its own snapshots: give no SNAP or --generate", 2)
	}
	if c.Int("runs") < 1 {
		return cli.Exit("bench: --runs must be at least 1", 2)
	}
	var sizes bench.TargetSizes
	switch c.String("sizes") {
	case "issue":
		sizes = bench.IssueSizes
	case "small":
		sizes = bench.SmallSizes
	default:
		return cli.Exit(fmt.Sprintf("bench: --sizes %q: want issue or small", c.String("sizes")), 2)
	}
	var outs []outputCheck
	for _, fl := range []string{"json", "markdown"} {
		if p := c.String(fl); p != "" && p != "-" {
			outs = append(outs, outputCheck{flag: "--" + fl, path: p})
		}
	}
	if err := checkOutputs("bench", c.Bool("force"), outs...); err != nil {
		return err
	}
	if p := c.String("readme"); p != "" {
		if b, err := os.ReadFile(p); err != nil {
			return cli.Exit("bench: --readme: "+err.Error(), 1)
		} else if !strings.Contains(string(b), bench.ReadmeBegin) || !strings.Contains(string(b), bench.ReadmeEnd) {
			return cli.Exit(fmt.Sprintf("bench: --readme %s has no %s ... %s block to replace", p, bench.ReadmeBegin, bench.ReadmeEnd), 2)
		}
	}
	cacheDir, err := bench.CacheDir()
	if err != nil {
		return cli.Exit("bench: "+err.Error(), 1)
	}
	cfg := bench.TargetsConfig{CacheDir: cacheDir, Sizes: sizes, Runs: c.Int("runs"), Workers: c.Int("workers"), Log: logf}
	cfg.Target = c.String("target")
	if cfg.Target == "" {
		cfg.Target = bench.FindTarget()
	}
	if dir, unmount, err := bench.HugetlbfsDir(c.String("hugetlbfs")); err == nil {
		defer unmount()
		cfg.HugetlbfsDir = dir
	} else if logf != nil {
		logf("%v: the hugetlbfs column is left out", err)
	}
	tr, runErr := bench.RunTargets(ctx, cfg)
	if tr == nil {
		return runErr
	}
	tr.Command = benchCommandLine(c)
	errs := []error{runErr}
	if p := c.String("json"); p != "" {
		errs = append(errs, atomicfile.WriteFile(p, 0o644, func(w io.Writer) error {
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			return enc.Encode(tr)
		}))
	}
	if runErr == nil {
		if p := c.String("readme"); p != "" {
			errs = append(errs, tr.UpdateReadme(p))
		}
		if p := c.String("markdown"); p == "-" {
			errs = append(errs, tr.WriteMarkdown(c.App.Writer))
		} else {
			if p != "" {
				errs = append(errs, atomicfile.WriteFile(p, 0o644, tr.WriteMarkdown))
			}
			w := c.App.Writer
			if w == nil {
				w = os.Stdout
			}
			errs = append(errs, tr.WriteTable(w))
		}
	}
	return errors.Join(errs...)
}
