package snapshot

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/uffdrestore/uffdrestore/format"
)

// InfoReport summarises a snapshot.
type InfoReport struct {
	Version      int            `json:"version"`
	ChunkSize    int            `json:"chunk_size"`
	Chunks       int            `json:"chunks"`
	FileBytes    int64          `json:"file_bytes"`
	RawBytes     uint64         `json:"raw_bytes"`    // sum of region lengths
	StoredBytes  uint64         `json:"stored_bytes"` // chunk data on disk
	BackingBytes uint64         `json:"backing_bytes"`
	Ratio        float64        `json:"ratio"`         // raw / stored (0 if nothing stored)
	ZeroChunks   int            `json:"zero_chunks"`   // chunks not stored
	ZeroFraction float64        `json:"zero_fraction"` // zero-chunk bytes / raw bytes
	Codecs       map[string]int `json:"codecs"`        // chunks per codec
	Regions      []RegionInfo   `json:"regions"`
	Metadata     MetadataInfo   `json:"metadata"`
	Profiles     []ProfileInfo  `json:"profiles"`
	// Attachments are the typed blobs stored with the memory (SPEC.md
	// section 6), e.g. a QEMU VM's device state.
	Attachments []AttachmentInfo `json:"attachments"`
	// ChunkOrder is false when the chunk data was reordered (snapshot
	// reorder: a working set first).
	ChunkOrder bool `json:"chunk_order"`
}

// RegionInfo describes one region.
type RegionInfo struct {
	Name        string `json:"name"`
	Addr        uint64 `json:"addr"`
	Length      uint64 `json:"length"`
	Prot        string `json:"prot"` // "rwx" style
	FirstChunk  int    `json:"first_chunk"`
	Chunks      int    `json:"chunks"`
	StoredBytes uint64 `json:"stored_bytes"`
	ZeroChunks  int    `json:"zero_chunks"`
}

// AttachmentInfo describes one attachment (its data is not in the report).
type AttachmentInfo struct {
	Kind  string `json:"kind"`
	Bytes int    `json:"bytes"`
	CRC   uint32 `json:"crc32c"`
}

// MetadataInfo is the snapshot metadata.
type MetadataInfo struct {
	Created     *time.Time        `json:"created,omitempty"`
	Source      string            `json:"source"`
	ToolVersion string            `json:"tool_version"`
	Extra       map[string]string `json:"extra,omitempty"`
}

// ProtString formats PROT_* bits as "rwx" with dashes.
func ProtString(p uint32) string {
	b := []byte("---")
	if p&format.ProtRead != 0 {
		b[0] = 'r'
	}
	if p&format.ProtWrite != 0 {
		b[1] = 'w'
	}
	if p&format.ProtExec != 0 {
		b[2] = 'x'
	}
	return string(b)
}

// Info builds the report for r. It reads only the index.
func Info(r *format.Reader) InfoReport {
	rep := InfoReport{
		Version:      r.Version(),
		ChunkSize:    r.ChunkSize(),
		Chunks:       r.NumChunks(),
		FileBytes:    r.FileSize(),
		BackingBytes: r.TotalSize(),
		Codecs:       map[string]int{},
		Regions:      []RegionInfo{},
		Profiles:     []ProfileInfo{},
		Attachments:  []AttachmentInfo{},
	}
	var zeroBytes uint64
	for _, rg := range r.Regions() {
		ri := RegionInfo{Name: rg.Name, Addr: rg.Addr, Length: rg.Length, Prot: ProtString(rg.Prot),
			FirstChunk: int(rg.FirstChunk), Chunks: rg.NumChunks(r.ChunkSize())}
		for i := ri.FirstChunk; i < ri.FirstChunk+ri.Chunks; i++ {
			c := r.Chunk(i)
			rep.Codecs[c.Codec.String()]++
			ri.StoredBytes += uint64(c.StoredLen)
			if c.Codec == format.CodecZero {
				ri.ZeroChunks++
				zeroBytes += uint64(c.RawLen)
			}
		}
		rep.RawBytes += rg.Length
		rep.StoredBytes += ri.StoredBytes
		rep.ZeroChunks += ri.ZeroChunks
		rep.Regions = append(rep.Regions, ri)
	}
	if rep.StoredBytes > 0 {
		rep.Ratio = float64(rep.RawBytes) / float64(rep.StoredBytes)
	}
	if rep.RawBytes > 0 {
		rep.ZeroFraction = float64(zeroBytes) / float64(rep.RawBytes)
	}
	md := r.Metadata()
	rep.Metadata = MetadataInfo{Source: md.Source, ToolVersion: md.ToolVersion, Extra: md.Extra}
	if !md.Created.IsZero() {
		t := md.Created.UTC()
		rep.Metadata.Created = &t
	}
	for _, p := range r.Profiles() {
		rep.Profiles = append(rep.Profiles, SummarizeProfile(r, p, 0))
	}
	for _, a := range r.Attachments() {
		rep.Attachments = append(rep.Attachments, AttachmentInfo{Kind: a.Kind, Bytes: len(a.Data), CRC: format.Checksum(a.Data)})
	}
	rep.ChunkOrder = InChunkOrder(r)
	return rep
}

