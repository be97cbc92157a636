package format

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"sort"
	"time"
)

// Section tags of the index (see SPEC.md).
const (
	secRegions  = 1
	secChunks   = 2
	secMetadata = 3
	secProfiles = 4

	secFlagCritical = 1 // a reader that does not know the tag must reject the file

	indexFixedSize    = 24
	sectionHeaderSize = 8
	regionFixedSize   = 26
	maxSections       = 64
	profileVersion    = 1
)

// index is the decoded index.
type index struct {
	chunkSize int
	regions   []Region
	// The chunk table, as the file has it: chunkEntrySize bytes an entry,
	// decoded on use (chunk). A parsed index's is a slice of the index it
	// was read from, so reading a snapshot writes no second copy of it (a
	// []Chunk of a 4 GiB snapshot is 64 KiB of fresh pages, a third of
	// Open's time there); a writer appends to it (appendChunk).
	table    []byte
	meta     Metadata
	profiles []Profile
	unknown  []rawSection // non-critical sections we do not know, kept verbatim

	attachments []Attachment
}

// numChunks is the number of chunks.
func (ix *index) numChunks() int { return len(ix.table) / chunkEntrySize }

// chunk is chunk-table entry i.
func (ix *index) chunk(i int) Chunk {
	return decodeChunk(ix.table[i*chunkEntrySize : (i+1)*chunkEntrySize])
}

// chunkList is the chunk table as a new slice.
func (ix *index) chunkList() []Chunk {
	out := make([]Chunk, ix.numChunks())
	for i := range out {
		out[i] = ix.chunk(i)
	}
	return out
}

// appendChunk appends c's chunk-table entry to table.
func appendChunk(table []byte, c Chunk) []byte {
	table = le.AppendUint64(table, c.Offset)
	table = le.AppendUint32(table, c.StoredLen)
	table = le.AppendUint32(table, c.RawLen)
	table = append(table, uint8(c.Codec), 0, 0, 0)
	table = le.AppendUint32(table, c.CRC)
	return le.AppendUint32(table, c.StoredCRC)
}

// decodeChunk decodes one chunk-table entry (chunkEntrySize bytes).
func decodeChunk(e []byte) Chunk {
	return Chunk{
		Offset:    le.Uint64(e[0:]),
		StoredLen: le.Uint32(e[8:]),
		RawLen:    le.Uint32(e[12:]),
		Codec:     Codec(e[16]),
		CRC:       le.Uint32(e[20:]),
		StoredCRC: le.Uint32(e[24:]),
	}
}

type rawSection struct {
	tag, flags uint16
	payload    []byte
}

var le = binary.LittleEndian

// ---- encoding ----

type enc struct{ b []byte }

func (e *enc) u8(v uint8)   { e.b = append(e.b, v) }
func (e *enc) u16(v uint16) { e.b = le.AppendUint16(e.b, v) }
func (e *enc) u32(v uint32) { e.b = le.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = le.AppendUint64(e.b, v) }
func (e *enc) str(s string) { e.u32(uint32(len(s))); e.b = append(e.b, s...) }
func (e *enc) name(s string) {
	e.u16(uint16(len(s)))
	e.b = append(e.b, s...)
}

// section starts a section and returns a function that patches its length.
func (e *enc) section(tag, flags uint16) func() {
	e.u16(tag)
	e.u16(flags)
	at := len(e.b)
	e.u32(0)
	return func() { le.PutUint32(e.b[at:], uint32(len(e.b)-at-4)) }
}

func checkName(what, s string) error {
	if len(s) > MaxNameLen {
		return fmt.Errorf("%w: %s name is %d bytes, limit %d", ErrTooLarge, what, len(s), MaxNameLen)
	}
	return nil
}

