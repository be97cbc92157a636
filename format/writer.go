package format

import (
	"crypto/sha256"
	"fmt"
	"hash/crc32"
	"io"
	"runtime"
	"sync"
	"time"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// MaxChunks caps the number of chunks in a snapshot (1 TiB at 64 KiB chunks,
// 32 TiB at 2 MiB), which keeps the index under MaxIndexSize.
const MaxChunks = 16 << 20

func updateChecksum(crc uint32, b []byte) uint32 { return crc32.Update(crc, castagnoli, b) }

func appendHeader(dst []byte) []byte {
	var h [HeaderSize]byte
	copy(h[:], headerMagic[:])
	le.PutUint16(h[8:], Version)
	le.PutUint16(h[10:], HeaderSize)
	le.PutUint32(h[28:], Checksum(h[:28]))
	return append(dst, h[:]...)
}

// appendFooter appends the footer for an index of ib at file offset ioff.
func appendFooter(dst []byte, ioff uint64, ib []byte) []byte {
	var f [FooterSize]byte
	le.PutUint64(f[0:], ioff)
	le.PutUint64(f[8:], uint64(len(ib)))
	le.PutUint32(f[16:], Checksum(ib))
	le.PutUint32(f[20:], Checksum(f[:20]))
	copy(f[24:], footerMagic[:])
	return append(dst, f[:]...)
}

// WriterOptions configure a Writer. The zero value is valid.
type WriterOptions struct {
	ChunkSize int   // power of two in [MinChunkSize, MaxChunkSize]; default DefaultChunkSize
	Codec     Codec // CodecZstd (default; the zero value CodecZero means default), CodecS2 or CodecRaw
	Level     int   // codec level; 0 = codec default. zstd: 1..22 (zstd CLI scale); s2: 1 fast, 2 better, 3 best
	Workers   int   // parallel compression; default runtime.NumCPU()
	Metadata  Metadata
	// MACKey signs the snapshot (SPEC.md, section 5: authentication);
	// default: the key from UFFDRESTORE_MAC_KEY_FILE or UFFDRESTORE_MAC_KEY,
	// if set.
	MACKey []byte
}

// WriterStats summarises what a Writer wrote.
type WriterStats struct {
	RawBytes    uint64 // bytes passed to Write
	StoredBytes uint64 // chunk data bytes written
	FileBytes   uint64 // all bytes written (header, data, index, footer)
	Chunks      int    // chunk count
	PerCodec    [4]int // chunks per Codec, indexed by Codec
	ZeroChunks  int    // = PerCodec[CodecZero]
	Regions     int    // region count
}

// Writer streams a snapshot: header, then chunk data as regions are written,
// then (on Close) the index and footer. Chunks are compressed by a bounded
// pool of workers and emitted in order; memory is about 2*Workers chunks
// whatever the image size, and the output bytes do not depend on Workers.
type Writer struct {
	w         io.Writer
	opts      WriterOptions
	chunkSize int
	off       uint64
	err       error
	closed    bool

	regions   []Region
	inRegion  bool
	cur       Region
	submitted int    // chunks handed to workers so far
	table     []byte // the chunk table (appendChunk)
	profiles  []Profile

	attachments []Attachment

	jobs     chan *job
	pending  []*job // FIFO, in chunk order
	free     []*job
	fill     *job
	maxQueue int
	wg       sync.WaitGroup
	stats    WriterStats
	hashes   [][authChunkHashLen]byte // with a MAC key: SHA-256 of each chunk's stored bytes
}

type job struct {
	raw    []byte // cap chunkSize
	n      int
	out    []byte
	stored []byte
	codec  Codec
	crc    uint32
	scrc   uint32
	done   chan struct{}
}

// NewWriter writes the header to w and returns a Writer. Call Close to
// finish the snapshot and stop the workers.
func NewWriter(w io.Writer, opts WriterOptions) (*Writer, error) {
	if opts.ChunkSize == 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if !validChunkSize(opts.ChunkSize) {
		return nil, fmt.Errorf("%w: chunk size %d: want a power of two from %d KiB to %d MiB",
			ErrInvalid, opts.ChunkSize, MinChunkSize>>10, MaxChunkSize>>20)
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.NumCPU()
	}
	if opts.Codec == CodecZero {
		opts.Codec = CodecZstd
	}
	switch opts.Codec {
	case CodecZstd:
		if opts.Level < 0 || opts.Level > 22 {
			return nil, fmt.Errorf("%w: zstd level %d: want 1..22 (0 = default)", ErrInvalid, opts.Level)
		}
	case CodecS2:
		if opts.Level < 0 || opts.Level > 3 {
			return nil, fmt.Errorf("%w: s2 level %d: want 1 (fast), 2 (better) or 3 (best)", ErrInvalid, opts.Level)
		}
	case CodecRaw:
	default:
		return nil, fmt.Errorf("%w: codec %s cannot be used to write (want zstd, s2 or raw)", ErrInvalid, opts.Codec)
	}
	if opts.MACKey == nil {
		k, err := MACKeyFromEnv()
		if err != nil {
			return nil, err
		}
		opts.MACKey = k
	}
	if opts.Metadata.Created.IsZero() {
		opts.Metadata.Created = time.Now()
	}
	wr := &Writer{
		w:         w,
		opts:      opts,
		chunkSize: opts.ChunkSize,
		maxQueue:  2 * opts.Workers,
		jobs:      make(chan *job, 2*opts.Workers),
	}
	if err := wr.write(appendHeader(nil)); err != nil {
		return nil, err
	}
	// Encoders are created up front so option errors surface here.
	encs := make([]*zstd.Encoder, opts.Workers)
	if opts.Codec == CodecZstd {
		lvl := zstd.SpeedDefault
		if opts.Level > 0 {
			lvl = zstd.EncoderLevelFromZstd(opts.Level)
		}
		for i := range encs {
			e, err := zstd.NewWriter(nil,
				zstd.WithEncoderConcurrency(1),
				zstd.WithEncoderLevel(lvl),
				zstd.WithEncoderCRC(false), // chunks carry their own CRC-32C
				zstd.WithSingleSegment(true),
				zstd.WithWindowSize(windowFor(opts.ChunkSize)))
			if err != nil {
				return nil, fmt.Errorf("format: zstd encoder: %w", err)
			}
			encs[i] = e
		}
	}
	wr.wg.Add(opts.Workers)
	for i := 0; i < opts.Workers; i++ {
		go wr.worker(encs[i])
	}
	return wr, nil
}

func windowFor(chunkSize int) int {
	w := zstd.MinWindowSize
	for w < chunkSize {
		w <<= 1
	}
	return w
}

// numChunks is the number of chunks written so far.
func (w *Writer) numChunks() int { return len(w.table) / chunkEntrySize }

func (w *Writer) write(b []byte) error {
	if w.err != nil {
		return w.err
	}
	n, err := w.w.Write(b)
	w.off += uint64(n)
	w.stats.FileBytes += uint64(n)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		w.err = fmt.Errorf("format: write snapshot: %w", err)
	}
	return w.err
}

