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
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/format"
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
   uffdrestore snapshot verify image.snap`,
		Subcommands: []*cli.Command{snapCreateCmd(), snapInfoCmd(), snapVerifyCmd(), snapExtractCmd()},
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
(a temporary file in the output directory, renamed when complete).

The process keeps running while it is read: stop it first (kill -STOP PID)
for a consistent image. --region selects mappings whose name contains NAME, or
matches it as a glob (e.g. '[heap]', '*.so', 'memfd:*'); repeat it for more.

Examples:
   uffdrestore snapshot create --from-file image.raw --output image.snap
   cat image.raw | uffdrestore snapshot create --from-file - -o image.snap --codec s2
   uffdrestore snapshot create --from-pid 1234 --region '[heap]' --region anon -o app.snap
   uffdrestore snapshot create --from-file image.raw -o image.snap --chunk-size 256K --level 1 --workers 2`,
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
		Description: `Writes the raw bytes of all regions (or of the regions named --region:
exact name, else glob), in order, each exactly its length. Output to a file is
atomic (temporary file + rename); - writes to stdout.

Examples:
   uffdrestore snapshot extract image.snap --output image.raw
   uffdrestore snapshot extract app.snap --region '[heap]' -o - | xxd | less`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "file to write (`IMAGE`; - for stdout)"},
			&cli.StringFlag{Name: "region", Usage: "only this region (`NAME`: exact, or a glob)"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress bar"},
		},
		Action: runSnapExtract,
	}
}

// snapUsage is a usage error: exit status 2.
func snapUsage(format string, args ...any) error {
	return cli.Exit("snapshot: "+fmt.Sprintf(format, args...), 2)
}

// snapParseSize parses 65536, 64K, 64k, 64KiB, 64KB, 2M, 2MiB, 1G (binary
// units).
func snapParseSize(s string) (int64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range []struct {
		suf string
		m   int64
	}{{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"kb", 1 << 10}, {"mb", 1 << 20}, {"gb", 1 << 30}, {"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"b", 1}} {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suf)), u.m
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q: want a number of bytes, optionally with K, KiB, M, MiB, G or GiB", s)
	}
	return n * mult, nil
}

// snapSignalContext is cancelled on SIGINT/SIGTERM so partial outputs are
// removed.
func snapSignalContext(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
}

// snapIsTTY reports whether w is a terminal.
func snapIsTTY(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// snapProgress draws "label  done / total  pct  rate  ETA" on a terminal.
type snapProgress struct {
	w        io.Writer
	label    string
	on       bool
	start    time.Time
	mu       sync.Mutex
	last     time.Time
	drawn    bool
	lastDone uint64
}

func newSnapProgress(c *cli.Context, label string, quiet bool) *snapProgress {
	return &snapProgress{w: c.App.ErrWriter, label: label, on: !quiet && snapIsTTY(c.App.ErrWriter), start: time.Now()}
}

func (p *snapProgress) update(done, total uint64) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	p.lastDone = done
	if now.Sub(p.last) < 100*time.Millisecond && done != total {
		return
	}
	p.last = now
	el := now.Sub(p.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(done) / el
	}
	line := fmt.Sprintf("%s  %s", p.label, snapshot.HumanBytes(done))
	if total > 0 {
		line += fmt.Sprintf(" / %s  %3.0f%%", snapshot.HumanBytes(total), 100*float64(done)/float64(total))
	}
	line += fmt.Sprintf("  %s/s", snapshot.HumanBytes(uint64(rate)))
	if total > done && rate > 0 {
		line += fmt.Sprintf("  ETA %s", (time.Duration(float64(total-done)/rate) * time.Nanosecond).Round(time.Second))
	}
	fmt.Fprintf(p.w, "\r\033[K%s", line)
	p.drawn = true
}

func (p *snapProgress) done() {
	if p.on && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

// snapAtomicFile writes to a temporary file next to path and renames it
// over path on Commit; Abort removes it.
type snapAtomicFile struct {
	f    *os.File
	bw   *bufio.Writer
	path string
}

func snapCreateAtomic(path string) (*snapAtomicFile, error) {
	dir := filepath.Dir(path)
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return nil, fmt.Errorf("output %s is a directory: give a file name", path)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("create output next to %s: %w (does the directory exist and is it writable?)", path, err)
	}
	return &snapAtomicFile{f: f, bw: bufio.NewWriterSize(f, 1<<20), path: path}, nil
}

func (a *snapAtomicFile) Write(p []byte) (int, error) { return a.bw.Write(p) }

func (a *snapAtomicFile) Commit() error {
	err := a.bw.Flush()
	if err == nil {
		err = a.f.Chmod(0o644)
	}
	if err == nil {
		err = a.f.Sync()
	}
	if cerr := a.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(a.f.Name(), a.path)
	}
	if err != nil {
		os.Remove(a.f.Name())
		return fmt.Errorf("write %s: %w", a.path, err)
	}
	return nil
}

func (a *snapAtomicFile) Abort() {
	a.f.Close()
	os.Remove(a.f.Name())
}

// snapOutput opens the output: stdout for "-", else an atomic file.
func snapOutput(c *cli.Context, path string) (w io.Writer, commit func() error, abort func(), err error) {
	if path == "-" {
		bw := bufio.NewWriterSize(c.App.Writer, 1<<20)
		return bw, bw.Flush, func() {}, nil
	}
	a, err := snapCreateAtomic(path)
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
	cs, err := snapParseSize(c.String("chunk-size"))
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
	opts.Progress = prog.update

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
	prog.done()
	finish.Lock()
	close(finished)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
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
	errs := snapshot.VerifyProgress(ctx, f.Reader, c.Int("workers"), prog.update)
	prog.done()
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
	ctx, cancel := snapSignalContext(c)
	defer cancel()
	w, commit, abort, err := snapOutput(c, out)
	if err != nil {
		return err
	}
	prog := newSnapProgress(c, "extract", c.Bool("quiet") || out == "-")
	err = snapshot.ExtractProgress(ctx, f.Reader, w, c.String("region"), prog.update)
	prog.done()
	if err == nil {
		err = commit()
	}
	if err != nil {
		abort()
		return fmt.Errorf("snapshot extract: %w", err)
	}
	return nil
}
