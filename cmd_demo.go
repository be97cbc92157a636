package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
	"github.com/uffdrestore/uffdrestore/internal/size"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"github.com/uffdrestore/uffdrestore/snapshot"
	"github.com/urfave/cli/v2"
)

func init() {
	registerCommand(&cli.Command{
		Name:  "demo",
		Usage: "generate a snapshot, restore it lazily in this process, touch part of it, and print the figures",
		Description: `The demo makes a snapshot of memory-like content, restores it lazily into this
process (hugetlb memfd when huge pages are reserved, else shmem), touches a
random fraction of its pages from several goroutines, checks every byte against
the original, then fills the rest and checks again.

With --target, the demo then serves the same snapshot over a Unix socket (as
'uffdrestore load' does) and runs that example target program, a separate C
process, which attaches, touches the same fraction of pages, and dumps what it
sees; the dump is checked against the original and both sides' figures are
printed.

--size is checked first against what the machine has: the free space where
the snapshot (up to --size: incompressible chunks are stored as they are) and,
with --target, the target's dump are written, and the memory the restore
needs (free huge pages for a hugetlb backing, available memory for shmem).
SIGINT or SIGTERM stop the demo and remove everything it wrote.

Example:
   uffdrestore demo
   uffdrestore demo --size 1GiB --touch 0.25 --mode lazy --json
   uffdrestore demo --target bin/uffdrestore-target`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "size", Value: "256MiB", Usage: "snapshot size"},
			&cli.Float64Flag{Name: "touch", Value: 0.1, Usage: "fraction of pages to touch before the full check"},
			&cli.StringFlag{Name: "mode", Value: "lazy", Usage: "lazy, prefetch or eager"},
			&cli.StringFlag{Name: "backing", Value: "auto", Usage: "auto, memfd, shmem or hugetlbfs (needs --hugetlbfs)"},
			&cli.StringFlag{Name: "hugetlbfs", Usage: "hugetlbfs mount for --backing hugetlbfs (`DIR`)"},
			&cli.StringFlag{Name: "codec", Value: "zstd", Usage: "zstd, s2 or none"},
			&cli.IntFlag{Name: "goroutines", Value: 4, Usage: "goroutines touching the view"},
			&cli.StringFlag{Name: "dir", Usage: "where to write the snapshot (default: a temporary directory, removed after)"},
			&cli.BoolFlag{Name: "json", Usage: "print the final stats as JSON"},
			&cli.StringFlag{Name: "target", Usage: "also restore into this example target program (`PATH`, e.g. bin/uffdrestore-target) over a Unix socket"},
		},
		Action: runDemo,
	})
}