func (w *Writer) worker(enc *zstd.Encoder) {
	defer w.wg.Done()
	if enc != nil {
		defer enc.Close()
	}
	zc := zeroCRCs{}
	for j := range w.jobs {
		w.compress(j, enc, zc)
		j.done <- struct{}{}
	}
}

func (w *Writer) compress(j *job, enc *zstd.Encoder, zc zeroCRCs) {
	data := j.raw[:j.n]
	if isZero(data) {
		j.codec, j.stored, j.crc, j.scrc = CodecZero, nil, zc.get(uint32(j.n)), 0
		return
	}
	j.crc = Checksum(data)
	j.codec, j.stored, j.scrc = CodecRaw, data, j.crc
	switch w.opts.Codec {
	case CodecZstd:
		j.out = enc.EncodeAll(data, j.out[:0])
	case CodecS2:
		if need := s2.MaxEncodedLen(w.chunkSize); cap(j.out) < need {
			j.out = make([]byte, need)
		}
		out := j.out[:cap(j.out)]
		switch w.opts.Level {
		case 0, 1:
			j.out = s2.Encode(out, data)
		case 2:
			j.out = s2.EncodeBetter(out, data)
		default:
			j.out = s2.EncodeBest(out, data)
		}
	default:
		return
	}
	if len(j.out) < j.n {
		j.codec, j.stored, j.scrc = w.opts.Codec, j.out, Checksum(j.out)
	}
}