func encodeIndex(ix *index) ([]byte, error) {
	for _, r := range ix.regions {
		if err := checkName("region", r.Name); err != nil {
			return nil, err
		}
	}
	for _, p := range ix.profiles {
		if err := checkName("profile", p.Name); err != nil {
			return nil, err
		}
	}
	for _, s := range []string{ix.meta.Source, ix.meta.ToolVersion} {
		if len(s) > MaxStringLen {
			return nil, fmt.Errorf("%w: metadata string of %d bytes, limit %d", ErrTooLarge, len(s), MaxStringLen)
		}
	}
	for k, v := range ix.meta.Extra {
		if len(k) > MaxStringLen || len(v) > MaxStringLen {
			return nil, fmt.Errorf("%w: metadata key %.40q: longer than %d bytes", ErrTooLarge, k, MaxStringLen)
		}
	}
	if len(ix.meta.Extra) > MaxExtraKeys || len(ix.regions) > MaxRegions || len(ix.profiles) > MaxProfiles {
		return nil, fmt.Errorf("%w: too many regions, profiles or metadata keys", ErrTooLarge)
	}
	nc := ix.numChunks()
	e := &enc{b: make([]byte, 0, indexFixedSize+nc*chunkEntrySize+len(ix.regions)*64+256)}
	e.b = append(e.b, indexMagic[:]...)
	e.u16(1) // index layout version
	e.u16(0)
	e.u32(uint32(ix.chunkSize))
	e.u32(uint32(len(ix.regions)))
	e.u32(uint32(nc))
	nsec := 3
	for _, s := range ix.unknown {
		// A signature does not survive a new index: rewrites drop it.
		if s.tag != secAuth {
			nsec++
		}
	}
	if len(ix.profiles) > 0 {
		nsec++
	}
	if len(ix.attachments) > 0 {
		if err := checkAttachments(ix.attachments); err != nil {
			return nil, err
		}
		nsec++
	}
	e.u32(uint32(nsec))

	end := e.section(secRegions, secFlagCritical)
	for _, r := range ix.regions {
		e.u64(r.Addr)
		e.u64(r.Length)
		e.u32(r.Prot)
		e.u32(r.FirstChunk)
		e.name(r.Name)
	}
	end()

	end = e.section(secChunks, secFlagCritical)
	e.b = append(e.b, ix.table[:nc*chunkEntrySize]...)
	end()

	end = e.section(secMetadata, 0)
	var ns int64
	if !ix.meta.Created.IsZero() {
		ns = ix.meta.Created.UnixNano()
	}
	e.u64(uint64(ns))
	e.str(ix.meta.Source)
	e.str(ix.meta.ToolVersion)
	keys := make([]string, 0, len(ix.meta.Extra))
	for k := range ix.meta.Extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	e.u32(uint32(len(keys)))
	for _, k := range keys {
		e.str(k)
		e.str(ix.meta.Extra[k])
	}
	end()

	if len(ix.profiles) > 0 {
		end = e.section(secProfiles, 0)
		e.u16(profileVersion)
		e.u16(0)
		e.u32(uint32(len(ix.profiles)))
		for _, p := range ix.profiles {
			e.name(p.Name)
			e.u32(uint32(len(p.Entries)))
			for _, pe := range p.Entries {
				e.u32(pe.Chunk)
				e.u32(pe.Rank)
				e.u64(pe.TimeNS)
			}
		}
		end()
	}
	if len(ix.attachments) > 0 {
		encodeAttachments(e, ix.attachments)
	}
	for _, s := range ix.unknown {
		if s.tag == secAuth {
			continue
		}
		end = e.section(s.tag, s.flags)
		e.b = append(e.b, s.payload...)
		end()
	}
	if len(e.b) > MaxIndexSize {
		return nil, fmt.Errorf("%w: index of %d bytes, limit %d", ErrTooLarge, len(e.b), MaxIndexSize)
	}
	return e.b, nil
}

// ---- decoding ----

// dec reads little-endian fields from b, which starts at file offset base.
// The first failure is sticky.
type dec struct {
	b    []byte
	pos  int
	base int64
	err  error
}