func runDemo(c *cli.Context) error {
	nbytes, err := size.Parse(c.String("size"))
	if err != nil {
		return cli.Exit("demo: --size: "+err.Error(), 2)
	}
	if nbytes <= 0 {
		return cli.Exit("demo: --size must be positive", 2)
	}
	mode, err := restore.ParseMode(c.String("mode"))
	if err != nil {
		return cli.Exit(err, 2)
	}
	kind, err := restore.ParseBacking(c.String("backing"))
	if err != nil {
		return cli.Exit(err, 2)
	}
	if kind == restore.BackingHugetlbfs && c.String("hugetlbfs") == "" {
		return cli.Exit("demo: --backing hugetlbfs needs --hugetlbfs DIR (a hugetlbfs mount; `uffdrestore doctor` lists them)", 2)
	}
	codec, err := format.ParseCodec(c.String("codec"))
	if err != nil {
		return cli.Exit(err, 2)
	}
	frac := c.Float64("touch")
	if frac < 0 || frac > 1 {
		return cli.Exit("demo: --touch must be between 0 and 1", 2)
	}
	dir := c.String("dir")
	base := dir
	if base == "" {
		base = os.TempDir()
	}
	if err := demoCheckResources(base, nbytes, kind, c.String("target") != ""); err != nil {
		return cli.Exit("demo: "+err.Error(), 2)
	}

	// Everything the demo writes is removed on SIGINT or SIGTERM: the demo
	// runs on its own goroutine; a signal cancels its context, and the
	// files go once it stops (or after a grace period, or at a second
	// signal).
	sig := notifyShutdown(c.Context)
	defer sig.Stop()
	var created []string // files written in a --dir
	var createdMu sync.Mutex
	track := func(p string) string {
		createdMu.Lock()
		created = append(created, p)
		createdMu.Unlock()
		return p
	}
	cleanup := func() {}
	if dir == "" {
		if dir, err = os.MkdirTemp("", "uffdrestore-demo-"); err != nil {
			return err
		}
		tmp := dir
		cleanup = func() { os.RemoveAll(tmp) }
	} else {
		cleanup = func() {
			createdMu.Lock()
			defer createdMu.Unlock()
			for _, p := range created {
				os.Remove(p)
			}
		}
	}
	done := make(chan error, 1)
	go func() { done <- demoRun(c, sig.Graceful, dir, track, nbytes, mode, kind, codec, frac) }()
	var runErr error
	select {
	case runErr = <-done:
	case <-sig.Graceful.Done():
		select {
		case <-done:
		case <-sig.Force.Done():
		case <-time.After(3 * time.Second):
		}
		cleanup()
		return cli.Exit(fmt.Sprintf("demo: interrupted (%s); removed what it wrote", sig.Reason()), 130)
	}
	if c.String("dir") == "" || runErr != nil {
		cleanup()
	}
	return runErr
}

// demoCheckResources fails, naming what is missing and the fix, when the
// machine cannot hold a demo of nbytes: disk space in dir for the snapshot
// (at most nbytes) and the target's dump (nbytes), and memory for the
// restore.
func demoCheckResources(dir string, nbytes int64, kind restore.BackingKind, target bool) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	free := int64(st.Bavail) * st.Bsize
	need := nbytes
	what := "the snapshot (up to --size) needs"
	if target {
		need += nbytes
		what = "the snapshot (up to --size) and the target's dump (--size) need"
	}
	if free < need {
		return fmt.Errorf("--size %s: %s up to %s in %s, which has %s free: give a smaller --size, or --dir on a bigger file system",
			snapshot.HumanBytes(uint64(nbytes)), what, snapshot.HumanBytes(uint64(need)), dir, snapshot.HumanBytes(uint64(free)))
	}
	var pool uffd.HugePool
	page := uffd.DefaultHugePageSize()
	for _, p := range uffd.HugePools() {
		if p.PageSize == page {
			pool = p
		}
	}
	hugeFree := max(pool.Available(), 0) * page
	memAvail := demoMemAvailable()
	switch kind {
	case restore.BackingMemfdHugetlb, restore.BackingHugetlbfs:
		if hugeFree < nbytes {
			return fmt.Errorf("--size %s: a hugetlb backing needs %s of free huge pages, %s are free: give a smaller --size, reserve more (as root: make hugepages HUGEPAGES=%d), or use --backing shmem",
				snapshot.HumanBytes(uint64(nbytes)), snapshot.HumanBytes(uint64(nbytes)), snapshot.HumanBytes(uint64(hugeFree)), pool.Total+(nbytes+page-1)/page-hugeFree/page)
		}
	default:
		if kind == restore.BackingAuto && hugeFree >= nbytes {
			return nil
		}
		if memAvail >= 0 && memAvail < nbytes {
			return fmt.Errorf("--size %s: restoring it needs %s of memory, %s is available (MemAvailable) and %s in free huge pages: give a smaller --size",
				snapshot.HumanBytes(uint64(nbytes)), snapshot.HumanBytes(uint64(nbytes)), snapshot.HumanBytes(uint64(memAvail)), snapshot.HumanBytes(uint64(hugeFree)))
		}
	}
	return nil
}