// HumanBytes formats n as B, KiB, MiB, GiB.
func HumanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), -1
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTP"[i])
}

// WriteText writes the report for people.
func (rep InfoReport) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "format version:  %d\n", rep.Version)
	fmt.Fprintf(&b, "chunk size:      %s\n", HumanBytes(uint64(rep.ChunkSize)))
	fmt.Fprintf(&b, "chunks:          %d (%s)\n", rep.Chunks, codecSummary(rep.Codecs))
	fmt.Fprintf(&b, "raw size:        %s (%d bytes)\n", HumanBytes(rep.RawBytes), rep.RawBytes)
	fmt.Fprintf(&b, "stored size:     %s (file %s)\n", HumanBytes(rep.StoredBytes), HumanBytes(uint64(rep.FileBytes)))
	if rep.Ratio > 0 {
		fmt.Fprintf(&b, "ratio:           %.2fx\n", rep.Ratio)
	}
	fmt.Fprintf(&b, "zero:            %.1f%% (%d chunks not stored)\n", 100*rep.ZeroFraction, rep.ZeroChunks)
	if rep.Metadata.Created != nil {
		fmt.Fprintf(&b, "created:         %s\n", rep.Metadata.Created.Format(time.RFC3339))
	}
	fmt.Fprintf(&b, "source:          %s\n", printable(rep.Metadata.Source))
	fmt.Fprintf(&b, "tool version:    %s\n", printable(rep.Metadata.ToolVersion))
	keys := make([]string, 0, len(rep.Metadata.Extra))
	for k := range rep.Metadata.Extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s: %s\n", printable(k), printable(rep.Metadata.Extra[k]))
	}
	if !rep.ChunkOrder {
		fmt.Fprintf(&b, "chunk data:      reordered (not in chunk order)\n")
	}
	for _, p := range rep.Profiles {
		fmt.Fprintf(&b, "profile:         %s\n", p.Text())
	}
	for _, a := range rep.Attachments {
		fmt.Fprintf(&b, "attachment:      %s, %s (crc32c %08x)\n", printable(a.Kind), HumanBytes(uint64(a.Bytes)), a.CRC)
	}
	fmt.Fprintf(&b, "regions:         %d\n", len(rep.Regions))
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "#\tADDRESS\tLENGTH\tPROT\tCHUNKS\tZERO\tSTORED\t NAME\n")
	for i, r := range rep.Regions {
		fmt.Fprintf(tw, "%d\t%#x\t%s\t%s\t%d\t%d\t%s\t %s\n", i, r.Addr, HumanBytes(r.Length), r.Prot, r.Chunks, r.ZeroChunks, HumanBytes(r.StoredBytes), printable(r.Name))
	}
	return tw.Flush()
}

// printable returns s, quoted if it has characters that are not printable
// (names come from the file, which may be hostile: no terminal escapes).
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

func codecSummary(m map[string]int) string {
	var parts []string
	for _, c := range []string{"zstd", "s2", "raw", "zero"} {
		if m[c] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", c, m[c]))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// Text is the profile on one line: name, entries, chunks and units covered,
// first and last first-touch times.
func (p ProfileInfo) Text() string {
	units := "units"
	if p.Units == 1 {
		units = "unit"
	}
	s := fmt.Sprintf("%s: %d entries, %d chunks (%s), %d %s of %s, first touch at %s, last at %s",
		printable(p.Name), p.Entries, p.Chunks, HumanBytes(p.CoveredBytes), p.Units, units, HumanBytes(uint64(p.UnitSize)),
		time.Duration(p.FirstNS), time.Duration(p.LastNS))
	if p.OutOfRange > 0 {
		s += fmt.Sprintf(", %d entries out of range", p.OutOfRange)
	}
	return s
}