func (d *dec) off() int64 { return d.base + int64(d.pos) }

func (d *dec) need(n int, field string) bool {
	if d.err != nil {
		return false
	}
	if n < 0 || len(d.b)-d.pos < n {
		d.err = corrupt(ErrCorrupt, field, d.off(), -1, "needs %d bytes, %d left in its section", n, len(d.b)-d.pos)
		return false
	}
	return true
}

func (d *dec) u8(field string) uint8 {
	if !d.need(1, field) {
		return 0
	}
	v := d.b[d.pos]
	d.pos++
	return v
}

func (d *dec) u16(field string) uint16 {
	if !d.need(2, field) {
		return 0
	}
	v := le.Uint16(d.b[d.pos:])
	d.pos += 2
	return v
}

func (d *dec) u32(field string) uint32 {
	if !d.need(4, field) {
		return 0
	}
	v := le.Uint32(d.b[d.pos:])
	d.pos += 4
	return v
}

func (d *dec) u64(field string) uint64 {
	if !d.need(8, field) {
		return 0
	}
	v := le.Uint64(d.b[d.pos:])
	d.pos += 8
	return v
}

func (d *dec) bytes(n uint64, limit int, field string) []byte {
	if d.err != nil {
		return nil
	}
	if n > uint64(limit) {
		d.err = corrupt(ErrTooLarge, field, d.off(), -1, "length %d exceeds limit %d", n, limit)
		return nil
	}
	if !d.need(int(n), field) {
		return nil
	}
	v := d.b[d.pos : d.pos+int(n)]
	d.pos += int(n)
	return v
}

func (d *dec) str(field string) string {
	n := d.u32(field + ".len")
	return string(d.bytes(uint64(n), MaxStringLen, field))
}

func (d *dec) name(field string) string {
	n := d.u16(field + ".len")
	return string(d.bytes(uint64(n), MaxNameLen, field))
}

func (d *dec) fail(sentinel error, field string, at int64, chunk int, format string, args ...any) {
	if d.err == nil {
		d.err = corrupt(sentinel, field, at, chunk, format, args...)
	}
}

// layout tells parseIndex where the data area is.
type layout struct {
	dataStart, dataEnd uint64 // stored chunk bytes must lie in [dataStart, dataEnd)
}

