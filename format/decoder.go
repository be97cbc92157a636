package format

import (
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// Decoder decodes chunks of one Reader. Use one per worker goroutine and
// reuse it: it owns a stored-bytes buffer of one chunk and, once a zstd chunk
// is seen, one single-threaded zstd decoder whose memory is capped at the
// chunk size. A Decoder is not safe for concurrent use.
type Decoder struct {
	r      *Reader
	buf    []byte
	zd     *zstd.Decoder
	closed bool
}

// NewDecoder returns a Decoder for r's chunks.
func (r *Reader) NewDecoder() *Decoder { return &Decoder{r: r} }

// Close releases the decoder's resources. The Decoder must not be used after.
func (d *Decoder) Close() {
	if d.zd != nil {
		d.zd.Close()
		d.zd = nil
	}
	d.buf = nil
	d.closed = true
}

func (d *Decoder) check(i int, dst []byte) (Chunk, error) {
	if d.closed {
		return Chunk{}, ErrClosed
	}
	if i < 0 || i >= d.r.ix.numChunks() {
		return Chunk{}, fmt.Errorf("%w: chunk %d out of range (%d chunks)", ErrInvalid, i, d.r.ix.numChunks())
	}
	c := d.r.ix.chunk(i)
	if len(dst) < int(c.RawLen) {
		return Chunk{}, fmt.Errorf("%w: chunk %d: destination is %d bytes, need %d", ErrInvalid, i, len(dst), c.RawLen)
	}
	return c, nil
}

// DecodeChunk reads chunk i, decompresses it into dst[:RawLen] and verifies
// its CRC-32C. len(dst) must be at least Chunk(i).RawLen. A raw chunk is read
// straight into dst, a zero chunk zero-fills dst[:RawLen]. dst may be
// partially written when an error is returned. It does not allocate in
// steady state.
func (d *Decoder) DecodeChunk(i int, dst []byte) error {
	c, err := d.check(i, dst)
	if err != nil {
		return err
	}
	switch c.Codec {
	case CodecZero:
		clear(dst[:c.RawLen])
		return nil
	case CodecRaw:
		if err := readFull(d.r.ra, dst[:c.RawLen], int64(c.Offset), "", i); err != nil {
			return err
		}
		if err := d.r.checkHash(i, dst[:c.RawLen]); err != nil {
			clear(dst[:c.RawLen])
			return err
		}
		return d.verify(i, c, dst[:c.RawLen])
	}
	if cap(d.buf) < int(c.StoredLen) {
		if d.buf = takeWarmBuf(d.r.ix.chunkSize); d.buf == nil {
			d.buf = make([]byte, d.r.ix.chunkSize) // StoredLen < RawLen <= chunk size
		}
	}
	stored := d.buf[:c.StoredLen]
	if err := readFull(d.r.ra, stored, int64(c.Offset), "", i); err != nil {
		return err
	}
	return d.decode(i, c, stored, dst)
}

// DecodeStored decompresses stored, the already-read stored bytes of chunk i
// (len(stored) must be Chunk(i).StoredLen), into dst[:RawLen] and verifies
// the CRC-32C. Use it when several chunks' stored bytes are read at once.
func (d *Decoder) DecodeStored(i int, stored []byte, dst []byte) error {
	c, err := d.check(i, dst)
	if err != nil {
		return err
	}
	if len(stored) != int(c.StoredLen) {
		return fmt.Errorf("%w: chunk %d: %d stored bytes given, chunk has %d", ErrInvalid, i, len(stored), c.StoredLen)
	}
	switch c.Codec {
	case CodecZero:
		clear(dst[:c.RawLen])
		return nil
	case CodecRaw:
		if err := d.r.checkHash(i, stored); err != nil {
			return err
		}
		copy(dst, stored)
		return d.verify(i, c, dst[:c.RawLen])
	}
	return d.decode(i, c, stored, dst)
}

// warm holds what Prewarm made ahead for chunks of warm.size bytes: zstd
// decoders and stored-bytes buffers with their pages touched.
var warm struct {
	sync.Mutex
	size int
	zds  []*zstd.Decoder
	bufs [][]byte
}

// Prewarm makes n zstd decoders and n stored-bytes buffers for chunks of
// chunkSize bytes ahead, with their memory touched; the next Decoders of
// a snapshot with that chunk size take them instead of making their own on
// their first chunk. For a process that will restore soon but does not know
// the snapshot yet (a fault-handler helper waiting for its job): in a fresh
// process the first decode otherwise pays several milliseconds for these.
func Prewarm(chunkSize, n int) { PrewarmUntil(chunkSize, n, nil) }

// PrewarmUntil is Prewarm that stops early, between decoders, once stop
// (if not nil) returns true: a process whose restore began has better use
// for its cores.
func PrewarmUntil(chunkSize, n int, stop func() bool) {
	stopped := func() bool { return stop != nil && stop() }
	if stopped() {
		return
	}
	// One chunk-sized frame, decoded once by each decoder made: a decoder
	// makes its block buffers on its first frame, and the pages of those
	// and of the destination get touched.
	frame := warmFrame(chunkSize)
	var dst []byte
	if frame != nil {
		dst = make([]byte, chunkSize)
		touchPages(dst)
	}
	for k := 0; k < n && !stopped(); k++ {
		zd, err := newZstdDecoder(chunkSize)
		if err != nil {
			return
		}
		if frame != nil {
			zd.DecodeAll(frame, dst[:0])
		}
		buf := make([]byte, chunkSize)
		touchPages(buf)
		warm.Lock()
		if warm.size != chunkSize {
			for _, z := range warm.zds {
				z.Close()
			}
			warm.size, warm.zds, warm.bufs = chunkSize, nil, nil
		}
		warm.zds, warm.bufs = append(warm.zds, zd), append(warm.bufs, buf)
		warm.Unlock()
	}
}

// warmFrame is a zstd frame of chunkSize bytes shaped like memory (runs of
// text, of zeros and of noise, so every kind of block and sequence is
// decoded), as the writer encodes chunks; nil if it cannot be made.
func warmFrame(chunkSize int) []byte {
	raw := make([]byte, chunkSize)
	x := uint32(2463534242)
	const text = "restore the snapshot lazily, one chunk at a time; "
	for off := 0; off < len(raw); off += 4096 {
		page := raw[off:min(off+4096, len(raw))]
		switch off / 4096 % 4 {
		case 0, 1:
			for i := range page {
				page[i] = text[(i+off/4096)%len(text)]
			}
		case 2:
			for i := range page {
				x ^= x << 13
				x ^= x >> 17
				x ^= x << 5
				page[i] = byte(x)
			}
		}
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderCRC(false), zstd.WithSingleSegment(true), zstd.WithWindowSize(windowFor(chunkSize)))
	if err != nil {
		return nil
	}
	defer enc.Close()
	return enc.EncodeAll(raw, nil)
}

func takeWarmZstd(chunkSize int) *zstd.Decoder {
	warm.Lock()
	defer warm.Unlock()
	if warm.size != chunkSize || len(warm.zds) == 0 {
		return nil
	}
	zd := warm.zds[len(warm.zds)-1]
	warm.zds = warm.zds[:len(warm.zds)-1]
	return zd
}

func takeWarmBuf(chunkSize int) []byte {
	warm.Lock()
	defer warm.Unlock()
	if warm.size != chunkSize || len(warm.bufs) == 0 {
		return nil
	}
	b := warm.bufs[len(warm.bufs)-1]
	warm.bufs = warm.bufs[:len(warm.bufs)-1]
	return b
}

func newZstdDecoder(chunkSize int) (*zstd.Decoder, error) {
	zd, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(uint64(chunkSize)),
		zstd.WithDecoderMaxWindow(uint64(chunkSize)),
		zstd.WithDecodeAllCapLimit(true),
		zstd.IgnoreChecksum(true))
	if err != nil {
		return nil, fmt.Errorf("format: zstd decoder: %w", err)
	}
	return zd, nil
}

