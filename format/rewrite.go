package format

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
)

// RewriteOptions configure Rewrite.
type RewriteOptions struct {
	// Order lists the chunks whose stored bytes are written first, in this
	// order; every other stored chunk follows in chunk order. Zero chunks
	// (nothing stored) and repeats are skipped. A chunk out of range is
	// ErrInvalid.
	Order []uint32
	// Profiles, if not nil, replaces the snapshot's working-set profiles
	// (a non-nil empty slice removes them all). nil keeps them.
	Profiles []Profile
	// Progress, if set, is called with the stored bytes copied so far and
	// their total, at most once per chunk.
	Progress func(done, total uint64)
}

// RewriteStats summarises what Rewrite wrote.
type RewriteStats struct {
	StoredBytes uint64 // chunk data bytes copied
	FileBytes   uint64 // all bytes written
	Chunks      int    // stored (non-zero) chunks copied
	Leading     int    // of those, chunks placed by RewriteOptions.Order
}

// Rewrite copies the snapshot r to w with its chunk data in a new order and
// a new index: regions, metadata, unknown non-critical sections and (unless
// opts.Profiles says otherwise) profiles are kept; only chunk offsets change.
// Stored bytes are copied verbatim, never recompressed, and each chunk's
// stored CRC is checked on the way (a mismatch is ErrChecksum naming the
// chunk: the output must then be discarded). The header, extension bytes
// included, is copied. Memory is one chunk buffer plus the index, whatever
// the snapshot size; w is written sequentially (buffer it).
func Rewrite(ctx context.Context, w io.Writer, r *Reader, opts RewriteOptions) (RewriteStats, error) {
	var st RewriteStats
	n := r.ix.numChunks()
	ix := *r.ix
	ix.table = bytes.Clone(r.ix.table) // the copy's offsets are rewritten
	if opts.Profiles != nil {
		ix.profiles = opts.Profiles
		if len(ix.profiles) > MaxProfiles {
			return st, fmt.Errorf("%w: %d profiles, limit %d", ErrTooLarge, len(ix.profiles), MaxProfiles)
		}
		for _, p := range ix.profiles {
			if err := checkProfile(p, n); err != nil {
				return st, err
			}
		}
	}

	// The copy order: opts.Order's stored chunks, then the rest.
	placed := make([]bool, n)
	order := make([]uint32, 0, n)
	for _, c := range opts.Order {
		if int64(c) >= int64(n) {
			return st, fmt.Errorf("%w: rewrite order names chunk %d, the snapshot has %d", ErrInvalid, c, n)
		}
		if placed[c] || ix.chunk(int(c)).Codec == CodecZero {
			continue
		}
		placed[c] = true
		order = append(order, c)
	}
	st.Leading = len(order)
	for i := 0; i < n; i++ {
		if !placed[i] && ix.chunk(i).Codec != CodecZero {
			order = append(order, uint32(i))
		}
	}
	placed = nil

	// Header, verbatim (re-read: check it still matches its CRC).
	hdr := make([]byte, r.headerLen)
	if err := readFull(r.ra, hdr, 0, "header", -1); err != nil {
		return st, err
	}
	if want := updateChecksum(Checksum(hdr[:28]), hdr[HeaderSize:]); le.Uint32(hdr[28:]) != want {
		return st, corrupt(ErrChecksum, "header.crc", 28, -1, "header changed since the snapshot was opened")
	}
	off := uint64(0)
	write := func(b []byte) error {
		m, err := w.Write(b)
		off += uint64(m)
		if err == nil && m != len(b) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return fmt.Errorf("format: rewrite: write: %w", err)
		}
		return nil
	}
	if err := write(hdr); err != nil {
		return st, err
	}

	total := r.StoredSize()
	buf := make([]byte, 0, r.ix.chunkSize)
	for _, ci := range order {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		c := ix.chunk(int(ci))
		b := buf[:c.StoredLen]
		if err := readFull(r.ra, b, int64(c.Offset), "", int(ci)); err != nil {
			return st, err
		}
		if got := Checksum(b); got != c.StoredCRC {
			return st, corrupt(ErrChecksum, chunkField(int(ci), ".stored_crc"), int64(c.Offset), int(ci),
				"stored bytes: want %#08x, got %#08x", c.StoredCRC, got)
		}
		le.PutUint64(ix.table[int(ci)*chunkEntrySize:], off) // the entry's offset
		if err := write(b); err != nil {
			return st, err
		}
		st.StoredBytes += uint64(c.StoredLen)
		st.Chunks++
		if opts.Progress != nil {
			opts.Progress(st.StoredBytes, total)
		}
	}

	ib, err := encodeIndex(&ix)
	if err != nil {
		return st, err
	}
	// What we write must read back: catch a bug here, not at restore time.
	if _, err := parseIndex(ib, int64(off), layout{dataStart: uint64(r.headerLen), dataEnd: off}); err != nil {
		return st, fmt.Errorf("format: rewrite produced an invalid index: %w", err)
	}
	if err := write(appendFooter(ib, off, ib)); err != nil {
		return st, err
	}
	st.FileBytes = off
	return st, nil
}

// SetProfiles replaces the working-set profiles of the snapshot at path, in
// place, like AppendProfile: only the index and footer are rewritten. An
// empty ps removes them all.
func SetProfiles(path string, ps []Profile) error {
	return rewriteIndex(path, "set profiles of", func(ix *index) error {
		if len(ps) > MaxProfiles {
			return fmt.Errorf("%w: %d profiles, limit %d", ErrTooLarge, len(ps), MaxProfiles)
		}
		for _, p := range ps {
			if err := checkProfile(p, ix.numChunks()); err != nil {
				return err
			}
		}
		ix.profiles = slices.Clone(ps)
		return nil
	})
}

// rewriteIndex opens the snapshot at path, lets edit change a copy of its
// index, and writes the new index and footer in place of the old ones.
func rewriteIndex(path, what string, edit func(*index) error) (err error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	r, err := NewReader(f, st.Size())
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	ix := *r.ix
	if err := edit(&ix); err != nil {
		return err
	}
	ib, err := encodeIndex(&ix)
	if err != nil {
		return err
	}
	tail := appendFooter(ib, r.indexOff, ib)
	if _, err := f.WriteAt(tail, int64(r.indexOff)); err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	if err := f.Truncate(int64(r.indexOff) + int64(len(tail))); err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	return f.Sync()
}

// DataOrder returns the stored (non-zero) chunks in file order: the order
// their stored bytes appear in the data area.
func (r *Reader) DataOrder() []uint32 {
	order := make([]uint32, 0, r.ix.numChunks())
	for i := range r.ix.numChunks() {
		if r.ix.chunk(i).Codec != CodecZero {
			order = append(order, uint32(i))
		}
	}
	slices.SortFunc(order, func(a, b uint32) int { return cmp.Compare(r.ix.chunk(int(a)).Offset, r.ix.chunk(int(b)).Offset) })
	return order
}