// parseIndex decodes and validates an index read from file offset base.
func parseIndex(b []byte, base int64, lay layout) (*index, error) {
	d := &dec{b: b, base: base}
	if len(b) < indexFixedSize {
		return nil, corrupt(ErrCorrupt, "index", base, -1, "index is %d bytes, minimum %d", len(b), indexFixedSize)
	}
	if [4]byte(b[:4]) != indexMagic {
		return nil, corrupt(ErrCorrupt, "index.magic", base, -1, "got %q, want %q", b[:4], indexMagic[:])
	}
	d.pos = 4
	if v := d.u16("index.version"); v != 1 {
		return nil, corrupt(ErrVersion, "index.version", base+4, -1, "index layout version %d, this reader knows 1", v)
	}
	if v := d.u16("index.reserved"); v != 0 {
		return nil, corrupt(ErrCorrupt, "index.reserved", base+6, -1, "must be zero, got %#x", v)
	}
	ix := &index{}
	cs := d.u32("index.chunk_size")
	if !validChunkSize(int(cs)) {
		return nil, corrupt(ErrCorrupt, "index.chunk_size", base+8, -1,
			"%d is not a power of two in [%d, %d]", cs, MinChunkSize, MaxChunkSize)
	}
	ix.chunkSize = int(cs)
	nreg := d.u32("index.region_count")
	nchunk := d.u32("index.chunk_count")
	nsec := d.u32("index.section_count")
	if nreg > MaxRegions || uint64(nreg)*regionFixedSize > uint64(len(b)) {
		return nil, corrupt(ErrTooLarge, "index.region_count", base+12, -1, "%d regions cannot fit in a %d-byte index", nreg, len(b))
	}
	if nchunk > MaxChunks || uint64(nchunk)*chunkEntrySize > uint64(len(b)) {
		return nil, corrupt(ErrTooLarge, "index.chunk_count", base+16, -1, "%d chunks cannot fit in a %d-byte index", nchunk, len(b))
	}
	if nsec > maxSections {
		return nil, corrupt(ErrTooLarge, "index.section_count", base+20, -1, "%d sections, limit %d", nsec, maxSections)
	}

	var seen [secAttachments + 1]bool
	type secRef struct {
		payload []byte
		base    int64
	}
	var secs [secAttachments + 1]secRef
	for i := uint32(0); i < nsec; i++ {
		at := d.off()
		tag := d.u16("index.section.tag")
		flags := d.u16("index.section.flags")
		n := d.u32("index.section.length")
		payloadAt := d.off()
		payload := d.bytes(uint64(n), len(b), fmt.Sprintf("index.section[tag %d].payload", tag))
		if d.err != nil {
			return nil, d.err
		}
		if flags&^secFlagCritical != 0 {
			return nil, corrupt(ErrCorrupt, "index.section.flags", at+2, -1, "unknown flag bits %#x", flags)
		}
		switch {
		case tag >= secRegions && tag <= secProfiles, tag == secAttachments:
			if seen[tag] {
				return nil, corrupt(ErrCorrupt, "index.section.tag", at, -1, "section %d appears twice", tag)
			}
			seen[tag] = true
			secs[tag] = secRef{payload, payloadAt}
		case flags&secFlagCritical != 0:
			return nil, corrupt(ErrVersion, "index.section.tag", at, -1, "unknown critical section %d: written by a newer uffdrestore", tag)
		default:
			ix.unknown = append(ix.unknown, rawSection{tag, flags, slices.Clone(payload)})
		}
	}
	if d.pos != len(b) {
		return nil, corrupt(ErrCorrupt, "index", d.off(), -1, "%d trailing bytes after the last section", len(b)-d.pos)
	}
	for _, t := range []int{secRegions, secChunks, secMetadata} {
		if !seen[t] {
			return nil, corrupt(ErrCorrupt, "index", base, -1, "required section %d missing", t)
		}
	}

	// Regions.
	rd := &dec{b: secs[secRegions].payload, base: secs[secRegions].base}
	ix.regions = make([]Region, 0, nreg)
	var next uint64 // next expected first chunk
	for i := uint32(0); i < nreg; i++ {
		f := fmt.Sprintf("index.regions[%d]", i)
		at := rd.off()
		r := Region{
			Addr:       rd.u64(f + ".addr"),
			Length:     rd.u64(f + ".length"),
			Prot:       rd.u32(f + ".prot"),
			FirstChunk: rd.u32(f + ".first_chunk"),
		}
		r.Name = rd.name(f + ".name")
		if rd.err != nil {
			return nil, rd.err
		}
		if r.Prot&^protMask != 0 {
			return nil, corrupt(ErrCorrupt, f+".prot", at+16, -1, "unknown protection bits %#x", r.Prot)
		}
		if uint64(r.FirstChunk) != next {
			return nil, corrupt(ErrCorrupt, f+".first_chunk", at+20, -1,
				"is %d, want %d: regions must cover the chunks contiguously, in order", r.FirstChunk, next)
		}
		left := uint64(nchunk) - next
		if r.Length > left*uint64(cs) {
			return nil, corrupt(ErrCorrupt, f+".length", at+8, -1,
				"%d bytes need more than the %d chunks left", r.Length, left)
		}
		if r.Addr != 0 && r.Addr > math.MaxUint64-r.Length {
			return nil, corrupt(ErrCorrupt, f+".addr", at, -1, "address %#x + length %#x overflows", r.Addr, r.Length)
		}
		next += uint64(r.NumChunks(int(cs)))
		ix.regions = append(ix.regions, r)
	}
	if rd.pos != len(rd.b) {
		return nil, corrupt(ErrCorrupt, "index.regions", rd.off(), -1, "%d trailing bytes", len(rd.b)-rd.pos)
	}
	if next != uint64(nchunk) {
		return nil, corrupt(ErrCorrupt, "index.chunk_count", base+16, -1, "is %d but the regions cover %d chunks", nchunk, next)
	}

	// Chunks.
	cp := secs[secChunks]
	if uint64(len(cp.payload)) != uint64(nchunk)*chunkEntrySize {
		return nil, corrupt(ErrCorrupt, "index.chunks", cp.base, -1,
			"section is %d bytes, want %d chunks x %d", len(cp.payload), nchunk, chunkEntrySize)
	}
	ix.table = cp.payload
	// Stored ranges may lie in any order (writers may order chunk data for
	// locality). While they come in chunk order, back to back or with gaps,
	// checking each against the previous one's end proves there is no
	// overlap; otherwise checkOverlap sorts them by offset once.
	prevEnd := lay.dataStart
	inOrder := true
	zc := zeroCRCs{}
	for ri, r := range ix.regions {
		n := r.NumChunks(int(cs))
		for j := 0; j < n; j++ {
			ci := int(r.FirstChunk) + j
			e := cp.payload[ci*chunkEntrySize : (ci+1)*chunkEntrySize]
			at := cp.base + int64(ci)*chunkEntrySize
			c := decodeChunk(e)
			want := uint64(cs)
			if j == n-1 {
				want = r.Length - uint64(j)*uint64(cs)
			}
			if uint64(c.RawLen) != want {
				return nil, corrupt(ErrCorrupt, chunkField(ci, ".raw_len"), at+12, ci,
					"is %d, want %d from region %d (%q) length %d", c.RawLen, want, ri, r.Name, r.Length)
			}
			if e[17] != 0 || e[18] != 0 || e[19] != 0 {
				return nil, corrupt(ErrCorrupt, chunkField(ci, ".reserved"), at+17, ci, "must be zero")
			}
			switch c.Codec {
			case CodecZero:
				if c.Offset != 0 || c.StoredLen != 0 || c.StoredCRC != 0 {
					return nil, corrupt(ErrCorrupt, chunkField(ci, ".stored_len"), at+8, ci,
						"zero chunk with offset %#x, stored length %d, stored crc %#x; want 0, 0, 0", c.Offset, c.StoredLen, c.StoredCRC)
				}
				if w := zc.get(c.RawLen); c.CRC != w {
					return nil, corrupt(ErrChecksum, chunkField(ci, ".crc"), at+20, ci, "zero chunk: want %#08x, got %#08x", w, c.CRC)
				}
				continue
			case CodecRaw:
				if c.StoredLen != c.RawLen {
					return nil, corrupt(ErrCorrupt, chunkField(ci, ".stored_len"), at+8, ci, "raw chunk: stored length %d != raw length %d", c.StoredLen, c.RawLen)
				}
				if c.StoredCRC != c.CRC {
					return nil, corrupt(ErrCorrupt, chunkField(ci, ".stored_crc"), at+24, ci, "raw chunk: stored crc %#08x != crc %#08x", c.StoredCRC, c.CRC)
				}
			case CodecZstd, CodecS2:
				if c.StoredLen == 0 || c.StoredLen >= c.RawLen {
					return nil, corrupt(ErrCorrupt, chunkField(ci, ".stored_len"), at+8, ci,
						"%s chunk: stored length %d must be in [1, %d)", c.Codec, c.StoredLen, c.RawLen)
				}
			default:
				return nil, corrupt(ErrCorrupt, chunkField(ci, ".codec"), at+16, ci, "unknown codec %d", uint8(c.Codec))
			}
			if c.Offset < lay.dataStart || c.Offset > lay.dataEnd || uint64(c.StoredLen) > lay.dataEnd-c.Offset {
				return nil, corrupt(ErrCorrupt, chunkField(ci, ".offset"), at, ci,
					"stored range [%#x, %#x) is outside the data area [%#x, %#x)",
					c.Offset, c.Offset+uint64(c.StoredLen), lay.dataStart, lay.dataEnd)
			}
			if c.Offset < prevEnd {
				inOrder = false
			}
			prevEnd = c.Offset + uint64(c.StoredLen)
		}
	}

	if !inOrder {
		if err := checkOverlap(ix.chunkList(), cp.base); err != nil {
			return nil, err
		}
	}

	// Metadata.
	md := &dec{b: secs[secMetadata].payload, base: secs[secMetadata].base}
	ns := int64(md.u64("index.metadata.created"))
	if ns != 0 {
		ix.meta.Created = time.Unix(0, ns).UTC()
	}
	ix.meta.Source = md.str("index.metadata.source")
	ix.meta.ToolVersion = md.str("index.metadata.tool_version")
	nx := md.u32("index.metadata.extra_count")
	if md.err == nil && (nx > MaxExtraKeys || uint64(nx)*8 > uint64(len(md.b)-md.pos)) {
		md.fail(ErrTooLarge, "index.metadata.extra_count", md.off()-4, -1, "%d keys cannot fit", nx)
	}
	if md.err == nil && nx > 0 {
		ix.meta.Extra = make(map[string]string, nx)
		for i := uint32(0); i < nx && md.err == nil; i++ {
			at := md.off()
			k := md.str(fmt.Sprintf("index.metadata.extra[%d].key", i))
			v := md.str(fmt.Sprintf("index.metadata.extra[%d].value", i))
			if _, dup := ix.meta.Extra[k]; dup && md.err == nil {
				md.fail(ErrCorrupt, fmt.Sprintf("index.metadata.extra[%d].key", i), at, -1, "duplicate key %q", k)
			}
			ix.meta.Extra[k] = v
		}
	}
	if md.err == nil && md.pos != len(md.b) {
		md.fail(ErrCorrupt, "index.metadata", md.off(), -1, "%d trailing bytes", len(md.b)-md.pos)
	}
	if md.err != nil {
		return nil, md.err
	}

	// Profiles.
	if seen[secProfiles] {
		ps, err := parseProfiles(secs[secProfiles].payload, secs[secProfiles].base, nchunk)
		if err != nil {
			return nil, err
		}
		ix.profiles = ps
	}

	// Attachments.
	if seen[secAttachments] {
		as, err := parseAttachments(secs[secAttachments].payload, secs[secAttachments].base)
		if err != nil {
			return nil, err
		}
		ix.attachments = as
	}
	return ix, nil
}