// demoMemAvailable is MemAvailable from /proc/meminfo in bytes, or -1.
func demoMemAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemAvailable:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return n << 10
				}
			}
		}
	}
	return -1
}

// ctxReader ends a read with the context's error once it is cancelled.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// demoRun is the demo proper; it stops early when ctx is cancelled.
func demoRun(c *cli.Context, ctx context.Context, dir string, track func(string) string, nbytes int64, mode restore.Mode, kind restore.BackingKind, codec format.Codec, frac float64) error {
	out := c.App.Writer
	path := track(filepath.Join(dir, "demo.snap"))
	var ropts []restore.Option
	if d := c.String("hugetlbfs"); d != "" {
		ropts = append(ropts, restore.WithHugetlbfsDir(d))
	}

	// 1. Make the snapshot.
	t0 := time.Now()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w, err := format.NewWriter(f, format.WriterOptions{Codec: codec, Metadata: format.Metadata{Created: time.Now(), Source: "uffdrestore demo", ToolVersion: version}})
	if err != nil {
		f.Close()
		return err
	}
	w.BeginRegion("heap", 0x7f3a00000000, 3)
	if _, err := w.ReadFrom(ctxReader{ctx, memgen.NewReader(nbytes)}); err != nil {
		f.Close()
		return err
	}
	w.EndRegion()
	if err := w.Close(); err != nil {
		f.Close()
		return err
	}
	st, _ := f.Stat()
	f.Close()
	fmt.Fprintf(out, "snapshot: %d MiB of memory-like content -> %s, %.1f MiB (%.1fx, %v) in %v\n",
		nbytes>>20, path, float64(st.Size())/(1<<20), float64(nbytes)/float64(st.Size()), codec, time.Since(t0).Round(time.Millisecond))
	if err := ctx.Err(); err != nil {
		return err
	}

	// 2. Restore.
	r, err := restore.Open(ctx, path, append(ropts, restore.WithMode(mode), restore.WithBacking(kind))...)
	if err != nil {
		return err
	}
	defer r.Close()
	fmt.Fprintf(out, "restore:  %v mode on %v, ready in %v (nothing decompressed yet in lazy mode)\n",
		mode, r.Backing(), r.TimeToReady().Round(time.Microsecond))

	// 3. Touch a random fraction of the pages from several goroutines and
	// check each against the original.
	mem := r.Region("heap")
	pages := (len(mem) + memgen.PageSize - 1) / memgen.PageSize
	order := rand.Perm(pages)[:int(float64(pages)*frac)]
	g := max(1, c.Int("goroutines"))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var bad []int
	t1 := time.Now()
	for i := 0; i < g; i++ {
		wg.Add(1)
		go func(part []int) {
			defer wg.Done()
			want := make([]byte, memgen.PageSize)
			for _, p := range part {
				lo := p * memgen.PageSize
				hi := min(lo+memgen.PageSize, len(mem))
				memgen.Fill(want[:hi-lo], int64(p))
				if !bytes.Equal(mem[lo:hi], want[:hi-lo]) {
					mu.Lock()
					bad = append(bad, p)
					mu.Unlock()
				}
			}
		}(order[i*len(order)/g : (i+1)*len(order)/g])
	}
	wg.Wait()
	touched := time.Since(t1)
	s, err := r.Stats(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "touch:    %d of %d pages (%.0f%%) from %d goroutines in %v: %d faults, %d units filled of %d, %d MiB decompressed, fault service p50 %v p99 %v\n",
		len(order), pages, frac*100, g, touched.Round(time.Microsecond), s.FaultsMinor+s.FaultsMissing, s.FilledByFault+s.FilledByPrefill,
		s.Units, s.BytesDecoded>>20, s.FaultLatency.P50.Round(time.Microsecond), s.FaultLatency.P99.Round(time.Microsecond))
	if len(bad) > 0 {
		return cli.Exit(fmt.Sprintf("demo: %d touched pages differ from the original (first: page %d)", len(bad), bad[0]), 1)
	}

	// 4. Fill the rest and check every byte.
	t2 := time.Now()
	if err := r.Wait(ctx); err != nil {
		return err
	}
	waited := time.Since(t2)
	want := make([]byte, 1<<20)
	for off := 0; off < len(mem); off += len(want) {
		n := min(len(want), len(mem)-off)
		memgen.Fill(want[:n], int64(off/memgen.PageSize))
		if !bytes.Equal(mem[off:off+n], want[:n]) {
			return cli.Exit(fmt.Sprintf("demo: restored memory differs from the original near offset %#x", off), 1)
		}
	}
	s, err = r.Stats(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "complete: rest filled in %v; all %d MiB equal to the original, byte for byte\n", waited.Round(time.Microsecond), nbytes>>20)
	if c.Bool("json") {
		fmt.Fprintf(out, "%s\n", s.JSON())
	} else {
		fmt.Fprintf(out, "stats:    faults %d minor / %d missing, filled %d by fault / %d by prefetch, %d zero chunks, %d continues, %d premapped\n",
			s.FaultsMinor, s.FaultsMissing, s.FilledByFault, s.FilledByPrefill, s.ZeroChunks, s.Continues, s.Premapped)
	}
	if t := c.String("target"); t != "" {
		r.Close()
		return demoAttach(c, ctx, path, dir, t, track, ropts, kind, frac, nbytes)
	}
	return nil
}