// BeginRegion starts a new region at the next chunk boundary.
func (w *Writer) BeginRegion(name string, addr uint64, prot uint32) error {
	if w.closed {
		return ErrClosed
	}
	if w.inRegion {
		return fmt.Errorf("%w: BeginRegion(%q): region %q is still open", ErrInvalid, name, w.cur.Name)
	}
	if err := checkName("region", name); err != nil {
		return err
	}
	if prot&^protMask != 0 {
		return fmt.Errorf("%w: region %q: unknown protection bits %#x", ErrInvalid, name, prot)
	}
	if len(w.regions) >= MaxRegions {
		return fmt.Errorf("%w: more than %d regions", ErrTooLarge, MaxRegions)
	}
	w.inRegion = true
	w.cur = Region{Name: name, Addr: addr, Prot: prot, FirstChunk: uint32(w.submitted)}
	return w.err
}

// Write appends p to the current region.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, ErrClosed
	}
	if !w.inRegion {
		return 0, fmt.Errorf("%w: Write outside a region (call BeginRegion first)", ErrInvalid)
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.cur.Addr != 0 && w.cur.Addr+w.cur.Length+uint64(len(p)) < w.cur.Addr {
		return 0, fmt.Errorf("%w: region %q: address + length overflows", ErrInvalid, w.cur.Name)
	}
	done := 0
	for done < len(p) {
		if w.fill == nil {
			if w.submitted >= MaxChunks {
				return done, fmt.Errorf("%w: more than %d chunks; use a larger chunk size", ErrTooLarge, MaxChunks)
			}
			w.fill = w.getJob()
		}
		n := copy(w.fill.raw[w.fill.n:w.chunkSize], p[done:])
		w.fill.n += n
		done += n
		w.cur.Length += uint64(n)
		w.stats.RawBytes += uint64(n)
		if w.fill.n == w.chunkSize {
			if err := w.submit(); err != nil {
				return done, err
			}
		}
	}
	return done, nil
}