// checkOverlap checks that no two chunks' stored ranges overlap, whatever
// their order in the file: it sorts the stored chunks by offset (one index
// slice, O(n log n)) and compares neighbours. Every stored range is already
// known to lie inside the data area and to be non-empty. base is the file
// offset of the chunk table, for the error.
func checkOverlap(chunks []Chunk, base int64) error {
	n := 0
	for i := range chunks {
		if chunks[i].Codec != CodecZero {
			n++
		}
	}
	order := make([]uint32, 0, n)
	for i := range chunks {
		if chunks[i].Codec != CodecZero {
			order = append(order, uint32(i))
		}
	}
	slices.SortFunc(order, func(a, b uint32) int {
		if oa, ob := chunks[a].Offset, chunks[b].Offset; oa != ob {
			return cmp.Compare(oa, ob)
		}
		return cmp.Compare(a, b)
	})
	for k := 1; k < len(order); k++ {
		p, c := chunks[order[k-1]], chunks[order[k]]
		if pend := p.Offset + uint64(p.StoredLen); c.Offset < pend {
			ci, pi := int(order[k]), int(order[k-1])
			return corrupt(ErrCorrupt, chunkField(ci, ".offset"), base+int64(ci)*chunkEntrySize, ci,
				"stored range [%#x, %#x) overlaps chunk %d's stored range [%#x, %#x)",
				c.Offset, c.Offset+uint64(c.StoredLen), pi, p.Offset, pend)
		}
	}
	return nil
}

