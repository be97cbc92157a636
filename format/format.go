package format

import (
	"fmt"
	"hash/crc32"
	"strings"
	"time"
)

// Chunk sizes. A snapshot's chunk size is a power of two in
// [MinChunkSize, MaxChunkSize].
const (
	MinChunkSize     = 64 << 10
	MaxChunkSize     = 2 << 20
	DefaultChunkSize = 2 << 20
)

// Version is the format version this package writes and the only one it reads.
const Version = 1

// Fixed layout sizes and limits (see SPEC.md).
const (
	HeaderSize = 32 // v1 header length; readers accept [HeaderSize, MaxHeaderSize]
	FooterSize = 32

	MaxHeaderSize  = 4096
	MaxIndexSize   = 512 << 20 // index bytes; ~22M chunk entries
	MaxNameLen     = 4096      // region and profile names
	MaxStringLen   = 1 << 20   // metadata strings
	MaxRegions     = 1 << 20
	MaxProfiles    = 1 << 16
	MaxExtraKeys   = 1 << 16
	chunkEntrySize = 28
	profEntrySize  = 16
)

var (
	headerMagic = [8]byte{0x89, 'U', 'S', 'N', 'A', 'P', '\r', '\n'}
	footerMagic = [8]byte{0x89, 'U', 'S', 'E', 'N', 'D', '\r', '\n'}
	indexMagic  = [4]byte{'U', 'I', 'D', 'X'}
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the CRC-32C (Castagnoli) of b, the checksum used
// everywhere in the format.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Codec identifies how a chunk's bytes are stored.
type Codec uint8

// Codecs. CodecZero chunks are all zero and have no stored bytes.
const (
	CodecZero Codec = 0 // all-zero chunk, not stored
	CodecRaw  Codec = 1
	CodecZstd Codec = 2
	CodecS2   Codec = 3

	numCodecs = 4
)

func (c Codec) String() string {
	switch c {
	case CodecZero:
		return "zero"
	case CodecRaw:
		return "raw"
	case CodecZstd:
		return "zstd"
	case CodecS2:
		return "s2"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// ParseCodec parses a codec name as given on a command line: "zstd", "s2",
// "none" or "raw" (store uncompressed).
func ParseCodec(s string) (Codec, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "zstd":
		return CodecZstd, nil
	case "s2":
		return CodecS2, nil
	case "none", "raw":
		return CodecRaw, nil
	}
	return 0, fmt.Errorf("%w: unknown codec %q (want zstd, s2 or none)", ErrInvalid, s)
}

// Protection bits of a region, as in mmap(2).
const (
	ProtRead  = 1
	ProtWrite = 2
	ProtExec  = 4
	protMask  = ProtRead | ProtWrite | ProtExec
)

// Region is a named, contiguous range of the snapshot's logical backing. It
// starts on a chunk boundary: it occupies chunks
// [FirstChunk, FirstChunk+NumChunks(chunkSize)).
type Region struct {
	Name       string
	Addr       uint64 // original virtual address, 0 if unknown
	Length     uint64 // bytes
	Prot       uint32
	FirstChunk uint32
}

// NumChunks returns the number of chunks the region occupies.
func (r Region) NumChunks(chunkSize int) int {
	if chunkSize <= 0 {
		return 0
	}
	cs := uint64(chunkSize)
	return int(r.Length/cs + min(r.Length%cs, 1))
}

// Chunk is one chunk-table entry.
type Chunk struct {
	Offset    uint64 // file offset of stored bytes (0 for zero chunks)
	StoredLen uint32
	RawLen    uint32
	Codec     Codec
	CRC       uint32 // CRC-32C (Castagnoli) of the RawLen uncompressed bytes
	StoredCRC uint32 // CRC-32C of the StoredLen stored bytes (= CRC for raw, 0 for zero chunks)
}

// Metadata describes where a snapshot came from.
type Metadata struct {
	Created     time.Time
	Source      string
	ToolVersion string
	Extra       map[string]string
}

// Profile is a named working-set profile: the chunks a workload touched, in
// first-touch order.
type Profile struct {
	Name    string
	Entries []ProfileEntry
}

// ProfileEntry records the first touch of one chunk.
type ProfileEntry struct {
	Chunk  uint32 // chunk index
	Rank   uint32 // first-touch rank, 0 = first
	TimeNS uint64 // first-touch time, ns since the start of the recording
}

func validChunkSize(n int) bool {
	return n >= MinChunkSize && n <= MaxChunkSize && n&(n-1) == 0
}