// demoAttach serves the snapshot over a socket and runs the C example
// target against it: the out-of-process restore, in real separate processes.
func demoAttach(c *cli.Context, ctx context.Context, snap, dir, target string, track func(string) string, ropts []restore.Option, kind restore.BackingKind, frac float64, nbytes int64) error {
	out := c.App.Writer
	l, err := restore.NewLoader(ctx, snap, append(ropts, restore.WithBacking(kind))...)
	if err != nil {
		return err
	}
	defer l.Close()
	sock := track(filepath.Join(dir, "demo.sock"))
	srv, err := attach.Listen(sock, attach.FromLoader(l), attach.Options{})
	if err != nil {
		return err
	}
	defer srv.Close()
	fmt.Fprintf(out, "\nserve:    %s on %s (backing %s), as `uffdrestore load` does\n", filepath.Base(snap), sock, l.Layout().Backing)
	dump := track(filepath.Join(dir, "target.dump"))
	cmd := exec.CommandContext(ctx, target, "--socket", sock, "--pattern", fmt.Sprintf("fraction:%g", frac), "--threads", "2", "--dump", dump)
	cmd.Stderr = os.Stderr
	res, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("demo: target %s: %w", target, err)
	}
	fmt.Fprintf(out, "target:   %s", res)
	f, err := os.Open(dump)
	if err != nil {
		return err
	}
	defer f.Close()
	want := make([]byte, 1<<20)
	got := make([]byte, 1<<20)
	for off := int64(0); off < nbytes; off += int64(len(want)) {
		n := int(min(int64(len(want)), nbytes-off))
		memgen.Fill(want[:n], off/memgen.PageSize)
		if _, err := io.ReadFull(f, got[:n]); err != nil {
			return fmt.Errorf("demo: target dump: %w", err)
		}
		if !bytes.Equal(got[:n], want[:n]) {
			return cli.Exit(fmt.Sprintf("demo: the target's memory differs from the original near offset %#x", off), 1)
		}
	}
	s := l.Stats()
	fmt.Fprintf(out, "server:   %d faults, %d units filled of %d, %d MiB decompressed, fault service p50 %v p99 %v\n",
		s.FaultsMinor+s.FaultsMissing, s.FilledByFault+s.FilledByPrefill, s.Units, s.BytesDecoded>>20,
		s.FaultLatency.P50.Round(time.Microsecond), s.FaultLatency.P99.Round(time.Microsecond))
	fmt.Fprintf(out, "complete: the target process's %d MiB equal the original, byte for byte\n", nbytes>>20)
	return nil
}