// ReadFrom copies r into the current region until EOF, reading straight
// into chunk buffers.
func (w *Writer) ReadFrom(r io.Reader) (int64, error) {
	if w.closed {
		return 0, ErrClosed
	}
	if !w.inRegion {
		return 0, fmt.Errorf("%w: ReadFrom outside a region (call BeginRegion first)", ErrInvalid)
	}
	var total int64
	for w.err == nil {
		if w.fill == nil {
			if w.submitted >= MaxChunks {
				return total, fmt.Errorf("%w: more than %d chunks; use a larger chunk size", ErrTooLarge, MaxChunks)
			}
			w.fill = w.getJob()
		}
		n, err := r.Read(w.fill.raw[w.fill.n:w.chunkSize])
		w.fill.n += n
		total += int64(n)
		w.cur.Length += uint64(n)
		w.stats.RawBytes += uint64(n)
		if w.fill.n == w.chunkSize {
			if serr := w.submit(); serr != nil {
				return total, serr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
	return total, w.err
}

func (w *Writer) getJob() *job {
	if n := len(w.free); n > 0 {
		j := w.free[n-1]
		w.free = w.free[:n-1]
		j.n = 0
		return j
	}
	return &job{raw: make([]byte, w.chunkSize), done: make(chan struct{}, 1)}
}

// submit hands the fill buffer to the workers, first emitting the oldest
// chunk if the queue is full.
func (w *Writer) submit() error {
	j := w.fill
	w.fill = nil
	for len(w.pending) >= w.maxQueue {
		w.emitOldest()
	}
	w.pending = append(w.pending, j)
	w.submitted++
	w.jobs <- j
	return w.err
}

func (w *Writer) emitOldest() {
	j := w.pending[0]
	w.pending = w.pending[1:]
	<-j.done
	c := Chunk{RawLen: uint32(j.n), Codec: j.codec, CRC: j.crc}
	if j.codec != CodecZero {
		c.Offset = w.off
		c.StoredLen = uint32(len(j.stored))
		c.StoredCRC = j.scrc
		w.write(j.stored)
		w.stats.StoredBytes += uint64(len(j.stored))
	}
	if w.opts.MACKey != nil {
		var h [authChunkHashLen]byte // a zero chunk stores nothing: its entry is signed with the index
		if j.codec != CodecZero {
			h = sha256.Sum256(j.stored)
		}
		w.hashes = append(w.hashes, h)
	}
	w.table = appendChunk(w.table, c)
	w.stats.PerCodec[j.codec]++
	j.stored = nil
	w.free = append(w.free, j)
}

// EndRegion ends the current region; its short last chunk, if any, is
// flushed.
func (w *Writer) EndRegion() error {
	if w.closed {
		return ErrClosed
	}
	if !w.inRegion {
		return fmt.Errorf("%w: EndRegion without BeginRegion", ErrInvalid)
	}
	if w.fill != nil && w.fill.n > 0 {
		if err := w.submit(); err != nil {
			return err
		}
	}
	w.regions = append(w.regions, w.cur)
	w.inRegion = false
	return w.err
}

// AddProfile adds a working-set profile, written with the index on Close.
// Entries must name chunks that exist by the time Close is called.
func (w *Writer) AddProfile(p Profile) error {
	if w.closed {
		return ErrClosed
	}
	if err := checkName("profile", p.Name); err != nil {
		return err
	}
	if len(w.profiles) >= MaxProfiles {
		return fmt.Errorf("%w: more than %d profiles", ErrTooLarge, MaxProfiles)
	}
	w.profiles = append(w.profiles, Profile{Name: p.Name, Entries: append([]ProfileEntry(nil), p.Entries...)})
	return nil
}

// Close ends an open region, flushes all chunks, writes the index and the
// footer and stops the workers. It does not close the underlying writer.
// Close must be called, also after an error, to stop the workers.
func (w *Writer) Close() error {
	if w.closed {
		return ErrClosed
	}
	if w.inRegion && w.err == nil {
		w.EndRegion()
	}
	for len(w.pending) > 0 {
		w.emitOldest()
	}
	w.closed = true
	close(w.jobs)
	w.wg.Wait()
	w.free, w.fill = nil, nil
	if w.err != nil {
		return w.err
	}
	for _, p := range w.profiles {
		if err := checkProfile(p, w.numChunks()); err != nil {
			return err
		}
	}
	ix := &index{chunkSize: w.chunkSize, regions: w.regions, table: w.table, meta: w.opts.Metadata, profiles: w.profiles, attachments: w.attachments}
	ib, err := encodeIndex(ix)
	if err != nil {
		return err
	}
	if w.opts.MACKey != nil {
		if ib, err = signIndex(ib, w.hashes, w.opts.MACKey); err != nil {
			return err
		}
	}
	ioff := w.off
	w.write(appendFooter(ib, ioff, ib))
	w.stats.Chunks = w.numChunks()
	w.stats.ZeroChunks = w.stats.PerCodec[CodecZero]
	w.stats.Regions = len(w.regions)
	return w.err
}

// Abort stops the workers without writing the index or footer, so the
// output is not a valid snapshot. Use it on error paths instead of Close.
// Abort after Close (or a second Abort) does nothing.
func (w *Writer) Abort() {
	if w.closed {
		return
	}
	for len(w.pending) > 0 {
		j := w.pending[0]
		w.pending = w.pending[1:]
		<-j.done
	}
	w.closed = true
	close(w.jobs)
	w.wg.Wait()
	w.free, w.fill = nil, nil
	if w.err == nil {
		w.err = ErrClosed
	}
}

// Stats returns what has been written so far (complete after Close).
func (w *Writer) Stats() WriterStats {
	s := w.stats
	s.Chunks = w.numChunks()
	s.ZeroChunks = s.PerCodec[CodecZero]
	s.Regions = len(w.regions)
	return s
}
