package format

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"sync/atomic"

	"github.com/uffdrestore/uffdrestore/remote"
)

// Reader gives random access by chunk to a snapshot. NewReader validates the
// header, footer and the whole index, so every Chunk it returns has a stored
// range inside the data area and a RawLen consistent with its region. A
// Reader is safe for concurrent use; Decoders are not.
type Reader struct {
	ra        io.ReaderAt
	size      int64
	version   int
	headerLen int
	indexOff  uint64
	indexLen  uint64
	ix        *index
	rawIndex  []byte                   // the index bytes, kept when it is signed (auth.go)
	hashes    [][authChunkHashLen]byte // signed chunk hashes, once Authenticate succeeded
}

// readFull reads exactly len(b) bytes at off. A short read is a truncation
// error naming field; other I/O errors are returned wrapped, errno intact.
func readFull(ra io.ReaderAt, b []byte, off int64, field string, chunk int) error {
	n, err := ra.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return corrupt(ErrTruncated, field, off, chunk, "read %d of %d bytes", n, len(b))
	}
	if chunk >= 0 {
		return fmt.Errorf("format: chunk %d: read %d bytes at offset %#x: %w", chunk, len(b), off, err)
	}
	return fmt.Errorf("format: read %s (%d bytes at offset %#x): %w", field, len(b), off, err)
}

// ReadStored reads the file bytes [off, off+len(b)) that hold stored chunk
// data, for callers that read several adjacent chunks at once and decode
// them with Decoder.DecodeStored (which checks each chunk's stored CRC). The
// range must lie inside the data area.
func (r *Reader) ReadStored(b []byte, off int64) error {
	if off < int64(r.headerLen) || uint64(off)+uint64(len(b)) > r.indexOff {
		return fmt.Errorf("%w: stored range [%#x, %#x) is outside the data area", ErrInvalid, off, off+int64(len(b)))
	}
	return readFull(r.ra, b, off, "chunk data", -1)
}

// NewReader reads and validates the snapshot in r, which is size bytes long.
func NewReader(r io.ReaderAt, size int64) (*Reader, error) {
	rd, _, err := NewReaderBuffer(r, size, nil)
	return rd, err
}

// NewReaderBuffer is NewReader with the index read into buf when it fits
// (a new buffer otherwise), for a caller that opens snapshots again and
// again and would otherwise write each index into fresh memory: on a VM
// whose free pages go back to the host, 57 KiB of them (a 4 GiB snapshot's
// index) cost restore.Open 0.1-0.3 ms. It returns the buffer the index
// is in, to be passed again. The Reader keeps using that memory: it must
// not be passed again, or written, while the Reader is in use.
func NewReaderBuffer(r io.ReaderAt, size int64, buf []byte) (*Reader, []byte, error) {
	rd, err := newReader(r, size, &buf)
	return rd, buf, err
}