func parseProfiles(b []byte, base int64, nchunk uint32) ([]Profile, error) {
	d := &dec{b: b, base: base}
	if v := d.u16("index.profiles.version"); d.err == nil && v != profileVersion {
		return nil, corrupt(ErrVersion, "index.profiles.version", base, -1, "profile encoding version %d, this reader knows %d", v, profileVersion)
	}
	d.u16("index.profiles.reserved")
	n := d.u32("index.profiles.count")
	if d.err != nil {
		return nil, d.err
	}
	if n > MaxProfiles || uint64(n)*6 > uint64(len(b)) {
		return nil, corrupt(ErrTooLarge, "index.profiles.count", base+4, -1, "%d profiles cannot fit in %d bytes", n, len(b))
	}
	ps := make([]Profile, 0, n)
	for i := uint32(0); i < n; i++ {
		f := fmt.Sprintf("index.profiles[%d]", i)
		p := Profile{Name: d.name(f + ".name")}
		ne := d.u32(f + ".entry_count")
		if d.err != nil {
			return nil, d.err
		}
		if uint64(ne)*profEntrySize > uint64(len(b)-d.pos) {
			return nil, corrupt(ErrCorrupt, f+".entry_count", d.off()-4, -1, "%d entries cannot fit in the %d bytes left", ne, len(b)-d.pos)
		}
		p.Entries = make([]ProfileEntry, ne)
		for j := range p.Entries {
			at := d.off()
			pe := ProfileEntry{Chunk: d.u32(""), Rank: d.u32(""), TimeNS: d.u64("")}
			if pe.Chunk >= nchunk {
				return nil, corrupt(ErrCorrupt, fmt.Sprintf("%s.entries[%d].chunk", f, j), at, -1, "chunk %d out of range (%d chunks)", pe.Chunk, nchunk)
			}
			p.Entries[j] = pe
		}
		ps = append(ps, p)
	}
	if d.pos != len(b) {
		return nil, corrupt(ErrCorrupt, "index.profiles", d.off(), -1, "%d trailing bytes", len(b)-d.pos)
	}
	return ps, nil
}

