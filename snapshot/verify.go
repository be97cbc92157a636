package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/uffdrestore/uffdrestore/format"
)

// ChunkError is a chunk that failed verification.
type ChunkError struct {
	Chunk      int    // chunk index, -1 for an error not tied to a chunk (cancelled)
	Region     int    // region index, -1 if none
	RegionName string // region name
	Offset     uint64 // file offset of the chunk's stored bytes
	RegionOff  uint64 // offset of the chunk within its region
	Err        error
}

func (e ChunkError) Error() string {
	if e.Chunk < 0 {
		return e.Err.Error()
	}
	return fmt.Sprintf("chunk %d (region %d %q, +%#x; file offset %#x): %v",
		e.Chunk, e.Region, e.RegionName, e.RegionOff, e.Offset, e.Err)
}

func (e ChunkError) Unwrap() error { return e.Err }

// Verify decodes every chunk of r with workers goroutines (default
// GOMAXPROCS) and checks every checksum. It returns the chunks that failed,
// in chunk order; none means the snapshot is intact.
func Verify(ctx context.Context, r *format.Reader, workers int) []ChunkError {
	return VerifyProgress(ctx, r, workers, nil)
}

// VerifyProgress is Verify with a progress callback (raw bytes checked,
// total raw bytes), called from the workers, serialised.
func VerifyProgress(ctx context.Context, r *format.Reader, workers int, progress func(done, total uint64)) []ChunkError {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	n := r.NumChunks()
	workers = max(1, min(workers, n))
	var (
		next   atomic.Int64
		mu     sync.Mutex
		errs   []ChunkError
		done   uint64
		total  = r.RawSize()
		wg     sync.WaitGroup
		ctxErr error
	)
	regions := r.Regions()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := r.NewDecoder()
			defer d.Close()
			buf := make([]byte, r.ChunkSize())
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := ctx.Err(); err != nil {
					mu.Lock()
					ctxErr = err
					mu.Unlock()
					return
				}
				err := d.DecodeChunk(i, buf)
				mu.Lock()
				if err != nil {
					ce := ChunkError{Chunk: i, Region: r.RegionOf(i), Offset: r.Chunk(i).Offset, Err: err}
					if ce.Region >= 0 {
						rg := regions[ce.Region]
						ce.RegionName = rg.Name
						ce.RegionOff = uint64(i-int(rg.FirstChunk)) * uint64(r.ChunkSize())
					}
					errs = append(errs, ce)
				}
				done += uint64(r.Chunk(i).RawLen)
				if progress != nil {
					progress(done, total)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	sort.Slice(errs, func(a, b int) bool { return errs[a].Chunk < errs[b].Chunk })
	if ctxErr != nil {
		errs = append(errs, ChunkError{Chunk: -1, Region: -1, Err: fmt.Errorf("verify: %w", ctxErr)})
	}
	return errs
}

// ErrNoSuchRegion is returned by Extract when no region matches the name.
var ErrNoSuchRegion = errors.New("snapshot: no such region")

// SelectRegions returns the indexes of r's regions matching name: all
// regions for "", region N for "#N" (its index in snapshot order, as
// `snapshot info` lists it), else every region named exactly name (names
// repeat: a process snapshot has many "anon" regions), else those matching
// it as a glob (a name that itself looks like "#N" is selected with a glob:
// "[#]N").
func SelectRegions(r *format.Reader, name string) ([]int, error) {
	rs := r.Regions()
	if n, ok := strings.CutPrefix(name, "#"); ok && n != "" && strings.Trim(n, "0123456789") == "" {
		i, err := strconv.Atoi(n)
		if err != nil || i >= len(rs) {
			return nil, fmt.Errorf("%w %s: the snapshot has regions #0 to #%d (see snapshot info)", ErrNoSuchRegion, name, len(rs)-1)
		}
		return []int{i}, nil
	}
	var idx []int
	for i, rg := range rs {
		if name == "" || rg.Name == name {
			idx = append(idx, i)
		}
	}
	if len(idx) == 0 && strings.ContainsAny(name, "*?[") {
		for i, rg := range rs {
			if ok, _ := path.Match(name, rg.Name); ok {
				idx = append(idx, i)
			}
		}
	}
	if len(idx) == 0 && name != "" {
		names := make([]string, 0, len(rs))
		for _, rg := range rs {
			names = append(names, fmt.Sprintf("%q", rg.Name))
		}
		if len(names) > 20 {
			names = append(names[:20], "...")
		}
		return nil, fmt.Errorf("%w %q; the snapshot has: %s", ErrNoSuchRegion, name, strings.Join(names, ", "))
	}
	return idx, nil
}

// Extract writes the raw bytes of the regions named regionName (all if "")
// to w, in region order, each region exactly Length bytes. Memory use is one
// chunk.
func Extract(ctx context.Context, r *format.Reader, w io.Writer, regionName string) error {
	return ExtractProgress(ctx, r, w, regionName, nil)
}

// ExtractProgress is Extract with a progress callback (bytes written, total).
func ExtractProgress(ctx context.Context, r *format.Reader, w io.Writer, regionName string, progress func(done, total uint64)) error {
	idx, err := SelectRegions(r, regionName)
	if err != nil {
		return err
	}
	rs := r.Regions()
	var total, done uint64
	for _, i := range idx {
		total += rs[i].Length
	}
	d := r.NewDecoder()
	defer d.Close()
	buf := make([]byte, r.ChunkSize())
	for _, ri := range idx {
		rg := rs[ri]
		for j := 0; j < rg.NumChunks(r.ChunkSize()); j++ {
			if err := ctx.Err(); err != nil {
				return err
			}
			ci := int(rg.FirstChunk) + j
			n := r.Chunk(ci).RawLen
			if err := d.DecodeChunk(ci, buf); err != nil {
				return fmt.Errorf("extract region %q: %w", rg.Name, err)
			}
			if _, err := w.Write(buf[:n]); err != nil {
				return fmt.Errorf("extract: write: %w", err)
			}
			done += uint64(n)
			if progress != nil {
				progress(done, total)
			}
		}
	}
	return nil
}