func newReader(r io.ReaderAt, size int64, buf *[]byte) (*Reader, error) {
	if size < 0 {
		return nil, fmt.Errorf("%w: negative size %d", ErrInvalid, size)
	}
	// Magic first, so that "not a snapshot" wins over "too short".
	var hdr [HeaderSize]byte
	nm := min(size, int64(len(headerMagic)))
	if err := readFull(r, hdr[:nm], 0, "header.magic", -1); err != nil {
		return nil, err
	}
	if string(hdr[:nm]) != string(headerMagic[:nm]) {
		return nil, corrupt(ErrNotSnapshot, "header.magic", 0, -1, "got % x, want % x", hdr[:nm], headerMagic[:nm])
	}
	if size < HeaderSize+FooterSize {
		return nil, corrupt(ErrTruncated, "header", 0, -1, "file is %d bytes, a snapshot has at least %d", size, HeaderSize+FooterSize)
	}
	if err := readFull(r, hdr[:], 0, "header", -1); err != nil {
		return nil, err
	}
	version := le.Uint16(hdr[8:])
	hlen := le.Uint16(hdr[10:])
	flags := le.Uint32(hdr[12:])
	if version != Version {
		return nil, corrupt(ErrVersion, "header.version", 8, -1, "format version %d, this reader knows %d", version, Version)
	}
	if hlen < HeaderSize || hlen > MaxHeaderSize || int64(hlen) > size-FooterSize {
		return nil, corrupt(ErrCorrupt, "header.length", 10, -1, "%d, want [%d, %d] and inside the file", hlen, HeaderSize, MaxHeaderSize)
	}
	crc := Checksum(hdr[:28])
	if hlen > HeaderSize {
		ext := make([]byte, hlen-HeaderSize)
		if err := readFull(r, ext, HeaderSize, "header.extension", -1); err != nil {
			return nil, err
		}
		crc = updateChecksum(crc, ext)
	}
	if got := le.Uint32(hdr[28:]); got != crc {
		return nil, corrupt(ErrChecksum, "header.crc", 28, -1, "want %#08x, got %#08x", crc, got)
	}
	if flags != 0 {
		return nil, corrupt(ErrVersion, "header.flags", 12, -1, "unknown feature flags %#x: written by a newer uffdrestore", flags)
	}
	for i := 16; i < 28; i++ {
		if hdr[i] != 0 {
			return nil, corrupt(ErrCorrupt, "header.reserved", int64(i), -1, "must be zero")
		}
	}

	// Footer.
	var ft [FooterSize]byte
	fo := size - FooterSize
	if err := readFull(r, ft[:], fo, "footer", -1); err != nil {
		return nil, err
	}
	if [8]byte(ft[24:]) != footerMagic {
		return nil, corrupt(ErrTruncated, "footer.magic", fo+24, -1,
			"no footer at the end of the file: it was cut short, is still being written, or has trailing garbage")
	}
	if want, got := Checksum(ft[:20]), le.Uint32(ft[20:]); want != got {
		return nil, corrupt(ErrChecksum, "footer.crc", fo+20, -1, "want %#08x, got %#08x", want, got)
	}
	ioff, ilen, icrc := le.Uint64(ft[0:]), le.Uint64(ft[8:]), le.Uint32(ft[16:])
	if ilen > MaxIndexSize {
		return nil, corrupt(ErrTooLarge, "footer.index_length", fo+8, -1, "index of %d bytes, limit %d", ilen, MaxIndexSize)
	}
	if ioff < uint64(hlen) || ioff > uint64(fo) || ilen != uint64(fo)-ioff {
		return nil, corrupt(ErrCorrupt, "footer.index_offset", fo, -1,
			"index [%#x, +%#x) must start after the header (%#x) and end at the footer (%#x)", ioff, ilen, hlen, fo)
	}
	if uint64(cap(*buf)) < ilen {
		*buf = make([]byte, ilen)
	}
	*buf = (*buf)[:ilen]
	ib := *buf
	if err := readFull(r, ib, int64(ioff), "index", -1); err != nil {
		return nil, err
	}
	if got := Checksum(ib); got != icrc {
		return nil, corrupt(ErrChecksum, "index", int64(ioff), -1, "want %#08x (footer.index_crc), got %#08x", icrc, got)
	}
	ix, err := parseIndex(ib, int64(ioff), layout{dataStart: uint64(hlen), dataEnd: ioff})
	if err != nil {
		return nil, err
	}
	rd := &Reader{ra: r, size: size, version: int(version), headerLen: int(hlen), indexOff: ioff, indexLen: ilen, ix: ix}
	for _, s := range ix.unknown {
		if s.tag == secAuth {
			rd.rawIndex = ib
		}
	}
	return rd, nil
}

// Version returns the format version of the snapshot.
func (r *Reader) Version() int { return r.version }

// ChunkSize returns the chunk size in bytes.
func (r *Reader) ChunkSize() int { return r.ix.chunkSize }

// Regions returns the regions in file order. The slice is a copy.
func (r *Reader) Regions() []Region { return slices.Clone(r.ix.regions) }

// NumChunks returns the number of chunks.
func (r *Reader) NumChunks() int { return r.ix.numChunks() }

// Chunk returns chunk-table entry i. It panics if i is out of range.
func (r *Reader) Chunk(i int) Chunk { return r.ix.chunk(i) }

// TotalSize returns the size of the logical backing: NumChunks()*ChunkSize().
// Every region starts on a chunk boundary, so a region's short last chunk
// leaves a gap up to the next chunk boundary.
func (r *Reader) TotalSize() uint64 { return uint64(r.ix.numChunks()) * uint64(r.ix.chunkSize) }

// ChunkOffset returns the offset of chunk i in the logical backing.
func (r *Reader) ChunkOffset(i int) uint64 { return uint64(i) * uint64(r.ix.chunkSize) }

// RegionOf returns the index of the region holding chunk i, or -1.
func (r *Reader) RegionOf(chunk int) int {
	rs := r.ix.regions
	// First region whose end is beyond chunk (skips zero-length regions).
	k := sort.Search(len(rs), func(j int) bool {
		return int(rs[j].FirstChunk)+rs[j].NumChunks(r.ix.chunkSize) > chunk
	})
	if k < len(rs) && int(rs[k].FirstChunk) <= chunk {
		return k
	}
	return -1
}

