// Package snapshot makes and inspects uffdrestore snapshots: from a raw
// image file or a stream, from a live process (/proc/PID/maps +
// /proc/PID/mem), and reports on, verifies and extracts existing ones.
// The on-disk format itself is package format.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/uffdrestore/uffdrestore/format"
)

// Options configure snapshot creation.
type Options struct {
	format.WriterOptions

	// RegionName names the single region of CreateFromReader/CreateFromFile
	// (default "image" for streams, the file's base name for files).
	RegionName string
	// Regions selects mappings in CreateFromPID: a mapping is taken if its
	// name contains any entry as a substring or matches it as a glob
	// (path.Match, against the full name or its base name). Empty: all.
	Regions []string
	// Progress, if set, is called with bytes read so far and the total
	// (0 if unknown), at most every chunk.
	Progress func(done, total uint64)
	// Warn, if set, receives non-fatal problems (unreadable memory ranges).
	Warn func(msg string)
	// Attachments are stored with the memory (SPEC.md section 6), e.g. a
	// virtual machine's device state.
	Attachments []format.Attachment
}

func (o *Options) progress(done, total uint64) {
	if o.Progress != nil {
		o.Progress(done, total)
	}
}

func (o *Options) warn(format string, args ...any) {
	if o.Warn != nil {
		o.Warn(fmt.Sprintf(format, args...))
	}
}

// copyBufSize is the read size for streams: big enough to amortise
// syscalls, small enough to keep memory flat.
const copyBufSize = 1 << 20

// CreateFromReader writes a one-region snapshot of everything read from r
// to w. It returns the writer's statistics.
func CreateFromReader(ctx context.Context, r io.Reader, w io.Writer, opts Options) (format.WriterStats, error) {
	return createStream(ctx, r, w, opts, 0)
}

func createStream(ctx context.Context, r io.Reader, w io.Writer, opts Options, total uint64) (_ format.WriterStats, err error) {
	name := opts.RegionName
	if name == "" {
		name = "image"
	}
	if opts.Metadata.Source == "" {
		opts.Metadata.Source = "stream"
	}
	return createRegions(ctx, []streamRegion{{name: name, r: r}}, w, opts, total)
}

type streamRegion struct {
	name string
	r    io.Reader
}

// createRegions writes one region per source, in order, then the
// attachments, then the index.
func createRegions(ctx context.Context, srcs []streamRegion, w io.Writer, opts Options, total uint64) (_ format.WriterStats, err error) {
	fw, err := format.NewWriter(w, opts.WriterOptions)
	if err != nil {
		return format.WriterStats{}, err
	}
	defer func() {
		if err != nil {
			fw.Abort() // no index: a failed snapshot must not look valid
		}
	}()
	buf := make([]byte, copyBufSize)
	var done uint64
	for _, src := range srcs {
		if err := fw.BeginRegion(src.name, 0, format.ProtRead|format.ProtWrite); err != nil {
			return fw.Stats(), err
		}
		for {
			if err := ctx.Err(); err != nil {
				return fw.Stats(), err
			}
			n, rerr := io.ReadFull(src.r, buf)
			if n > 0 {
				if _, err := fw.Write(buf[:n]); err != nil {
					return fw.Stats(), err
				}
				done += uint64(n)
				opts.progress(done, total)
			}
			if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
				break
			}
			if rerr != nil {
				return fw.Stats(), fmt.Errorf("read input: %w", rerr)
			}
		}
		if err := fw.EndRegion(); err != nil {
			return fw.Stats(), err
		}
	}
	for _, a := range opts.Attachments {
		if err := fw.AddAttachment(a); err != nil {
			return fw.Stats(), err
		}
	}
	if err := fw.Close(); err != nil {
		return fw.Stats(), err
	}
	return fw.Stats(), nil
}

// NamedFile is one region of CreateFromFiles: the file at Path, stored as
// a region called Name.
type NamedFile struct {
	Name, Path string
}

// CreateFromFiles writes a snapshot with one region per file, in order
// (e.g. each RAM backend file of a virtual machine, named after the
// backend), plus opts.Attachments.
func CreateFromFiles(ctx context.Context, files []NamedFile, w io.Writer, opts Options) (format.WriterStats, error) {
	var srcs []streamRegion
	var total uint64
	for _, nf := range files {
		f, err := os.Open(nf.Path)
		if err != nil {
			return format.WriterStats{}, err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return format.WriterStats{}, err
		}
		if !st.Mode().IsRegular() {
			return format.WriterStats{}, fmt.Errorf("%s is not a regular file: give memory files", nf.Path)
		}
		total += uint64(st.Size())
		srcs = append(srcs, streamRegion{name: nf.Name, r: f})
	}
	if len(srcs) == 0 {
		return format.WriterStats{}, ErrNoRegions
	}
	return createRegions(ctx, srcs, w, opts, total)
}

// CreateFromFile writes a one-region snapshot of the file at path (a raw
// memory image, or an existing hugetlbfs/shmem file) to w.
func CreateFromFile(ctx context.Context, path string, w io.Writer, opts Options) (format.WriterStats, error) {
	f, err := os.Open(path)
	if err != nil {
		return format.WriterStats{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return format.WriterStats{}, err
	}
	if st.IsDir() {
		return format.WriterStats{}, fmt.Errorf("%s is a directory: give a raw image file", path)
	}
	if opts.RegionName == "" {
		opts.RegionName = filepath.Base(path)
	}
	if opts.Metadata.Source == "" {
		opts.Metadata.Source = "file " + path
	}
	var total uint64
	if st.Mode().IsRegular() {
		total = uint64(st.Size())
	}
	return createStream(ctx, f, w, opts, total)
}

// ErrNoRegions is returned when a region filter selects nothing.
var ErrNoRegions = errors.New("snapshot: no regions selected")