// zeroBlock is a small read-only all-zero block: zero detection and zero
// CRCs walk it again and again rather than a whole chunk of zeros. A
// chunk-sized zero array was read through its never-written pages, each
// mapped on its first read: on a 2-vCPU VM the first Open of a snapshot with
// a zero chunk (every process snapshot has some) took 8-9 ms in a fresh
// process against 0.4 ms later, the fault-handler helper's start included.
var zeroBlock [16 << 10]byte

// zeroChecksum is the CRC-32C of n zero bytes.
func zeroChecksum(n int) uint32 {
	var crc uint32
	for ; n > len(zeroBlock); n -= len(zeroBlock) {
		crc = updateChecksum(crc, zeroBlock[:])
	}
	return updateChecksum(crc, zeroBlock[:n])
}

// isZero reports whether b is all zero.
func isZero(b []byte) bool {
	for len(b) > len(zeroBlock) {
		if !bytes.Equal(b[:len(zeroBlock)], zeroBlock[:]) {
			return false
		}
		b = b[len(zeroBlock):]
	}
	return bytes.Equal(b, zeroBlock[:len(b)])
}

type zeroCRCs map[uint32]uint32

func (z zeroCRCs) get(n uint32) uint32 {
	if v, ok := z[n]; ok {
		return v
	}
	v := zeroChecksum(int(n))
	z[n] = v
	return v
}

// chunkField names a chunk table field for an error; built only on the error
// path, since an index may hold a million chunks.
func chunkField(ci int, field string) string { return fmt.Sprintf("index.chunks[%d]%s", ci, field) }