func (d *Decoder) decode(i int, c Chunk, stored, dst []byte) error {
	if err := d.r.checkHash(i, stored); err != nil {
		return err
	}
	if got := Checksum(stored); got != c.StoredCRC {
		return corrupt(ErrChecksum, "stored bytes", int64(c.Offset), i, "want %#08x, got %#08x", c.StoredCRC, got)
	}
	raw := int(c.RawLen)
	out := dst[:0:raw]
	switch c.Codec {
	case CodecZstd:
		if d.zd == nil {
			zd := takeWarmZstd(d.r.ix.chunkSize)
			if zd == nil {
				var err error
				if zd, err = newZstdDecoder(d.r.ix.chunkSize); err != nil {
					return err
				}
			}
			d.zd = zd
		}
		var err error
		out, err = d.zd.DecodeAll(stored, out)
		if err != nil {
			return corrupt(ErrCorrupt, "", int64(c.Offset), i, "zstd: %v", err)
		}
	case CodecS2:
		n, err := s2.DecodedLen(stored)
		if err != nil {
			return corrupt(ErrCorrupt, "", int64(c.Offset), i, "s2: %v", err)
		}
		if n != raw {
			return corrupt(ErrCorrupt, "", int64(c.Offset), i, "s2: decoded length %d, want %d", n, raw)
		}
		out, err = s2.Decode(dst[:raw], stored)
		if err != nil {
			return corrupt(ErrCorrupt, "", int64(c.Offset), i, "s2: %v", err)
		}
	default:
		return corrupt(ErrCorrupt, "", int64(c.Offset), i, "unknown codec %d", uint8(c.Codec))
	}
	if len(out) != raw {
		return corrupt(ErrCorrupt, "", int64(c.Offset), i, "%s: decoded %d bytes, want %d", c.Codec, len(out), raw)
	}
	if &out[0] != &dst[0] {
		return corrupt(ErrCorrupt, "", int64(c.Offset), i, "%s: decoder did not decode in place", c.Codec)
	}
	return d.verify(i, c, out)
}

func (d *Decoder) verify(i int, c Chunk, b []byte) error {
	if got := Checksum(b); got != c.CRC {
		return corrupt(ErrChecksum, "", int64(c.Offset), i, "want %#08x, got %#08x", c.CRC, got)
	}
	return nil
}

// touchPages makes b's pages present by having the kernel write them (a
// read of /dev/zero) and then user space (a byte of each). On a VM a page's
// first access in each of the two modes can cost several microseconds more
// than the next: measured on a 2-vCPU VM, a fresh 2 MiB buffer written
// from user space only took 1.0-1.4 ms longer for its first 500 KB pread;
// written by the kernel only, its first checksum took 1 ms longer; written
// by both, neither did. A chunk's stored bytes are read into the buffer by
// the kernel and then checked and decoded from user space.
func touchPages(b []byte) {
	if f, err := os.Open("/dev/zero"); err == nil {
		io.ReadFull(f, b)
		f.Close()
	}
	for i := 0; i < len(b); i += 4096 {
		b[i] = 0
	}
}
