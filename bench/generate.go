package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/internal/benchcache"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
)

// Layout is where the snapshot's bytes are in restored memory: chunk i at
// i × ChunkSize, the same for every strategy (it is the restore backing's
// layout, so a region's offset is its first chunk's).
type Layout struct {
	Size      int64    `json:"size"` // chunks × chunk size
	ChunkSize int      `json:"chunk_size"`
	RawBytes  int64    `json:"raw_bytes"` // sum of the regions' lengths
	Regions   []Region `json:"regions"`
}

// Region is one snapshot region in the Layout.
type Region struct {
	Name   string `json:"name"`
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
}

// LayoutOf returns r's layout.
func LayoutOf(r *format.Reader) Layout {
	l := Layout{Size: int64(r.TotalSize()), ChunkSize: r.ChunkSize()}
	for _, reg := range r.Regions() {
		l.Regions = append(l.Regions, Region{Name: reg.Name, Offset: int64(reg.FirstChunk) * int64(r.ChunkSize()), Length: int64(reg.Length)})
		l.RawBytes += int64(reg.Length)
	}
	return l
}

// Pages returns the 4 KiB page indexes that hold region bytes, ascending.
func (l Layout) Pages() []uint32 {
	var out []uint32
	for _, r := range l.Regions {
		for off := r.Offset &^ 4095; off < r.Offset+r.Length; off += 4096 {
			out = append(out, uint32(off/4096))
		}
	}
	return out
}

// Contents a generated snapshot can have.
var Contents = []string{"realistic", "zeros", "random"}

// CacheDir is where generated snapshots and raw images are kept between
// runs: this user's own directory (see internal/benchcache), created 0700.
func CacheDir() (string, error) { return benchcache.Dir() }

// Generate writes (or reuses, from dir) a one-region snapshot of size bytes
// of content, and its raw image in Layout form next to it. It returns both
// paths.
func Generate(ctx context.Context, dir string, size int64, content string, codec format.Codec, chunkSize int) (snap, image string, err error) {
	switch content {
	case "realistic", "zeros", "random":
	default:
		return "", "", fmt.Errorf("bench: unknown content %q (want realistic, zeros or random)", content)
	}
	if size <= 0 {
		return "", "", fmt.Errorf("bench: --generate size must be positive")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	name := fmt.Sprintf("gen-%s-%d-%v-%d", content, size, codec, chunkSize)
	snap = filepath.Join(dir, name+".snap")
	image = filepath.Join(dir, name+".raw")
	_, e1 := os.Stat(snap)
	_, e2 := os.Stat(image)
	if e1 == nil && e2 == nil {
		return snap, image, nil
	}
	sf, err := atomicfile.Create(snap, 0o644)
	if err != nil {
		return "", "", err
	}
	defer sf.Abort()
	imf, err := atomicfile.Create(image, 0o644)
	if err != nil {
		return "", "", err
	}
	defer imf.Abort()
	w, err := format.NewWriter(sf, format.WriterOptions{ChunkSize: chunkSize, Codec: codec,
		Metadata: format.Metadata{Source: "uffdrestore bench --generate " + content}})
	if err != nil {
		return "", "", err
	}
	if err := w.BeginRegion("heap", 0x7f3a00000000, format.ProtRead|format.ProtWrite); err != nil {
		return "", "", err
	}
	const block = 8 << 20
	bufs := [2][]byte{make([]byte, block), make([]byte, block)}
	for off, k := int64(0), 0; off < size; off, k = off+block, k+1 {
		if err := ctx.Err(); err != nil {
			w.Abort()
			return "", "", err
		}
		p := bufs[k%2][:min(block, size-off)]
		fillContent(p, content, off)
		if _, err := w.Write(p); err != nil {
			return "", "", err
		}
		if _, err := imf.Write(p); err != nil {
			return "", "", err
		}
	}
	if err := w.EndRegion(); err != nil {
		return "", "", err
	}
	if err := w.Close(); err != nil {
		return "", "", err
	}
	st := w.Stats()
	if err := imf.Truncate(int64(st.Chunks) * int64(chunkSize)); err != nil {
		return "", "", err
	}
	// The image first: a snapshot without its image is regenerated.
	if err := imf.Commit(); err != nil {
		return "", "", err
	}
	return snap, image, sf.Commit()
}

// fillContent fills p (generated content starting at byte off of the image)
// in parallel over the CPUs; the bytes depend only on off, not on how p is
// split.
func fillContent(p []byte, content string, off int64) {
	if content == "zeros" {
		clear(p)
		return
	}
	pages := (len(p) + 4095) / 4096
	workers := min(runtime.NumCPU(), max(1, pages/64))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		lo, hi := pages*w/workers*4096, min(len(p), pages*(w+1)/workers*4096)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if content == "random" {
				randomPages(p[lo:hi], (off+int64(lo))/4096)
			} else {
				memgen.Fill(p[lo:hi], (off+int64(lo))/memgen.PageSize)
			}
		}()
	}
	wg.Wait()
}

func randomPages(p []byte, firstPage int64) {
	for pg := 0; pg*4096 < len(p); pg++ {
		rng := rand.New(rand.NewPCG(uint64(firstPage)+uint64(pg), 11))
		b := p[pg*4096 : min(len(p), (pg+1)*4096)]
		for i := 0; i+8 <= len(b); i += 8 {
			binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
		}
	}
}

// PrepareImage returns the raw image of snap in Layout form — chunk i at
// i × chunk size, zero-filled gaps — decoding it once into dir (cached by
// the snapshot's path, size and modification time).
func PrepareImage(ctx context.Context, dir, snap string) (string, error) {
	st, err := os.Stat(snap)
	if err != nil {
		return "", err
	}
	abs, _ := filepath.Abs(snap)
	h := fnv.New64a()
	fmt.Fprintf(h, "%s\x00%d\x00%d", abs, st.Size(), st.ModTime().UnixNano())
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	image := filepath.Join(dir, fmt.Sprintf("img-%s-%016x.raw", filepath.Base(snap), h.Sum64()))
	if _, err := os.Stat(image); err == nil {
		return image, nil
	}
	f, err := format.Open(snap)
	if err != nil {
		return "", err
	}
	defer f.Close()
	out, err := atomicfile.Create(image, 0o644)
	if err != nil {
		return "", err
	}
	defer out.Abort()
	if err := out.Truncate(int64(f.TotalSize())); err != nil {
		return "", err
	}
	n := f.NumChunks()
	next := make(chan int)
	errs := make(chan error, runtime.NumCPU())
	var wg sync.WaitGroup
	for w := 0; w < runtime.NumCPU(); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := f.NewDecoder()
			defer d.Close()
			buf := make([]byte, f.ChunkSize())
			for i := range next {
				c := f.Chunk(i)
				if c.Codec == format.CodecZero {
					continue
				}
				if err := d.DecodeChunk(i, buf); err != nil {
					errs <- err
					return
				}
				if _, err := out.WriteAt(buf[:c.RawLen], int64(f.ChunkOffset(i))); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var ferr error
feed:
	for i := 0; i < n; i++ {
		select {
		case next <- i:
		case ferr = <-errs:
			break feed
		case <-ctx.Done():
			ferr = ctx.Err()
			break feed
		}
	}
	close(next)
	wg.Wait()
	if ferr == nil {
		select {
		case ferr = <-errs:
		default:
		}
	}
	if ferr != nil {
		return "", fmt.Errorf("bench: decode %s into a raw image: %w", snap, ferr)
	}
	return image, out.Commit()
}