// RawSize returns the sum of all region lengths.
func (r *Reader) RawSize() uint64 {
	var n uint64
	for _, rg := range r.ix.regions {
		n += rg.Length
	}
	return n
}

// StoredSize returns the sum of all chunks' stored lengths.
func (r *Reader) StoredSize() uint64 {
	var n uint64
	for i := range r.ix.numChunks() {
		n += uint64(r.ix.chunk(i).StoredLen)
	}
	return n
}

// FileSize returns the size passed to NewReader.
func (r *Reader) FileSize() int64 { return r.size }

// Metadata returns the snapshot metadata.
func (r *Reader) Metadata() Metadata {
	m := r.ix.meta
	if m.Extra != nil {
		e := make(map[string]string, len(m.Extra))
		for k, v := range m.Extra {
			e[k] = v
		}
		m.Extra = e
	}
	return m
}

// Profiles returns the working-set profiles, if any.
func (r *Reader) Profiles() []Profile {
	ps := make([]Profile, len(r.ix.profiles))
	for i, p := range r.ix.profiles {
		ps[i] = Profile{Name: p.Name, Entries: slices.Clone(p.Entries)}
	}
	return ps
}

// File is a Reader that owns its *os.File, or its remote.Reader for a
// snapshot on an HTTP server.
type File struct {
	*Reader
	f      *os.File
	rem    *remote.Reader
	closed atomic.Bool
}

// Open opens and validates the snapshot at path, which may also be an
// http:// or https:// URL (read with ranged GETs, see package remote).
func Open(path string) (_ *File, err error) {
	if remote.IsURL(path) {
		return openRemote(path, remote.Options{})
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("format: open %s: not a regular file", path)
	}
	r, err := NewReader(f, st.Size())
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if err := AuthenticateFromEnv(r); err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &File{Reader: r, f: f}, nil
}

// OpenRemote opens and validates the snapshot at an http:// or https:// URL
// with the given options.
func OpenRemote(url string, o remote.Options) (*File, error) { return openRemote(url, o) }

func openRemote(url string, o remote.Options) (*File, error) {
	rr, err := remote.Open(context.Background(), url, o)
	if err != nil {
		return nil, err
	}
	r, err := NewReader(rr, rr.Size())
	if err == nil {
		err = AuthenticateFromEnv(r)
	}
	if err != nil {
		rr.Close()
		return nil, fmt.Errorf("open %s: %w", url, err)
	}
	return &File{Reader: r, rem: rr}, nil
}

// OSFile returns the underlying file (for fadvise, readahead and the like),
// or nil for a remote snapshot.
func (f *File) OSFile() *os.File { return f.f }

// Remote returns the remote reader of a snapshot opened from a URL, or nil.
func (f *File) Remote() *remote.Reader { return f.rem }

// Close closes the file. It returns os.ErrClosed after the first call.
func (f *File) Close() error {
	if f.closed.Swap(true) {
		return os.ErrClosed
	}
	if f.rem != nil {
		return f.rem.Close()
	}
	return f.f.Close()
}

// AppendProfile adds a working-set profile to the snapshot at path, in place.
// Only the index and footer are rewritten; chunk data is untouched. A crash
// during the rewrite leaves the file without a valid footer (NewReader then
// reports ErrTruncated); the chunk data survives.
func AppendProfile(path string, p Profile) error {
	return rewriteIndex(path, "append profile to", func(ix *index) error {
		if err := checkProfile(p, ix.numChunks()); err != nil {
			return err
		}
		if len(ix.profiles) >= MaxProfiles {
			return fmt.Errorf("%w: more than %d profiles", ErrTooLarge, MaxProfiles)
		}
		ix.profiles = append(slices.Clone(ix.profiles), p)
		return nil
	})
}

func checkProfile(p Profile, nchunks int) error {
	if err := checkName("profile", p.Name); err != nil {
		return err
	}
	if uint64(len(p.Entries)) > MaxIndexSize/profEntrySize {
		return fmt.Errorf("%w: profile %q has %d entries", ErrTooLarge, p.Name, len(p.Entries))
	}
	for j, e := range p.Entries {
		if int64(e.Chunk) >= int64(nchunks) {
			return fmt.Errorf("%w: profile %q entry %d: chunk %d out of range (%d chunks)", ErrInvalid, p.Name, j, e.Chunk, nchunks)
		}
	}
	return nil
}
